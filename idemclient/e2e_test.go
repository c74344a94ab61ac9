package idemclient_test

// End-to-end tests: the transport against the library's own middleware,
// on real HTTP servers on loopback, with faults injected around the
// middleware, in a TCP proxy in front of the server, or in the store.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemclient"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// fault is what the server does to one HTTP request that reaches it.
type fault int

const (
	faultNone      fault = iota
	faultUnavail         // 503 in front of the middleware: nothing runs
	faultFail            // the handler answers 500 before its side effect
	faultDropAfter       // the handler runs, its response is stored, the connection is closed unanswered
	faultReset           // the connection is reset before the middleware sees the request
	numFaults
)

func (f fault) String() string {
	return [...]string{"none", "503", "500", "drop-after", "reset"}[f]
}

type faultKey struct{}

// server is a venue API behind the idempotency middleware, with faults.
type server struct {
	*httptest.Server
	mw http.Handler

	// schedule returns the fault for the n-th arrival (0-based) of a key.
	schedule func(key string, n int) fault
	// before, if set, runs for every POST before the fault is applied.
	before func(n int64)
	// slow, if set, is waited on by the handler before its side effect.
	slow func()

	mu         sync.Mutex
	arrivals   map[string]int
	executions map[string][]string // key → bodies written by executions
	posts      atomic.Int64
	runs       atomic.Int64
}

// newServer serves the venue API behind mw, or behind a middleware on a
// memory store with default settings when mw is nil.
func newServer(t testing.TB, mw *idempotency.Middleware) *server {
	t.Helper()
	if mw == nil {
		var err error
		mw, err = idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
		require.NoError(t, err)
	}
	s := &server{arrivals: map[string]int{}, executions: map[string][]string{}}
	s.mw = mw.Handler(http.HandlerFunc(s.create))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /warm", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "warm") })
	mux.HandleFunc("POST /venues", s.serve)
	s.Server = httptest.NewServer(mux)
	t.Cleanup(s.Close)
	return s
}

// serve applies the scheduled fault around the middleware.
func (s *server) serve(w http.ResponseWriter, r *http.Request) {
	n := s.posts.Add(1)
	if s.before != nil {
		s.before(n)
	}
	key := r.Header.Get("Idempotency-Key")
	s.mu.Lock()
	arrival := s.arrivals[key]
	s.arrivals[key]++
	s.mu.Unlock()
	f := faultNone
	if s.schedule != nil {
		f = s.schedule(key, arrival)
	}
	r = r.WithContext(context.WithValue(r.Context(), faultKey{}, f))
	switch f {
	case faultUnavail:
		w.Header().Set("Retry-After", "0")
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
	case faultReset:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	case faultDropAfter:
		// The middleware refuses Hijack on its recorder, so it writes into
		// a sink and the connection is dropped out here, after the handler
		// ran and the response was stored.
		s.mw.ServeHTTP(&sink{header: http.Header{}}, r)
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		conn.Close()
	default:
		s.mw.ServeHTTP(w, r)
	}
}

// create is the handler: it creates a venue (the side effect) unless told
// to fail first.
func (s *server) create(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "unreadable", http.StatusBadRequest)
		return
	}
	if r.Context().Value(faultKey{}) == faultFail {
		http.Error(w, "failed before doing anything", http.StatusInternalServerError)
		return
	}
	if s.slow != nil {
		s.slow()
	}
	id := s.runs.Add(1)
	out := fmt.Sprintf(`{"id":"venue_%d","request":%s}`, id, body)
	key := r.Header.Get("Idempotency-Key")
	s.mu.Lock()
	s.executions[key] = append(s.executions[key], out)
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	io.WriteString(w, out)
}

func (s *server) executed(key string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.executions[key]...)
}

type sink struct{ header http.Header }

func (s *sink) Header() http.Header         { return s.header }
func (s *sink) WriteHeader(int)             {}
func (s *sink) Write(p []byte) (int, error) { return len(p), nil }

// scheduleOf applies the same list of faults to every key.
func scheduleOf(faults ...fault) func(string, int) fault {
	return func(_ string, n int) fault {
		if n < len(faults) {
			return faults[n]
		}
		return faultNone
	}
}

// scaledSleep sleeps for a fraction of each wait: Retry-After: 1 becomes
// 10 ms, so the tests honour it in shape without waiting a second.
func scaledSleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d / 100)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// newClient returns a client whose transport retries through base with
// short waits, recording every attempt.
func newClient(t testing.TB, base *http.Transport, opts ...idemclient.Option) (*http.Client, *attempts) {
	t.Helper()
	rec := &attempts{}
	all := append([]idemclient.Option{
		idemclient.WithClock(time.Now, scaledSleep),
		idemclient.WithBackoff(time.Millisecond, 20*time.Millisecond),
		idemclient.WithObserver(rec.add),
	}, opts...)
	c, err := idemclient.NewClient(base, all...)
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)
	return c, rec
}

