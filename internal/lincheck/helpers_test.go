package lincheck_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/lincheck"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/internal/redistest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// artifactsEnv names a directory where failing tests leave what explains
// the failure (histories as HTML pages); it outlives the test run.
const artifactsEnv = "IDEMPOTENCY_TEST_ARTIFACTS"

// checkTimeout bounds the checker per history: a history that takes
// longer has too many concurrent operations per key to be checked, which
// is a failure of the test's design, not a verdict.
const checkTimeout = time.Minute

// artifact returns the path of a new file named after the test and name,
// in $IDEMPOTENCY_TEST_ARTIFACTS, or else in the test's temporary
// directory, and says which in a note for the failure message.
func artifact(t *testing.T, name string) (path, note string) {
	file := regexp.MustCompile(`[^A-Za-z0-9._-]+`).ReplaceAllString(t.Name()+"-"+name, "_")
	if dir := os.Getenv(artifactsEnv); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err == nil {
			return filepath.Join(dir, file), ""
		}
	}
	return filepath.Join(t.TempDir(), file), " (in the test's temporary directory, removed when the test ends: set " + artifactsEnv + " to keep it)"
}

// figures counts, per test, the histories checked and their operations,
// and logs them when the test ends.
type figures struct {
	t         *testing.T
	histories int
	ops       int
	unknown   int
	took      time.Duration
}

func newFigures(t *testing.T) *figures {
	f := &figures{t: t}
	t.Cleanup(func() {
		if f.histories > 0 {
			t.Logf("in all: %d histories, %d operations (%d of unknown outcome), checked in %v",
				f.histories, f.ops, f.unknown, f.took.Round(time.Millisecond))
		}
	})
	return f
}

// check checks the history rec recorded, logs its figures and, when it is
// not linearizable, fails the test with an explanation and writes the
// failing keys' history as porcupine's HTML visualization.
func (f *figures) check(name string, rec *lincheck.Recorder) {
	t := f.t
	t.Helper()
	history := rec.History()
	res := lincheck.Check(history, checkTimeout)
	f.histories++
	f.ops += res.Operations
	f.unknown += res.Unknown
	f.took += res.Took
	t.Logf("%s: %s", name, res)
	switch res.Verdict {
	case porcupine.Ok:
	case porcupine.Unknown:
		t.Errorf("%s: the checker reached no verdict within %v: the history has too many concurrent operations per key (shorter rounds, fewer clients or fewer faults make it checkable)", name, checkTimeout)
	default:
		keys := res.Failing[:min(len(res.Failing), 5)]
		var why []string
		for _, key := range keys[:min(len(keys), 3)] {
			why = append(why, lincheck.Explain(history, key))
		}
		path, note := artifact(t, name+".html")
		if err := lincheck.Visualize(history, keys, path); err != nil {
			t.Errorf("%s: writing the visualization: %v", name, err)
		}
		text := strings.TrimSuffix(path, ".html") + ".txt"
		if err := os.WriteFile(text, []byte(lincheck.Timeline(history, keys)), 0o644); err != nil {
			t.Errorf("%s: writing the timeline: %v", name, err)
		}
		t.Errorf("%s: not linearizable: %d of %d keys fail, the first %s\n%s\nthe history of %d failing keys: %s (as text: %s)%s",
			name, len(res.Failing), res.Keys, strings.Join(keys, ", "), strings.Join(why, "\n"), len(keys), path, text, note)
	}
}

// run is one recorded history: a workload, for how long, under which
// faults.
type run struct {
	name     string
	workload lincheck.Workload
	length   time.Duration
	// faults, when set, injects faults on the test's goroutine until ctx
	// ends, calling healed whenever the faults are cleared.
	faults func(ctx context.Context, healed func())
}

// record runs r against store and returns the history.
func record(t *testing.T, store idempotency.Store, r run) *lincheck.Recorder {
	t.Helper()
	rec := lincheck.NewRecorder()
	ctx, cancel := context.WithTimeout(context.Background(), r.length)
	w := r.workload
	if w.KeyPrefix == "" {
		w.KeyPrefix = r.name + "/"
	}
	gate := newGate()
	if r.faults != nil {
		w.Pause = gate.wait
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.Run(ctx, store, rec)
		cancel() // the clients are done (MaxOps): so is the injector
	}()
	defer func() { // also when the injector fails the test
		cancel()
		<-done
	}()
	if r.faults != nil {
		r.faults(ctx, gate.open)
	}
	<-done
	return rec
}

