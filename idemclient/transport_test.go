package idemclient_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/idemclient"
)

var (
	ok201   = step{status: http.StatusCreated, body: `{"id":"venue_1"}`}
	s503    = step{status: http.StatusServiceUnavailable, body: "down"}
	refused = step{err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}
	uuidV4  = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
)

func TestKeys(t *testing.T) {
	t.Run("random key, the same for every attempt, caller's request untouched", func(t *testing.T) {
		base := script(s503, s503, ok201)
		tr, _ := newTransport(t, base)
		req := post(t, context.Background(), `{"name":"Hall"}`)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		assert.Equal(t, `{"id":"venue_1"}`, readAll(t, resp))
		calls := base.calls()
		require.Len(t, calls, 3)
		assert.Regexp(t, uuidV4, calls[0].key)
		for _, c := range calls {
			assert.Equal(t, calls[0].key, c.key)
			assert.Equal(t, 1, c.keys)
		}
		assert.Empty(t, req.Header.Get("Idempotency-Key"), "the caller's request must not be modified")
		res, ok := idemclient.ResultOf(resp)
		require.True(t, ok)
		assert.Equal(t, idemclient.Result{Key: calls[0].key, Attempts: 3}, res)
	})

	t.Run("a new key per request", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base)
		for range 2 {
			resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
			require.NoError(t, err)
			readAll(t, resp)
		}
		calls := base.calls()
		require.Len(t, calls, 2)
		assert.NotEqual(t, calls[0].key, calls[1].key)
	})

	t.Run("the caller's key is never changed", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base, idemclient.WithKeyFunc(func(*http.Request) (string, error) { return "derived", nil }))
		req := post(t, idemclient.ContextWithKey(context.Background(), "from-context"), "{}")
		req.Header.Set("Idempotency-Key", `"caller's key, quoted"`)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		for _, c := range base.calls() {
			assert.Equal(t, `"caller's key, quoted"`, c.key)
			assert.Equal(t, 1, c.keys)
		}
	})

	t.Run("context key beats key function", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base, idemclient.WithKeyFunc(func(*http.Request) (string, error) { return "derived", nil }))
		resp, err := tr.RoundTrip(post(t, idemclient.ContextWithKey(context.Background(), "job-42"), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		for _, c := range base.calls() {
			assert.Equal(t, "job-42", c.key)
		}
	})

	t.Run("key function; empty means random", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base, idemclient.WithKeyFunc(func(r *http.Request) (string, error) {
			return r.Header.Get("X-Job-ID"), nil
		}))
		req := post(t, context.Background(), "{}")
		req.Header.Set("X-Job-ID", "job-7")
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		resp, err = tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		calls := base.calls()
		assert.Equal(t, "job-7", calls[0].key)
		assert.Regexp(t, uuidV4, calls[1].key)
	})

	t.Run("key function error: nothing sent, body closed", func(t *testing.T) {
		base := script(ok201)
		boom := errors.New("no job")
		tr, _ := newTransport(t, base, idemclient.WithKeyFunc(func(*http.Request) (string, error) { return "", boom }))
		body := &closeTracker{Reader: strings.NewReader("{}")}
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", body)
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		assert.ErrorIs(t, err, boom)
		assert.Empty(t, base.calls())
		assert.True(t, body.closed)
	})

	for _, bad := range []string{"", "has space", `quo"te`, "a,b", "clé", strings.Repeat("k", 256)} {
		t.Run(fmt.Sprintf("invalid key %.20q", bad), func(t *testing.T) {
			base := script(ok201)
			tr, _ := newTransport(t, base)
			_, err := tr.RoundTrip(post(t, idemclient.ContextWithKey(context.Background(), bad), "{}"))
			assert.ErrorIs(t, err, idemclient.ErrInvalidKey)
			tr, _ = newTransport(t, base, idemclient.WithKeyFunc(func(*http.Request) (string, error) { return bad, nil }))
			_, err = tr.RoundTrip(post(t, context.Background(), "{}"))
			if bad == "" {
				assert.NoError(t, err) // empty from the key function: a random key
			} else {
				assert.ErrorIs(t, err, idemclient.ErrInvalidKey)
			}
			assert.LessOrEqual(t, len(base.calls()), 1)
		})
	}

	t.Run("unprotected methods pass through", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base)
		req, err := http.NewRequest(http.MethodGet, "http://127.0.0.1:1/", nil)
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		readAll(t, resp)
		_, ok := idemclient.ResultOf(resp)
		assert.False(t, ok)
		require.Len(t, base.calls(), 1)
		assert.Empty(t, base.calls()[0].key)
	})

	t.Run("WithMethods and WithKeyHeader", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base, idemclient.WithMethods(http.MethodPut), idemclient.WithKeyHeader("X-Idempotency-Key"))
		req, err := http.NewRequest(http.MethodPut, "http://127.0.0.1:1/", strings.NewReader("x"))
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		require.Len(t, base.calls(), 2)
		assert.Empty(t, base.calls()[0].key, "Idempotency-Key is not the configured header")

		resp, err = tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		readAll(t, resp)
		assert.Len(t, base.calls(), 3, "POST is no longer protected: one call")
	})
}

