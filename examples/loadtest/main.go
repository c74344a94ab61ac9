// Command loadtest measures the idempotency middleware under load with
// vegeta (used as a library), and checks that it stays correct meanwhile.
//
// It starts, on 127.0.0.1, one in-process HTTP server per kind: the bare
// handler (no middleware), the handler behind the middleware on the memory
// store, and behind the middleware on Redis (skipped, with a note, when
// Redis is unreachable). It attacks each at a constant rate for a fixed
// time with these scenarios:
//
//   - baseline (bare only): every request has a new key;
//   - unique: every request has a new key, so the handler runs each time;
//   - replay: one key, completed once before the attack, so every request
//     is a replay;
//   - conflict: one key whose first request blocks in the handler for the
//     whole attack, so every request gets 409.
//
// It prints the Go version, GOMAXPROCS and the flags, then one table, then
// one line per correctness check; it exits 1 when a check fails and 2 on
// bad flags:
//
//	go run ./examples/loadtest -duration 5s
//
// With -saturate it runs no scenarios but looks, for each server, for the
// highest constant rate of first requests (new keys) that it answers
// entirely with p99 under -p99 (10 ms): it doubles the rate from
// -rate until a step fails, then bisects between the last rate that
// passed and the first that failed; each step attacks for -duration, and
// a failing step is tried once more before it counts. It prints each
// server's rate and its ratio to the bare handler's:
//
//	go run ./examples/loadtest -saturate -rate 500 -duration 3s
//
// Flags: -rate (2000 requests/s; with -saturate, the first step),
// -duration (5s), -connections (32 per server), -redis (REDIS_URL, else
// redis://127.0.0.1:6379/0; empty: no Redis rows), -cluster (Redis Cluster
// seed addresses, comma-separated; empty: no cluster rows), -database (a
// postgres:// URL whose database the run may create a schema in; empty:
// no PostgreSQL rows), -saturate, -p99 (10ms), -max-rate (2^20: where
// the search stops doubling).
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	vegeta "github.com/tsenart/vegeta/v12/lib"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

const (
	keyHeader    = "Idempotency-Key"
	replayHeader = "X-Idempotent-Replayed"
	// blockHeader makes the handler wait until the scenario releases it:
	// only the conflict scenario's first request carries it.
	blockHeader = "X-Loadtest-Block"

	defaultRedisURL = "redis://127.0.0.1:6379/0"
)

var (
	// requestBody is ~100 bytes of JSON, the same for every request, so
	// that replays match the stored fingerprint.
	requestBody = []byte(`{"name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Berlin","currency":"EUR"}`)
	// responseBody is ~200 bytes of JSON.
	responseBody = []byte(`{"id":"ven_0123456789abcdef","object":"venue","name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Berlin","currency":"EUR","status":"active","created":1700000000,"livemode":false}`)
)

type config struct {
	rate        int
	duration    time.Duration
	connections int
	redisURL    string // empty: no Redis rows
	cluster     string // Redis Cluster seed addresses, comma-separated; empty: no cluster rows
	databaseURL string // empty: no PostgreSQL rows
	saturate    bool
	p99         time.Duration // with saturate: the latency bound
	maxRate     int           // with saturate: the highest rate tried
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := realMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// realMain returns the exit status: 0 when every check passed, 1 when one
// failed or the run could not be done, 2 on bad flags.
func realMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, flags, err := parseFlags(args, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case err != nil:
		return 2
	}
	printHeader(stdout, flags)
	ok, err := run(ctx, cfg, stdout)
	if err != nil {
		fmt.Fprintln(stderr, "loadtest:", err)
		return 1
	}
	if !ok {
		fmt.Fprintln(stderr, "loadtest: a check failed")
		return 1
	}
	return 0
}

