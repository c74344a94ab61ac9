package idemclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// retryableStatus reports whether a response that is not a replay asks
// to be retried.
func retryableStatus(resp *http.Response) bool {
	switch code := resp.StatusCode; {
	case code == http.StatusConflict:
		// The middleware's "still running" answer carries Retry-After; an
		// application's own conflict does not, and is final.
		return resp.Header.Get("Retry-After") != ""
	case code == http.StatusRequestTimeout, code == http.StatusTooManyRequests:
		return true
	case code >= 500 && code <= 599:
		return true
	}
	return false
}

// transientMessages are errors of net/http that have no type to test for
// and mean that a connection broke under the request.
var transientMessages = []string{
	"server closed idle connection",
	"transport connection broken",
	"http2: client connection lost",
	"http2: server sent GOAWAY",
	"REFUSED_STREAM",
}

// retryableError reports whether err, returned by a RoundTripper, is a
// connection error after which the request may or may not have reached the
// server, and may succeed when sent again.
func retryableError(err error) bool {
	var (
		verify   *tls.CertificateVerificationError
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		record   tls.RecordHeaderError
		dns      *net.DNSError
		netErr   net.Error
	)
	switch {
	case errors.As(err, &verify), errors.As(err, &unknown), errors.As(err, &hostname),
		errors.As(err, &invalid), errors.As(err, &record):
		return false // sending again fails the same way
	case errors.As(err, &dns):
		return !dns.IsNotFound
	case errors.As(err, &netErr):
		return true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EPIPE):
		return true
	}
	msg := err.Error()
	for _, m := range transientMessages {
		if strings.Contains(msg, m) {
			return true
		}
	}
	return false
}

// backoff returns the jittered wait after attempt n (1 for the first):
// uniform in [0, min(maxDelay, baseDelay·2^(n-1))].
func (t *Transport) backoff(n int) time.Duration {
	ceiling := t.cfg.maxDelay
	if shift := n - 1; shift < 62 {
		if d := t.cfg.baseDelay << shift; d > 0 && d>>shift == t.cfg.baseDelay && d < ceiling {
			ceiling = d
		}
	}
	return time.Duration(t.cfg.jitter(int64(ceiling) + 1))
}

// retryAfter parses a Retry-After header: delay-seconds or an HTTP date.
func retryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	v := strings.TrimSpace(h.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		if secs > int64(365*24*time.Hour/time.Second) {
			secs = int64(365 * 24 * time.Hour / time.Second) // far past any budget
		}
		return time.Duration(secs) * time.Second, true
	}
	if at, err := http.ParseTime(v); err == nil {
		d := at.Sub(now)
		if d < 0 {
			d = 0
		}
		return d, true
	}
	return 0, false
}
