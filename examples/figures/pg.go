package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// pgCost is what one request costs PostgreSQL, averaged over a phase.
type pgCost struct {
	roundTrips float64 // statements sent (BEGIN and COMMIT each count)
	cpuMicros  float64 // the serving backend's CPU, user and system (/proc); NaN when the server is not local
	walBytes   float64 // WAL written by the whole server (pg_current_wal_lsn), the minimum over the repetitions
	rows       float64 // row versions written: inserted, updated, deleted (pg_stat_user_tables)
	bytes      float64 // growth of the tables and their indexes (pg_total_relation_size)
}

// pgCosts are the per-request costs of the store and of the floor.
type pgCosts struct {
	storeFirst, storeReplay, floorFirst, floorReplay pgCost
	local                                            bool // the backend's CPU could be read
}

// queryCounter is a pgx tracer counting statements and batches.
type queryCounter struct{ n atomic.Int64 }

func (c *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}
func (c *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (c *queryCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.n.Add(1)
	return ctx
}
func (c *queryCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *queryCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// pgEnv is a schema of this program's own, dropped by close, and a pool
// of one connection working in it, so that one backend serves every
// request and its CPU can be read.
type pgEnv struct {
	admin   *pgx.Conn
	pool    *pgxpool.Pool
	schema  string
	counter *queryCounter
	pid     int
	local   bool
}

func newPGEnv(ctx context.Context, rawURL string) (*pgEnv, error) {
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		return nil, err
	}
	admin, err := pgx.ConnectConfig(ctx, cfg.ConnConfig.Copy())
	if err != nil {
		return nil, err
	}
	e := &pgEnv{admin: admin, schema: "figures_" + strings.ToLower(rand.Text()[:12]), counter: &queryCounter{}}
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+e.schema); err != nil {
		admin.Close(ctx)
		return nil, err
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = e.schema
	cfg.ConnConfig.RuntimeParams["application_name"] = e.schema
	cfg.ConnConfig.Tracer = e.counter
	cfg.MaxConns, cfg.MinConns = 1, 1
	if e.pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		e.close(ctx)
		return nil, err
	}
	if err := e.pool.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&e.pid); err != nil {
		e.close(ctx)
		return nil, err
	}
	host := cfg.ConnConfig.Host
	if u, err := url.Parse(rawURL); err == nil && u.Hostname() != "" {
		host = u.Hostname()
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", e.pid))
	e.local = (host == "127.0.0.1" || host == "localhost" || host == "::1" || strings.HasPrefix(host, "/")) &&
		strings.TrimSpace(string(comm)) == "postgres"
	return e, nil
}

func (e *pgEnv) close(ctx context.Context) {
	if e.pool != nil {
		e.pool.Close()
	}
	_, _ = e.admin.Exec(ctx, "DROP SCHEMA "+e.schema+" CASCADE")
	e.admin.Close(ctx)
}

// backendCPU is the backend's CPU so far in microseconds, from
// /proc/PID/stat (utime and stime, in clock ticks of 10 ms).
func (e *pgEnv) backendCPU() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", e.pid))
	if err != nil {
		return 0
	}
	s := string(b)
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) * 1e6 / clockTicks
}

// clockTicks is Linux's USER_HZ, the unit of /proc/PID/stat's times.
const clockTicks = 100

type pgSnapshot struct {
	lsn        string
	rows, size float64
	cpu        float64
	trips      int64
}

