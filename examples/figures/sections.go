package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// costs are the per-request inputs of the capacity model, measured in
// this run; nil where the server was missing.
type costs struct {
	redis  *redisCosts
	pg     *pgCosts
	shards []shardRun
}

func f1(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }
func f2(v float64) string { return strconv.FormatFloat(v, 'f', 2, 64) }
func f0(v float64) string { return strconv.FormatFloat(v, 'f', 0, 64) }

// times is a/b as "1.23×", or "—" when b is 0.
func times(a, b float64) string {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "—"
	}
	return f2(a/b) + "×"
}

// serverCosts measures what a request costs the servers themselves.
func (r *report) serverCosts(ctx context.Context) *costs {
	c := &costs{}
	r.section("Per request, on the servers")
	bin, why := redisServerBin()
	if bin == "" {
		r.skip("Redis server-side costs", why)
	} else {
		srv, err := startRedis(ctx, bin)
		if err != nil {
			r.fail("Redis server-side costs", err)
		} else {
			rc, err := measureRedisCosts(ctx, srv.addr, r.cfg.n)
			srv.stop()
			if err != nil {
				r.fail("Redis server-side costs", err)
			} else {
				c.redis = &rc
				r.redisCostTable(rc, bin)
			}
		}
	}
	url := os.Getenv(databaseURLEnv)
	if url == "" {
		r.skip("PostgreSQL server-side costs", databaseURLEnv+" is not set")
		return c
	}
	reps := 3
	if r.cfg.short {
		reps = 1
	}
	pc, err := measurePGCosts(ctx, url, r.cfg.n, reps)
	if err != nil {
		r.fail("PostgreSQL server-side costs", err)
		return c
	}
	c.pg = &pc
	r.pgCostTable(pc, reps)
	return c
}

func (r *report) redisCostTable(c redisCosts, bin string) {
	r.note(fmt.Sprintf("Redis: a redis-server of this run's own (%s), %d requests per phase, one after another, 24 h TTL.\n\n", bin, r.cfg.n))
	type metric struct {
		name string
		get  func(redisCost) float64
		fmt  func(float64) string
	}
	var rows [][]string
	for _, m := range []metric{
		{"round trips", func(c redisCost) float64 { return c.roundTrips }, f2},
		{"commands run (a script: EVALSHA and the calls inside)", func(c redisCost) float64 { return c.commands }, f2},
		{"µs in commands (INFO commandstats)", func(c redisCost) float64 { return c.cmdMicros }, f1},
		{"µs of Redis CPU (INFO cpu: commands, network, event loop)", func(c redisCost) float64 { return c.cpuMicros }, f1},
		{"bytes of memory added (INFO used_memory, hash tables included)", func(c redisCost) float64 { return c.bytes }, f0},
		{"fence counters added (one per hash tag, at most 65,536, never expiring)", func(c redisCost) float64 { return c.fenceKeys }, f2},
		{"bytes per record, fence counters left out: used_memory growth", func(c redisCost) float64 { return c.recordBytes }, f0},
		{"bytes per record, fence counters left out: MEMORY USAGE", func(c redisCost) float64 { return c.recordUsage }, f0},
		{"keys added", func(c redisCost) float64 { return c.keys }, f2},
	} {
		rows = append(rows, []string{m.name,
			m.fmt(m.get(c.storeFirst)), m.fmt(m.get(c.floorFirst)), times(m.get(c.storeFirst), m.get(c.floorFirst)),
			m.fmt(m.get(c.storeReplay)), m.fmt(m.get(c.floorReplay)), times(m.get(c.storeReplay), m.get(c.floorReplay))})
	}
	r.table([]string{"per request", "first", "floor", "× floor", "replay", "floor", "× floor"}, rows)
	r.note("\nfloor: SET NX PX GET then EVALSHA of a store-if-owner script (first), SET NX PX GET (replay), as in BenchmarkRedisOverhead, storing the same 200-byte body.\n")
	r.note("µs in commands counts a script's calls twice: inside EVALSHA's time and on their own. Below, each command the client sent counted once (INFO commandstats of those commands alone, in a pass of its own per phase).\n\n")
	r.table([]string{"µs per request in the commands sent", "first", "× plain floor", "× script floor", "replay", "× plain floor", "× script floor"}, [][]string{
		{"the store's scripts", f1(c.storeFirst.topMicros), times(c.storeFirst.topMicros, c.plainFirst.topMicros), times(c.storeFirst.topMicros, c.floorFirst.topMicros),
			f1(c.storeReplay.topMicros), times(c.storeReplay.topMicros, c.plainReplay.topMicros), times(c.storeReplay.topMicros, c.floorReplay.topMicros)},
		{"plain floor: SET NX PX, SET (first); GET (replay)", f1(c.plainFirst.topMicros), "1.00×", "", f1(c.plainReplay.topMicros), "1.00×", ""},
		{"script floor, as above", f1(c.floorFirst.topMicros), "", "1.00×", f1(c.floorReplay.topMicros), "", "1.00×"},
	})
	r.note("\n")
}