// parseFlags returns the configuration and the flags as given on a command
// line that reproduces the run. Errors are already printed to stderr.
func parseFlags(args []string, stderr io.Writer) (config, string, error) {
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: go run ./examples/loadtest [flags]\n\n"+
			"Load-tests the idempotency middleware with vegeta against in-process servers\n"+
			"on 127.0.0.1 (bare handler, memory store, Redis) and checks how often the\n"+
			"handler ran. Exits 1 when a check fails, 2 on bad flags.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	defRedis := defaultRedisURL
	if v, ok := os.LookupEnv("REDIS_URL"); ok {
		defRedis = v
	}
	var cfg config
	fs.IntVar(&cfg.rate, "rate", 2000, "requests per second, constant, in every scenario")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "length of each scenario's attack")
	fs.IntVar(&cfg.connections, "connections", 32, "connections per server: at most this many open, and kept idle")
	fs.StringVar(&cfg.redisURL, "redis", defRedis, "Redis URL (default from REDIS_URL); empty skips the Redis rows")
	fs.StringVar(&cfg.cluster, "cluster", "", "Redis Cluster seed addresses, comma-separated; empty skips the cluster rows")
	fs.StringVar(&cfg.databaseURL, "database", "", "postgres:// URL of a database the run may create a schema in; empty skips the PostgreSQL rows")
	fs.BoolVar(&cfg.saturate, "saturate", false, "find each server's highest rate of first requests with p99 under -p99, instead of the scenarios")
	fs.DurationVar(&cfg.p99, "p99", 10*time.Millisecond, "with -saturate: the p99 latency a rate must stay under")
	fs.IntVar(&cfg.maxRate, "max-rate", 1<<20, "with -saturate: the highest rate tried")
	if err := fs.Parse(args); err != nil {
		return config{}, "", err // flag printed the error and the usage
	}
	fail := func(format string, a ...any) (config, string, error) {
		err := fmt.Errorf(format, a...)
		fmt.Fprintf(stderr, "loadtest: %v (see -h)\n", err)
		return config{}, "", err
	}
	switch {
	case fs.NArg() > 0:
		return fail("unexpected argument %q", fs.Arg(0))
	case cfg.rate <= 0:
		return fail("-rate %d: must be positive", cfg.rate)
	// vegeta attacks forever with a zero duration.
	case cfg.duration <= 0:
		return fail("-duration %v: must be positive", cfg.duration)
	case cfg.connections <= 0:
		return fail("-connections %d: must be positive", cfg.connections)
	case cfg.p99 <= 0:
		return fail("-p99 %v: must be positive", cfg.p99)
	case cfg.maxRate < cfg.rate:
		return fail("-max-rate %d: below -rate %d", cfg.maxRate, cfg.rate)
	}
	if cfg.databaseURL != "" {
		if _, err := pgxpool.ParseConfig(cfg.databaseURL); err != nil {
			return fail("-database: %v", err)
		}
	}
	shownRedis := cfg.redisURL
	if cfg.redisURL != "" {
		if _, err := redis.ParseURL(cfg.redisURL); err != nil {
			return fail("-redis: %v", err)
		}
		// Keep a password out of the printed command line.
		if u, err := url.Parse(cfg.redisURL); err == nil {
			shownRedis = u.Redacted()
		}
	}
	flags := fmt.Sprintf("-rate=%d -duration=%v -connections=%d -redis=%q", cfg.rate, cfg.duration, cfg.connections, shownRedis)
	if cfg.cluster != "" {
		flags += fmt.Sprintf(" -cluster=%q", cfg.cluster)
	}
	if cfg.databaseURL != "" {
		shown := cfg.databaseURL
		if u, err := url.Parse(cfg.databaseURL); err == nil {
			shown = u.Redacted()
		}
		flags += fmt.Sprintf(" -database=%q", shown)
	}
	if cfg.saturate {
		flags += fmt.Sprintf(" -saturate -p99=%v -max-rate=%d", cfg.p99, cfg.maxRate)
	}
	return cfg, flags, nil
}

func printHeader(w io.Writer, flags string) {
	vegetaVersion := "(unknown)"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range bi.Deps {
			if dep.Path == "github.com/tsenart/vegeta/v12" {
				vegetaVersion = dep.Version
			}
		}
	}
	fmt.Fprintf(w, "go: %s %s/%s, GOMAXPROCS=%d, NumCPU=%d, vegeta %s\n",
		runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.GOMAXPROCS(0), runtime.NumCPU(), vegetaVersion)
	fmt.Fprintf(w, "command: go run ./examples/loadtest %s\n\n", flags)
}

// app is the handler under test: it counts its executions, and the request
// carrying blockHeader waits on the current gate.
type app struct {
	execs atomic.Int64
	gate  atomic.Pointer[gate]
}

type gate struct {
	startOnce sync.Once
	started   chan struct{} // closed when the blocked request is in the handler
	release   chan struct{} // closed to let it finish
}

func (a *app) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.execs.Add(1)
	// Read the body as a real handler would, so the bare baseline pays for
	// it too (the middleware has already buffered it).
	_, _ = io.Copy(io.Discard, r.Body)
	if r.Header.Get(blockHeader) != "" {
		if g := a.gate.Load(); g != nil {
			g.startOnce.Do(func() { close(g.started) })
			select {
			case <-g.release:
			case <-r.Context().Done():
			}
		}
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(responseBody)))
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write(responseBody)
}

