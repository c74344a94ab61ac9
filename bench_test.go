package idempotency_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/benchtest"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// Benchmarks compare the middleware with the same handler unwrapped (the
// handler and request of TestAllocationBudget: a ~100-byte JSON request,
// a 200-byte JSON 201). Run:
//
//	go test -run '^$' -bench . -benchmem
//	IDEMPOTENCY_TEST_REDIS_URL=redis://127.0.0.1:6379/0 go test -run '^$' -bench . -benchmem
//
// The Overhead benchmarks interleave the bare handler (or the raw Redis
// commands that are the floor) with the middleware in every iteration and
// report the differences, so that a noisy machine moves both sides alike.

func BenchmarkBaseline(b *testing.B) {
	h := allocHandler()
	b.ReportAllocs()
	for b.Loop() {
		h.ServeHTTP(httptest.NewRecorder(), allocRequest("k"))
	}
}

// benchMemoryStore has no limits: a benchmark's first requests add
// millions of records, past the default 1 GiB, and it measures speed.
func benchMemoryStore() *idempotency.MemoryStore {
	return idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})
}

func BenchmarkMemory(b *testing.B) {
	benchmarkStore(b, benchMemoryStore())
}

// BenchmarkMemoryOverhead reports, per request, the time the middleware
// on the memory store adds to the bare handler: first-µs and replay-µs.
func BenchmarkMemoryOverhead(b *testing.B) {
	bare := allocHandler()
	h := newMiddleware(b, benchMemoryStore()).Handler(allocHandler())
	serve(h, allocRequest("replay"))
	keys := benchtest.Keys("first-", b.N)
	var base, first, replay time.Duration
	b.ResetTimer()
	for i := range b.N {
		base += benchtest.Timed(func() { bare.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i])) })
		first += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i])) })
		replay += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), allocRequest("replay")) })
	}
	n := float64(b.N)
	b.ReportMetric(benchtest.Micros(base)/n, "bare-µs")
	b.ReportMetric(benchtest.Micros(first-base)/n, "first-over-bare-µs")
	b.ReportMetric(benchtest.Micros(replay-base)/n, "replay-over-bare-µs")
}

// benchRedisClient is a go-redis client as the README recommends it:
// store calls bounded by their context, inline.
func benchRedisClient(b *testing.B) *redis.Client {
	opt := redistest.Options(b)
	opt.ContextTimeoutEnabled = true
	return redistest.ClientWith(b, opt)
}

