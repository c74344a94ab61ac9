package pgstore_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

// The tests here inject real faults between the store and a real
// PostgreSQL: backends terminated by the server, connections reset by a
// TCP proxy (internal/faultproxy) after the server ran the statement,
// replies delayed past the store timeout, a pool with no free connection.

const (
	faultStoreTimeout = 300 * time.Millisecond
	// faultBound is the longest a 503 may take: the store timeout plus
	// room for a loaded 2-core machine running the race detector.
	faultBound = faultStoreTimeout + 700*time.Millisecond
)

// observed collects the middleware's reports.
type observed struct {
	outcomes chan idempotency.Outcome
}

func newObserved() *observed { return &observed{outcomes: make(chan idempotency.Outcome, 100)} }

func (o *observed) observe(_ context.Context, r idempotency.Report) { o.outcomes <- r.Outcome }

func (o *observed) last(t *testing.T) idempotency.Outcome {
	t.Helper()
	select {
	case out := <-o.outcomes:
		return out
	case <-time.After(5 * time.Second):
		t.Fatal("no report")
		return ""
	}
}

// requireUnavailable checks a fail-closed answer: 503 with Retry-After,
// within faultBound.
func requireUnavailable(t *testing.T, w interface {
	Result() *http.Response
}, took time.Duration) {
	t.Helper()
	resp := w.Result()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "1", resp.Header.Get("Retry-After"))
	assert.Less(t, took, faultBound, "the 503 took too long")
}

// proxied returns a pool (migrated, in a schema of the test's own) whose
// connections go through a fault proxy, and a pool straight to the
// server, on the same schema, to look at what is stored.
func proxied(t *testing.T, maxConns int32) (through, direct *pgxpool.Pool, proxy *faultproxy.Proxy) {
	t.Helper()
	cfg := pgtest.Config(t)
	direct = pgtest.Pool(t, cfg.Copy(), migrate)
	proxy, err := faultproxy.Start(net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))))
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	host, port, err := net.SplitHostPort(proxy.Addr())
	require.NoError(t, err)
	p, err := strconv.Atoi(port)
	require.NoError(t, err)
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = host, uint16(p)
	cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	cfg.MaxConns = maxConns
	through, err = pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(through.Close)
	return through, direct, proxy
}

// renewalStore reports, for each lease renewal that succeeded, how many
// kills had happened when it was sent.
type renewalStore struct {
	idempotency.Store
	kills   *atomic.Int64
	renewed chan int64
}

func (s renewalStore) Unwrap() idempotency.Store { return s.Store }

func (s renewalStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	kills := s.kills.Load()
	err := s.Store.Extend(ctx, key, token, lease)
	if err == nil {
		select {
		case s.renewed <- kills:
		default:
		}
	}
	return err
}

