package idempotency_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
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

// gate is a handler whose first execution blocks until opened; every
// execution answers with its number and the status the test chose.
type gate struct {
	calls   atomic.Int32
	entered chan struct{}
	open    chan struct{}
	once    sync.Once
	status  func(n int32) int
	keep    func(n int32) (time.Duration, bool)
}

// release opens the gate; it may be called more than once, so a test
// defers it to let the first execution end on every path.
func (g *gate) release() { g.once.Do(func() { close(g.open) }) }

func newGate() *gate {
	return &gate{entered: make(chan struct{}), open: make(chan struct{}), status: func(int32) int { return http.StatusCreated }}
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := g.calls.Add(1)
	if n == 1 {
		close(g.entered)
		<-g.open
	}
	if g.keep != nil {
		if d, ok := g.keep(n); ok {
			c, _ := idempotency.ClaimFromContext(r.Context())
			c.Keep(d)
		}
	}
	w.WriteHeader(g.status(n))
	fmt.Fprintf(w, "execution %d", n)
}

// answer is what one concurrent request got, and when.
type answer struct {
	code     int
	body     string
	replayed bool
	retry    string
	at       time.Time
}

func serveAt(h http.Handler, r *http.Request) answer {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return answer{w.Code, w.Body.String(), w.Header().Get("X-Idempotent-Replayed") == "true", w.Header().Get("Retry-After"), time.Now()}
}

// duplicates sends n requests through hs (round robin) at once and
// returns their answers once all are in.
func duplicates(hs []http.Handler, n int, req func() *http.Request) []answer {
	out := make([]answer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = serveAt(hs[i%len(hs)], req())
		}()
	}
	wg.Wait()
	return out
}

func preferWait(key, prefer string) *http.Request {
	r := post(key, `{"name":"Hall"}`)
	if prefer != "" {
		r.Header.Set("Prefer", prefer)
	}
	return r
}

// TestWait runs the waiting duplicate's contract against every store.
func TestWait(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			newStore := func(t *testing.T) idempotency.Store {
				store, _ := kind.new(t)
				return store
			}
			testWait(t, newStore)
		})
	}
}