func BenchmarkRedis(b *testing.B) {
	client := benchRedisClient(b)
	// The floor: one go-redis round trip with nothing else around it.
	b.Run("ping", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := client.Ping(b.Context()).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	benchmarkStore(b, newRedisStore(b, client))
}

// rawComplete stands for the store-if-owner script: a GET, a prefix
// comparison and a SET, the floor's second round trip.
var rawComplete = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0`)

// BenchmarkRedisOverhead reports, per request, how far the middleware on
// a real Redis is from what it cannot do without: the bare handler
// serving the request plus the raw go-redis commands. Two floors: the
// script floor (floor-*), which also checks the owner when storing (SET
// NX PX GET, then EVALSHA of a store-if-owner script; SET NX PX GET for a
// replay), and issue 23's plain floor (plain-floor-*: SET NX PX to claim
// and SET to store for a first request, one GET for a replay). Each
// iteration runs all six, so the floors and the middleware see the same
// server and the same machine.
func BenchmarkRedisOverhead(b *testing.B) {
	client := benchRedisClient(b)
	ctx := context.Background()
	prefix := redistest.Prefix(b)
	bare := allocHandler()
	h := newMiddleware(b, newRedisStore(b, client)).Handler(allocHandler())
	serve(h, allocRequest("replay"))
	claim := "\x01F\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + "\x40" + string(make([]byte, 64)) + "\x00"
	done := "\x01C\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + string(allocResponseBody)
	if err := rawComplete.Load(ctx, client).Err(); err != nil {
		b.Fatal(err)
	}
	keys := benchtest.Keys("first-", b.N)
	var plainFloorFirst, scriptFloorFirst, first, plainFloorReplay, scriptFloorReplay, replay time.Duration
	b.ResetTimer()
	for i := range b.N {
		raw, scripted := prefix+"raw:"+keys[i], prefix+"script:"+keys[i]
		plainFloorFirst += benchtest.Timed(func() {
			bare.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i]))
			if err := client.SetArgs(ctx, raw, claim, redis.SetArgs{Mode: "NX", TTL: time.Minute}).Err(); err != nil {
				b.Fatal(err)
			}
			if err := client.Set(ctx, raw, done, time.Minute).Err(); err != nil {
				b.Fatal(err)
			}
		})
		scriptFloorFirst += benchtest.Timed(func() {
			bare.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i]))
			if err := client.SetArgs(ctx, scripted, claim, redis.SetArgs{Mode: "NX", TTL: time.Minute, Get: true}).Err(); err != redis.Nil {
				b.Fatal(err)
			}
			if err := rawComplete.EvalSha(ctx, client, []string{scripted}, claim[:29], done, 60000).Err(); err != nil {
				b.Fatal(err)
			}
		})
		first += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i])) })
		plainFloorReplay += benchtest.Timed(func() {
			bare.ServeHTTP(httptest.NewRecorder(), allocRequest("replay"))
			if err := client.Get(ctx, raw).Err(); err != nil {
				b.Fatal(err)
			}
		})
		scriptFloorReplay += benchtest.Timed(func() {
			bare.ServeHTTP(httptest.NewRecorder(), allocRequest("replay"))
			if err := client.SetArgs(ctx, scripted, claim, redis.SetArgs{Mode: "NX", TTL: time.Minute, Get: true}).Err(); err != nil {
				b.Fatal(err)
			}
		})
		replay += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), allocRequest("replay")) })
	}
	n := float64(b.N)
	// floor-* is the script floor, as before issue 23; plain-floor-* the
	// plain commands'.
	b.ReportMetric(benchtest.Micros(scriptFloorFirst)/n, "floor-first-µs")
	b.ReportMetric(benchtest.Micros(first-scriptFloorFirst)/n, "first-over-floor-µs")
	b.ReportMetric(benchtest.Micros(scriptFloorReplay)/n, "floor-replay-µs")
	b.ReportMetric(benchtest.Micros(replay-scriptFloorReplay)/n, "replay-over-floor-µs")
	b.ReportMetric(benchtest.Micros(plainFloorFirst)/n, "plain-floor-first-µs")
	b.ReportMetric(benchtest.Micros(first-plainFloorFirst)/n, "first-over-plain-floor-µs")
	b.ReportMetric(benchtest.Micros(plainFloorReplay)/n, "plain-floor-replay-µs")
	b.ReportMetric(benchtest.Micros(replay-plainFloorReplay)/n, "replay-over-plain-floor-µs")
}

func benchmarkStore(b *testing.B, store idempotency.Store) {
	h := newMiddleware(b, store).Handler(allocHandler())
	var seq atomic.Int64

	b.Run("first", func(b *testing.B) {
		keys := benchtest.Keys("first-"+strconv.FormatInt(seq.Add(1), 10)+"-", b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			h.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i]))
		}
	})
	b.Run("replay", func(b *testing.B) {
		h.ServeHTTP(httptest.NewRecorder(), allocRequest("replay"))
		b.ReportAllocs()
		for b.Loop() {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, allocRequest("replay"))
			if w.Code != http.StatusCreated {
				b.Fatalf("status %d", w.Code)
			}
		}
	})
	b.Run("first-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				h.ServeHTTP(httptest.NewRecorder(), allocRequest("par-"+strconv.FormatInt(seq.Add(1), 10)))
			}
		})
	})
}