// TestFaultBackendTerminated: while the handler runs, its lease renewed,
// the server terminates every backend of the store's pool
// (pg_terminate_backend), twice. The renewal after the first kill and the
// completion after the second find their connections dead, are sent again
// on new ones, and the response is stored: 201, one execution, the retry
// replays. The handler waits for renewals, not for a duration; the lease
// is long enough that a loaded machine's stalls do not end it.
func TestFaultBackendTerminated(t *testing.T) {
	cfg := pgtest.Config(t)
	app := cfg.ConnConfig.RuntimeParams["application_name"]
	pool := pgtest.Pool(t, cfg, migrate)
	killerCfg := cfg.ConnConfig.Copy()
	killerCfg.RuntimeParams["application_name"] = app + "_killer"
	killer, err := pgx.ConnectConfig(context.Background(), killerCfg)
	require.NoError(t, err)
	defer killer.Close(context.Background())

	var kills, terminated atomic.Int64
	kill := func() {
		var n int64
		require.NoError(t, killer.QueryRow(context.Background(),
			`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&n))
		terminated.Add(n)
		kills.Add(1)
	}
	renewed := make(chan int64, 100)
	// renewal waits for a renewal sent after kill number after succeeded.
	renewal := func(after int64) {
		timeout := time.After(10 * time.Second)
		for {
			select {
			case k := <-renewed:
				if k >= after {
					return
				}
			case <-timeout:
				t.Errorf("no renewal sent after kill %d succeeded", after)
				return
			}
		}
	}
	handler := &counted{hold: func() {
		renewal(0)
		kill()
		renewal(1) // on a new connection
		kill()     // before the completion
	}}
	obs := newObserved()
	store := renewalStore{Store: newStore(t, pool), kills: &kills, renewed: renewed}
	h := newMiddleware(t, store, idempotency.Options{Lease: 2 * time.Second, Observer: obs.observe}).Handler(handler)

	conns := pool.Stat().NewConnsCount()
	w := serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, "body: %s", w.Body)
	assert.Equal(t, idempotency.OutcomeExecuted, obs.last(t), "the response was stored")
	assert.Positive(t, terminated.Load(), "backends were terminated")
	assert.GreaterOrEqual(t, pool.Stat().NewConnsCount()-conns, int64(2), "the renewal and the completion went on new connections")
	t.Logf("%d backends terminated while the handler ran", terminated.Load())

	handler.hold = nil
	kill() // and once more before the retry
	retry := serve(h, post("k", `{}`))
	assert.Equal(t, http.StatusCreated, retry.Code)
	assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, w.Body.String(), retry.Body.String())
	assert.Equal(t, int32(1), handler.calls.Load())
}

// TestFaultConnectionReset: the proxy drops the reply to a statement the
// server ran and resets the connection. The store sends the statement
// again on a new connection; the claim finds its own token (acquired),
// the completion its own record (stored).
func TestFaultConnectionReset(t *testing.T) {
	for _, at := range []string{"claim", "complete"} {
		t.Run(at, func(t *testing.T) {
			pool, direct, proxy := proxied(t, 1)
			obs := newObserved()
			handler := &counted{}
			h := newMiddleware(t, newStore(t, pool), idempotency.Options{Observer: obs.observe}).Handler(handler)
			require.Equal(t, http.StatusCreated, serve(h, post("warm-up", `{}`)).Code) // statements prepared
			obs.last(t)

			if at == "claim" {
				proxy.ResetNextReplies(1)
			} else {
				handler.hold = func() { proxy.ResetNextReplies(1) }
			}
			accepted := proxy.Accepted()
			w := serve(h, post("k", `{}`))
			require.Equal(t, http.StatusCreated, w.Code, "body: %s", w.Body)
			assert.Equal(t, `{"execution":2}`, w.Body.String())
			assert.Equal(t, idempotency.OutcomeExecuted, obs.last(t))
			assert.Greater(t, proxy.Accepted(), accepted, "the statement went again on a new connection")

			handler.hold = nil
			retry := serve(h, post("k", `{}`))
			assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, `{"execution":2}`, retry.Body.String())
			assert.Equal(t, int32(2), handler.calls.Load(), "warm-up and k, once each")
			assert.Equal(t, 2, count(t, direct, "SELECT count(*) FROM idempotency_keys WHERE status = 'completed'"))
		})
	}
}

// TestFaultSlowServer: every reply takes 2 s, far beyond the 300 ms store
// timeout. Requests get 503 within the bound and never run; a request
// whose own deadline is shorter gets it sooner. After the network heals
// the keys run (201) within their lease: nothing is left claimed beyond
// it, and nothing was stored meanwhile.
func TestFaultSlowServer(t *testing.T) {
	pool, direct, proxy := proxied(t, 4)
	const lease = time.Second
	handler := &counted{}
	store := newStore(t, pool)
	fast := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: faultStoreTimeout}).Handler(handler)
	patient := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: 5 * time.Second}).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(patient, post("warm-up", `{}`)).Code)

	proxy.SetLatency(2 * time.Second)
	w, took := timedServe(fast, post("k", `{}`))
	requireUnavailable(t, w, took)
	assert.GreaterOrEqual(t, took, faultStoreTimeout-10*time.Millisecond, "the 503 waited for the store timeout")
	t.Logf("503 after %v (store timeout %v, replies delayed 2s)", took, faultStoreTimeout)

	long := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: time.Minute}).Handler(handler)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	w, took = timedServe(long, post("k2", `{}`).WithContext(ctx))
	requireUnavailable(t, w, took)
	t.Logf("503 after %v for a request with a 200ms deadline (store timeout 1m)", took)
	assert.Equal(t, int32(1), handler.calls.Load(), "no handler ran")

	healed := time.Now()
	proxy.Heal()
	assert.Zero(t, count(t, direct, `SELECT count(*) FROM idempotency_keys
		WHERE status = 'in_flight' AND lease_expires_at > clock_timestamp() + $1::bigint * interval '1 microsecond'`, lease.Microseconds()),
		"no claim outlives its lease")
	for _, key := range []string{"k", "k2"} {
		for {
			w := serve(patient, post(key, `{}`))
			if w.Code != http.StatusConflict {
				require.Equal(t, http.StatusCreated, w.Code, "key %s: %s", key, w.Body)
				assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), "nothing was stored for %s", key)
				break
			}
			require.Less(t, time.Since(healed), lease+time.Second, "key %s still claimed past its lease", key)
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("key %s ran %v after healing (lease %v)", key, time.Since(healed), lease)
	}
	assert.Equal(t, int32(3), handler.calls.Load())
}

// TestFaultSlowServerInTx: the server turns slow (every reply 2 s) after
// the handler wrote its row in the claim's transaction, before the
// completion. The completion and the transaction's end are bounded by the
// store timeout: the client gets 503 within the bound, never the
// handler's 201, and neither the handler's row nor the response is
// stored. After the network heals and the lease lapses, the key runs
// again, and only that execution's row is there.
func TestFaultSlowServerInTx(t *testing.T) {
	pool, direct, proxy := proxied(t, 4)
	exec(t, direct, "CREATE TABLE venues (key text NOT NULL)")
	const lease = time.Second
	store := newStore(t, pool)
	var calls atomic.Int32
	var slowAfterWrite atomic.Bool
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		tx, err := store.Tx(r.Context())
		if err == nil {
			_, err = tx.Exec(r.Context(), "INSERT INTO venues (key) VALUES ($1)", r.Header.Get("Idempotency-Key"))
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if slowAfterWrite.Load() {
			proxy.SetLatency(2 * time.Second)
		}
		w.WriteHeader(http.StatusCreated)
	})
	fast := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: faultStoreTimeout}).Handler(handler)
	patient := newMiddleware(t, store, idempotency.Options{Lease: lease, StoreTimeout: 5 * time.Second}).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(patient, post("warm-up", `{}`)).Code)

	slowAfterWrite.Store(true)
	w, took := timedServe(fast, post("k", `{}`))
	requireUnavailable(t, w, took)
	t.Logf("503 after %v (store timeout %v, replies delayed 2s from the completion on)", took, faultStoreTimeout)
	assert.Equal(t, int32(2), calls.Load())

	slowAfterWrite.Store(false)
	healed := time.Now()
	proxy.Heal()
	assert.Zero(t, count(t, direct, "SELECT count(*) FROM venues WHERE key = 'k'"), "the handler's row did not commit")
	assert.Zero(t, count(t, direct, "SELECT count(*) FROM idempotency_keys WHERE status = 'completed' AND key = 'k'::bytea"), "no response was stored")
	for {
		w := serve(patient, post("k", `{}`))
		if w.Code != http.StatusConflict {
			require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
			assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), "the key ran again")
			break
		}
		require.Less(t, time.Since(healed), lease+5*time.Second, "k still claimed long past its lease")
		time.Sleep(20 * time.Millisecond)
	}
	assert.Equal(t, int32(3), calls.Load())
	assert.Equal(t, 1, count(t, direct, "SELECT count(*) FROM venues WHERE key = 'k'"), "one execution's row")
}

// TestFaultPartitionHealed: a silent partition (nothing goes through,
// either way) outlasts two calls that hold both connections of the pool;
// then the network heals, with no connection reset. pgx closes each
// abandoned connection after a cancel request that the partition
// swallowed, waiting up to 15 s for its answer, and pgxpool alone keeps
// the connection's slot until then: every call would fail for 15 s after
// the network healed. The store gives such a connection back within
// closeWait, so a call succeeds soon after healing.
func TestFaultPartitionHealed(t *testing.T) {
	pool, _, proxy := proxied(t, 2)
	store := newStore(t, pool)
	ctx := context.Background()
	call := func() error {
		ctx, cancel := context.WithTimeout(ctx, faultStoreTimeout)
		defer cancel()
		_, err := store.Get(ctx, "k")
		return err
	}
	var wg sync.WaitGroup
	for range 2 { // both connections open
		wg.Add(1)
		go func() {
			defer wg.Done()
			assert.NoError(t, store.Remove(ctx, "warm-up"))
		}()
	}
	wg.Wait()
	opened := proxy.Accepted()

	proxy.Blackhole()
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- call() }()
	}
	for range 2 {
		require.Error(t, <-errs, "the partition swallows the call")
	}
	// Each abandoned connection's cancel request is under way, and lost.
	for proxy.Accepted() < opened+2 {
		runtime.Gosched()
	}
	proxy.Heal()
	healed := time.Now()
	for {
		err := call()
		if err == nil {
			break
		}
		require.Less(t, time.Since(healed), 3*time.Second, "the pool is still exhausted after healing: %v", err)
	}
	t.Logf("a call succeeded %v after the partition healed (pgxpool alone: up to 15 s)", time.Since(healed).Round(time.Millisecond))
}

// TestFaultPoolExhausted: the pool's only connection is held elsewhere. A
// request waits for a connection until the store timeout and gets 503;
// its handler never runs and nothing is claimed. Once the connection is
// back, the same key runs.
func TestFaultPoolExhausted(t *testing.T) {
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.MaxConns = 1 })
	handler := &counted{}
	h := newMiddleware(t, newStore(t, pool), idempotency.Options{StoreTimeout: faultStoreTimeout}).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(h, post("warm-up", `{}`)).Code)

	held, err := pool.Acquire(context.Background())
	require.NoError(t, err)
	w, took := timedServe(h, post("k", `{}`))
	requireUnavailable(t, w, took)
	assert.GreaterOrEqual(t, took, faultStoreTimeout-10*time.Millisecond)
	t.Logf("503 after %v with the pool exhausted (store timeout %v)", took, faultStoreTimeout)
	assert.Equal(t, int32(1), handler.calls.Load(), "the handler did not run")
	held.Release()

	w = serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, "nothing was claimed: %s", w.Body)
	assert.Equal(t, int32(2), handler.calls.Load())
	assert.Equal(t, 2, count(t, pool, "SELECT count(*) FROM idempotency_keys"))
}

// TestFaultAllBackendsTerminated: the pool holds its 4 connections idle
// and the server terminates every one of them before each call, so the
// pool hands out 4 dead connections in a row before it dials a new one.
// Each call (claim, renewal, completion, read, removal, release) reaches a
// live connection within the store timeout, 10 times over.
func TestFaultAllBackendsTerminated(t *testing.T) {
	cfg := pgtest.Config(t)
	pool := pgtest.Pool(t, cfg, migrate)
	const conns = 4
	require.EqualValues(t, conns, pool.Stat().MaxConns())
	killer, err := pgx.ConnectConfig(context.Background(), cfg.ConnConfig.Copy())
	require.NoError(t, err)
	defer killer.Close(context.Background())
	store := newStore(t, pool)

	// killAll fills the pool with idle connections, has the server
	// terminate each, and waits until their backends are gone.
	killAll := func() {
		t.Helper()
		ctx := context.Background()
		held := make([]*pgxpool.Conn, conns)
		pids := make([]uint32, conns)
		for i := range held {
			// The previous step may have left a killed connection idle
			// (it reached a live one before it tried them all): pgx
			// finds it dead when it is used, and it is then destroyed.
			for held[i] == nil {
				c, err := pool.Acquire(ctx)
				require.NoError(t, err)
				if c.Ping(ctx) != nil {
					c.Release()
					continue
				}
				held[i], pids[i] = c, c.Conn().PgConn().PID()
			}
		}
		for _, c := range held {
			c.Release()
		}
		// pgxpool's health check, which it runs 500 ms after it
		// destroyed a dead connection, takes every idle connection for
		// a moment: wait until it gave them back.
		require.Eventually(t, func() bool { return pool.Stat().IdleConns() == conns }, 10*time.Second, time.Millisecond,
			"the pool's %d connections idle", conns)
		var terminated int
		require.NoError(t, killer.QueryRow(ctx,
			`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest($1::int[]) AS pid`, pids).Scan(&terminated))
		require.Equal(t, conns, terminated)
		for left := 1; left > 0; { // until the backends exited
			require.NoError(t, killer.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])`, pids).Scan(&left))
		}
	}
	// call is a call's context: the middleware's default store timeout.
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 3*time.Second)
	}

	for i := range 10 {
		key, other := fmt.Sprintf("k%d", i), fmt.Sprintf("other%d", i)
		claim := idempotency.Record{Token: "t" + key, Fingerprint: "fp", CreatedAt: time.Now()}
		rec := &idempotency.Record{Fingerprint: claim.Fingerprint, CreatedAt: claim.CreatedAt,
			Response: &idempotency.Response{StatusCode: http.StatusCreated, Body: []byte(key)}}
		steps := []struct {
			name string
			run  func(ctx context.Context) error
		}{
			{"acquire", func(ctx context.Context) error {
				fence, existing, err := store.Acquire(ctx, key, claim, time.Minute)
				if err == nil && (fence == 0 || existing != nil) {
					err = fmt.Errorf("not claimed: fence %d, existing %+v", fence, existing)
				}
				return err
			}},
			{"extend", func(ctx context.Context) error { return store.Extend(ctx, key, claim.Token, time.Minute) }},
			{"complete", func(ctx context.Context) error { return store.Complete(ctx, key, claim.Token, rec, time.Hour) }},
			{"get", func(ctx context.Context) error {
				got, err := store.Get(ctx, key)
				if err == nil && (got == nil || got.Response == nil || string(got.Response.Body) != key) {
					err = fmt.Errorf("not the stored record: %+v", got)
				}
				return err
			}},
			{"remove", func(ctx context.Context) error { return store.Remove(ctx, key) }},
			{"acquire another key", func(ctx context.Context) error {
				_, _, err := store.Acquire(ctx, other, claim, time.Minute)
				return err
			}},
			{"release", func(ctx context.Context) error { return store.Release(ctx, other, claim.Token) }},
		}
		for _, step := range steps {
			killAll()
			ctx, cancel := call()
			err := step.run(ctx)
			cancel()
			require.NoError(t, err, "round %d: %s", i, step.name)
		}
	}
}