func TestRetryStatus(t *testing.T) {
	retryAfter := http.Header{"Retry-After": {"1"}}
	replayed := http.Header{"X-Idempotent-Replayed": {"true"}}
	for _, tc := range []struct {
		status int
		header http.Header
		retry  bool
	}{
		{http.StatusOK, nil, false},
		{http.StatusCreated, nil, false},
		{http.StatusFound, nil, false},
		{http.StatusBadRequest, nil, false},
		{http.StatusUnauthorized, nil, false},
		{http.StatusForbidden, nil, false},
		{http.StatusNotFound, nil, false},
		{http.StatusConflict, nil, false}, // an application's conflict
		{http.StatusRequestEntityTooLarge, nil, false},
		{http.StatusUnprocessableEntity, nil, false},
		{http.StatusConflict, retryAfter, true}, // the middleware's "still running"
		{http.StatusRequestTimeout, nil, true},
		{http.StatusTooManyRequests, retryAfter, true},
		{http.StatusTooManyRequests, nil, true},
		{http.StatusInternalServerError, nil, true},
		{http.StatusBadGateway, nil, true},
		{http.StatusServiceUnavailable, retryAfter, true},
		{http.StatusGatewayTimeout, nil, true},
		{http.StatusInternalServerError, replayed, false}, // a stored 5xx is final
	} {
		t.Run(fmt.Sprintf("%d %v", tc.status, tc.header), func(t *testing.T) {
			base := script(step{status: tc.status, header: tc.header, body: "first"}, ok201)
			tr, _ := newTransport(t, base)
			resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
			require.NoError(t, err)
			body := readAll(t, resp)
			res, _ := idemclient.ResultOf(resp)
			if tc.retry {
				assert.Equal(t, http.StatusCreated, resp.StatusCode)
				assert.Equal(t, 2, res.Attempts)
				assert.Len(t, base.calls(), 2)
			} else {
				assert.Equal(t, tc.status, resp.StatusCode)
				assert.Equal(t, "first", body)
				assert.Equal(t, 1, res.Attempts)
				assert.Len(t, base.calls(), 1)
				assert.Equal(t, tc.header.Get("X-Idempotent-Replayed") == "true", res.Replayed)
			}
		})
	}
}

