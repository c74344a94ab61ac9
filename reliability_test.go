package idempotency_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// The tests here inject real faults into real redis-server processes of
// their own (IDEMPOTENCY_TEST_REDIS_SERVER), some through a TCP proxy that
// delays, blackholes or resets. Each backs one row of the README's
// reliability table.
//
// The go-redis clients get a long read timeout, retries and no context
// deadlines (faultClient), and the requests whose 503 a test times go
// through a middleware with a short store timeout (faultStoreTimeout): so
// every bound measured comes from the library, not from the client. The
// requests around the fault go through a middleware on the same store with
// a patient store timeout, so a loaded machine does not turn them into 503s.

const (
	faultStoreTimeout   = 300 * time.Millisecond
	patientStoreTimeout = 5 * time.Second
	faultReadTimeout    = 5 * time.Second
	// faultBound is the longest a 503 may take: the store timeout plus
	// room for a loaded 2-core machine running the race detector.
	faultBound = faultStoreTimeout + 700*time.Millisecond
)

// fastAndPatient returns one handler's middleware twice over one store:
// with the short store timeout whose bound the tests measure, and with a
// patient one.
func fastAndPatient(t *testing.T, store idempotency.Store, handler http.Handler, opts ...idempotency.Options) (fast, patient http.Handler) {
	fast = newMiddleware(t, store, merged(opts...), idempotency.Options{StoreTimeout: faultStoreTimeout}).Handler(handler)
	patient = newMiddleware(t, store, merged(opts...), idempotency.Options{StoreTimeout: patientStoreTimeout}).Handler(handler)
	return fast, patient
}

// faultClient is a go-redis client that, left alone, would wait up to
// three read timeouts (three attempts) for a reply.
func faultClient(t *testing.T, addr string, readTimeout time.Duration) *redis.Client {
	return redistest.ClientWith(t, &redis.Options{
		Addr:                  addr,
		DialTimeout:           readTimeout,
		ReadTimeout:           readTimeout,
		WriteTimeout:          readTimeout,
		MaxRetries:            2,
		ContextTimeoutEnabled: false,
	})
}

