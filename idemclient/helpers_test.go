package idemclient_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/idemclient"
)

// step is what the scripted RoundTripper answers to one attempt.
type step struct {
	status int
	header http.Header
	body   string
	err    error
}

// sent is what the scripted RoundTripper received in one attempt.
type sent struct {
	method string
	key    string
	keys   int // number of key header values
	body   string
	length int64
}

// scripted is a RoundTripper that answers attempts from a script (the
// last step repeats) and records what it was sent.
type scripted struct {
	mu     sync.Mutex
	steps  []step
	sent   []sent
	bodies []*trackedBody
	idle   atomic.Int32
}

func script(steps ...step) *scripted { return &scripted{steps: steps} }

func (s *scripted) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(r.Body)
		r.Body.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sent = append(s.sent, sent{
		method: r.Method,
		key:    r.Header.Get("Idempotency-Key"),
		keys:   len(r.Header.Values("Idempotency-Key")),
		body:   string(body),
		length: r.ContentLength,
	})
	st := s.steps[min(len(s.sent), len(s.steps))-1]
	if st.err != nil {
		return nil, st.err
	}
	h := st.header.Clone()
	if h == nil {
		h = http.Header{}
	}
	b := &trackedBody{r: strings.NewReader(st.body)}
	s.bodies = append(s.bodies, b)
	return &http.Response{StatusCode: st.status, Header: h, Body: b, Request: r}, nil
}

func (s *scripted) CloseIdleConnections() { s.idle.Add(1) }

func (s *scripted) calls() []sent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sent(nil), s.sent...)
}

// trackedBody is a response body that records whether it was read to the
// end and closed.
type trackedBody struct {
	r      *strings.Reader
	closed atomic.Bool
}

func (b *trackedBody) Read(p []byte) (int, error) { return b.r.Read(p) }
func (b *trackedBody) Close() error               { b.closed.Store(true); return nil }
func (b *trackedBody) drained() bool              { return b.r.Len() == 0 }

// fakeClock is a clock whose sleeps return at once and move it forward.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	waits []time.Duration
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.waits = append(c.waits, d)
	return nil
}

func (c *fakeClock) Waits() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.waits...)
}

// maxJitter makes the backoff wait its whole ceiling.
func maxJitter(n int64) int64 { return n - 1 }

// newTransport returns a transport over base on a fake clock, with the
// backoff at its ceiling, plus the clock.
func newTransport(t *testing.T, base http.RoundTripper, opts ...idemclient.Option) (*idemclient.Transport, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	all := append([]idemclient.Option{
		idemclient.WithClock(clock.Now, clock.Sleep),
		idemclient.WithJitter(maxJitter),
	}, opts...)
	tr, err := idemclient.New(base, all...)
	require.NoError(t, err)
	return tr, clock
}

// post builds a POST with a body that has GetBody (a strings.Reader).
func post(t *testing.T, ctx context.Context, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://127.0.0.1:1/venues", strings.NewReader(body))
	require.NoError(t, err)
	return req
}

// readAll reads and closes a response body.
func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}