func TestRetryError(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		retry bool
	}{
		{"connection refused", refused.err, true},
		{"connection reset", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, true},
		{"EOF", io.EOF, true},
		{"unexpected EOF", fmt.Errorf("reading: %w", io.ErrUnexpectedEOF), true},
		{"broken pipe", os.NewSyscallError("write", syscall.EPIPE), true},
		{"idle connection closed", errors.New("http: server closed idle connection"), true},
		{"timeout", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, true},
		{"DNS temporary", &net.DNSError{Err: "server misbehaving", Name: "api", IsTemporary: true}, true},
		{"DNS not found", &net.DNSError{Err: "no such host", Name: "api", IsNotFound: true}, false},
		{"unknown authority", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, false},
		{"hostname", x509.HostnameError{Certificate: &x509.Certificate{}, Host: "api"}, false},
		{"not TLS", tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}, false},
		{"unsupported scheme", errors.New(`unsupported protocol scheme "ftp"`), false},
		{"canceled", context.Canceled, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := script(step{err: tc.err}, ok201)
			tr, _ := newTransport(t, base)
			resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
			if tc.retry {
				require.NoError(t, err)
				assert.Equal(t, http.StatusCreated, resp.StatusCode)
				readAll(t, resp)
				assert.Len(t, base.calls(), 2)
			} else {
				assert.ErrorIs(t, err, tc.err)
				assert.NotErrorIs(t, err, idemclient.ErrGaveUp)
				assert.Len(t, base.calls(), 1)
			}
		})
	}

	t.Run("gave up", func(t *testing.T) {
		base := script(refused)
		tr, _ := newTransport(t, base, idemclient.WithMaxAttempts(3))
		_, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		assert.ErrorIs(t, err, idemclient.ErrGaveUp)
		assert.ErrorIs(t, err, syscall.ECONNREFUSED)
		assert.ErrorContains(t, err, "after 3 attempts")
		assert.Len(t, base.calls(), 3)
	})

	t.Run("context ended", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		base := script(refused)
		tr, _ := newTransport(t, base, idemclient.WithObserver(func(idemclient.Attempt) { cancel() }))
		_, err := tr.RoundTrip(post(t, ctx, "{}"))
		assert.ErrorIs(t, err, context.Canceled)
		assert.Len(t, base.calls(), 1)
	})

	t.Run("context ended during the attempt", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		calls := 0
		base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			calls++
			cancel()
			return nil, refused.err
		})
		tr, _ := newTransport(t, base)
		_, err := tr.RoundTrip(post(t, ctx, "{}"))
		assert.ErrorIs(t, err, syscall.ECONNREFUSED)
		assert.NotErrorIs(t, err, idemclient.ErrGaveUp)
		assert.Equal(t, 1, calls)
	})
}

func TestBackoff(t *testing.T) {
	t.Run("exponential, capped", func(t *testing.T) {
		base := script(s503)
		tr, clock := newTransport(t, base, idemclient.WithMaxAttempts(7),
			idemclient.WithBackoff(100*time.Millisecond, time.Second), idemclient.WithBudget(time.Hour))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		readAll(t, resp)
		ms := time.Millisecond
		assert.Equal(t, []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1000 * ms, 1000 * ms}, clock.Waits())
	})

	t.Run("full jitter draws below the ceiling", func(t *testing.T) {
		var asked []int64
		base := script(s503, s503, ok201)
		tr, clock := newTransport(t, base, idemclient.WithBackoff(100*time.Millisecond, time.Second),
			idemclient.WithJitter(func(n int64) int64 { asked = append(asked, n); return n / 2 }))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		assert.Equal(t, []int64{int64(100*time.Millisecond) + 1, int64(200*time.Millisecond) + 1}, asked)
		assert.Equal(t, []time.Duration{50 * time.Millisecond, 100 * time.Millisecond}, clock.Waits())
	})

	t.Run("huge attempt numbers do not overflow", func(t *testing.T) {
		base := script(s503)
		tr, clock := newTransport(t, base, idemclient.WithMaxAttempts(100),
			idemclient.WithBackoff(time.Millisecond, time.Millisecond*3), idemclient.WithBudget(time.Hour))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		for _, w := range clock.Waits() {
			assert.True(t, w >= 0 && w <= 3*time.Millisecond, "wait %v", w)
		}
		assert.Len(t, base.calls(), 100)
	})
}

func TestRetryAfter(t *testing.T) {
	clockStart := newFakeClock().Now()
	for _, tc := range []struct {
		name  string
		value string
		want  time.Duration
	}{
		{"seconds", "3", 3 * time.Second},
		{"zero: the backoff", "0", 100 * time.Millisecond},
		{"shorter than the backoff", "0", 100 * time.Millisecond},
		{"HTTP date", clockStart.Add(5 * time.Second).Format(http.TimeFormat), 5 * time.Second},
		{"date in the past: the backoff", clockStart.Add(-time.Hour).Format(http.TimeFormat), 100 * time.Millisecond},
		{"garbage: the backoff", "soon", 100 * time.Millisecond},
		{"negative: the backoff", "-4", 100 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := script(step{status: http.StatusTooManyRequests, header: http.Header{"Retry-After": {tc.value}}}, ok201)
			tr, clock := newTransport(t, base)
			resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
			require.NoError(t, err)
			assert.Equal(t, http.StatusCreated, resp.StatusCode)
			readAll(t, resp)
			assert.Equal(t, []time.Duration{tc.want}, clock.Waits())
		})
	}
}