func startProxy(t *testing.T, target string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(target)
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

func timedServe(h http.Handler, r *http.Request) (*httptest.ResponseRecorder, time.Duration) {
	start := time.Now()
	w := serve(h, r)
	return w, time.Since(start)
}

// requireUnavailable checks a fail-closed answer: 503, Retry-After, the
// store-unavailable problem type, within faultBound.
func requireUnavailable(t *testing.T, w *httptest.ResponseRecorder, took time.Duration) {
	t.Helper()
	requireUnavailableAs(t, w, took, "ErrStoreUnavailable")
}

// requireLeaseLost checks the answer to a handler cut short because its
// lease was lost: 503, Retry-After, the lease-lost problem type.
func requireLeaseLost(t *testing.T, w *httptest.ResponseRecorder) {
	t.Helper()
	requireUnavailableAs(t, w, 0, "ErrLeaseLost")
}

func requireUnavailableAs(t *testing.T, w *httptest.ResponseRecorder, took time.Duration, sentinel string) {
	t.Helper()
	p := requireProblem(t, w, http.StatusServiceUnavailable)
	assert.Contains(t, p.Type, sentinel)
	assert.Equal(t, "1", w.Header().Get("Retry-After"))
	assert.Less(t, took, faultBound, "the 503 took too long")
}

// untilNot409 repeats a request while it is answered 409 and returns the
// first other answer and how long it took to get it.
func untilNot409(t *testing.T, h http.Handler, req func() *http.Request, within time.Duration) (*httptest.ResponseRecorder, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		w := serve(h, req())
		if w.Code != http.StatusConflict {
			return w, time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("still 409 after %v: the key is wedged", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func venue(key string) func() *http.Request {
	return func() *http.Request { return post(key, `{"name":"Hall"}`) }
}

// TestReliabilityRedisDown: Redis is not running (closed port). Requests
// fail closed at once; with WithFailOpen they run unprotected; once Redis
// is back on the same port, the same key runs normally.
func TestReliabilityRedisDown(t *testing.T) {
	addr, stop := redistest.StartServer(t)
	store := newRedisStore(t, faultClient(t, addr, faultReadTimeout))
	handler := createVenue()
	obs := &observed{}
	fast, h := fastAndPatient(t, store, handler, idempotency.Options{Observer: obs.observe})
	require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code)

	stop()
	w, took := timedServe(fast, venue("k")())
	requireUnavailable(t, w, took)
	t.Logf("503 after %v with Redis down", took)
	assert.Equal(t, int32(1), handler.calls.Load(), "no handler ran unprotected")
	assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome)

	open := createVenue()
	hOpen := newMiddleware(t, store, idempotency.Options{StoreTimeout: faultStoreTimeout, FailOpen: true, Observer: obs.observe}).Handler(open)
	assert.Equal(t, http.StatusCreated, serve(hOpen, venue("k")()).Code, "fail open runs the handler")
	assert.Equal(t, int32(1), open.calls.Load())
	assert.Equal(t, idempotency.OutcomeUnprotected, obs.last().Outcome)

	redistest.StartServerAt(t, addr)
	w = serve(h, venue("k")())
	require.Equal(t, http.StatusCreated, w.Code, "the key is not wedged once Redis is back: %s", w.Body)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, "true", serve(h, venue("k")()).Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, int32(2), handler.calls.Load())
}

// TestReliabilityRedisSlow: replies take twice go-redis' read timeout.
// The store timeout answers 503 long before go-redis would give up, and
// so does the request's own deadline when it is shorter. The claims the
// slow SETs made land late and are freed: after the network heals the same
// keys run at once, not after the lease.
func TestReliabilityRedisSlow(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	proxy := startProxy(t, addr)
	store := newRedisStore(t, faultClient(t, proxy.Addr(), faultReadTimeout))
	handler := createVenue()
	const lease = 30 * time.Second // a key freed within seconds was released, not lapsed
	fast, h := fastAndPatient(t, store, handler, idempotency.Options{Lease: lease})
	require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code)

	proxy.SetLatency(2 * faultReadTimeout)
	w, took := timedServe(fast, venue("k")())
	requireUnavailable(t, w, took)
	assert.GreaterOrEqual(t, took, faultStoreTimeout-10*time.Millisecond, "the 503 waited for the store timeout")
	t.Logf("503 after %v (store timeout %v, go-redis read timeout %v, 3 attempts)", took, faultStoreTimeout, faultReadTimeout)

	// A request whose own deadline comes before the store timeout.
	hLong := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: time.Minute}).Handler(handler)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	w, took = timedServe(hLong, venue("k2")().WithContext(ctx))
	requireUnavailable(t, w, took)
	t.Logf("503 after %v for a request with a 200ms deadline (store timeout 1m)", took)
	assert.Equal(t, int32(1), handler.calls.Load(), "no handler ran unprotected")

	proxy.Heal()
	for _, key := range []string{"k", "k2"} {
		w, waited := untilNot409(t, h, venue(key), 5*time.Second)
		require.Equal(t, http.StatusCreated, w.Code, "key %s: %s", key, w.Body)
		assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), key)
		t.Logf("key %s free %v after healing", key, waited)
	}
	assert.Equal(t, int32(3), handler.calls.Load())
}