func testWait(t *testing.T, newStore func(t *testing.T) idempotency.Store) {
	// Duplicates that wait get the first outcome, not 409; the handler
	// runs once.
	t.Run("DuplicatesGetTheReplay", func(t *testing.T) {
		g := newGate()
		defer g.release()
		const wait = 10 * time.Second
		acquires := newAcquireLog()
		h := newMiddleware(t, acquires.wrap(newStore(t)), idempotency.Options{Wait: wait, MaxWaiters: 100}).Handler(g)
		first := make(chan answer, 1)
		go func() { first <- serveAt(h, preferWait("k", "")) }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		got := make(chan []answer, 1)
		go func() { got <- duplicates([]http.Handler{h}, 10, func() *http.Request { return preferWait("k", "") }) }()
		acquires.awaitWaiting(t, 10)
		g.release()
		a := waitFor(t, first, eventBound, "the first request did not end")
		require.Equal(t, http.StatusCreated, a.code)
		for _, d := range waitFor(t, got, eventBound, "the duplicates did not end") {
			assert.Equal(t, http.StatusCreated, d.code)
			assert.True(t, d.replayed)
			assert.Equal(t, "execution 1", d.body)
			// Timed out, they would have answered 409 after the wait.
			assert.Less(t, d.at.Sub(a.at), wait/2, "woken, not timed out")
		}
		assert.Equal(t, int32(1), g.calls.Load())
	})

	// The wait ends first: 409 with a Retry-After from the lease, after
	// the bound and not much later.
	t.Run("WaitEndsFirstIs409", func(t *testing.T) {
		g := newGate()
		const wait, lease = 300 * time.Millisecond, 9500 * time.Millisecond
		h := newMiddleware(t, newStore(t), idempotency.Options{Wait: wait, MaxWaiters: 100, Lease: lease}).Handler(g)
		done := make(chan struct{})
		go func() { defer close(done); serve(h, preferWait("k", "")) }()
		defer func() { g.release(); waitFor(t, done, eventBound, "the first request did not end") }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		start := time.Now()
		a := serveAt(h, preferWait("k", ""))
		took := a.at.Sub(start)
		assert.Equal(t, http.StatusConflict, a.code)
		// The rest of the lease, rounded up: 10 just after the claim or a
		// renewal, and at least 6 while the renewals (every 9.5 s / 3)
		// come within a second of their time. A store on a fake clock
		// always says 10; on a real one the value depends on when the 409
		// was computed, which a loaded machine delays.
		retryAfter, err := strconv.Atoi(a.retry)
		require.NoError(t, err, "Retry-After %q", a.retry)
		assert.GreaterOrEqual(t, retryAfter, 6, "the 9.5 s lease's rest, rounded up")
		assert.LessOrEqual(t, retryAfter, 10, "the 9.5 s lease's rest, rounded up")
		// Ended by the wait, not by the lease.
		assert.GreaterOrEqual(t, took, wait)
		assert.Less(t, took, lease/2)
	})

	// Prefer: wait=0 asks for the 409 at once; wait=N shortens the bound.
	t.Run("PreferWait", func(t *testing.T) {
		g := newGate()
		const wait = 10 * time.Second
		acquires := newAcquireLog()
		h := newMiddleware(t, acquires.wrap(newStore(t)), idempotency.Options{Wait: wait, MaxWaiters: 100}).Handler(g)
		done := make(chan struct{})
		go func() { defer close(done); serve(h, preferWait("k", "")) }()
		defer func() { g.release(); waitFor(t, done, eventBound, "the first request did not end") }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		// A request that does not wait reads the key once; one that
		// waits reads it again once it watches the key.
		mark := acquires.mark()
		a := serveAt(h, preferWait("k", "respond-async, wait=0"))
		assert.Equal(t, http.StatusConflict, a.code)
		assert.Equal(t, []int{1}, acquires.readsSince(mark), "wait=0: answered at once, without waiting")
		start := time.Now()
		a = serveAt(h, preferWait("k", "wait=1"))
		assert.Equal(t, http.StatusConflict, a.code)
		assert.GreaterOrEqual(t, a.at.Sub(start), time.Second)
		assert.Less(t, a.at.Sub(start), wait/2, "wait=1 shortened the 10 s wait")
	})

	// A different request under the key is told so at once.
	t.Run("MismatchIs422AtOnce", func(t *testing.T) {
		g := newGate()
		acquires := newAcquireLog()
		h := newMiddleware(t, acquires.wrap(newStore(t)), idempotency.Options{Wait: 5 * time.Second, MaxWaiters: 100}).Handler(g)
		done := make(chan struct{})
		go func() { defer close(done); serve(h, preferWait("k", "")) }()
		defer func() { g.release(); waitFor(t, done, eventBound, "the first request did not end") }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		mark := acquires.mark()
		w := serve(h, post("k", `{"other":1}`))
		requireProblem(t, w, http.StatusUnprocessableEntity)
		assert.Equal(t, []int{1}, acquires.readsSince(mark), "told at once: it read the key once and did not wait")
	})

	// Above the cap a duplicate gets 409 at once.
	t.Run("CapOnWaiters", func(t *testing.T) {
		g := newGate()
		acquires := newAcquireLog()
		h := newMiddleware(t, acquires.wrap(newStore(t)), idempotency.Options{Wait: 5 * time.Second, MaxWaiters: 1}).Handler(g)
		done := make(chan struct{})
		go func() { defer close(done); serve(h, preferWait("k", "")) }()
		defer func() { g.release(); waitFor(t, done, eventBound, "the first request did not end") }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		waiter := make(chan answer, 1)
		go func() { waiter <- serveAt(h, preferWait("k", "")) }()
		acquires.awaitWaiting(t, 1)
		mark := acquires.mark()
		a := serveAt(h, preferWait("k", ""))
		assert.Equal(t, http.StatusConflict, a.code)
		assert.Equal(t, []int{1}, acquires.readsSince(mark), "over the cap: answered at once, without waiting")
		g.release()
		assert.True(t, waitFor(t, waiter, eventBound, "the waiter did not end").replayed)
	})

	// The first attempt fails and frees the key: exactly one waiter
	// takes it over and runs the handler; the others get its replay.
	t.Run("FailedFirstHandsOverToOneWaiter", func(t *testing.T) {
		g := newGate()
		g.status = func(n int32) int {
			if n == 1 {
				return http.StatusInternalServerError
			}
			return http.StatusCreated
		}
		defer g.release()
		acquires := newAcquireLog()
		h := newMiddleware(t, acquires.wrap(newStore(t)), idempotency.Options{Wait: 5 * time.Second, MaxWaiters: 100}).Handler(g)
		first := make(chan answer, 1)
		go func() { first <- serveAt(h, preferWait("k", "")) }()
		waitFor(t, g.entered, eventBound, "the handler did not start")
		got := make(chan []answer, 1)
		go func() { got <- duplicates([]http.Handler{h}, 10, func() *http.Request { return preferWait("k", "") }) }()
		acquires.awaitWaiting(t, 10)
		g.release()
		assert.Equal(t, http.StatusInternalServerError, waitFor(t, first, eventBound, "the first request did not end").code)
		executed, replayed := 0, 0
		for _, a := range waitFor(t, got, eventBound, "the duplicates did not end") {
			require.Equal(t, http.StatusCreated, a.code, a.body)
			assert.Equal(t, "execution 2", a.body)
			if a.replayed {
				replayed++
			} else {
				executed++
			}
		}
		assert.Equal(t, 1, executed, "one waiter took the key over")
		assert.Equal(t, 9, replayed)
		assert.Equal(t, int32(2), g.calls.Load())
	})

	// The handler decides what is stored: Keep(0) frees the key even for
	// a 201, Keep(d) stores even a 500.
	t.Run("HandlerDecidesWhatIsStored", func(t *testing.T) {
		g := newGate()
		g.release()
		g.keep = func(n int32) (time.Duration, bool) { return 0, n == 1 }
		h := newMiddleware(t, newStore(t)).Handler(g)
		assert.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
		again := serve(h, post("k", `{}`))
		assert.Equal(t, "execution 2", again.Body.String(), "not stored: the retry ran it again")
		assert.Equal(t, "true", serve(h, post("k", `{}`)).Header().Get("X-Idempotent-Replayed"))

		g2 := newGate()
		g2.release()
		g2.status = func(int32) int { return http.StatusInternalServerError }
		g2.keep = func(int32) (time.Duration, bool) { return time.Hour, true }
		h2 := newMiddleware(t, newStore(t)).Handler(g2)
		serve(h2, post("k", `{}`))
		retry := serve(h2, post("k", `{}`))
		assert.Equal(t, http.StatusInternalServerError, retry.Code)
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), g2.calls.Load())
	})
}