func freshConns() *http.Transport {
	return &http.Transport{DisableKeepAlives: true}
}

type attempts struct {
	mu   sync.Mutex
	list []idemclient.Attempt
	hook func(idemclient.Attempt)
}

func (a *attempts) add(at idemclient.Attempt) {
	a.mu.Lock()
	a.list = append(a.list, at)
	hook := a.hook
	a.mu.Unlock()
	if hook != nil {
		hook(at)
	}
}

func (a *attempts) forKey(key string) []idemclient.Attempt {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []idemclient.Attempt
	for _, at := range a.list {
		if at.Key == key {
			out = append(out, at)
		}
	}
	return out
}

// create sends one logical request and returns its status, body and result.
func create(t testing.TB, ctx context.Context, c *http.Client, url, body string) (int, string, idemclient.Result) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/venues", strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	res, ok := idemclient.ResultOf(resp)
	require.True(t, ok)
	return resp.StatusCode, string(b), res
}

// assertOnce checks that the request under res.Key ran exactly once and
// the caller got that execution's response.
func assertOnce(t testing.TB, s *server, status int, body string, res idemclient.Result) {
	t.Helper()
	runs := s.executed(res.Key)
	require.Len(t, runs, 1, "executions of key %s", res.Key)
	assert.Equal(t, http.StatusCreated, status)
	assert.Equal(t, runs[0], body, "the caller gets the original response")
}

func TestE2EHandlerFailsNTimes(t *testing.T) {
	s := newServer(t, nil)
	s.schedule = scheduleOf(faultFail, faultFail)
	c, rec := newClient(t, freshConns())
	status, body, res := create(t, context.Background(), c, s.URL, `{"name":"Hall"}`)
	assertOnce(t, s, status, body, res)
	assert.Equal(t, 3, res.Attempts)
	assert.False(t, res.Replayed, "the third attempt ran the handler")
	got := rec.forKey(res.Key)
	require.Len(t, got, 3)
	assert.Equal(t, []int{500, 500, 201}, []int{got[0].StatusCode, got[1].StatusCode, got[2].StatusCode})
}

func TestE2EConnectionDroppedAfterExecution(t *testing.T) {
	s := newServer(t, nil)
	s.schedule = scheduleOf(faultDropAfter)
	c, rec := newClient(t, freshConns())
	status, body, res := create(t, context.Background(), c, s.URL, `{"name":"Hall"}`)
	assertOnce(t, s, status, body, res)
	assert.Equal(t, 2, res.Attempts)
	assert.True(t, res.Replayed, "the second attempt got the stored response")
	got := rec.forKey(res.Key)
	require.Len(t, got, 2)
	assert.Error(t, got[0].Err)
	assert.EqualValues(t, 2, s.posts.Load())
}

func TestE2EResetBeforeExecution(t *testing.T) {
	s := newServer(t, nil)
	s.schedule = scheduleOf(faultReset, faultUnavail, faultReset)
	c, _ := newClient(t, freshConns())
	status, body, res := create(t, context.Background(), c, s.URL, `{"name":"Hall"}`)
	assertOnce(t, s, status, body, res)
	assert.Equal(t, 4, res.Attempts)
	assert.False(t, res.Replayed)
}