// TestReliabilityConnectionReset: connections are reset after Redis ran
// the command but before its reply arrived (the proxy drops the reply and
// sends RST both ways).
//
//   - Once, on the claim's SET: go-redis retries on a new connection, the
//     retry finds our own claim, and the request runs: 201, one execution.
//   - On every attempt (1 + MaxRetries): the client gets 503, and the claim
//     that Redis stored is taken back, so the key is free again at once.
//   - On the store-if-owner script: the client had its 201 already; the
//     script ran and stored the record, and go-redis' re-sent script finds
//     the record completed by the same token, so it succeeds: the outcome
//     is executed and the retry replays the record.
func TestReliabilityConnectionReset(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	proxy := startProxy(t, addr)
	store := newRedisStore(t, faultClient(t, proxy.Addr(), faultReadTimeout))
	const lease = 30 * time.Second // a key freed within seconds was released, not lapsed
	handler := createVenue()
	obs := &observed{}
	fast, h := fastAndPatient(t, store, handler, idempotency.Options{Lease: lease, Observer: obs.observe})
	require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code)

	t.Run("once", func(t *testing.T) {
		calls := handler.calls.Load()
		accepted := proxy.Accepted()
		proxy.ResetNextReplies(1)
		w := serve(h, venue("once")())
		require.Equal(t, http.StatusCreated, w.Code, w.Body)
		assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, calls+1, handler.calls.Load())
		assert.Greater(t, proxy.Accepted(), accepted, "go-redis retried on a new connection")
		assert.Equal(t, "true", serve(h, venue("once")()).Header().Get("X-Idempotent-Replayed"))
	})

	t.Run("every attempt", func(t *testing.T) {
		calls := handler.calls.Load()
		proxy.ResetNextReplies(3) // go-redis tries 1 + MaxRetries times
		w, took := timedServe(fast, venue("every")())
		requireUnavailable(t, w, took)
		assert.Equal(t, calls, handler.calls.Load(), "no handler ran unprotected")

		w, waited := untilNot409(t, h, venue("every"), 5*time.Second)
		require.Equal(t, http.StatusCreated, w.Code, w.Body)
		assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, calls+1, handler.calls.Load())
		t.Logf("key free %v after the 503 (lease %v)", waited, lease)
	})

	t.Run("store", func(t *testing.T) {
		store := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			proxy.ResetNextReplies(1) // the next reply is the store-if-owner script's
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, "created")
		}}
		h := newMiddleware(t, newRedisStore(t, faultClient(t, proxy.Addr(), faultReadTimeout)), idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout, Observer: obs.observe}).Handler(store)
		w := serve(h, venue("store")())
		assert.Equal(t, http.StatusCreated, w.Code, "the response went through before the store call")
		assert.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome, "err: %v", obs.last().Err)
		retry := serve(h, venue("store")())
		assert.Equal(t, http.StatusCreated, retry.Code)
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"), "Redis had stored it")
		assert.Equal(t, "created", retry.Body.String())
		assert.Equal(t, int32(1), store.calls.Load())
	})
}

// TestReliabilityRedisRestartedMidRequest: Redis dies while a handler runs
// and comes back empty (no persistence). Requests meanwhile get 503; the
// running handler's next lease renewal finds its claim gone, its context
// is cancelled with ErrLeaseLost and its client gets 503; the key then
// runs normally.
func TestReliabilityRedisRestartedMidRequest(t *testing.T) {
	addr, stop := redistest.StartServer(t)
	store := newRedisStore(t, faultClient(t, addr, faultReadTimeout))
	const lease = time.Second
	entered := make(chan struct{})
	var cause atomic.Value
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
			<-r.Context().Done()
			cause.Store(context.Cause(r.Context()))
			return
		}
		w.WriteHeader(http.StatusCreated)
	}
	fast, h := fastAndPatient(t, store, handler, idempotency.Options{Lease: lease})
	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(h, venue("k")()) }()
	waitFor(t, entered, eventBound, "the handler did not start")

	stop()
	w, took := timedServe(fast, venue("other")())
	requireUnavailable(t, w, took)
	restarted := time.Now()
	redistest.StartServerAt(t, addr)

	first := waitFor(t, done, eventBound, "the first request did not end")
	t.Logf("handler cancelled %v after the restart", time.Since(restarted))
	requireLeaseLost(t, first)
	assert.ErrorIs(t, cause.Load().(error), idempotency.ErrLeaseLost)

	w = serve(h, venue("k")())
	assert.Equal(t, http.StatusCreated, w.Code, "the key is free: %s", w.Body)
	assert.Equal(t, int32(2), handler.calls.Load())
}