// server is one kind of server under test.
type server struct {
	name      string
	url       string
	app       *app
	scenarios []string
}

type row struct {
	server, scenario string
	requests         uint64
	rate             float64 // requests sent per second
	success          float64 // share of requests with the expected status
	throughput       float64 // expected responses per second
	p50, p99         time.Duration
	codes            map[string]int
	errors           []string // transport errors, a few
}

type check struct {
	name   string
	ok     bool
	detail string
}

// run starts the servers, runs every scenario (or, with saturate, the
// search for each server's highest rate) and prints the table and the
// checks. It reports whether every check passed; an error means the run
// itself could not be done.
func run(ctx context.Context, cfg config, out io.Writer) (bool, error) {
	runID := strconv.FormatInt(time.Now().UnixNano(), 36)
	servers, notes, cleanup, err := startServers(ctx, cfg, runID, out)
	defer cleanup()
	if err != nil {
		return false, err
	}
	if cfg.saturate {
		return saturate(ctx, cfg, servers, notes, runID, out)
	}
	loadBefore := loadavg()

	var rows []row
	var checks []check
	for _, srv := range servers {
		for _, sc := range srv.scenarios {
			r, c, err := runScenario(ctx, cfg, srv, sc, runID)
			if err != nil {
				return false, fmt.Errorf("%s/%s: %w", srv.name, sc, err)
			}
			rows = append(rows, r)
			checks = append(checks, c)
		}
	}

	printTable(out, rows)
	for _, n := range notes {
		fmt.Fprintln(out, "note:", n)
	}
	fmt.Fprintf(out, "load before: %s; at the end: %s\n", loadBefore, loadavg())
	fmt.Fprintln(out)
	ok := true
	for _, c := range checks {
		verdict := "ok"
		if !c.ok {
			verdict, ok = "FAIL", false
		}
		fmt.Fprintf(out, "check %-16s %-4s %s\n", c.name, verdict, c.detail)
	}
	return ok, nil
}

// startServers starts one server per kind: bare, memory, and Redis,
// Redis Cluster and PostgreSQL when configured and reachable (a note says
// why one is skipped). cleanup, never nil, stops them and removes what the
// run stored.
func startServers(ctx context.Context, cfg config, runID string, out io.Writer) (servers []server, notes []string, cleanup func(), err error) {
	var undo []func()
	cleanup = func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	serveWith := func(name string, store idempotency.Store) error {
		a := &app{}
		h := http.Handler(a)
		if store != nil {
			mw, err := idempotency.New(store, idempotency.Options{})
			if err != nil {
				return err
			}
			h = mw.Handler(a)
		}
		srv := httptest.NewServer(h)
		undo = append(undo, srv.Close)
		scenarios := []string{"unique", "replay", "conflict"}
		if store == nil {
			scenarios = []string{"baseline"}
		}
		servers = append(servers, server{name: name, url: srv.URL, app: a, scenarios: scenarios})
		return nil
	}
	if err := serveWith("bare", nil); err != nil {
		return nil, nil, cleanup, err
	}
	if err := serveWith("memory", idempotency.NewMemoryStore(idempotency.MemoryOptions{})); err != nil {
		return nil, nil, cleanup, err
	}
	// A prefix per run keeps runs apart; the store's fence counters never
	// expire, so the run removes its keys when it ends.
	prefix := "idem-loadtest:" + runID + ":"
	if cfg.redisURL != "" {
		rdb, note, err := openRedis(ctx, cfg.redisURL)
		switch {
		case err != nil:
			return nil, nil, cleanup, err
		case note != "":
			notes = append(notes, note)
		default:
			undo = append(undo, func() { _ = rdb.Close() })
			undo = append(undo, func() {
				n, err := removeKeys(context.WithoutCancel(ctx), rdb, prefix)
				reportRemoved(out, "Redis", prefix, n, err)
			})
			store, err := idempotency.NewRedisStore(rdb, idempotency.RedisOptions{Prefix: prefix})
			if err != nil {
				return nil, nil, cleanup, err
			}
			if err := serveWith("redis", store); err != nil {
				return nil, nil, cleanup, err
			}
		}
	}
	if cfg.cluster != "" {
		cc, note := openCluster(ctx, cfg.cluster)
		if note != "" {
			notes = append(notes, note)
		} else {
			undo = append(undo, func() { _ = cc.Close() })
			undo = append(undo, func() {
				var total atomic.Int64
				err := cc.ForEachMaster(context.WithoutCancel(ctx), func(ctx context.Context, node *redis.Client) error {
					n, err := removeKeys(ctx, node, prefix)
					total.Add(int64(n))
					return err
				})
				reportRemoved(out, "Redis Cluster", prefix, int(total.Load()), err)
			})
			store, err := idempotency.NewRedisStore(cc, idempotency.RedisOptions{Prefix: prefix})
			if err != nil {
				return nil, nil, cleanup, err
			}
			if err := serveWith("cluster", store); err != nil {
				return nil, nil, cleanup, err
			}
		}
	}
	if cfg.databaseURL != "" {
		store, drop, note, err := openPostgres(ctx, cfg, runID)
		switch {
		case err != nil:
			return nil, nil, cleanup, err
		case note != "":
			notes = append(notes, note)
		default:
			undo = append(undo, drop)
			if err := serveWith("postgres", store); err != nil {
				return nil, nil, cleanup, err
			}
		}
	}
	return servers, notes, cleanup, nil
}