func TestBudget(t *testing.T) {
	t.Run("a Retry-After past the budget returns the response at once", func(t *testing.T) {
		base := script(step{status: http.StatusConflict, header: http.Header{"Retry-After": {"100"}}, body: "in flight"}, ok201)
		var seen []idemclient.Attempt
		tr, clock := newTransport(t, base, idemclient.WithBudget(30*time.Second),
			idemclient.WithObserver(func(a idemclient.Attempt) { seen = append(seen, a) }))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		assert.Equal(t, http.StatusConflict, resp.StatusCode)
		assert.Equal(t, "in flight", readAll(t, resp), "the returned body is unread")
		assert.Empty(t, clock.Waits())
		assert.Len(t, base.calls(), 1)
		require.Len(t, seen, 1)
		assert.False(t, seen[0].Retry)
		assert.Zero(t, seen[0].Wait)
	})

	t.Run("backoff stops at the budget", func(t *testing.T) {
		base := script(s503)
		tr, clock := newTransport(t, base, idemclient.WithMaxAttempts(100),
			idemclient.WithBackoff(400*time.Millisecond, 10*time.Second), idemclient.WithBudget(time.Second))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		// 400 ms, then 800 ms would end at 1.2 s, past the budget.
		assert.Equal(t, []time.Duration{400 * time.Millisecond}, clock.Waits())
		assert.Len(t, base.calls(), 2)
	})

	t.Run("slow attempts count against the budget", func(t *testing.T) {
		clock := newFakeClock()
		slow := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			clock.mu.Lock()
			clock.now = clock.now.Add(2 * time.Second)
			clock.mu.Unlock()
			return &http.Response{StatusCode: 503, Header: http.Header{}, Body: http.NoBody}, nil
		})
		tr, err := idemclient.New(slow, idemclient.WithClock(clock.Now, clock.Sleep), idemclient.WithJitter(maxJitter),
			idemclient.WithMaxAttempts(100), idemclient.WithBudget(5*time.Second))
		require.NoError(t, err)
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		res, _ := idemclient.ResultOf(resp)
		assert.Equal(t, 3, res.Attempts) // 2.1 s, 4.3 s, then 6.3 s + 0.4 s is past 5 s
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestDiscardedResponses(t *testing.T) {
	base := script(step{status: 503, body: strings.Repeat("x", 100)}, step{status: 502, body: strings.Repeat("y", 200<<10)}, step{status: 500, body: "last"})
	tr, _ := newTransport(t, base, idemclient.WithMaxAttempts(3))
	resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
	require.NoError(t, err)
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	require.Len(t, base.bodies, 3)
	assert.Same(t, base.bodies[2], resp.Body, "the returned body is the base's own, not wrapped")
	assert.False(t, base.bodies[2].closed.Load())
	assert.Equal(t, "last", readAll(t, resp))
	assert.True(t, base.bodies[0].closed.Load())
	assert.True(t, base.bodies[0].drained(), "a short discarded body is drained")
	assert.True(t, base.bodies[1].closed.Load())
	assert.False(t, base.bodies[1].drained(), "a long discarded body is closed unread past the limit")
}

func TestContextDuringWait(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	base := script(s503)
	tr, err := idemclient.New(base, idemclient.WithBackoff(time.Hour, time.Hour), idemclient.WithBudget(10*time.Hour),
		idemclient.WithObserver(func(a idemclient.Attempt) {
			if a.Retry {
				time.AfterFunc(10*time.Millisecond, cancel)
			}
		}), idemclient.WithJitter(maxJitter))
	require.NoError(t, err)
	start := time.Now()
	_, err = tr.RoundTrip(post(t, ctx, "{}"))
	assert.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(start), 5*time.Second, "the wait must end with the context")
	assert.Len(t, base.calls(), 1)
	require.Len(t, base.bodies, 1)
	assert.True(t, base.bodies[0].closed.Load())
}

