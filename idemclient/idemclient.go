// Package idemclient is the client half of the idempotency middleware: an
// [http.RoundTripper] that gives every POST and PATCH an Idempotency-Key
// and retries it safely, so that a request whose outcome is unknown (the
// connection broke, the server was busy or briefly down) is executed by the
// server exactly once and the caller gets the original response.
//
//	client, err := idemclient.NewClient(nil) // wraps http.DefaultTransport
//	if err != nil {
//		return err
//	}
//	resp, err := client.Post(url, "application/json", strings.NewReader(`{"name":"Hall"}`))
//	if err != nil {
//		return err
//	}
//	defer resp.Body.Close()
//	res, _ := idemclient.ResultOf(resp) // res.Attempts, res.Replayed, res.Key
//
// # Keys
//
// A request that already carries the key header is sent with the caller's
// key, never changed. Otherwise the transport sets one, chosen once per
// request and kept for every attempt: the key in the request's context
// ([ContextWithKey]) if any, else the one [WithKeyFunc] derives, else a
// random one. A random key protects the retries made by this transport; to
// protect a request that is re-sent by a later process or another worker
// (a job queue redelivering a job), derive the key from the job.
//
// # Retries
//
// An attempt is retried, with the same key and a byte-identical body, when
// it ends in
//
//   - a connection error, where the request may or may not have reached the
//     server: refused, reset or dropped connections, EOFs, timeouts ([net.Error]);
//   - 409 with Retry-After: the middleware's answer while the first request
//     with the key still runs (a 409 without Retry-After is an
//     application's own conflict and is returned);
//   - 408, 429, or any 5xx, 503 included.
//
// It is not retried on any other status (400, 401, 403, 404, 413 and 422
// among them), on a response marked as a replay (the server's final
// answer), on TLS certificate errors, unknown hosts or errors the transport
// does not recognise as connection errors, nor once the request's context
// has ended. Waits follow capped exponential backoff with full jitter
// ([WithBackoff]); a Retry-After longer than the backoff is honoured. The
// number of attempts ([WithMaxAttempts]) and the time they take
// ([WithBudget]) are bounded, and when the next wait would overrun the
// budget the transport returns the response it has instead of sleeping.
// Responses it discards are drained (a bounded amount) and closed; the
// response it returns is untouched, its body unread.
//
// Bodies are re-sent through the request's GetBody when it has one, and
// otherwise buffered in memory up to [WithMaxBodyBytes] (more fails with
// [ErrBodyTooLarge] before anything is sent).
//
// # Go's own retries
//
// [http.Transport] re-sends a request by itself when a keep-alive
// connection it reused turns out to be broken: always when nothing was
// written yet, and, once the request was written, only for requests it
// considers replayable, which include any request carrying an
// Idempotency-Key or X-Idempotency-Key header with a body it can rewind.
// Every request this transport sends carries the key and a GetBody, so
// Go's retry applies to them too. The two layers add up, they do not
// multiply: Go's retry happens inside one attempt of this transport
// (the attempt then succeeds or fails as a whole and counts once), goes out
// with the same key and body, and only ever on a fresh connection, so a
// server running the idempotency middleware executes the request once
// whichever layer re-sent it. Attempts counted by this package are calls to
// the wrapped RoundTripper; the server may see a few more HTTP requests.
//
// Requests whose method is not protected ([WithMethods]) pass through
// untouched: no key, no retries.
package idemclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Errors returned by [Transport.RoundTrip], possibly wrapped (and wrapped
// again in a [*url.Error] by [http.Client]); test for them with
// [errors.Is].
var (
	// ErrInvalidKey: the key from the context or the key function is
	// empty, too long or not printable ASCII without spaces, quotes or
	// commas. Nothing was sent.
	ErrInvalidKey = errors.New("idemclient: invalid idempotency key")

	// ErrBodyTooLarge: the request has no GetBody and its body is longer
	// than the transport buffers to re-send it. Nothing was sent.
	ErrBodyTooLarge = errors.New("idemclient: request body too large to buffer for retries")

	// ErrGaveUp: every attempt failed with a connection error and the
	// transport stopped retrying (attempts or budget used up). It wraps
	// the last attempt's error too.
	ErrGaveUp = errors.New("idemclient: gave up retrying")
)

// drainLimit bounds how much of a discarded response body is read so that
// its connection can be reused; a longer body is closed unread.
const drainLimit = 64 << 10

// Transport is an [http.RoundTripper] that sets an idempotency key on
// POST and PATCH requests and retries them (see the package documentation).
// Create it with [New]; the zero value is not usable. It is safe for
// concurrent use.
type Transport struct {
	base http.RoundTripper
	cfg  config
}

var _ http.RoundTripper = (*Transport)(nil)

// New returns a Transport that sends requests through base, or through
// [http.DefaultTransport] when base is nil. It fails when an option is
// invalid.
func New(base http.RoundTripper, opts ...Option) (*Transport, error) {
	cfg := defaultConfig()
	for _, opt := range opts {
		if opt == nil {
			return nil, errors.New("idemclient: nil option")
		}
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	if base == nil {
		base = http.DefaultTransport
	}
	return &Transport{base: base, cfg: cfg}, nil
}

// NewClient returns an [http.Client] whose Transport is New(base, opts...).
// It fails when an option is invalid.
func NewClient(base http.RoundTripper, opts ...Option) (*http.Client, error) {
	t, err := New(base, opts...)
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: t}, nil
}

// CloseIdleConnections closes the idle connections of the wrapped
// RoundTripper, when it has such a method; [http.Client.CloseIdleConnections]
// calls it.
func (t *Transport) CloseIdleConnections() {
	if c, ok := t.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// Result is what the transport reports about one request, through
// [ResultOf].
type Result struct {
	// Key is the idempotency key the request was sent with, the caller's
	// or the one the transport chose.
	Key string

	// Attempts is the number of times the request was handed to the
	// wrapped RoundTripper, the first time included.
	Attempts int

	// Replayed reports whether the response carries the replay header:
	// the server answered from its record of an earlier attempt.
	Replayed bool
}

type resultKey struct{}

// ResultOf returns what the transport did to obtain resp. ok is false
// when resp did not come from a [Transport] or its request's method is not
// protected. The result travels in the context of resp.Request, which the
// transport sets to the request its last attempt sent; the body is not
// wrapped.
func ResultOf(resp *http.Response) (res Result, ok bool) {
	if resp == nil || resp.Request == nil {
		return Result{}, false
	}
	res, ok = resp.Request.Context().Value(resultKey{}).(Result)
	return res, ok
}

type contextKey struct{}

// ContextWithKey returns a copy of ctx that makes the transport send
// requests made with it under key, unless the request carries its own key
// header. Use it to tie a request to the operation it performs (a job ID,
// an order number): a re-sent request then carries the same key, however
// and wherever it is re-sent. One key must name one request: two different
// requests sent under the same key are answered 422 by the middleware.
// RoundTrip fails with [ErrInvalidKey] if key is not a valid key.
func ContextWithKey(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, contextKey{}, key)
}

// Attempt describes one attempt, for the observer set by [WithObserver].
type Attempt struct {
	// Request is the request this attempt sent, with its key header. Do
	// not read or modify it; its context is the caller's.
	Request *http.Request

	// Key is the idempotency key the request was sent with.
	Key string

	// Number is the attempt's number, 1 for the first.
	Number int

	// StatusCode is the response's status, 0 when the attempt failed with
	// an error.
	StatusCode int

	// Replayed reports whether the response was marked as a replay.
	Replayed bool

	// Err is the error of the wrapped RoundTripper, nil when it returned
	// a response.
	Err error

	// Duration is how long the wrapped RoundTripper took to answer.
	Duration time.Duration

	// Retry reports whether the transport makes another attempt after
	// Wait (unless the request's context ends first). When false, this
	// attempt's response or error goes to the caller.
	Retry bool

	// Wait is how long the transport waits before the next attempt; 0
	// when Retry is false.
	Wait time.Duration
}

// RoundTrip implements [http.RoundTripper]. For a protected method it
// sends req under an idempotency key, retrying as the package
// documentation describes, and returns the last response with its body
// unread; [ResultOf] tells how it was obtained. req itself is not
// modified, except that its body is read and closed.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req == nil {
		return nil, errors.New("idemclient: nil request")
	}
	if !t.cfg.methods[req.Method] {
		return t.base.RoundTrip(req)
	}
	key, callerKey, err := t.key(req)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	body, err := t.rewindable(req)
	if err != nil {
		return nil, err
	}
	ctx := req.Context()
	start := t.cfg.now()
	for n := 1; ; n++ {
		out := req.Clone(ctx)
		if out.Header == nil {
			out.Header = make(http.Header)
		}
		if !callerKey {
			out.Header.Set(t.cfg.keyHeader, key)
		}
		if err := body.attach(out, n); err != nil {
			return nil, fmt.Errorf("idemclient: rewinding the request body: %w", err)
		}

		sent := t.cfg.now()
		resp, err := t.base.RoundTrip(out)
		took := t.cfg.now().Sub(sent)

		a := Attempt{Request: out, Key: key, Number: n, Err: err, Duration: took}
		retry, wait := false, time.Duration(0)
		if err == nil {
			a.StatusCode = resp.StatusCode
			a.Replayed = resp.Header.Get(t.cfg.replayHeader) == "true"
			retry = !a.Replayed && retryableStatus(resp)
		} else {
			resp = nil // a RoundTripper returns a response or an error
			retry = ctx.Err() == nil && retryableError(err)
		}
		if retry {
			wait = t.backoff(n)
			if resp != nil {
				if ra, ok := retryAfter(resp.Header, t.cfg.now()); ok && ra > wait {
					wait = ra
				}
			}
			elapsed := t.cfg.now().Sub(start)
			retry = n < t.cfg.maxAttempts && elapsed+wait < t.cfg.budget && ctx.Err() == nil
		}
		if !retry {
			wait = 0
		}
		a.Retry, a.Wait = retry, wait
		if t.cfg.observer != nil {
			t.cfg.observer(a)
		}

		if !retry {
			if err != nil {
				if ctx.Err() == nil && retryableError(err) {
					return nil, fmt.Errorf("%w after %d attempts: %w", ErrGaveUp, n, err)
				}
				return nil, err
			}
			res := Result{Key: key, Attempts: n, Replayed: a.Replayed}
			resp.Request = out.WithContext(context.WithValue(ctx, resultKey{}, res))
			return resp, nil
		}
		discard(resp)
		if err := t.cfg.sleep(ctx, wait); err != nil {
			return nil, fmt.Errorf("idemclient: waiting to retry after %d attempts: %w", n, err)
		}
	}
}

