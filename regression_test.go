package idempotency_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// Regression tests for issue 8: seven ways the middleware ran work twice,
// lost a stored response, replayed what it should not have, or leaked an
// internal error. Each test states the behaviour required of the fix.

// waitFor receives from ch, failing the test after d instead of blocking
// for ever.
func waitFor[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("%s: nothing after %v", what, d)
		var zero T
		return zero
	}
}

// TestRegressionDisconnectKeepsLease (issue 8, bug 1): a client that hangs
// up while its handler keeps working must not stop the lease renewal. The
// lease is 1.2 s, the handler takes three leases and ignores its context, the
// client gives up after 100 ms and retries the same key every 50 ms: the
// handler runs once, never twice at once, and the client ends up with the
// replay of that one execution.
func TestRegressionDisconnectKeepsLease(t *testing.T) {
	// A renewal may come up to 500 ms late (the lease keeper renews every
	// lease/3; the work's deadline is three quarters of a lease after the
	// last renewal), for a loaded machine under -race.
	const lease = 1200 * time.Millisecond
	var running, maxRunning atomic.Int32
	entered := make(chan struct{})
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
		}
		n := running.Add(1)
		defer running.Add(-1)
		for {
			m := maxRunning.Load()
			if n <= m || maxRunning.CompareAndSwap(m, n) {
				break
			}
		}
		execution := handler.calls.Load()
		time.Sleep(3 * lease) // ignores its context: the work goes on
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"execution":%d}`, execution)
	}
	srv := httptest.NewServer(newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Lease: lease}).Handler(handler))
	defer srv.Close()

	send := func(ctx context.Context) (*http.Response, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/venues", strings.NewReader(`{"name":"Hall"}`))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "k")
		resp, err := srv.Client().Do(req)
		if err != nil {
			return nil, nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp, body, err
	}

	// The first attempt gives up after 100 ms, but not before its handler
	// started, however slow the machine.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sent := time.Now()
	go func() {
		select {
		case <-entered:
		case <-time.After(5 * time.Second):
		}
		time.Sleep(time.Until(sent.Add(100 * time.Millisecond)))
		cancel()
	}()
	_, _, err := send(ctx)
	require.ErrorIs(t, err, context.Canceled, "the first attempt gave up on the client side")

	var final *http.Response
	var finalBody []byte
	conflicts := 0
	for deadline := time.Now().Add(3*lease + 10*time.Second); final == nil; {
		require.True(t, time.Now().Before(deadline), "no 201 within 3 leases and 10 s")
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		resp, body, err := send(ctx)
		cancel()
		switch {
		case err != nil:
			t.Logf("retry failed: %v", err)
		case resp.StatusCode == http.StatusConflict:
			conflicts++
		default:
			final, finalBody = resp, body
			continue
		}
		time.Sleep(50 * time.Millisecond)
	}
	srv.Close() // waits for every handler to return
	t.Logf("%d retries got 409; %d executions, at most %d at once", conflicts, handler.calls.Load(), maxRunning.Load())

	assert.Equal(t, int32(1), handler.calls.Load(), "the handler ran once: the lease was kept after the client left")
	assert.Equal(t, int32(1), maxRunning.Load(), "never two executions at once")
	assert.Equal(t, http.StatusCreated, final.StatusCode)
	assert.Equal(t, "true", final.Header.Get("X-Idempotent-Replayed"), "the final answer is a replay")
	assert.Equal(t, `{"execution":1}`, string(finalBody), "of the first execution's response")
}

// sendTimes is a go-redis hook that records when the latest command that
// succeeded was sent: the start of the last claim or renewal that Redis
// acknowledged, from which its lease counts.
type sendTimes struct {
	mu     sync.Mutex
	lastOK time.Time
}

func (s *sendTimes) DialHook(next redis.DialHook) redis.DialHook { return next }

func (s *sendTimes) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		sent := time.Now()
		err := next(ctx, cmd)
		if err == nil || errors.Is(err, redis.Nil) {
			s.mu.Lock()
			if sent.After(s.lastOK) {
				s.lastOK = sent
			}
			s.mu.Unlock()
		}
		return err
	}
}

func (s *sendTimes) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (s *sendTimes) last() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastOK
}

// TestRegressionLeaseLostBeforeExpiry (issue 8, bug 2): an instance cut off
// from Redis must stop its handler before the lease Redis holds can lapse,
// counting from when the claim or the last renewal was sent, not from when
// its reply came back, and not only when a renewal attempt ends. Instance A
// talks to Redis through a proxy that delays every reply by 100 ms and is
// cut (blackholed, or resetting every connection) as soon as A's handler
// starts; instance B talks to
// Redis directly and retries the key until its handler runs. A's handler
// must be cancelled before B's starts, and no later than the send time of
// A's last acknowledged command plus the lease.
func TestRegressionLeaseLostBeforeExpiry(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	prefix := redistest.Prefix(t)
	const (
		lease        = 600 * time.Millisecond
		storeTimeout = 300 * time.Millisecond
		replyLatency = 100 * time.Millisecond
		rounds       = 3
	)
	newStore := func(client *redis.Client) idempotency.Store {
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
		require.NoError(t, err)
		return store
	}
	b := newMiddleware(t, newStore(faultClient(t, addr, time.Second)), idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout})

	for _, fault := range []string{"blackhole", "reset"} {
		t.Run(fault, func(t *testing.T) {
			for round := range rounds {
				key := fmt.Sprintf("%s-%d", fault, round)
				proxy := startProxy(t, addr)
				clientA := faultClient(t, proxy.Addr(), time.Second)
				require.NoError(t, clientA.Ping(context.Background()).Err()) // connected before the latency
				// A's replies take 100 ms: its claim returns well after
				// Redis ran it, so a lease counted from the reply ends
				// after the one Redis holds.
				proxy.SetLatency(replyLatency)
				sent := &sendTimes{}
				clientA.AddHook(sent)
				a := newMiddleware(t, newStore(clientA), idempotency.Options{Lease: lease, StoreTimeout: storeTimeout})

				entered := make(chan struct{})
				cancelledA := make(chan time.Time, 1)
				handlerA := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					close(entered)
					select {
					case <-r.Context().Done():
						cancelledA <- time.Now()
					case <-time.After(5 * time.Second):
						close(cancelledA) // never cancelled
					}
				})
				startedB := make(chan time.Time, 1)
				handlerB := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					startedB <- time.Now()
					w.WriteHeader(http.StatusCreated)
				})

				doneA := make(chan struct{})
				go func() {
					defer close(doneA)
					serve(a.Handler(handlerA), venue(key)())
				}()
				waitFor(t, entered, 5*time.Second, "A's handler did not start")
				switch fault {
				case "blackhole":
					proxy.Blackhole()
				case "reset":
					proxy.Refuse()
				}

				var wB *httptest.ResponseRecorder
				for deadline := time.Now().Add(5 * time.Second); ; {
					wB = serve(b.Handler(handlerB), venue(key)())
					if wB.Code != http.StatusConflict || time.Now().After(deadline) {
						break
					}
					time.Sleep(5 * time.Millisecond)
				}
				waitFor(t, doneA, 10*time.Second, "A's request did not end")
				proxy.Heal()

				require.Equal(t, http.StatusCreated, wB.Code, "round %d: B ran the key: %s", round, wB.Body)
				cancelled, ok := <-cancelledA
				require.True(t, ok, "round %d: A's handler was never cancelled", round)
				started := <-startedB
				lastSent := sent.last()
				t.Logf("round %d: A cancelled %v after its last acknowledged send, B started %v after it (lease %v)",
					round, cancelled.Sub(lastSent), started.Sub(lastSent), lease)
				assert.True(t, cancelled.Before(started),
					"round %d: A's handler was cancelled %v after B's handler started: both ran at once",
					round, cancelled.Sub(started))
				assert.False(t, cancelled.After(lastSent.Add(lease)),
					"round %d: A's handler was cancelled %v after the lease it last sent could lapse in Redis",
					round, cancelled.Sub(lastSent.Add(lease)))
			}
		})
	}
}

// TestRegressionGoneClientNoWriteStored (issue 8, bug 3): a handler that
// finishes without writing (net/http answers 200) after its client hung up
// has done its work; the default is that a client disconnect does not
// cancel the handler's context, and that the implicit 200 is stored, so
// the retry gets the replay instead of running the work again.
func TestRegressionGoneClientNoWriteStored(t *testing.T) {
	entered, disconnected := make(chan struct{}), make(chan struct{})
	handlerErr := make(chan error, 1)
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
			select { // the test tells the handler its client has gone
			case <-disconnected:
			case <-time.After(5 * time.Second):
			}
			handlerErr <- r.Context().Err()
		}
		// Returns without writing: net/http answers 200.
	}
	obs := &observed{}
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: obs.observe}).Handler(handler)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		serve(h, post("k", `{}`).WithContext(ctx))
	}()
	waitFor(t, entered, 5*time.Second, "the handler did not start")
	cancel() // the client hangs up...
	close(disconnected)
	waitFor(t, done, 5*time.Second, "the first request did not end")

	assert.NoError(t, <-handlerErr, "the client's disconnect did not cancel the handler's context")
	t.Logf("first request's outcome: %s (err: %v)", obs.last().Outcome, obs.last().Err)
	retry, _ := untilNot409(t, h, func() *http.Request { return post("k", `{}`) }, 2*time.Second)
	assert.Equal(t, http.StatusOK, retry.Code)
	assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"), "the finished work's implicit 200 was stored")
	assert.Equal(t, int32(1), handler.calls.Load(), "the finished work did not run again")
}

// TestRegressionPausedRedisFreesClaims (issue 8, bug 4): with a go-redis
// client that has ContextTimeoutEnabled, Redis stops answering for 2.5 s
// (a proxy holds its replies; the commands still reach it and run) while
// 50 requests with new keys arrive, and the store timeout is 1 s. All 50
// get 503 and run no handler. The claims their SETs made must be taken
// back: within about a second of Redis answering again every key runs
// (201), long before the 30 s lease could lapse.
//
// The client's pool is warm, as under traffic, so up to PoolSize SETs are
// sent at once. (CLIENT PAUSE does not reproduce this: Redis drops the
// paused commands of connections that go-redis closes on the timeout.)
func TestRegressionPausedRedisFreesClaims(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	proxy := startProxy(t, addr)
	client := redistest.ClientWith(t, &redis.Options{Addr: proxy.Addr(), ContextTimeoutEnabled: true})
	const (
		lease        = 30 * time.Second // a key free within seconds was taken back, not lapsed
		storeTimeout = time.Second
		pause        = 2500 * time.Millisecond
		n            = 50
	)
	handler := createVenue()
	h := newMiddleware(t, newRedisStore(t, client), idempotency.Options{Lease: lease, StoreTimeout: storeTimeout}).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code)
	calls := handler.calls.Load()

	// Warm the pool: every connection busy at once, then idle.
	var wg sync.WaitGroup
	for i := range client.Options().PoolSize {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client.Do(context.Background(), "blpop", fmt.Sprintf("warm:%d", i), "0.1")
		}()
	}
	wg.Wait()
	t.Logf("pool: %d connections (PoolSize %d)", client.PoolStats().TotalConns, client.Options().PoolSize)

	proxy.SetLatency(pause)
	paused := time.Now()
	codes := make([]int, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i] = serve(h, venue(fmt.Sprintf("k%d", i))()).Code
		}()
	}
	wg.Wait()
	for i, code := range codes {
		assert.Equal(t, http.StatusServiceUnavailable, code, "key k%d while Redis was not answering", i)
	}
	assert.Equal(t, calls, handler.calls.Load(), "no handler ran while Redis was not answering")

	time.Sleep(time.Until(paused.Add(pause)))
	proxy.Heal()
	resumed := time.Now()
	deadline := resumed.Add(1500 * time.Millisecond)
	stuck := []string{}
	for i := range n {
		key := fmt.Sprintf("k%d", i)
		var w *httptest.ResponseRecorder
		for {
			w = serve(h, venue(key)())
			if w.Code != http.StatusConflict || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if w.Code == http.StatusConflict {
			stuck = append(stuck, key)
			continue
		}
		assert.Equal(t, http.StatusCreated, w.Code, "key %s after Redis answered again: %s", key, w.Body)
	}
	t.Logf("probed every key within %v of Redis answering again", time.Since(resumed))
	assert.Empty(t, stuck, "%d of %d keys still answered 409 1.5s after Redis answered again (lease %v)", len(stuck), n, lease)
}

// TestRegressionNoScriptFallbackHasBudget (issue 8, bug 5): with Redis'
// script cache emptied (SCRIPT FLUSH, as after a restart) while a handler
// runs, storing its response meets NOSCRIPT on EVALSHA and must fall back
// to EVAL with a budget of its own. Here each round trip takes 250 ms and
// the store timeout is 400 ms: the response must be stored (outcome
// executed) and a retry gets the replay without the handler running again.
// It runs with go-redis clients that ignore and that honour context
// deadlines (ContextTimeoutEnabled).
func TestRegressionNoScriptFallbackHasBudget(t *testing.T) {
	const (
		storeTimeout = 400 * time.Millisecond
		latency      = 250 * time.Millisecond
	)
	for _, contextTimeout := range []bool{false, true} {
		t.Run(fmt.Sprintf("ContextTimeoutEnabled=%v", contextTimeout), func(t *testing.T) {
			addr, _ := redistest.StartServer(t)
			proxy := startProxy(t, addr)
			direct := faultClient(t, addr, faultReadTimeout)
			client := faultClient(t, proxy.Addr(), faultReadTimeout)
			if contextTimeout {
				client = redistest.ClientWith(t, &redis.Options{Addr: proxy.Addr(), ReadTimeout: faultReadTimeout, ContextTimeoutEnabled: true})
			}
			handler := &counted{}
			handler.serve = func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get("Idempotency-Key") == "k" && handler.calls.Load() == 2 {
					// The script cache empties, and the network slows down.
					if err := direct.ScriptFlush(context.Background()).Err(); err != nil {
						t.Errorf("SCRIPT FLUSH: %v", err)
					}
					proxy.SetLatency(latency)
				}
				w.WriteHeader(http.StatusCreated)
				io.WriteString(w, "created")
			}
			obs := &observed{}
			h := newMiddleware(t, newRedisStore(t, client), idempotency.Options{StoreTimeout: storeTimeout, Observer: obs.observe}).Handler(handler)
			require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code) // scripts are cached now
			require.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome)

			first, took := timedServe(h, venue("k")())
			ev := obs.last()
			proxy.Heal()
			require.Equal(t, http.StatusCreated, first.Code)
			t.Logf("first request took %v; outcome %s (err: %v)", took, ev.Outcome, ev.Err)
			assert.Equal(t, idempotency.OutcomeExecuted, ev.Outcome, "the response was stored: err %v", ev.Err)

			retry, _ := untilNot409(t, h, venue("k"), time.Second)
			assert.Equal(t, http.StatusCreated, retry.Code, "body: %s", retry.Body)
			assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"), "the retry got the stored response")
			assert.Equal(t, "created", retry.Body.String())
			assert.Equal(t, int32(2), handler.calls.Load(), "warm-up and k ran once each")
		})
	}
}

// TestRegressionReplayHeaders (issue 8, bug 6): a replay carries the
// handler's own response headers, not the whole header map at
// WriteHeader. Headers that outer middleware sets for each request
// (X-Request-Id, Access-Control-Allow-Origin) stay the current request's;
// Set-Cookie is not replayed by default; trailers are not replayed; and a
// 101 Switching Protocols is never stored.
func TestRegressionReplayHeaders(t *testing.T) {
	t.Run("OuterHeadersAndCookies", func(t *testing.T) {
		var requests atomic.Int32
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			h.Set("Content-Type", "application/json")
			h.Set("Location", "/venues/1")
			h.Set("ETag", `"v1"`)
			h.Set("Set-Cookie", "session=s3cr3t; Path=/; HttpOnly")
			h.Set("Trailer", "X-Digest")                  // a declared trailer...
			h.Set(http.TrailerPrefix+"X-Checksum", "c-1") // ...and an undeclared one
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, `{"id":"v_1"}`)
			h.Set("X-Digest", "d-1")
		}}
		mw := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
		// outer stands for logging and CORS middleware around the
		// idempotency middleware: its headers describe this request.
		outer := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Request-Id", fmt.Sprintf("req-%d", requests.Add(1)))
			w.Header().Set("Access-Control-Allow-Origin", r.Header.Get("Origin"))
			mw.Handler(handler).ServeHTTP(w, r)
		})
		srv := httptest.NewServer(outer)
		defer srv.Close()

		send := func(origin string) (*http.Response, string) {
			req, err := http.NewRequest(http.MethodPost, srv.URL+"/venues", strings.NewReader(`{}`))
			require.NoError(t, err)
			req.Header.Set("Idempotency-Key", "k")
			req.Header.Set("Origin", origin)
			resp, err := srv.Client().Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body) // trailers arrive after the body
			require.NoError(t, err)
			return resp, string(body)
		}
		first, _ := send("https://a.example")
		require.Equal(t, http.StatusCreated, first.StatusCode)
		require.Equal(t, "req-1", first.Header.Get("X-Request-Id"))

		retry, body := send("https://b.example")
		require.Equal(t, http.StatusCreated, retry.StatusCode)
		require.Equal(t, "true", retry.Header.Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), handler.calls.Load())
		assert.Equal(t, `{"id":"v_1"}`, body)

		assert.Equal(t, []string{"req-2"}, retry.Header.Values("X-Request-Id"), "the current request's id, not the first's")
		assert.Equal(t, []string{"https://b.example"}, retry.Header.Values("Access-Control-Allow-Origin"), "the current request's origin")
		assert.Equal(t, "application/json", retry.Header.Get("Content-Type"), "the handler's own headers are replayed")
		assert.Equal(t, "/venues/1", retry.Header.Get("Location"))
		assert.Equal(t, `"v1"`, retry.Header.Get("ETag"))
		assert.Empty(t, retry.Header.Values("Set-Cookie"), "Set-Cookie is not replayed by default")
		for _, name := range []string{"X-Digest", "X-Checksum"} {
			assert.Empty(t, retry.Trailer.Values(name), "trailer %s is not replayed", name)
			assert.Empty(t, retry.Header.Values(name), "trailer %s is not replayed as a header", name)
		}
	})

	t.Run("SwitchingProtocolsNotStored", func(t *testing.T) {
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Upgrade", "websocket")
			w.Header().Set("Connection", "Upgrade")
			w.WriteHeader(http.StatusSwitchingProtocols)
		}}
		h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(handler)
		first := serve(h, post("k", `{}`))
		require.Equal(t, http.StatusSwitchingProtocols, first.Code)
		retry := serve(h, post("k", `{}`))
		assert.Empty(t, retry.Header().Get("X-Idempotent-Replayed"), "a 101 is never replayed (retry answered %d)", retry.Code)
		assert.Equal(t, int32(2), handler.calls.Load(), "nothing was stored for the 101: the retry ran the handler")
	})
}

// TestRegressionFingerprintErrorsHidden (issue 8, bug 7): only the
// package's own JSON errors (Fingerprinter{CanonicalJSON: true}) show
// their text to the client. Any other error from a custom FingerprintFunc
// gets a fixed-text 500; one that wraps ErrInvalidJSON with text of its
// own gets 400 without that text. Either way the handler does not run
// and nothing is stored.
func TestRegressionFingerprintErrorsHidden(t *testing.T) {
	cases := []struct {
		name   string
		err    error
		status int
		secret string
	}{
		{"ArbitraryError", errors.New("tenant lookup: dial tcp 10.0.0.7:5432: connection refused"),
			http.StatusInternalServerError, "10.0.0.7"},
		{"WrapsErrInvalidJSON", fmt.Errorf("%w: tenant t_42 lookup in schema billing_v3 failed", idempotency.ErrInvalidJSON),
			http.StatusBadRequest, "billing_v3"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
			handler := createVenue()
			failing := newMiddleware(t, store, idempotency.Options{Fingerprint: func(*http.Request, []byte) (string, error) {
				return "", tc.err
			}}).Handler(handler)
			w := serve(failing, post("k", `{"name":"Hall"}`))
			assert.NotContains(t, w.Body.String(), tc.secret, "the fingerprint error's text reached the client")
			assert.NotContains(t, w.Body.String(), "tenant")
			p := requireProblem(t, w, tc.status)
			t.Logf("answer %d: %+v", w.Code, p)
			assert.Equal(t, int32(0), handler.calls.Load(), "the handler did not run")

			normal := newMiddleware(t, store).Handler(handler)
			w = serve(normal, post("k", `{"name":"Hall"}`))
			assert.Equal(t, http.StatusCreated, w.Code, "nothing was stored under the key")
			assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, int32(1), handler.calls.Load())
		})
	}

	t.Run("OwnJSONErrorsShowDetail", func(t *testing.T) { // the control: unchanged behaviour
		handler := createVenue()
		h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Fingerprint: idempotency.Fingerprinter{CanonicalJSON: true}.Fingerprint}).Handler(handler)
		p := requireProblem(t, serve(h, post("k", `{"name":`)), http.StatusBadRequest)
		assert.Contains(t, p.Type, "ErrInvalidJSON")
		assert.Contains(t, p.Detail, "unexpected end of input")
		assert.Equal(t, int32(0), handler.calls.Load())
	})
}