func TestBody(t *testing.T) {
	t.Run("GetBody: the same bytes every attempt", func(t *testing.T) {
		base := script(s503, refused, ok201)
		tr, _ := newTransport(t, base)
		resp, err := tr.RoundTrip(post(t, context.Background(), `{"name":"Hall"}`))
		require.NoError(t, err)
		readAll(t, resp)
		for _, c := range base.calls() {
			assert.Equal(t, `{"name":"Hall"}`, c.body)
			assert.EqualValues(t, 15, c.length)
		}
	})

	t.Run("no GetBody: buffered, the same bytes every attempt", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base)
		body := &closeTracker{Reader: strings.NewReader(`{"name":"Barn"}`)}
		req, err := http.NewRequest(http.MethodPatch, "http://127.0.0.1:1/", body)
		require.NoError(t, err)
		require.Nil(t, req.GetBody)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		assert.True(t, body.closed, "RoundTrip closes the caller's body")
		calls := base.calls()
		require.Len(t, calls, 2)
		for _, c := range calls {
			assert.Equal(t, `{"name":"Barn"}`, c.body)
			assert.EqualValues(t, 15, c.length)
		}
	})

	t.Run("no body", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base)
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", nil)
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		assert.Len(t, base.calls(), 2)
	})

	t.Run("too large to buffer", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base, idemclient.WithMaxBodyBytes(10))
		body := &closeTracker{Reader: strings.NewReader(strings.Repeat("z", 11))}
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", body)
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		assert.ErrorIs(t, err, idemclient.ErrBodyTooLarge)
		assert.True(t, body.closed)
		assert.Empty(t, base.calls())
	})

	t.Run("declared too large: not read", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base, idemclient.WithMaxBodyBytes(10))
		body := &closeTracker{Reader: failingReader{}}
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", body)
		require.NoError(t, err)
		req.ContentLength = 1 << 30
		_, err = tr.RoundTrip(req)
		assert.ErrorIs(t, err, idemclient.ErrBodyTooLarge)
		assert.ErrorContains(t, err, "1073741824 bytes")
		assert.True(t, body.closed)
	})

	t.Run("exactly the cap is fine", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base, idemclient.WithMaxBodyBytes(10))
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", io.NopCloser(strings.NewReader("0123456789")))
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		assert.Equal(t, "0123456789", base.calls()[0].body)
	})

	t.Run("unreadable body", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base)
		req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", &closeTracker{Reader: failingReader{}})
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		assert.ErrorContains(t, err, "reading the request body")
		assert.Empty(t, base.calls())
	})

	t.Run("GetBody failing on a retry", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base)
		req := post(t, context.Background(), "{}")
		req.GetBody = func() (io.ReadCloser, error) { return nil, errors.New("gone") }
		_, err := tr.RoundTrip(req)
		assert.ErrorContains(t, err, "gone")
		assert.Len(t, base.calls(), 1)
	})
}

type closeTracker struct {
	io.Reader
	closed bool
}

func (c *closeTracker) Close() error { c.closed = true; return nil }

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("disk on fire") }

func TestObserver(t *testing.T) {
	base := script(refused, step{status: 409, header: http.Header{"Retry-After": {"1"}}}, ok201)
	var seen []idemclient.Attempt
	tr, clock := newTransport(t, base, idemclient.WithObserver(func(a idemclient.Attempt) { seen = append(seen, a) }))
	resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
	require.NoError(t, err)
	readAll(t, resp)
	require.Len(t, seen, 3)
	key := base.calls()[0].key
	for i, a := range seen {
		assert.Equal(t, i+1, a.Number)
		assert.Equal(t, key, a.Key)
		assert.Equal(t, key, a.Request.Header.Get("Idempotency-Key"))
	}
	assert.Error(t, seen[0].Err)
	assert.Zero(t, seen[0].StatusCode)
	assert.True(t, seen[0].Retry)
	assert.Equal(t, 409, seen[1].StatusCode)
	assert.True(t, seen[1].Retry)
	assert.Equal(t, time.Second, seen[1].Wait, "Retry-After beats the shorter backoff")
	assert.Equal(t, 201, seen[2].StatusCode)
	assert.False(t, seen[2].Retry)
	assert.Equal(t, []time.Duration{seen[0].Wait, seen[1].Wait}, clock.Waits())
}