// key returns the key req is sent with, and whether the caller set it.
func (t *Transport) key(req *http.Request) (key string, caller bool, err error) {
	if v := req.Header.Values(t.cfg.keyHeader); len(v) > 0 {
		return v[0], true, nil
	}
	if k, ok := req.Context().Value(contextKey{}).(string); ok {
		if err := validKey(k); err != nil {
			return "", false, err
		}
		return k, false, nil
	}
	if t.cfg.keyFunc != nil {
		k, err := t.cfg.keyFunc(req)
		if err != nil {
			return "", false, fmt.Errorf("idemclient: deriving the idempotency key: %w", err)
		}
		if k != "" {
			if err := validKey(k); err != nil {
				return "", false, err
			}
			return k, false, nil
		}
	}
	return randomKey(), false, nil
}

// validKey checks that key is one the middleware accepts in its bare form.
func validKey(key string) error {
	if key == "" {
		return fmt.Errorf("%w: empty", ErrInvalidKey)
	}
	if len(key) > MaxKeyLength {
		return fmt.Errorf("%w: longer than %d characters", ErrInvalidKey, MaxKeyLength)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e || c == '"' || c == ',' {
			return fmt.Errorf("%w: byte %#x at %d", ErrInvalidKey, c, i)
		}
	}
	return nil
}

