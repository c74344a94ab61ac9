package main

import (
	"context"
	"fmt"
	"os"
)

const (
	redisURLEnv    = "IDEMPOTENCY_TEST_REDIS_URL"
	databaseURLEnv = "IDEMPOTENCY_TEST_DATABASE_URL"
	redisServerEnv = "IDEMPOTENCY_TEST_REDIS_SERVER"
)

func (r *report) benchArgs(pattern, benchtime, pkg string) []string {
	return []string{"-count", itoa(r.cfg.count), "-run", "^$", "-bench", pattern, "-benchmem", "-benchtime", benchtime, pkg}
}

// memory: the bare handler against the middleware on the memory store,
// interleaved in every iteration (BenchmarkMemoryOverhead), and the whole
// requests (BenchmarkBaseline, BenchmarkMemory).
func (r *report) memory(ctx context.Context) {
	r.section("Memory store: the middleware against the bare handler")
	args := r.benchArgs("^Benchmark(Baseline|Memory|MemoryOverhead)$", r.cfg.bench[0], ".")
	out, err := goTest(ctx, r.cfg.root, []string{redisURLEnv + "="}, args...)
	if err != nil {
		r.fail("memory benchmarks", err)
		return
	}
	res := parseBench(out)
	bare := of(res, "BenchmarkMemoryOverhead", "bare-µs")
	firstOver := of(res, "BenchmarkMemoryOverhead", "first-over-bare-µs")
	replayOver := of(res, "BenchmarkMemoryOverhead", "replay-over-bare-µs")
	baseAllocs := of(res, "BenchmarkBaseline", "allocs/op")
	allocsOver := func(name string) string {
		return zip(of(res, name, "allocs/op"), baseAllocs, minus).format(0, "")
	}
	rows := [][]string{
		{"first", bare.format(2, " µs"), zip(bare, firstOver, plus).format(2, " µs"),
			zip(zip(bare, firstOver, plus), bare, ratio).format(2, ""), firstOver.format(2, " µs"), allocsOver("BenchmarkMemory/first")},
		{"replay", bare.format(2, " µs"), zip(bare, replayOver, plus).format(2, " µs"),
			zip(zip(bare, replayOver, plus), bare, ratio).format(2, ""), replayOver.format(2, " µs"), allocsOver("BenchmarkMemory/replay")},
	}
	rounds, k := 40, 1000
	if r.cfg.short {
		rounds, k = 2, 200
	}
	par, err := measureParallel(rounds, k)
	if err != nil {
		r.fail("memory, parallel", err)
	} else {
		rows = append(rows, []string{fmt.Sprintf("first, %d goroutines in parallel (wall time per request) ¹", par.goroutines),
			par.bare.format(2, " µs"), par.mw.format(2, " µs"), zip(par.mw, par.bare, ratio).format(2, ""), zip(par.mw, par.bare, minus).format(2, " µs"),
			allocsOver("BenchmarkMemory/first-parallel")})
	}
	r.table([]string{"request", "bare handler", "middleware", "× bare", "over bare", "allocations over bare"}, rows)
	r.note("\nfirst and replay: BenchmarkMemoryOverhead, bare handler and middleware in every iteration (median and range over the runs); allocations: BenchmarkMemory against BenchmarkBaseline.\n" +
		fmt.Sprintf("¹ this program: one goroutine per CPU serving %d requests each, bare handler then middleware, %d rounds (median and range over the rounds); allocations from BenchmarkMemory/first-parallel.\n", k, rounds) +
		"command: go test " + join(args) + "\n")
}