func TestOptions(t *testing.T) {
	for name, opt := range map[string]idemclient.Option{
		"no methods":        idemclient.WithMethods(),
		"bad method":        idemclient.WithMethods("PO ST"),
		"empty key header":  idemclient.WithKeyHeader(""),
		"bad key header":    idemclient.WithKeyHeader("Idempotency Key"),
		"bad replay header": idemclient.WithReplayHeader("a:b"),
		"nil key func":      idemclient.WithKeyFunc(nil),
		"zero attempts":     idemclient.WithMaxAttempts(0),
		"zero base":         idemclient.WithBackoff(0, time.Second),
		"max below base":    idemclient.WithBackoff(time.Second, time.Millisecond),
		"zero budget":       idemclient.WithBudget(0),
		"negative body":     idemclient.WithMaxBodyBytes(-1),
		"nil observer":      idemclient.WithObserver(nil),
		"nil option":        nil,
	} {
		t.Run(name, func(t *testing.T) {
			tr, err := idemclient.New(nil, opt)
			assert.Error(t, err)
			assert.Nil(t, tr)
			c, err := idemclient.NewClient(nil, opt)
			assert.Error(t, err)
			assert.Nil(t, c)
		})
	}

	t.Run("valid", func(t *testing.T) {
		c, err := idemclient.NewClient(nil, idemclient.WithMethods("POST", "PUT"), idemclient.WithKeyHeader("x-idempotency-key"),
			idemclient.WithReplayHeader("Idempotent-Replayed"), idemclient.WithMaxAttempts(1),
			idemclient.WithBackoff(time.Millisecond, time.Millisecond), idemclient.WithBudget(time.Second),
			idemclient.WithMaxBodyBytes(0))
		require.NoError(t, err)
		assert.IsType(t, &idemclient.Transport{}, c.Transport)
	})

	t.Run("replay header", func(t *testing.T) {
		base := script(step{status: 500, header: http.Header{"Idempotent-Replayed": {"true"}}})
		tr, _ := newTransport(t, base, idemclient.WithReplayHeader("Idempotent-Replayed"))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		res, _ := idemclient.ResultOf(resp)
		assert.True(t, res.Replayed)
		assert.Len(t, base.calls(), 1)
	})

	t.Run("max attempts 1 keeps the key, no retries", func(t *testing.T) {
		base := script(s503, ok201)
		tr, _ := newTransport(t, base, idemclient.WithMaxAttempts(1))
		resp, err := tr.RoundTrip(post(t, context.Background(), "{}"))
		require.NoError(t, err)
		readAll(t, resp)
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		require.Len(t, base.calls(), 1)
		assert.NotEmpty(t, base.calls()[0].key)
	})
}

func TestEdges(t *testing.T) {
	t.Run("nil request", func(t *testing.T) {
		tr, _ := newTransport(t, script(ok201))
		_, err := tr.RoundTrip(nil)
		assert.Error(t, err)
	})

	t.Run("nil header", func(t *testing.T) {
		base := script(ok201)
		tr, _ := newTransport(t, base)
		req := post(t, context.Background(), "{}")
		req.Header = nil
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		readAll(t, resp)
		assert.NotEmpty(t, base.calls()[0].key)
	})

	t.Run("ResultOf without a result", func(t *testing.T) {
		_, ok := idemclient.ResultOf(nil)
		assert.False(t, ok)
		_, ok = idemclient.ResultOf(&http.Response{})
		assert.False(t, ok)
	})

	t.Run("CloseIdleConnections reaches the base", func(t *testing.T) {
		base := script(ok201)
		c, err := idemclient.NewClient(base)
		require.NoError(t, err)
		c.CloseIdleConnections()
		assert.EqualValues(t, 1, base.idle.Load())
		tr, err := idemclient.New(roundTripFunc(nil))
		require.NoError(t, err)
		tr.CloseIdleConnections() // a base without the method: nothing happens
	})
}