// TestKeepTTL checks that Keep(d) sets the record's TTL, with a clock.
func TestKeepTTL(t *testing.T) {
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	g := newGate()
	g.release()
	g.keep = func(int32) (time.Duration, bool) { return time.Minute, true }
	h := newMiddleware(t, store).Handler(g)
	serve(h, post("k", `{}`))
	clock.Advance(59 * time.Second)
	assert.Equal(t, "true", serve(h, post("k", `{}`)).Header().Get("X-Idempotent-Replayed"))
	clock.Advance(2 * time.Second)
	assert.Equal(t, "execution 2", serve(h, post("k", `{}`)).Body.String(), "kept for a minute, not 24 h")
}

// redisInstances returns n middlewares, each with its own go-redis
// client and RedisStore, on the real Redis, sharing a prefix, and the
// name of their connections (CLIENT LIST shows it). Their Acquire calls
// are recorded in acquires.
func redisInstances(t *testing.T, n int, acquires *acquireLog, handler http.Handler, opts ...idempotency.Options) ([]http.Handler, []*idempotency.RedisStore, string) {
	t.Helper()
	prefix := redistest.Prefix(t)
	var hs []http.Handler
	var stores []*idempotency.RedisStore
	for range n {
		opt := redistest.Options(t)
		opt.ClientName = clientName(prefix) // so a test can find its own connections
		client := redis.NewClient(opt)
		t.Cleanup(func() { client.Close() })
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
		require.NoError(t, err)
		stores = append(stores, store)
		hs = append(hs, newMiddleware(t, acquires.wrap(store), opts...).Handler(handler))
	}
	return hs, stores, clientName(prefix)
}