func reportRemoved(out io.Writer, what, prefix string, n int, err error) {
	if err != nil {
		fmt.Fprintf(out, "note: removing the run's %s keys (%s*): %v\n", what, prefix, err)
		return
	}
	fmt.Fprintf(out, "note: removed the run's %d %s keys (%s*)\n", n, what, prefix)
}

// openCluster returns a cluster client, or a note saying why the cluster
// rows are skipped.
func openCluster(ctx context.Context, addrs string) (*redis.ClusterClient, string) {
	cc := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:                    strings.Split(addrs, ","),
		ContextTimeoutEnabled:    true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cc.ForEachShard(pingCtx, func(ctx context.Context, c *redis.Client) error { return c.Ping(ctx).Err() }); err != nil {
		_ = cc.Close()
		return nil, fmt.Sprintf("Redis Cluster rows skipped: %s: %v", addrs, err)
	}
	return cc, ""
}

// openPostgres migrates a schema of the run's own and returns a store on
// it and a function that drops it, or a note saying why the PostgreSQL
// rows are skipped.
func openPostgres(ctx context.Context, cfg config, runID string) (idempotency.Store, func(), string, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.databaseURL)
	if err != nil {
		return nil, nil, "", fmt.Errorf("-database: %w", err)
	}
	connectCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	admin, err := pgx.ConnectConfig(connectCtx, pcfg.ConnConfig.Copy())
	if err != nil {
		return nil, nil, fmt.Sprintf("PostgreSQL rows skipped: %v", err), nil
	}
	schema := "idem_loadtest_" + runID
	drop := func() {
		dropCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_, _ = admin.Exec(dropCtx, "DROP SCHEMA IF EXISTS "+schema+" CASCADE")
		_ = admin.Close(dropCtx)
	}
	if _, err := admin.Exec(connectCtx, "CREATE SCHEMA "+schema); err != nil {
		drop()
		return nil, nil, "", err
	}
	// As many connections as the attack's, so the pool is not the limit.
	pcfg.MaxConns = int32(cfg.connections)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		drop()
		return nil, nil, "", err
	}
	closeAll := func() { pool.Close(); drop() }
	if err := pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{Schema: schema}); err != nil {
		closeAll()
		return nil, nil, "", err
	}
	store, err := pgstore.New(ctx, pool, pgstore.Options{Schema: schema})
	if err != nil {
		closeAll()
		return nil, nil, "", err
	}
	return store, closeAll, "", nil
}

// openRedis returns a client, or a note saying why the Redis rows are
// skipped. An error is a URL that does not parse.
func openRedis(ctx context.Context, rawURL string) (*redis.Client, string, error) {
	opt, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, "", fmt.Errorf("-redis: %w", err)
	}
	// As in the example service: store calls are bounded by their
	// context's deadline and run on the caller's goroutine.
	opt.ContextTimeoutEnabled = true
	// Maintenance notifications need Redis 8; older servers refuse the
	// handshake and go-redis would log about it.
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	// Probe with a plain dial first: go-redis would retry and log each
	// failed dial before the note says the same.
	pingCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(pingCtx, opt.Network, opt.Addr)
	if err != nil {
		return nil, fmt.Sprintf("Redis rows skipped: %s unreachable: %v", opt.Addr, err), nil
	}
	_ = conn.Close()
	rdb := redis.NewClient(opt)
	if err := rdb.Ping(pingCtx).Err(); err != nil {
		_ = rdb.Close()
		return nil, fmt.Sprintf("Redis rows skipped: %s unreachable: %v", opt.Addr, err), nil
	}
	return rdb, "", nil
}