// gate lets clients whose store call failed wait until the faults are
// next cleared, so that a fault leaves at most one operation of unknown
// outcome per client. It is safe for concurrent use.
type gate struct {
	mu     sync.Mutex
	healed chan struct{}
}

func newGate() *gate { return &gate{healed: make(chan struct{})} }

// wait returns when the faults are next cleared, or when ctx ends.
func (g *gate) wait(ctx context.Context) {
	g.mu.Lock()
	healed := g.healed
	g.mu.Unlock()
	select {
	case <-healed:
	case <-ctx.Done():
	}
}

// open lets the waiting clients go on.
func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	close(g.healed)
	g.healed = make(chan struct{})
}

// pace waits d, or until ctx ends: it paces a fault injector (a load, not
// a synchronisation).
func pace(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// proxyFaults returns an injector that cycles through the proxy's faults,
// each held for hold (longer than a call's timeout, so that calls time
// out) and followed by hold without faults: replies slowed
// down; replies delayed past the calls' deadlines (slow) after the server
// ran the command; replies dropped with a reset connection after it ran;
// a blackhole that lets nothing through either way, and then heals
// silently, as a partition does, every connection that lived through it
// still open; every connection reset.
//
// A silent partition is hard on pgx: it closes a connection whose call
// timed out after sending the server a cancel request on a new
// connection, which the partition swallows, and pgxpool keeps the
// connection's slot until that request gives up, 15 s later. pgstore
// hands such connections back itself (see its "Deadlines and failures"),
// so the pool has room again soon after the network healed.
func proxyFaults(p *faultproxy.Proxy, hold, slow time.Duration) func(ctx context.Context, healed func()) {
	faults := []func(){
		func() { p.SetLatency(2 * time.Millisecond) },
		func() { p.DelayNextReplies(4, slow) },
		func() { p.ResetNextReplies(3) },
		p.Blackhole,
		p.ResetAll,
	}
	return func(ctx context.Context, healed func()) {
		for i := 0; ctx.Err() == nil; i++ {
			faults[i%len(faults)]()
			pace(ctx, hold)
			p.Heal()
			healed()
			pace(ctx, hold)
		}
	}
}

// Redis.

// redisOptions returns options for the Redis named by
// IDEMPOTENCY_TEST_REDIS_URL, which must answer, with calls bounded by
// their context's deadline; it skips the test when the variable is unset.
func redisOptions(t *testing.T) *redis.Options {
	t.Helper()
	redistest.Client(t) // skips, or fails when the server does not answer
	opt := redistest.Options(t)
	opt.ContextTimeoutEnabled = true
	return opt
}

// redisStore returns a store on client whose keys start with a prefix of
// the test's own, or with prefix[0] when given.
func redisStore(t *testing.T, client idempotency.RedisClient, prefix ...string) *idempotency.RedisStore {
	t.Helper()
	prefix = append(prefix, redistest.Prefix(t))
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix[0]})
	if err != nil {
		t.Fatal(err)
	}
	return store
}

// startProxy starts a fault proxy to target, closed when the test ends.
func startProxy(t *testing.T, target string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// PostgreSQL.

// pgProxied returns a pool on a fresh schema (migrated) whose connections
// go through a fault proxy, the proxy, and a configuration for pools on
// the same schema straight to the server; it skips the test when
// IDEMPOTENCY_TEST_DATABASE_URL is unset. configure, if given, changes
// the proxied pool's configuration before the pool is made.
func pgProxied(t *testing.T, maxConns int32, configure ...func(*pgxpool.Config)) (*pgxpool.Pool, *faultproxy.Proxy, *pgxpool.Config) {
	t.Helper()
	direct := pgtest.Config(t)
	pgtest.Pool(t, direct.Copy(), migrate)
	proxy := startProxy(t, net.JoinHostPort(direct.ConnConfig.Host, strconv.Itoa(int(direct.ConnConfig.Port))))
	host, port, err := net.SplitHostPort(proxy.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	cfg := direct.Copy()
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = host, uint16(p)
	cfg.ConnConfig.ConnectTimeout = time.Second
	cfg.MaxConns = maxConns
	for _, c := range configure {
		c(cfg)
	}
	return pgPool(t, cfg), proxy, direct
}

// pgPool opens a pool, closed when the test ends.
func pgPool(t *testing.T, cfg *pgxpool.Config) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// migrate creates pgstore's tables: a setup for pgtest.Pool.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
}

// pgStore returns a pgstore.Store on pool.
func pgStore(t *testing.T, pool *pgxpool.Pool) *pgstore.Store {
	t.Helper()
	store, err := pgstore.New(context.Background(), pool, pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return store
}