// clientName names the connections of the instances with this prefix.
func clientName(prefix string) string {
	return "idemtest-" + strings.Trim(strings.ReplaceAll(prefix, ":", "-"), "-")
}

// waitBound is how long after the first outcome every waiter must have
// its replay: a wake-up and one re-read, with room for -race and a
// machine whose two cores are busy. A waiter that missed its wake-up
// would take the full wait, 10 s.
const waitBound = 2 * time.Second

// TestWaitThreeInstances: 50 concurrent duplicates across 3 instances on
// one real Redis get one execution and 49 replays, none later than the
// first outcome plus waitBound.
func TestWaitThreeInstances(t *testing.T) {
	const n = 50
	// The handler answers once the 49 duplicates wait: every replay is
	// then a wake-up, which a sleep here only made likely.
	acquires := newAcquireLog()
	handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		if !acquires.until(func() bool { return acquires.waitingLocked() >= n-1 }) {
			t.Errorf("%d of %d duplicates waiting after %v", acquires.waiting(), n-1, eventBound)
		}
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "created")
	}}
	hs, stores, _ := redisInstances(t, 3, acquires, handler, idempotency.Options{Wait: 10 * time.Second, MaxWaiters: 100})
	got := duplicates(hs, n, func() *http.Request { return preferWait("k", "") })
	var executed []answer
	var replays []answer
	for _, a := range got {
		require.Equal(t, http.StatusCreated, a.code, a.body)
		if a.replayed {
			replays = append(replays, a)
		} else {
			executed = append(executed, a)
		}
	}
	require.Len(t, executed, 1)
	require.Len(t, replays, 49)
	assert.Equal(t, int32(1), handler.calls.Load())
	var late []time.Duration
	for _, a := range replays {
		late = append(late, a.at.Sub(executed[0].at))
	}
	slices.Sort(late)
	t.Logf("replays after the first outcome: min %v, median %v, max %v", late[0], late[len(late)/2], late[len(late)-1])
	assert.Less(t, late[len(late)-1], waitBound)
	for _, s := range stores {
		conns, channels := s.Subscriptions()
		assert.Zero(t, conns+channels, "the subscription closes when nobody waits")
	}
}

// TestWaitHandOverAcrossInstances: the first attempt fails; exactly one
// waiter, on any instance, takes over; the rest replay its outcome.
func TestWaitHandOverAcrossInstances(t *testing.T) {
	var calls atomic.Int32
	// The first attempt fails once the 29 duplicates wait, so the key is
	// handed over to a waiter (a sleep here only made that likely).
	acquires := newAcquireLog()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		if n == 1 {
			if !acquires.until(func() bool { return acquires.waitingLocked() >= 29 }) {
				t.Errorf("%d of 29 duplicates waiting after %v", acquires.waiting(), eventBound)
			}
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "execution %d", n)
	})
	hs, _, _ := redisInstances(t, 3, acquires, handler, idempotency.Options{Wait: 10 * time.Second, MaxWaiters: 100})
	got := duplicates(hs, 30, func() *http.Request { return preferWait("k", "") })
	count := map[string]int{}
	for _, a := range got {
		count[strconv.Itoa(a.code)+" replayed="+strconv.FormatBool(a.replayed)+" "+a.body]++
	}
	assert.Equal(t, map[string]int{
		"503 replayed=false ":            1,
		"201 replayed=false execution 2": 1,
		"201 replayed=true execution 2":  28,
	}, count)
	assert.Equal(t, int32(2), calls.Load())
}