// TestReliabilityReadTimeoutRetryTrap: the reply to the claim's SET comes
// after go-redis' read timeout, so go-redis sends the SET again on a new
// connection, and Redis already holds our claim. SET NX GET returns our
// own value, which counts as acquired: one execution, 201 to the original
// request. The same fault makes a plain SETNX answer false.
func TestReliabilityReadTimeoutRetryTrap(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	proxy := startProxy(t, addr)
	const readTimeout = 300 * time.Millisecond
	client := faultClient(t, proxy.Addr(), readTimeout)
	store := newRedisStore(t, client)
	handler := createVenue()
	// The store timeout leaves go-redis the time to retry.
	h := newMiddleware(t, store, idempotency.Options{StoreTimeout: 5 * time.Second}).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(h, venue("warm-up")()).Code)
	accepted := proxy.Accepted()

	proxy.DelayNextReplies(1, 3*readTimeout)
	w, took := timedServe(h, venue("k")())
	require.Equal(t, http.StatusCreated, w.Code, "the original request owns its claim: %s", w.Body)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	assert.GreaterOrEqual(t, took, readTimeout, "the first reply timed out")
	assert.Greater(t, proxy.Accepted(), accepted, "go-redis retried on a new connection")
	assert.Equal(t, int32(2), handler.calls.Load(), "one execution for k")
	assert.Equal(t, "true", serve(h, venue("k")()).Header().Get("X-Idempotent-Replayed"))
	t.Logf("201 after %v (read timeout %v)", took, readTimeout)

	// The trap itself: the retried SETNX finds the value its first attempt
	// stored and reports the key as taken.
	proxy.DelayNextReplies(1, 3*readTimeout)
	ok, err := client.SetNX(context.Background(), "trap", "mine", time.Minute).Result()
	require.NoError(t, err)
	assert.False(t, ok, "a plain SETNX would have told the owner its key was in use")
}

// TestReliabilityLeaseExtended: a handler that runs for many leases keeps
// its key: the lease is renewed, every duplicate gets 409, and the
// handler's context stays live.
func TestReliabilityLeaseExtended(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	client := faultClient(t, addr, faultReadTimeout)
	const lease = 600 * time.Millisecond
	entered, finish := make(chan struct{}), make(chan struct{})
	finished := sync.OnceFunc(func() { close(finish) })
	defer finished()
	handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		// Runs until the duplicates below are done, not for a fixed
		// time that a slow loop could outlast.
		<-finish
		assert.NoError(t, r.Context().Err(), "the handler's context stays live")
		w.WriteHeader(http.StatusCreated)
	}}
	h := newMiddleware(t, newRedisStore(t, client), idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout}).Handler(handler)
	done := make(chan int, 1)
	go func() { done <- serve(h, venue("k")()).Code }()
	waitFor(t, entered, eventBound, "the handler did not start")
	conflicts := 0
	for deadline := time.Now().Add(4 * lease); time.Now().Before(deadline); conflicts++ {
		require.Equal(t, http.StatusConflict, serve(h, venue("k")()).Code, "the key stays claimed")
		time.Sleep(lease / 6) // the pace of the duplicates, not a synchronisation
	}
	finished()
	assert.Equal(t, http.StatusCreated, waitFor(t, done, eventBound, "the first request did not end"))
	assert.Equal(t, int32(1), handler.calls.Load())
	t.Logf("%d duplicates got 409 over %v, 4 leases", conflicts, 4*lease)
}