// randomKey returns a random UUID, version 4.
func randomKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand, Go 1.24)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// body re-creates a request body for each attempt.
type body struct {
	orig    io.ReadCloser // the caller's body, used by the first attempt
	getBody func() (io.ReadCloser, error)
	length  int64
}

// rewindable prepares req's body to be sent several times: through
// GetBody, or buffered. On error, req's body is closed.
func (t *Transport) rewindable(req *http.Request) (body, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return body{}, nil
	}
	if req.GetBody != nil {
		return body{orig: req.Body, getBody: req.GetBody, length: req.ContentLength}, nil
	}
	defer req.Body.Close()
	if req.ContentLength > t.cfg.maxBodyBytes {
		return body{}, fmt.Errorf("%w: %d bytes, more than %d", ErrBodyTooLarge, req.ContentLength, t.cfg.maxBodyBytes)
	}
	buf, err := io.ReadAll(io.LimitReader(req.Body, t.cfg.maxBodyBytes+1))
	if err != nil {
		return body{}, fmt.Errorf("idemclient: reading the request body: %w", err)
	}
	if int64(len(buf)) > t.cfg.maxBodyBytes {
		return body{}, fmt.Errorf("%w: more than %d bytes", ErrBodyTooLarge, t.cfg.maxBodyBytes)
	}
	if len(buf) == 0 {
		return body{}, nil
	}
	get := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
	b, _ := get()
	return body{orig: b, getBody: get, length: int64(len(buf))}, nil
}

// attach gives out the body of attempt n.
func (b body) attach(out *http.Request, n int) error {
	if b.getBody == nil {
		out.Body, out.GetBody, out.ContentLength = http.NoBody, nil, 0
		return nil
	}
	rc := b.orig
	if n > 1 {
		var err error
		if rc, err = b.getBody(); err != nil {
			return err
		}
	}
	out.Body, out.GetBody, out.ContentLength = rc, b.getBody, b.length
	return nil
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// discard drains a bounded part of a response's body, so that its
// connection can be reused, and closes it.
func discard(resp *http.Response) {
	if resp == nil || resp.Body == nil {
		return
	}
	_, _ = io.CopyN(io.Discard, resp.Body, drainLimit)
	resp.Body.Close()
}