func (r *report) pgCostTable(c pgCosts, reps int) {
	r.note(fmt.Sprintf("PostgreSQL: a schema of this run's own, one connection, %d requests per phase, %d repetition(s); WAL and CPU are each phase's smallest (other clients of the server only add to them).\n\n", r.cfg.n, reps))
	type metric struct {
		name string
		get  func(pgCost) float64
		fmt  func(float64) string
	}
	metrics := []metric{
		{"round trips (statements, BEGIN and COMMIT included)", func(c pgCost) float64 { return c.roundTrips }, f2},
		{"row versions written", func(c pgCost) float64 { return c.rows }, f2},
		{"WAL bytes (pg_current_wal_lsn, whole server)", func(c pgCost) float64 { return c.walBytes }, f0},
		{"bytes of table and index growth", func(c pgCost) float64 { return c.bytes }, f0},
	}
	if c.local {
		metrics = append(metrics, metric{"µs of the backend's CPU (/proc)", func(c pgCost) float64 { return c.cpuMicros }, f1})
	}
	var rows [][]string
	for _, m := range metrics {
		rows = append(rows, []string{m.name,
			m.fmt(m.get(c.storeFirst)), m.fmt(m.get(c.floorFirst)), times(m.get(c.storeFirst), m.get(c.floorFirst)),
			m.fmt(m.get(c.storeReplay)), m.fmt(m.get(c.floorReplay)), times(m.get(c.storeReplay), m.get(c.floorReplay))})
	}
	r.table([]string{"per request", "first", "floor", "× floor", "replay", "floor", "× floor"}, rows)
	r.note("\nfloor: a table of the columns a store needs with its primary key alone; a first request is a claim (INSERT … ON CONFLICT DO NOTHING) and an owner-checked UPDATE storing the response, a replay one SELECT.\n")
	if !c.local {
		r.note("The backend's CPU is not shown: the server is not on this machine.\n")
	}
}

// inbox: the inbox's acknowledgement against verification and a single
// INSERT, interleaved.
func (r *report) inbox(ctx context.Context) {
	r.section("Inbox: acknowledgement against a single INSERT")
	url := os.Getenv(databaseURLEnv)
	if url == "" {
		r.skip("inbox rows", databaseURLEnv+" is not set")
		return
	}
	n := r.cfg.n / 5
	f, err := measureInbox(ctx, url, n)
	if err != nil {
		r.fail("inbox", err)
		return
	}
	us := func(d time.Duration) string { return f0(float64(d) / 1e3) }
	row := func(name string, d, floor []time.Duration, indexes int) []string {
		return []string{name, us(mean(d)) + " µs", us(percentile(d, 0.5)) + " µs", us(percentile(d, 0.99)) + " µs",
			times(float64(mean(d)), float64(mean(floor))), times(float64(percentile(d, 0.5)), float64(percentile(floor, 0.5))), strconv.Itoa(indexes)}
	}
	r.table([]string{"acknowledgement of a new Stripe event", "mean", "p50", "p99", "× floor (mean)", "× floor (p50)", "indexes on the table"}, [][]string{
		row("inbox (Inbox.Receive: verify, INSERT)", f.inbox, f.floor, f.inboxIndexes),
		row("floor: the same verification, one INSERT of the same row", f.floor, f.floor, f.floorIndex),
	})
	r.note(fmt.Sprintf("\n%d events, inbox and floor alternating on one connection of a schema of this run's own.\n", n))
	r.inboxTests(ctx, url)
}