// TestWaitPubSubKilled drops the waiters' pub/sub connections (CLIENT
// KILL TYPE pubsub) while they wait: each wait still ends by its bound
// with the replay.
func TestWaitPubSubKilled(t *testing.T) {
	admin := redistest.Client(t)
	g := newGate()
	defer g.release()
	const bound = 3 * time.Second
	acquires := newAcquireLog()
	hs, _, name := redisInstances(t, 3, acquires, g, idempotency.Options{Wait: bound, MaxWaiters: 100})
	first := make(chan answer, 1)
	go func() { first <- serveAt(hs[0], preferWait("k", "")) }()
	waitFor(t, g.entered, eventBound, "the handler did not start")
	got := make(chan []answer, 1)
	start := time.Now()
	go func() { got <- duplicates(hs, 20, func() *http.Request { return preferWait("k", "") }) }()
	acquires.awaitWaiting(t, 20) // each is subscribed once it waits
	// Only this test's pub/sub connections: the server is shared.
	killed := 0
	list, err := admin.ClientList(context.Background()).Result()
	require.NoError(t, err)
	for _, line := range strings.Split(list, "\n") {
		if strings.Contains(line, " name="+name+" ") && strings.Contains(line, " flags=P ") {
			id, _, _ := strings.Cut(strings.TrimPrefix(line, "id="), " ")
			require.NoError(t, admin.Do(context.Background(), "client", "kill", "id", id).Err())
			killed++
		}
	}
	t.Logf("killed %d pub/sub connections", killed)
	require.Positive(t, killed)
	g.release()
	a := waitFor(t, first, eventBound, "the first request did not end")
	var worst time.Duration
	for _, d := range waitFor(t, got, eventBound, "the duplicates did not end") {
		assert.Equal(t, http.StatusCreated, d.code)
		assert.True(t, d.replayed)
		// By the bound, counted from before the duplicates were sent,
		// and one re-read.
		assert.LessOrEqual(t, d.at.Sub(start), bound+waitBound)
		worst = max(worst, d.at.Sub(a.at))
	}
	t.Logf("after the kill, the last replay came %v after the first outcome", worst)
}