// removeKeys deletes every key under prefix (records and fence counters)
// on one node.
func removeKeys(ctx context.Context, rdb *redis.Client, prefix string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	n := 0
	iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	batch := make([]string, 0, 500)
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		// One UNLINK per key, pipelined: a cluster node refuses one
		// UNLINK of keys in different slots.
		_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, k := range batch {
				p.Unlink(ctx, k)
			}
			return nil
		})
		n += len(batch)
		batch = batch[:0]
		return err
	}
	for iter.Next(ctx) {
		if batch = append(batch, iter.Val()); len(batch) == cap(batch) {
			if err := flush(); err != nil {
				return n, err
			}
		}
	}
	if err := iter.Err(); err != nil {
		return n, err
	}
	return n, flush()
}

// runScenario attacks srv with one scenario and checks the handler's
// execution count.
func runScenario(ctx context.Context, cfg config, srv server, scenario, runID string) (row, check, error) {
	ctl := newControlClient()
	defer ctl.CloseIdleConnections()
	name := srv.name + "/" + scenario
	before := srv.app.execs.Load()
	key := runID + "-" + srv.name + "-" + scenario

	var (
		tr       vegeta.Targeter
		expected = http.StatusCreated
		ck       = check{name: name}
		// finish runs after the attack, before executions are counted.
		finish = func() error { return nil }
	)
	switch scenario {
	case "baseline", "unique":
		// Called concurrently by vegeta's workers: the counter is atomic.
		var n atomic.Uint64
		tr = func(t *vegeta.Target) error {
			t.Method = http.MethodPost
			t.URL = srv.url
			t.Body = requestBody
			t.Header = http.Header{
				"Content-Type": {"application/json"},
				keyHeader:      {key + "-" + strconv.FormatUint(n.Add(1), 10)},
			}
			return nil
		}
	case "replay":
		code, replayed, err := post(ctx, ctl, srv.url, key, false)
		switch {
		case err != nil:
			return row{}, ck, fmt.Errorf("seed request: %w", err)
		case code != http.StatusCreated || replayed:
			return row{}, ck, fmt.Errorf("seed request: status %d, replayed %v; want a fresh 201", code, replayed)
		}
		tr = staticTargeter(srv.url, key)
	case "conflict":
		expected = http.StatusConflict
		g := &gate{started: make(chan struct{}), release: make(chan struct{})}
		srv.app.gate.Store(g)
		defer srv.app.gate.Store(nil)
		type result struct {
			code int
			err  error
		}
		done := make(chan result, 1)
		go func() {
			code, _, err := post(ctx, ctl, srv.url, key, true)
			done <- result{code, err}
		}()
		var once sync.Once
		var seed result
		// Release the blocked request and wait for its answer on every
		// path, so no request outlives the scenario.
		finish = func() error {
			once.Do(func() {
				close(g.release)
				seed = <-done
			})
			switch {
			case seed.err != nil:
				return fmt.Errorf("seed request: %w", seed.err)
			case seed.code != http.StatusCreated:
				return fmt.Errorf("seed request: status %d, want 201", seed.code)
			}
			return nil
		}
		defer func() { _ = finish() }()
		select {
		case <-g.started:
		case <-time.After(10 * time.Second):
			return row{}, ck, errors.New("seed request did not reach the handler within 10s")
		case <-ctx.Done():
			return row{}, ck, ctx.Err()
		}
		tr = staticTargeter(srv.url, key)
	default:
		return row{}, ck, fmt.Errorf("unknown scenario %q", scenario)
	}

	m, replayed, errs := attack(ctx, cfg, name, tr)
	if err := finish(); err != nil {
		return row{}, ck, err
	}
	if err := ctx.Err(); err != nil {
		return row{}, ck, err
	}
	execs := srv.app.execs.Load() - before

	good := m.StatusCodes[strconv.Itoa(expected)]
	r := row{
		server: srv.name, scenario: scenario, requests: m.Requests, rate: m.Rate,
		p50: m.Latencies.P50, p99: m.Latencies.P99, codes: m.StatusCodes, errors: errs,
	}
	if m.Requests > 0 {
		r.success = float64(good) / float64(m.Requests)
	}
	if d := m.Duration + m.Wait; d > 0 {
		r.throughput = float64(good) / d.Seconds()
	}

	switch scenario {
	case "baseline", "unique":
		ck.ok = execs == int64(good)
		ck.detail = fmt.Sprintf("handler ran %d times, %d responses were 201 (want equal)", execs, good)
	case "replay":
		ck.ok = execs == 1 && replayed == good
		ck.detail = fmt.Sprintf("handler ran %d time(s) (want 1, the seed); %d of %d 201s marked replayed (want all)", execs, replayed, good)
	case "conflict":
		ck.ok = execs == 1
		ck.detail = fmt.Sprintf("handler ran %d time(s) (want 1, the blocked seed); %d of %d requests got 409", execs, good, m.Requests)
	}
	return r, ck, nil
}