// TestE2EProxyFaults puts a TCP proxy between client and server: a refused
// connection (the request never arrived) and a reply lost after the server
// executed the request.
func TestE2EProxyFaults(t *testing.T) {
	s := newServer(t, nil)
	proxy, err := faultproxy.Start(s.Listener.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	url := "http://" + proxy.Addr()

	t.Run("refused", func(t *testing.T) {
		c, rec := newClient(t, freshConns())
		rec.hook = func(a idemclient.Attempt) {
			if a.Number == 2 {
				proxy.Heal()
			}
		}
		proxy.Refuse()
		status, body, res := create(t, context.Background(), c, url, `{"name":"Refused"}`)
		assertOnce(t, s, status, body, res)
		assert.Equal(t, 3, res.Attempts)
		assert.False(t, res.Replayed)
	})

	t.Run("reply reset", func(t *testing.T) {
		c, _ := newClient(t, freshConns())
		proxy.ResetNextReplies(1)
		status, body, res := create(t, context.Background(), c, url, `{"name":"Reset"}`)
		assertOnce(t, s, status, body, res)
		assert.Equal(t, 2, res.Attempts)
		assert.True(t, res.Replayed)
	})
}

// TestE2EConcurrentDuplicate: two workers send the same job (a key derived
// from it) while the first is still running; the second gets 409 with
// Retry-After (the rest of the first's lease: 1 s here), waits, and ends
// with the first one's response.
func TestE2EConcurrentDuplicate(t *testing.T) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Lease: time.Second})
	require.NoError(t, err)
	s := newServer(t, mw)
	started, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	s.slow = func() {
		once.Do(func() { close(started) })
		<-release
	}
	c, rec := newClient(t, freshConns(), idemclient.WithMaxAttempts(20))
	var releaseOnce sync.Once
	rec.hook = func(a idemclient.Attempt) {
		if a.StatusCode == http.StatusConflict {
			releaseOnce.Do(func() { close(release) })
		}
	}
	ctx := idemclient.ContextWithKey(context.Background(), "job-42")

	type outcome struct {
		status int
		body   string
		res    idemclient.Result
	}
	first := make(chan outcome, 1)
	go func() {
		status, body, res := create(t, ctx, c, s.URL, `{"name":"Arena"}`)
		first <- outcome{status, body, res}
	}()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the first request never reached the handler")
	}
	status, body, res := create(t, ctx, c, s.URL, `{"name":"Arena"}`)
	one := <-first

	assertOnce(t, s, one.status, one.body, one.res)
	assertOnce(t, s, status, body, res)
	assert.Equal(t, "job-42", res.Key)
	assert.Equal(t, 1, one.res.Attempts)
	assert.False(t, one.res.Replayed)
	assert.GreaterOrEqual(t, res.Attempts, 2)
	assert.True(t, res.Replayed)
	var conflicts int
	for _, a := range rec.forKey("job-42") {
		if a.StatusCode == http.StatusConflict {
			conflicts++
			assert.GreaterOrEqual(t, a.Wait, time.Second, "Retry-After: 1 is honoured")
		}
	}
	assert.GreaterOrEqual(t, conflicts, 1)
}

// TestE2EStoreOutage runs the middleware on Redis (miniredis) that goes
// down for the first two requests: the middleware answers 503 without
// running the handler, the client retries until the store is back.
func TestE2EStoreOutage(t *testing.T) {
	settle(t)
	mr, _ := redistest.Miniredis(t)
	rdb := redistest.ClientFor(t, mr.Addr())
	store, err := idempotency.NewRedisStore(rdb, idempotency.RedisOptions{})
	require.NoError(t, err)
	mw, err := idempotency.New(store, idempotency.Options{StoreTimeout: 200 * time.Millisecond})
	require.NoError(t, err)
	s := newServer(t, mw)
	s.before = func(n int64) {
		switch n {
		case 1:
			mr.Close()
		case 3:
			require.NoError(t, mr.Restart())
		}
	}
	c, rec := newClient(t, freshConns(), idemclient.WithMaxAttempts(10))
	status, body, res := create(t, context.Background(), c, s.URL, `{"name":"Hall"}`)
	assertOnce(t, s, status, body, res)
	got := rec.forKey(res.Key)
	require.GreaterOrEqual(t, len(got), 3)
	for _, a := range got[:2] {
		assert.Equal(t, http.StatusServiceUnavailable, a.StatusCode)
		assert.GreaterOrEqual(t, a.Wait, time.Second, "the middleware's Retry-After: 1 is honoured")
	}
	assert.Equal(t, http.StatusCreated, got[len(got)-1].StatusCode)
}

