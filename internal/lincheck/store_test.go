package lincheck_test

import (
	"context"
	"crypto/rand"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/lincheck"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/internal/redistest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// The tests here record histories of 8 clients contending for a few keys
// of a real store, and check them for linearizability: without faults,
// with leases long enough that none lapses and short enough that many do;
// and under faults between the store and its server.

// plain returns the two fault-free runs every store gets: steady (no
// lease lapses) and lapsing (work often outlasts a lease of lease, and
// clients that find a key taken come back within half a lease, so that
// lapsed keys are claimed again while their stale owners still write:
// without that, a stale owner's Release would mostly find its key free,
// which the protocol allows, and a Release that deleted another owner's
// claim would seldom show).
func plain(lease time.Duration) []run {
	return []run{
		{name: "steady", length: time.Second,
			workload: lincheck.Workload{Lease: 2 * time.Second, MaxWork: time.Millisecond}},
		{name: "lapsing", length: time.Second,
			workload: lincheck.Workload{Lease: lease, MaxWork: lease * 3 / 2, Retry: lease / 2}},
	}
}

func TestMemoryStore(t *testing.T) {
	f := newFigures(t)
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	for _, r := range plain(10 * time.Millisecond) {
		f.check("memory/"+r.name, record(t, store, r))
	}
}

func TestRedisStore(t *testing.T) {
	f := newFigures(t)
	store := redisStore(t, redistest.ClientWith(t, redisOptions(t)))
	for _, r := range plain(20 * time.Millisecond) {
		f.check("redis/"+r.name, record(t, store, r))
	}
}

func TestRedisCluster(t *testing.T) {
	f := newFigures(t)
	store := redisStore(t, redistest.Cluster(t))
	for _, r := range plain(20 * time.Millisecond) {
		f.check("cluster/"+r.name, record(t, store, r))
	}
}

func TestPGStore(t *testing.T) {
	f := newFigures(t)
	cfg := pgtest.Config(t)
	cfg.MaxConns = 8
	store, err := pgstore.New(context.Background(), pgtest.Pool(t, cfg, migrate), pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range plain(40 * time.Millisecond) {
		r.length = 3 * time.Second / 2
		f.check("postgres/"+r.name, record(t, store, r))
	}
}

// TestRedisStoreFaults: the fault proxy between the store and the Redis
// named by IDEMPOTENCY_TEST_REDIS_URL; and a redis-server of the test's
// own, persisting every write before it answers (appendfsync always),
// killed and restarted on the same port again and again, so that what it
// acknowledged survives: either way the history must stay linearizable.
func TestRedisStoreFaults(t *testing.T) {
	workload := lincheck.Workload{Lease: 300 * time.Millisecond, Timeout: 100 * time.Millisecond, MaxWork: 5 * time.Millisecond}
	t.Run("proxy", func(t *testing.T) {
		f := newFigures(t)
		opt := redisOptions(t)
		proxy := startProxy(t, opt.Addr)
		opt.Addr = proxy.Addr()
		store := redisStore(t, redistest.ClientWith(t, opt))
		f.check("redis/proxy-faults", record(t, store, run{name: "proxy", workload: workload, length: 3 * time.Second,
			faults: proxyFaults(proxy, 150*time.Millisecond, 300*time.Millisecond)}))
	})
	t.Run("restart", func(t *testing.T) {
		f := newFigures(t)
		args := []string{"--appendonly", "yes", "--appendfsync", "always", "--dir", t.TempDir()}
		addr, stop := redistest.StartServer(t, args...)
		store := redisStore(t, redistest.ClientWith(t, &redis.Options{Addr: addr, ContextTimeoutEnabled: true}))
		restarts := 0
		f.check("redis/restarts", record(t, store, run{name: "restart", workload: workload, length: 3 * time.Second,
			faults: func(ctx context.Context, healed func()) {
				for {
					pace(ctx, 400*time.Millisecond)
					if ctx.Err() != nil {
						return
					}
					stop() // SIGKILL
					stop = redistest.StartServerAt(t, addr, args...)
					restarts++
					healed()
				}
			}}))
		t.Logf("redis-server killed and restarted %d times", restarts)
		if restarts == 0 {
			t.Error("the server was never restarted")
		}
	})
}

// TestPGStoreFaults: the fault proxy between the store's pool and
// PostgreSQL; and the server terminating the pool's backends
// (pg_terminate_backend) again and again.
func TestPGStoreFaults(t *testing.T) {
	workload := lincheck.Workload{Lease: time.Second, Timeout: 150 * time.Millisecond, MaxWork: 5 * time.Millisecond}
	t.Run("proxy", func(t *testing.T) {
		f := newFigures(t)
		pool, proxy, _ := pgProxied(t, 8)
		store := pgStore(t, pool)
		f.check("postgres/proxy-faults", record(t, store, run{name: "proxy", workload: workload, length: 3 * time.Second,
			faults: proxyFaults(proxy, 250*time.Millisecond, time.Second)}))
	})
	t.Run("terminate", func(t *testing.T) {
		f := newFigures(t)
		cfg := pgtest.Config(t)
		cfg.MaxConns = 8
		app := cfg.ConnConfig.RuntimeParams["application_name"]
		killerCfg := cfg.ConnConfig.Copy()
		killerCfg.RuntimeParams["application_name"] = app + "_killer"
		store, err := pgstore.New(context.Background(), pgtest.Pool(t, cfg, migrate), pgstore.Options{})
		if err != nil {
			t.Fatal(err)
		}
		killer, err := pgx.ConnectConfig(context.Background(), killerCfg)
		if err != nil {
			t.Fatal(err)
		}
		defer killer.Close(context.Background())
		terminated := 0
		f.check("postgres/backends-terminated", record(t, store, run{name: "terminate", workload: workload, length: 3 * time.Second,
			faults: func(ctx context.Context, healed func()) {
				for {
					pace(ctx, 200*time.Millisecond)
					if ctx.Err() != nil {
						return
					}
					var n int
					if err := killer.QueryRow(context.Background(),
						`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
						app).Scan(&n); err != nil {
						t.Fatal(err)
					}
					terminated += n
					healed()
				}
			}}))
		t.Logf("%d backends terminated", terminated)
		if terminated == 0 {
			t.Error("no backend was terminated")
		}
	})
}

// TestRedisFencesAfterRestart: fences never go backwards, also when a
// Redis without persistence restarts and forgets everything. The test
// records the fences handed out for a few keys, kills and restarts a
// redis-server of its own on the same port, and claims each key again:
// the new fence must be greater than every fence the key had.
func TestRedisFencesAfterRestart(t *testing.T) {
	addr, stop := redistest.StartServer(t)
	store := redisStore(t, redistest.ClientWith(t, &redis.Options{Addr: addr, ContextTimeoutEnabled: true}))
	ctx := context.Background()
	claim := func(key string) uint64 {
		t.Helper()
		c := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
		fence, existing, err := store.Acquire(ctx, key, c, time.Minute)
		if err != nil || existing != nil || fence == 0 {
			t.Fatalf("claiming %s: fence %d, existing %v, error %v", key, fence, existing, err)
		}
		if err := store.Release(ctx, key, c.Token); err != nil {
			t.Fatal(err)
		}
		return fence
	}
	keys := []string{"fence-a", "fence-b", "fence-c"}
	before := make(map[string][]uint64)
	for range 3 {
		for _, key := range keys {
			before[key] = append(before[key], claim(key))
		}
	}
	stop()
	redistest.StartServerAt(t, addr)
	for _, key := range keys {
		fences := before[key]
		greatest := slices.Max(fences)
		if after := claim(key); after <= greatest {
			t.Errorf("key %s: fence %d after a restart of a Redis without persistence is not greater than %d, the greatest handed out before it (fences before: %v), as a counter kept only in Redis would do", key, after, greatest, fences)
		} else {
			t.Logf("key %s: fences %v before the restart, %d after", key, fences, after)
		}
	}
}

// TestReleaseReplyLost: a Release whose reply is lost after the store ran
// it (the connection reset) is sent again, by go-redis or by pgstore. The
// Store contract reserves ErrLeaseLost for a call that changed nothing;
// this one released the key. The repeat may answer nil, or an error of
// unknown outcome, but not ErrLeaseLost: both when it finds the key free,
// and when another claim took the key in between (the test holds the
// repeat's new connection until then), which the repeat cannot tell from
// a claim that came after its own lease lapsed. This is the deterministic
// form of what the fault histories above find when a reset hits a
// Release.
func TestReleaseReplyLost(t *testing.T) {
	stores := []struct {
		name string
		// store returns the store through a proxy whose new connections
		// dial through dials, and a store on the same keys, straight to
		// the server.
		store func(t *testing.T, dials *dialGate) (through, direct idempotency.Store, proxy *faultproxy.Proxy)
	}{
		{"redis", func(t *testing.T, dials *dialGate) (idempotency.Store, idempotency.Store, *faultproxy.Proxy) {
			prefix := redistest.Prefix(t)
			direct := redisStore(t, redistest.ClientWith(t, redisOptions(t)), prefix)
			opt := redisOptions(t)
			proxy := startProxy(t, opt.Addr)
			opt.Addr = proxy.Addr()
			opt.Dialer = dials.dial
			return redisStore(t, redistest.ClientWith(t, opt), prefix), direct, proxy
		}},
		{"postgres", func(t *testing.T, dials *dialGate) (idempotency.Store, idempotency.Store, *faultproxy.Proxy) {
			pool, proxy, direct := pgProxied(t, 1, func(cfg *pgxpool.Config) { cfg.ConnConfig.DialFunc = dials.dial })
			return pgStore(t, pool), pgStore(t, pgPool(t, direct)), proxy
		}},
	}
	for _, s := range stores {
		for _, between := range []bool{false, true} {
			name := s.name + "/key-free"
			if between {
				name = s.name + "/claimed-in-between"
			}
			t.Run(name, func(t *testing.T) {
				dials := newDialGate()
				store, direct, proxy := s.store(t, dials)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				var claim idempotency.Record
				for _, key := range []string{"warm-up", "k"} { // the first prepares the statements
					claim = idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
					if _, _, err := store.Acquire(ctx, key, claim, time.Minute); err != nil {
						t.Fatal(err)
					}
					if key == "warm-up" {
						if err := store.Release(ctx, key, claim.Token); err != nil {
							t.Fatal(err)
						}
					}
				}
				other := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
				if between {
					dials.hold()
				}
				proxy.ResetNextReplies(1)
				released := make(chan error, 1)
				go func() { released <- store.Release(ctx, "k", claim.Token) }()
				if between {
					select {
					case <-dials.entered:
					case err := <-released:
						t.Fatalf("Release answered %v without sending again on a new connection", err)
					}
					// The first send freed the key: another claim takes it
					// before the repeat goes out.
					if fence, existing, err := direct.Acquire(ctx, "k", other, time.Minute); err != nil || fence == 0 {
						t.Fatalf("the other claim: fence %d, existing %+v, error %v", fence, existing, err)
					}
					dials.open()
				}
				err := <-released
				proxy.Heal()
				rec, getErr := direct.(idempotency.Inspector).Get(ctx, "k")
				if getErr != nil {
					t.Fatal(getErr)
				}
				switch {
				case !between && rec != nil:
					t.Fatalf("after Release (error %v) the key holds %+v", err, rec)
				case between && (rec == nil || rec.Token != other.Token):
					t.Fatalf("after Release (error %v) the key holds %+v, not the other claim", err, rec)
				case errors.Is(err, idempotency.ErrLeaseLost):
					t.Errorf("Release answered %q although it released the key (its reply was lost, the call was sent again): ErrLeaseLost must mean the call changed nothing", err)
				default:
					t.Logf("Release answered %v", err)
				}
			})
		}
	}
}

// dialGate holds new connections, once told to, until it is opened: a
// test's way to run something between a call whose connection broke and
// its repeat on a new connection.
type dialGate struct {
	held    atomic.Bool
	entered chan struct{} // closed when a dial is first held
	opened  chan struct{}
	once    sync.Once
	dialer  net.Dialer
}

func newDialGate() *dialGate {
	return &dialGate{entered: make(chan struct{}), opened: make(chan struct{})}
}

// hold makes the dials from now on wait until open.
func (g *dialGate) hold() { g.held.Store(true) }

// open lets the held dials, and every later one, go.
func (g *dialGate) open() {
	g.held.Store(false)
	close(g.opened)
}

func (g *dialGate) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if g.held.Load() {
		g.once.Do(func() { close(g.entered) })
		select {
		case <-g.opened:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return g.dialer.DialContext(ctx, network, addr)
}