func (e *pgEnv) snapshot(ctx context.Context) (pgSnapshot, error) {
	s := pgSnapshot{cpu: e.backendCPU(), trips: e.counter.n.Load()}
	// The serving backend reports its table counters when it next goes
	// idle: after this statement.
	if _, err := e.pool.Exec(ctx, "SELECT pg_stat_force_next_flush()"); err != nil {
		return s, err
	}
	if _, err := e.admin.Exec(ctx, "SELECT pg_stat_clear_snapshot()"); err != nil {
		return s, err
	}
	err := e.admin.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text,
		coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::float8,
		coalesce(sum(pg_total_relation_size(relid)), 0)::float8
		FROM pg_stat_user_tables WHERE schemaname = $1`, e.schema).Scan(&s.lsn, &s.rows, &s.size)
	return s, err
}

// measure runs n requests between two snapshots and returns the cost per
// request. The snapshots' own statements are not counted.
func (e *pgEnv) measure(ctx context.Context, n int, do func(i int) error) (pgCost, error) {
	before, err := e.snapshot(ctx)
	if err != nil {
		return pgCost{}, err
	}
	trips := e.counter.n.Load()
	for i := range n {
		if err := do(i); err != nil {
			return pgCost{}, err
		}
	}
	trips = e.counter.n.Load() - trips
	after, err := e.snapshot(ctx)
	if err != nil {
		return pgCost{}, err
	}
	var wal float64
	if err := e.admin.QueryRow(ctx, "SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::float8", after.lsn, before.lsn).Scan(&wal); err != nil {
		return pgCost{}, err
	}
	k := 1 / float64(n)
	c := pgCost{
		roundTrips: float64(trips) * k,
		walBytes:   wal * k,
		rows:       (after.rows - before.rows) * k,
		bytes:      (after.size - before.size) * k,
	}
	// The snapshot's own statement ran on the backend too: a few µs in
	// thousands of requests.
	c.cpuMicros = (after.cpu - before.cpu) * k
	return c, nil
}

// The floor is pgtest's (the statements of pgstore's BenchmarkPostgresOverhead).

// measurePGCosts measures first requests and replays through the
// middleware on a pgstore.Store, and the floor's statements, reps times
// each; WAL and CPU keep
// each phase's smallest figure, since other clients of the server can only
// add to them.
func measurePGCosts(ctx context.Context, rawURL string, n, reps int) (pgCosts, error) {
	var out pgCosts
	e, err := newPGEnv(ctx, rawURL)
	if err != nil {
		return out, err
	}
	defer e.close(context.WithoutCancel(ctx))
	out.local = e.local
	if err := pgstore.Migrate(ctx, e.pool, pgstore.MigrateOptions{Schema: e.schema}); err != nil {
		return out, err
	}
	if _, err := e.pool.Exec(ctx, pgtest.FloorTable); err != nil {
		return out, err
	}
	store, err := pgstore.New(ctx, e.pool, pgstore.Options{Schema: e.schema})
	if err != nil {
		return out, err
	}
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		return out, err
	}
	h := mw.Handler(app)
	exec := func(sql string, args ...any) error {
		_, err := e.pool.Exec(ctx, sql, args...)
		return err
	}
	token, fingerprint := []byte("0123456789abcdef0123456789abcdef"), make([]byte, 32)
	header := []byte("\x00\x01Content-Type\x00\x10application/json")
	floorFirst := func(key []byte) error {
		if err := exec(pgtest.FloorClaim, key, token, fingerprint); err != nil {
			return err
		}
		return exec(pgtest.FloorComplete, key, token, int32(http.StatusCreated), header, responseBody)
	}
	floorReplay := func() error {
		var (
			status          string
			tok, fp, hd, bd []byte
			code            int32
		)
		return e.pool.QueryRow(ctx, pgtest.FloorReplay, []byte("replay")).Scan(&status, &tok, &fp, &code, &hd, &bd)
	}
	for i := range 10 {
		if err := serve(h, "warm-"+strconv.Itoa(i)); err != nil {
			return out, err
		}
	}
	if err := serve(h, "replay"); err != nil {
		return out, err
	}
	if err := floorFirst([]byte("replay")); err != nil {
		return out, err
	}
	for rep := range reps {
		tag := strconv.Itoa(rep) + "-"
		phases := []struct {
			cost *pgCost
			do   func(i int) error
		}{
			{&out.storeFirst, func(i int) error { return serve(h, "first-"+tag+strconv.Itoa(i)) }},
			{&out.storeReplay, func(int) error { return serve(h, "replay") }},
			{&out.floorFirst, func(i int) error { return floorFirst([]byte("first-" + tag + strconv.Itoa(i))) }},
			{&out.floorReplay, func(int) error { return floorReplay() }},
		}
		for _, p := range phases {
			c, err := e.measure(ctx, n, p.do)
			if err != nil {
				return out, err
			}
			if rep == 0 {
				*p.cost = c
				continue
			}
			p.cost.walBytes = min(p.cost.walBytes, c.walBytes)
			p.cost.cpuMicros = min(p.cost.cpuMicros, c.cpuMicros)
		}
	}
	return out, nil
}