// settle makes the test's last cleanup wait (up to 5 s) until the
// goroutines it started have ended: the middleware may keep working in the
// background for a while after a store failure (freeing a claim whose
// acquire failed), and TestMain's leak check must not see that as a leak
// of this package. Call it first, so its cleanup runs last.
func settle(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for goleak.Find(before) != nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// TestE2EGoTransportRetryDoesNotMultiplyAttempts drops the connection
// after the handler ran, on a keep-alive connection that http.Transport
// reused. Because the request carries an Idempotency-Key and a GetBody,
// http.Transport re-sends it itself on a fresh connection, inside the one
// attempt of idemclient: the server sees two HTTP requests, the handler
// runs once, the caller sees one attempt and the replayed response.
// Without a reused connection the same fault costs idemclient a second
// attempt instead, and still two HTTP requests: the layers add, never
// multiply.
func TestE2EGoTransportRetryDoesNotMultiplyAttempts(t *testing.T) {
	s := newServer(t, nil)
	s.schedule = scheduleOf(faultDropAfter)
	base := &http.Transport{}
	c, rec := newClient(t, base)

	warm := func() {
		resp, err := c.Get(s.URL + "/warm")
		require.NoError(t, err)
		readAll(t, resp)
	}
	// A reused connection is likely but not certain (the idle connection
	// is parked asynchronously): try a few logical requests.
	for i := range 10 {
		warm()
		time.Sleep(5 * time.Millisecond)
		var reused []bool
		var mu sync.Mutex
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) { mu.Lock(); reused = append(reused, info.Reused); mu.Unlock() },
		})
		postsBefore := s.posts.Load()
		status, body, res := create(t, ctx, c, s.URL, fmt.Sprintf(`{"name":"Hall %d"}`, i))
		assertOnce(t, s, status, body, res)
		assert.True(t, res.Replayed)
		posts := s.posts.Load() - postsBefore
		assert.Len(t, rec.forKey(res.Key), res.Attempts)
		mu.Lock()
		first := len(reused) > 0 && reused[0]
		conns := len(reused)
		mu.Unlock()
		if !first {
			assert.Equal(t, 2, res.Attempts)
			assert.EqualValues(t, 2, posts)
			continue
		}
		t.Logf("request %d went out on a reused connection", i)
		assert.Equal(t, 1, res.Attempts, "Go's own retry is inside idemclient's attempt")
		assert.EqualValues(t, 2, posts, "two HTTP requests reached the server")
		assert.Equal(t, 2, conns, "Go's retry went out on a second connection")
		return
	}
	t.Fatal("no request went out on a reused connection")
}

// TestE2ENeverRetried: answers that must not be retried reach the
// handler once.
func TestE2ENeverRetried(t *testing.T) {
	for _, status := range []int{400, 401, 403, 404, 413, 422} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			var hits atomic.Int64
			mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
			require.NoError(t, err)
			srv := httptest.NewServer(mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				http.Error(w, "no", status)
			})))
			t.Cleanup(srv.Close)
			c, _ := newClient(t, freshConns())
			resp, err := c.Post(srv.URL, "application/json", strings.NewReader("{}"))
			require.NoError(t, err)
			assert.Equal(t, status, resp.StatusCode)
			assert.Equal(t, "no\n", readAll(t, resp))
			res, _ := idemclient.ResultOf(resp)
			assert.Equal(t, 1, res.Attempts)
			assert.EqualValues(t, 1, hits.Load())
		})
	}

	t.Run("422 from the middleware: same key, another body", func(t *testing.T) {
		s := newServer(t, nil)
		c, _ := newClient(t, freshConns())
		ctx := idemclient.ContextWithKey(context.Background(), "reused")
		status, _, _ := create(t, ctx, c, s.URL, `{"name":"A"}`)
		require.Equal(t, http.StatusCreated, status)
		status, body, res := create(t, ctx, c, s.URL, `{"name":"B"}`)
		assert.Equal(t, http.StatusUnprocessableEntity, status)
		assert.Contains(t, body, "ErrFingerprintMismatch")
		assert.Equal(t, 1, res.Attempts)
		assert.Len(t, s.executed("reused"), 1)
	})
}

// TestE2ECallerKeySurvivesRetries: a caller-set key is the one the server
// sees on every attempt, and the response body is unread when returned
// even with a streaming server.
func TestE2ECallerKeySurvivesRetries(t *testing.T) {
	s := newServer(t, nil)
	s.schedule = scheduleOf(faultUnavail, faultDropAfter)
	c, rec := newClient(t, freshConns())
	req, err := http.NewRequest(http.MethodPost, s.URL+"/venues", strings.NewReader(`{"name":"Mine"}`))
	require.NoError(t, err)
	req.Header.Set("Idempotency-Key", "caller-chosen")
	resp, err := c.Do(req)
	require.NoError(t, err)
	br := bufio.NewReader(resp.Body)
	var v map[string]any
	require.NoError(t, json.NewDecoder(br).Decode(&v))
	resp.Body.Close()
	assert.Equal(t, "venue_1", v["id"])
	res, _ := idemclient.ResultOf(resp)
	assert.Equal(t, idemclient.Result{Key: "caller-chosen", Attempts: 3, Replayed: true}, res)
	for _, a := range rec.forKey("caller-chosen") {
		assert.Equal(t, "caller-chosen", a.Request.Header.Get("Idempotency-Key"))
	}
	assert.Len(t, s.executed("caller-chosen"), 1)
}