// inboxFigureLine is a result line of pgstore/inbox's own figures tests.
var inboxFigureLine = regexp.MustCompile(`(?m)^\s+figures_test\.go:\d+: ((?:acknowledgement|one worker).*)$`)

// inboxTests runs pgstore/inbox's figures tests against their floors (an
// INSERT into a table with the indexes any inbox needs; a raw
// claim-and-complete loop), where the tree has them, and prints their
// results.
func (r *report) inboxTests(ctx context.Context, url string) {
	args := []string{"-count=1", "-run", "^TestFigures(AckFloor|WorkerFloor)$", "-v", "./pgstore/inbox"}
	out, err := goTest(ctx, r.cfg.root, []string{"PGSTORE_INBOX_FIGURES=1"}, args...)
	if err != nil {
		r.fail("pgstore/inbox figures tests", err)
		return
	}
	lines := inboxFigureLine.FindAllStringSubmatch(out, -1)
	if len(lines) == 0 {
		r.skip("pgstore/inbox's floors", "this tree has no TestFiguresAckFloor or TestFiguresWorkerFloor")
		return
	}
	r.note("\npgstore/inbox's own figures against its floors:\n\n")
	for _, l := range lines {
		r.note("- " + l[1] + "\n")
	}
	r.note("\ncommand: PGSTORE_INBOX_FIGURES=1 " + databaseURLEnv + "='" + url + "' go test " + join(args) + "\n")
}

// clusters: first requests from a fixed number of goroutines against 1,
// 3 and 6 Redis primaries: throughput, Redis CPU per request and how the
// keys spread over the shards.
func (r *report) clusters(ctx context.Context, c *costs) {
	r.section("Redis Cluster: throughput per shard and the keys' spread")
	bin, why := redisServerBin()
	if bin == "" {
		r.skip("cluster rows", why)
		return
	}
	const workers = 16
	single := func() (shardRun, error) {
		srv, err := startRedis(ctx, bin)
		if err != nil {
			return shardRun{}, err
		}
		defer srv.stop()
		client := redis.NewClient(redisOptions(srv.addr))
		defer client.Close()
		return loadShards(ctx, client, []*redis.Client{client}, workers, r.cfg.cluster)
	}
	sharded := func(n int) (shardRun, error) {
		addrs, stop, err := startCluster(ctx, r.cfg.root, bin, n)
		if err != nil {
			return shardRun{}, err
		}
		defer stop()
		client := clusterClient(addrs)
		defer client.Close()
		var nodes []*redis.Client
		for _, a := range addrs {
			node := redis.NewClient(redisOptions(a))
			defer node.Close()
			nodes = append(nodes, node)
		}
		return loadShards(ctx, client, nodes, workers, r.cfg.cluster)
	}
	var rows [][]string
	for _, n := range append([]int{1}, r.cfg.shards...) {
		var run shardRun
		var err error
		if n == 1 {
			run, err = single()
		} else {
			run, err = sharded(n)
		}
		if err != nil {
			r.fail(fmt.Sprintf("%d-shard run", n), err)
			continue
		}
		c.shards = append(c.shards, run)
		lo, hi := run.spread()
		kind := "cluster of " + strconv.Itoa(n) + " primaries"
		if n == 1 {
			kind = "one node, no cluster"
		}
		perShard := run.rate() / float64(n)
		rows = append(rows, []string{kind, f0(run.rate()), f0(perShard), f1(run.cpuPerRequest()),
			f0(100*run.busiest()) + " %", f0(perShard / run.busiest()), f2(lo) + "–" + f2(hi)})
	}
	r.table([]string{"Redis", "first requests/s", "per shard", "µs of Redis CPU per request (all shards, idle CPU taken off)", "busiest shard's CPU", "per shard at 100 % CPU (extrapolated)", "keys per shard ÷ even share (min–max)"}, rows)
	r.note(fmt.Sprintf("\n%d goroutines of this program send first requests with new keys through the middleware (in process, no HTTP) for %v per row; "+
		"the nodes are redis-server processes on this machine (scripts/cluster.sh), so client and shards share its CPUs: "+
		"a shard far from 100%% CPU says the client, not the shard, set the rate.\n", workers, r.cfg.cluster))
}