// TestReliabilityLeaseLostRedisGone: Redis goes away while a handler runs
// and stays away. Renewals fail; after a whole lease the handler's
// context is cancelled with ErrLeaseLost and its client gets 503. When
// Redis returns, the key runs normally.
func TestReliabilityLeaseLostRedisGone(t *testing.T) {
	addr, stop := redistest.StartServer(t)
	store := newRedisStore(t, faultClient(t, addr, faultReadTimeout))
	const lease = time.Second
	entered := make(chan struct{})
	var cause atomic.Value
	cancelled := make(chan time.Time, 1)
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
			<-r.Context().Done()
			cancelled <- time.Now()
			cause.Store(context.Cause(r.Context()))
			return
		}
		w.WriteHeader(http.StatusCreated)
	}
	obs := &observed{}
	h := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout, Observer: obs.observe}).Handler(handler)
	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(h, venue("k")()) }()
	waitFor(t, entered, eventBound, "the handler did not start")
	stopped := time.Now()
	stop()

	first := waitFor(t, done, eventBound, "the first request did not end")
	answeredAfter := time.Since(stopped)
	cancelledAfter := waitFor(t, cancelled, eventBound, "the handler was not cancelled").Sub(stopped)
	requireLeaseLost(t, first)
	assert.ErrorIs(t, cause.Load().(error), idempotency.ErrLeaseLost)
	// Renewals run every lease/3 and each is cut off after lease/3: the
	// last success came at most lease/3 before Redis went away, and the
	// failure that crosses a whole lease since then ends up to two
	// intervals later.
	assert.Less(t, cancelledAfter, lease+2*lease/3+500*time.Millisecond, "cancelled within about one lease")
	// The 503 waits for the release to fail, which the store timeout bounds.
	assert.Less(t, answeredAfter, cancelledAfter+patientStoreTimeout+500*time.Millisecond)
	assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome, "the release failed too: Redis is down")
	t.Logf("handler cancelled %v, client answered %v after Redis went away (lease %v)", cancelledAfter, answeredAfter, lease)

	redistest.StartServerAt(t, addr)
	assert.Equal(t, http.StatusCreated, serve(h, venue("k")()).Code)
	assert.Equal(t, int32(2), handler.calls.Load())
}

// TestReliabilityLeaseLostTakenOver: instance A is cut off from Redis (a
// blackhole) while its handler runs; its lease lapses and instance B takes
// the key and completes it. A's handler is cancelled with ErrLeaseLost;
// when it answers anyway after the network heals, its store-if-owner
// write is refused, B's record stands, and A's client gets 503, not the
// 201 that the replay would contradict.
func TestReliabilityLeaseLostTakenOver(t *testing.T) {
	addr, _ := redistest.StartServer(t)
	proxy := startProxy(t, addr)
	prefix := redistest.Prefix(t)
	newStore := func(addr string) idempotency.Store {
		store, err := idempotency.NewRedisStore(faultClient(t, addr, time.Second), idempotency.RedisOptions{Prefix: prefix})
		require.NoError(t, err)
		return store
	}
	const lease = time.Second
	entered, proceed := make(chan struct{}), make(chan struct{})
	var cause atomic.Value
	handlerA := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-r.Context().Done()
		cause.Store(context.Cause(r.Context()))
		<-proceed
		w.WriteHeader(http.StatusCreated) // a handler that answers although cancelled
		io.WriteString(w, "A")
	}}
	handlerB := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "B")
	}}
	obsA := &observed{}
	a := newMiddleware(t, newStore(proxy.Addr()), idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout, Observer: obsA.observe}).Handler(handlerA)
	b := newMiddleware(t, newStore(addr), idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout}).Handler(handlerB)

	doneA := make(chan *httptest.ResponseRecorder, 1)
	go func() { doneA <- serve(a, venue("k")()) }()
	waitFor(t, entered, eventBound, "the handler did not start")
	proxy.Blackhole()
	wB, waited := untilNot409(t, b, venue("k"), 5*time.Second)
	require.Equal(t, http.StatusCreated, wB.Code, wB.Body)
	assert.Equal(t, "B", wB.Body.String())
	t.Logf("B took the key %v after A was cut off (lease %v)", waited, lease)

	proxy.Heal()
	close(proceed)
	wA := waitFor(t, doneA, eventBound, "A's request did not end")
	assert.ErrorIs(t, cause.Load().(error), idempotency.ErrLeaseLost)
	p := requireProblem(t, wA, http.StatusServiceUnavailable)
	assert.Contains(t, p.Type, "#ErrLeaseLost", "A's client did not get what A's handler wrote")
	assert.Equal(t, idempotency.OutcomeLeaseLost, obsA.last().Outcome, "A's write was refused")

	for _, h := range []http.Handler{a, b} {
		retry := serve(h, venue("k")())
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, "B", retry.Body.String(), "B's record stands")
	}
}