// redisBench: the middleware on Redis against the raw go-redis commands
// the protocol cannot do without, interleaved (BenchmarkRedisOverhead).
func (r *report) redisBench(ctx context.Context) {
	r.section("Redis: the middleware against the raw-client floor")
	url := os.Getenv(redisURLEnv)
	if url == "" {
		r.skip("Redis rows", redisURLEnv+" is not set")
		return
	}
	args := r.benchArgs("^Benchmark(Redis|RedisOverhead)$", r.cfg.bench[1], ".")
	out, err := goTest(ctx, r.cfg.root, nil, args...)
	if err != nil {
		r.fail("Redis benchmarks", err)
		return
	}
	res := parseBench(out)
	ff, fo := of(res, "BenchmarkRedisOverhead", "floor-first-µs"), of(res, "BenchmarkRedisOverhead", "first-over-floor-µs")
	rf, ro := of(res, "BenchmarkRedisOverhead", "floor-replay-µs"), of(res, "BenchmarkRedisOverhead", "replay-over-floor-µs")
	ping := of(res, "BenchmarkRedis/ping", "ns/op")
	pingAllocs := of(res, "BenchmarkRedis/ping", "allocs/op")
	row := func(name string, floor, over series, allocs string) []string {
		return []string{name, floor.format(1, " µs"), zip(floor, over, plus).format(1, " µs"), zip(zip(floor, over, plus), floor, ratio).format(2, ""), over.format(1, " µs"), allocs}
	}
	firstAllocs := of(res, "BenchmarkRedis/first", "allocs/op").format(0, "")
	replayAllocs := of(res, "BenchmarkRedis/replay", "allocs/op").format(0, "")
	rows := [][]string{
		row("first (script floor: SET NX PX GET, EVALSHA of a store-if-owner script)", ff, fo, firstAllocs),
		row("replay (script floor: SET NX PX GET)", rf, ro, replayAllocs),
	}
	// The plain floor, where the benchmark reports it.
	if pf := of(res, "BenchmarkRedisOverhead", "plain-floor-first-µs"); len(pf) > 0 {
		rows = append(rows,
			row("first (plain floor: SET NX PX, SET)", pf, of(res, "BenchmarkRedisOverhead", "first-over-plain-floor-µs"), firstAllocs),
			row("replay (plain floor: GET)", of(res, "BenchmarkRedisOverhead", "plain-floor-replay-µs"), of(res, "BenchmarkRedisOverhead", "replay-over-plain-floor-µs"), replayAllocs))
	}
	rows = append(rows, []string{"one round trip (PING)", ping.scale(1e-3).format(1, " µs"), "", "", "", ""})
	r.table([]string{"request", "floor", "middleware", "× floor", "over floor", "allocations (one PING: " + pingAllocs.format(0, ")")}, rows)
	r.note("\nBenchmarkRedisOverhead: bare handler plus raw commands, and the middleware, in every iteration, on " + redisURLEnv + ".\n" +
		"command: " + redisURLEnv + "=" + url + " go test " + join(args) + "\n")
}

// postgresBench: the middleware on pgstore against bare INSERT … ON
// CONFLICT statements on the same pool, interleaved
// (BenchmarkPostgresOverhead).
func (r *report) postgresBench(ctx context.Context) {
	r.section("PostgreSQL: the middleware against the raw statements")
	url := os.Getenv(databaseURLEnv)
	if url == "" {
		r.skip("PostgreSQL rows", databaseURLEnv+" is not set")
		return
	}
	args := r.benchArgs("^BenchmarkPostgres(Overhead)?$", r.cfg.bench[2], "./pgstore")
	out, err := goTest(ctx, r.cfg.root, nil, args...)
	if err != nil {
		r.fail("PostgreSQL benchmarks", err)
		return
	}
	res := parseBench(out)
	ff, fo := of(res, "BenchmarkPostgresOverhead", "floor-first-µs"), of(res, "BenchmarkPostgresOverhead", "first-over-floor-µs")
	rf, ro := of(res, "BenchmarkPostgresOverhead", "floor-replay-µs"), of(res, "BenchmarkPostgresOverhead", "replay-over-floor-µs")
	rows := [][]string{
		{"first (floor: the claim and the completion)", ff.format(0, " µs"), zip(ff, fo, plus).format(0, " µs"), zip(zip(ff, fo, plus), ff, ratio).format(2, ""), fo.format(0, " µs"),
			of(res, "BenchmarkPostgres/first", "allocs/op").format(0, "")},
		{"replay (floor: the read of the stored row)", rf.format(0, " µs"), zip(rf, ro, plus).format(0, " µs"), zip(zip(rf, ro, plus), rf, ratio).format(2, ""), ro.format(0, " µs"),
			of(res, "BenchmarkPostgres/replay", "allocs/op").format(0, "")},
	}
	// The transaction-mode pair, where the benchmark has it.
	if tf, to := of(res, "BenchmarkPostgresOverhead", "floor-tx-µs"), of(res, "BenchmarkPostgresOverhead", "tx-over-floor-µs"); len(tf) > 0 {
		rows = append(rows, []string{"first, handler writes in the claim's transaction (floor: the claim, then BEGIN, the handler's INSERT, the completion, COMMIT)",
			tf.format(0, " µs"), zip(tf, to, plus).format(0, " µs"), zip(zip(tf, to, plus), tf, ratio).format(2, ""), to.format(0, " µs"),
			of(res, "BenchmarkPostgres/first-tx", "allocs/op").format(0, "")})
	}
	r.table([]string{"request", "floor", "middleware", "× floor", "over floor", "allocations"}, rows)
	r.note("\nBenchmarkPostgresOverhead: the floor's raw statements (its doc comment says which) and the middleware on the same pool in every iteration.\n" +
		"command: " + databaseURLEnv + "='" + url + "' go test " + join(args) + "\n")
}
