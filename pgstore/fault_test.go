package pgstore_test

import (
	"context"
	"net"
	"net/http"
	"strconv"
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
	direct = pgtest.Pool(t, cfg.Copy())
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

// TestFaultBackendTerminated: while the handler runs (its lease renewed
// every 100 ms), the server terminates every backend of the store's pool
// (pg_terminate_backend), twice. The renewals and the completion find
// their connections dead, are sent again on new ones, and the response is
// stored: 201, one execution, the retry replays.
func TestFaultBackendTerminated(t *testing.T) {
	cfg := pgtest.Config(t)
	app := cfg.ConnConfig.RuntimeParams["application_name"]
	pool := pgtest.Pool(t, cfg)
	killerCfg := cfg.ConnConfig.Copy()
	killerCfg.RuntimeParams["application_name"] = app + "_killer"
	killer, err := pgx.ConnectConfig(context.Background(), killerCfg)
	require.NoError(t, err)
	defer killer.Close(context.Background())

	var killed atomic.Int64
	kill := func() {
		var n int64
		require.NoError(t, killer.QueryRow(context.Background(),
			`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&n))
		killed.Add(n)
	}
	handler := &counted{hold: func() {
		time.Sleep(250 * time.Millisecond) // renewals run
		kill()
		time.Sleep(250 * time.Millisecond)
		kill()
	}}
	obs := newObserved()
	h := newMiddleware(t, newStore(t, pool), idempotency.WithLease(300*time.Millisecond),
		idempotency.WithObserver(obs.observe)).Handler(handler)

	w := serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, "body: %s", w.Body)
	assert.Equal(t, idempotency.OutcomeExecuted, obs.last(t), "the response was stored")
	assert.Positive(t, killed.Load(), "backends were terminated")
	t.Logf("%d backends terminated while the handler ran", killed.Load())

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
			h := newMiddleware(t, newStore(t, pool), idempotency.WithObserver(obs.observe)).Handler(handler)
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
	fast := newMiddleware(t, store, idempotency.WithLease(lease), idempotency.WithStoreTimeout(faultStoreTimeout)).Handler(handler)
	patient := newMiddleware(t, store, idempotency.WithLease(lease), idempotency.WithStoreTimeout(5*time.Second)).Handler(handler)
	require.Equal(t, http.StatusCreated, serve(patient, post("warm-up", `{}`)).Code)

	proxy.SetLatency(2 * time.Second)
	w, took := timedServe(fast, post("k", `{}`))
	requireUnavailable(t, w, took)
	assert.GreaterOrEqual(t, took, faultStoreTimeout-10*time.Millisecond, "the 503 waited for the store timeout")
	t.Logf("503 after %v (store timeout %v, replies delayed 2s)", took, faultStoreTimeout)

	long := newMiddleware(t, store, idempotency.WithLease(lease), idempotency.WithStoreTimeout(time.Minute)).Handler(handler)
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

// TestFaultPoolExhausted: the pool's only connection is held elsewhere. A
// request waits for a connection until the store timeout and gets 503;
// its handler never runs and nothing is claimed. Once the connection is
// back, the same key runs.
func TestFaultPoolExhausted(t *testing.T) {
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.MaxConns = 1 })
	handler := &counted{}
	h := newMiddleware(t, newStore(t, pool), idempotency.WithStoreTimeout(faultStoreTimeout)).Handler(handler)
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