func staticTargeter(u, key string) vegeta.Targeter {
	return vegeta.NewStaticTargeter(vegeta.Target{
		Method: http.MethodPost,
		URL:    u,
		Body:   requestBody,
		Header: http.Header{"Content-Type": {"application/json"}, keyHeader: {key}},
	})
}

// attack runs one vegeta attack and returns its metrics, how many 201s
// carried the replay header, and up to three distinct transport errors.
func attack(ctx context.Context, cfg config, name string, tr vegeta.Targeter) (*vegeta.Metrics, int, []string) {
	// Our own transport, so that its connections can be closed when the
	// attack ends (vegeta does not expose its own), and without a proxy.
	transport := &http.Transport{
		MaxConnsPerHost:     cfg.connections,
		MaxIdleConnsPerHost: cfg.connections,
		IdleConnTimeout:     30 * time.Second,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	a := vegeta.NewAttacker(
		vegeta.Client(client),
		// Start with a worker per connection rather than vegeta's 10, so
		// the first second is not spent growing the pool.
		vegeta.Workers(uint64(cfg.connections)),
	)
	stop := context.AfterFunc(ctx, func() { a.Stop() })
	defer stop()

	var (
		m        vegeta.Metrics
		replayed int
		errs     []string
	)
	pacer := vegeta.ConstantPacer{Freq: cfg.rate, Per: time.Second}
	for res := range a.Attack(tr, pacer, cfg.duration, name) {
		m.Add(res)
		switch {
		case res.Code == http.StatusCreated && res.Headers.Get(replayHeader) == "true":
			replayed++
		case res.Code == 0 && len(errs) < 3 && !slices.Contains(errs, res.Error):
			errs = append(errs, res.Error)
		}
	}
	m.Close()
	return &m, replayed, errs
}

// newControlClient returns the client of the seed requests, apart from the
// attack's connections.
func newControlClient() *http.Client {
	return &http.Client{Transport: &http.Transport{}, Timeout: time.Minute}
}

// post sends the scenario's request once with key and returns the status and
// whether it was a replay.
func post(ctx context.Context, client *http.Client, u, key string, block bool) (int, bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(requestBody))
	if err != nil {
		return 0, false, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(keyHeader, key)
	if block {
		req.Header.Set(blockHeader, "1")
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get(replayHeader) == "true", nil
}

// printTable prints the rows, each row's p50 also as a ratio to the bare
// handler's p50 of the same run.
func printTable(w io.Writer, rows []row) {
	var bare time.Duration
	for _, r := range rows {
		if r.server == "bare" {
			bare = r.p50
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "server\tscenario\trequests\tsent/s\tsuccess\tthroughput/s\tp50\tp99\tp50×bare\tstatus codes")
	for _, r := range rows {
		ratio := "—"
		if bare > 0 {
			ratio = strconv.FormatFloat(float64(r.p50)/float64(bare), 'f', 2, 64)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f\t%.2f%%\t%.1f\t%s\t%s\t%s\t%s\n",
			r.server, r.scenario, r.requests, r.rate, 100*r.success, r.throughput,
			round(r.p50), round(r.p99), ratio, formatCodes(r.codes))
	}
	_ = tw.Flush()
	for _, r := range rows {
		if len(r.errors) > 0 {
			fmt.Fprintf(w, "errors in %s/%s: %s\n", r.server, r.scenario, strings.Join(r.errors, "; "))
		}
	}
}

// round keeps three significant-ish digits: enough to compare rows.
func round(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(time.Microsecond)
	}
}

// formatCodes prints status counts as "201=9998 0=2", sorted by code.
func formatCodes(codes map[string]int) string {
	keys := make([]string, 0, len(codes))
	for k := range codes {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + strconv.Itoa(codes[k])
	}
	return strings.Join(parts, " ")
}