const crashChildEnv = "IDEMPOTENCY_TEST_CRASH_CHILD_REDIS"

// TestReliabilityCrashAfterSideEffect: a process dies inside the handler,
// after its side effect and before the response is stored. Until the
// lease lapses, retries get 409; then a retry runs the handler again. A
// side effect keyed by a key derived from the claim (as Stripe calls with
// derived idempotency keys are) is not repeated: the second attempt finds
// the first one's result.
func TestReliabilityCrashAfterSideEffect(t *testing.T) {
	const lease = time.Second
	prefix := "crash:"
	effect := func(ctx context.Context, client *redis.Client, r *http.Request) (string, bool) {
		claim, _ := idempotency.ClaimFromContext(r.Context())
		sum := sha256.Sum256([]byte(strings.Join([]string{claim.Kind, claim.Scope, claim.Key, claim.Fingerprint, "create-account"}, "\x00")))
		derived := "effect:" + hex.EncodeToString(sum[:16])
		client.Incr(ctx, "attempts")
		applied, err := client.SetNX(ctx, derived, "acct_1", 0).Result()
		if err != nil {
			panic(err)
		}
		return client.Get(ctx, derived).Val(), applied
	}
	if addr := os.Getenv(crashChildEnv); addr != "" {
		// The child: claim the key, apply the side effect, die.
		client := faultClient(t, addr, faultReadTimeout)
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
		require.NoError(t, err)
		h := newMiddleware(t, store, idempotency.Options{Lease: lease}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			effect(r.Context(), client, r)
			os.Exit(3)
		}))
		serve(h, venue("k")())
		os.Exit(4) // not reached
	}

	addr, _ := redistest.StartServer(t)
	child := exec.Command(os.Args[0], "-test.run=^TestReliabilityCrashAfterSideEffect$", "-test.count=1")
	child.Env = append(os.Environ(), crashChildEnv+"="+addr)
	out, err := child.CombinedOutput()
	crashed := time.Now()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit, "output: %s", out)
	require.Equal(t, 3, exit.ExitCode(), "the child died in its handler: %s", out)

	client := faultClient(t, addr, faultReadTimeout)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
	require.NoError(t, err)
	var appliedAgain atomic.Bool
	handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		account, applied := effect(r.Context(), client, r)
		appliedAgain.Store(applied)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"account":%q}`, account)
	}}
	h := newMiddleware(t, store, idempotency.Options{Lease: lease}).Handler(handler)
	w := serve(h, venue("k")())
	requireProblem(t, w, http.StatusConflict) // the dead process' claim holds until its lease lapses
	w, _ = untilNot409(t, h, venue("k"), 5*lease)
	window := time.Since(crashed)
	require.Equal(t, http.StatusCreated, w.Code, w.Body)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), "nothing had been stored: the handler ran again")
	assert.Less(t, window, lease+time.Second, "the key frees after about one lease")
	t.Logf("retries got 409 for %v after the crash (lease %v)", window, lease)

	assert.Equal(t, int32(1), handler.calls.Load())
	assert.Equal(t, "2", client.Get(context.Background(), "attempts").Val(), "the handler ran twice in all")
	assert.False(t, appliedAgain.Load(), "the side effect keyed by the derived key was not applied twice")
	assert.Equal(t, `{"account":"acct_1"}`, w.Body.String(), "the retry found the first attempt's result")
}

// fill writes to Redis until it refuses with an OOM error, in ever
// smaller values, so that even a small write is refused after it.
func fill(t *testing.T, client *redis.Client) int {
	t.Helper()
	ctx := context.Background()
	n := 0
	for _, size := range []int{64 << 10, 1 << 10, 16} {
		value := strings.Repeat("x", size)
		for {
			err := client.Set(ctx, fmt.Sprintf("filler:%d", n), value, 0).Err()
			n++
			if err != nil {
				require.ErrorContains(t, err, "OOM")
				break
			}
			require.Less(t, n, 1_000_000, "Redis never filled up")
		}
	}
	return n
}

// TestReliabilityRedisOOM: Redis with maxmemory and noeviction is full.
// New requests get 503 without running the handler; a handler that was
// already running cannot have its response stored, so its client gets 503
// instead of it and the key is freed; its retries get 503 while Redis is
// full, and once memory is freed the handler runs again.
func TestReliabilityRedisOOM(t *testing.T) {
	addr, _ := redistest.StartServer(t, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
	client := faultClient(t, addr, faultReadTimeout)
	const lease = time.Second
	entered, proceed := make(chan struct{}), make(chan struct{})
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
			<-proceed
		}
		w.WriteHeader(http.StatusCreated)
	}
	obs := &observed{}
	fast, h := fastAndPatient(t, newRedisStore(t, client), handler, idempotency.Options{Lease: lease, Observer: obs.observe})
	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(h, venue("k")()) }()
	waitFor(t, entered, eventBound, "the handler did not start")
	fillers := fill(t, client)

	w, took := timedServe(fast, venue("other")())
	requireUnavailable(t, w, took)
	assert.ErrorContains(t, obs.last().Err, "OOM")
	assert.Equal(t, int32(1), handler.calls.Load(), "no handler ran unprotected")

	close(proceed)
	first := waitFor(t, done, eventBound, "the first request did not end")
	requireProblem(t, first, http.StatusServiceUnavailable) // held, not stored: not sent
	assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome)
	assert.ErrorContains(t, obs.last().Err, "OOM", "storing the response hit OOM")

	// The key was freed (DEL needs no memory), so a retry may run, but
	// claiming needs memory: 503 while Redis is full.
	w, took = timedServe(fast, venue("k")())
	requireUnavailable(t, w, took)

	keys := make([]string, fillers)
	for i := range keys {
		keys[i] = fmt.Sprintf("filler:%d", i)
	}
	require.NoError(t, client.Del(context.Background(), keys...).Err())
	w, waited := untilNot409(t, h, venue("k"), 5*lease)
	assert.Equal(t, http.StatusCreated, w.Code, w.Body)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), "nothing had been stored: the handler ran again")
	assert.Equal(t, int32(2), handler.calls.Load())
	t.Logf("after memory was freed, 409 for %v (lease %v)", waited, lease)
}

// TestReliabilityEvictionLosesRecords: with an evicting policy
// (allkeys-lru) a full Redis silently drops records, and a retry runs the
// handler a second time. This is why RedisStore needs noeviction.
func TestReliabilityEvictionLosesRecords(t *testing.T) {
	addr, _ := redistest.StartServer(t, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
	client := faultClient(t, addr, faultReadTimeout)
	handler := createVenue()
	h := newMiddleware(t, newRedisStore(t, client)).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(h, venue("k")()).Code)
	ctx := context.Background()
	var records []string
	for _, k := range client.Keys(ctx, "idemtest:*").Val() {
		if !strings.HasSuffix(k, "}fence") {
			records = append(records, k)
		}
	}
	require.Len(t, records, 1)

	value := strings.Repeat("x", 64<<10)
	for i := 0; client.Exists(ctx, records[0]).Val() == 1; i++ {
		require.NoError(t, client.Set(ctx, fmt.Sprintf("filler:%d", i), value, 0).Err(), "writes never fail: Redis evicts instead")
		require.Less(t, i, 10_000, "the record was never evicted")
	}
	w := serve(h, venue("k")())
	assert.Equal(t, http.StatusCreated, w.Code)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, int32(2), handler.calls.Load(), "the evicted record let the handler run twice")
}

// TestReliabilityFailover: a primary with one replica; the replication
// link is cut (so writes stay on the primary), then the replica is
// promoted (REPLICAOF NO ONE) and clients move to it.
//
// Without WithRedisWait, every record replicated before the cut survives
// and every record written after it is lost: the retry runs the handler a
// second time. With WithRedisWait(1, ...), a claim made while no replica
// acknowledges fails closed (503, handler not run, claim taken back); a
// response stored while none acknowledges reaches its client but is
// reported as a store failure, and is lost with the primary: its claim,
// which was acknowledged, holds the key on the new primary until the lease
// lapses, then a retry runs the handler again.
func TestReliabilityFailover(t *testing.T) {
	primary, replica, link := startReplicated(t)
	prefix := redistest.Prefix(t)
	newStore := func(addr string, opts ...idempotency.RedisOptions) idempotency.Store {
		store, err := idempotency.NewRedisStore(faultClient(t, addr, faultReadTimeout), merged(append(opts, idempotency.RedisOptions{Prefix: prefix})...))
		require.NoError(t, err)
		return store
	}
	const waitTimeout = time.Second
	const lease = time.Second
	entered, proceed := make(chan struct{}), make(chan struct{})
	var cut atomic.Bool
	handler := &counted{}
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Idempotency-Key") == "waited-cut" && cut.CompareAndSwap(false, true) {
			close(entered)
			<-proceed
		}
		w.WriteHeader(http.StatusCreated)
	}
	obs := &observed{}
	opts := idempotency.Options{Lease: lease, StoreTimeout: patientStoreTimeout, Observer: obs.observe}
	plain := newMiddleware(t, newStore(primary), opts).Handler(handler)
	waiting := newMiddleware(t, newStore(primary, idempotency.RedisOptions{WaitReplicas: 1, WaitTimeout: waitTimeout}), opts).Handler(handler)

	require.Equal(t, http.StatusCreated, serve(plain, venue("before")()).Code, "%v", obs.last().Err)
	require.Equal(t, http.StatusCreated, serve(waiting, venue("waited")()).Code, "%v", obs.last().Err)
	assert.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome)
	// The plain record is only known to be on the replica once WAIT says so.
	require.EqualValues(t, 1, faultClient(t, primary, time.Second).Do(context.Background(), "wait", 1, 1000).Val())

	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(waiting, venue("waited-cut")()) }()
	waitFor(t, entered, eventBound, "the handler did not start")

	link.Blackhole() // replication stops; the primary still answers
	require.Equal(t, http.StatusCreated, serve(plain, venue("after")()).Code, "the primary acknowledges alone")
	w, took := timedServe(waiting, venue("refused")())
	requireProblem(t, w, http.StatusServiceUnavailable)
	assert.Less(t, took, waitTimeout+faultBound, "the 503 came once WAIT timed out")
	assert.ErrorContains(t, obs.last().Err, "acknowledged by 0 of 1 replicas")
	close(proceed)
	requireProblem(t, waitFor(t, done, eventBound, "the request did not end"), http.StatusServiceUnavailable) // not acknowledged, so not sent
	assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome, "its stored response was not acknowledged")
	executed := handler.calls.Load()
	assert.Equal(t, int32(4), executed, "before, waited, after, waited-cut; not refused")

	// Failover: promote the replica and move the clients to it.
	require.NoError(t, faultClient(t, replica, time.Second).ReplicaOf(context.Background(), "NO", "ONE").Err())
	promoted := newMiddleware(t, newStore(replica), opts).Handler(handler)
	for _, key := range []string{"before", "waited"} {
		w := serve(promoted, venue(key)())
		assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"), "%s survived the failover", key)
	}
	for _, key := range []string{"after", "refused"} {
		w := serve(promoted, venue(key)())
		assert.Equal(t, http.StatusCreated, w.Code, key)
		assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), "%s: nothing of it reached the replica", key)
	}
	// waited-cut's claim was acknowledged, its renewals and its response
	// were not: the key is in flight on the new primary (409) until the
	// lease the replica last heard of lapses (here it already has), then
	// it runs again.
	w, waited := untilNot409(t, promoted, venue("waited-cut"), 5*lease)
	assert.Equal(t, http.StatusCreated, w.Code)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	t.Logf("waited-cut ran again %v after the failover (lease %v)", waited, lease)
	assert.Equal(t, executed+3, handler.calls.Load(), "after and waited-cut ran a second time; refused ran for the first time")
}