// TestWaitFigures measures, in one run on the real Redis, the time from
// the first attempt's completion to each waiter's replay with
// notifications and with 50 ms polling, and the subscriptions and
// goroutines of one instance at 1,000 waiters.
func TestWaitFigures(t *testing.T) {
	if testing.Short() {
		t.Skip("figures are for a full run")
	}
	const waiters = 200
	var finished atomic.Int64 // Unix ns when the first attempt's outcome was stored
	hold := make(chan struct{})
	holding := make(chan struct{}, 2)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		holding <- struct{}{}
		<-hold
		w.WriteHeader(http.StatusCreated)
	})
	observe := func(_ context.Context, r idempotency.Report) {
		if r.Outcome == idempotency.OutcomeExecuted {
			finished.Store(time.Now().UnixNano())
		}
	}
	acquires := newAcquireLog()
	hs, stores, _ := redisInstances(t, 1, acquires, handler, idempotency.Options{Wait: 10 * time.Second, MaxWaiters: waiters, Observer: observe})

	percentiles := func(name string, lat []time.Duration) {
		slices.Sort(lat)
		t.Logf("%s: %d waiters, p50 %v, p99 %v, max %v", name, len(lat), lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1])
	}

	// Notifications: the waiters come once the key is held, and it is
	// completed once all of them wait.
	firstDone := make(chan struct{})
	go func() { defer close(firstDone); serve(hs[0], preferWait("notify", "")) }()
	waitFor(t, holding, eventBound, "the handler did not start")
	got := make(chan answer, waiters)
	for range waiters {
		go func() { got <- serveAt(hs[0], preferWait("notify", "")) }()
	}
	acquires.awaitWaiting(t, waiters)
	close(hold)
	answers := make([]answer, 0, waiters)
	for range waiters {
		answers = append(answers, waitFor(t, got, eventBound, "a waiter did not end"))
	}
	waitFor(t, firstDone, eventBound, "the first request did not end") // its outcome is reported
	var lat []time.Duration
	for _, a := range answers {
		require.True(t, a.replayed)
		lat = append(lat, a.at.Sub(time.Unix(0, finished.Load())))
	}
	percentiles("notifications", lat)

	// 50 ms polling, what a waiter without notifications would do: the
	// same claim round trip every 50 ms. The key is completed once every
	// poller has polled.
	hold2 := make(chan struct{})
	polls := newAcquireLog()
	pollHandler := newMiddleware(t, polls.wrap(stores[0]), idempotency.Options{Observer: observe}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		holding <- struct{}{}
		<-hold2
		w.WriteHeader(http.StatusCreated)
	}))
	firstDone = make(chan struct{})
	go func() { defer close(firstDone); serve(pollHandler, preferWait("poll", "")) }()
	waitFor(t, holding, eventBound, "the handler did not start")
	polled := make(chan time.Time, waiters)
	for range waiters {
		go func() {
			for {
				w := serve(pollHandler, preferWait("poll", ""))
				if w.Code != http.StatusConflict {
					polled <- time.Now()
					return
				}
				time.Sleep(50 * time.Millisecond) // the polling measured
			}
		}()
	}
	if !polls.until(func() bool { return polls.calls >= 1+waiters }) {
		t.Fatalf("%d polls after %v, want %d", polls.count()-1, eventBound, waiters)
	}
	close(hold2)
	var pollTimes []time.Time
	for range waiters {
		pollTimes = append(pollTimes, waitFor(t, polled, eventBound, "a poller did not end"))
	}
	waitFor(t, firstDone, eventBound, "the first request did not end")
	lat = lat[:0]
	for _, at := range pollTimes {
		lat = append(lat, at.Sub(time.Unix(0, finished.Load())))
	}
	percentiles("50 ms polling", lat)

	// 1,000 waiters on 1,000 keys that another instance holds.
	const many = 1000
	block := make(chan struct{})
	var entered sync.WaitGroup
	entered.Add(many)
	blocking := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered.Done()
		<-block
		w.WriteHeader(http.StatusCreated)
	})
	manyWaiting := newAcquireLog() // the holders read their keys once, the waiters twice
	pair, pairStores, _ := redisInstances(t, 2, manyWaiting, blocking, idempotency.Options{Wait: 10 * time.Second, MaxWaiters: many})
	// The holders' pool: 1,000 claims at once.
	var all sync.WaitGroup
	for i := range many {
		all.Add(1)
		go func() { defer all.Done(); serve(pair[0], preferWait("many-"+strconv.Itoa(i), "")) }()
	}
	allEntered := make(chan struct{})
	go func() { entered.Wait(); close(allEntered) }()
	waitFor(t, allEntered, eventBound, "the holders' handlers did not all start")
	before := runtime.NumGoroutine()
	for i := range many {
		all.Add(1)
		go func() {
			defer all.Done()
			w := serve(pair[1], preferWait("many-"+strconv.Itoa(i), ""))
			assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
		}()
	}
	manyWaiting.awaitWaiting(t, many)
	_, subscribed := pairStores[1].Subscriptions()
	require.Equal(t, many, subscribed, "a waiter subscribes before it re-reads its key")
	// Once every waiter has re-read its key after subscribing, and sits
	// in its select.
	extra := 0
	assert.Eventually(t, func() bool { extra = runtime.NumGoroutine() - before - many; return extra <= 2 }, 10*time.Second, 10*time.Millisecond)
	conns, channels := pairStores[1].Subscriptions()
	t.Logf("%d waiters on one instance: %d pub/sub connection(s), %d channels subscribed, %d goroutine(s) besides the waiting requests' own", many, conns, channels, extra)
	assert.Equal(t, 1, conns)
	assert.LessOrEqual(t, extra, 2)
	close(block)
	all.Wait()
	conns, channels = pairStores[1].Subscriptions()
	assert.Zero(t, conns+channels)
}
