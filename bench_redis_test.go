package idempotency_test

import (
	"context"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed70ea8305/idempotency/internal/benchtest"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// BenchmarkRedisServerTime reports the time Redis itself spends per
// request (INFO commandstats: the usec of the commands, summed and
// divided by the requests), for the middleware's scripts and for the
// commands of BenchmarkRedisOverhead's floors (floor: the plain commands,
// script-floor: with the store-if-owner script):
//
//	IDEMPOTENCY_TEST_REDIS_SERVER=$(command -v redis-server) \
//	  go test -run '^$' -bench RedisServerTime -benchtime 20000x .
//
// With IDEMPOTENCY_TEST_REDIS_SERVER it starts a server of its own, which
// nothing else uses; otherwise it measures the server of
// IDEMPOTENCY_TEST_REDIS_URL, where other clients' commands of the same
// names would count too. Scripts' own commands count both in the
// script's time and under their names, so the phases run apart, in
// blocks taking turns, and each counts only the commands its client
// sent.
func BenchmarkRedisServerTime(b *testing.B) {
	var opt *redis.Options
	if os.Getenv("IDEMPOTENCY_TEST_REDIS_SERVER") != "" {
		addr, stop := redistest.StartServer(b)
		b.Cleanup(stop)
		opt = &redis.Options{Addr: addr}
	} else {
		opt = redistest.Options(b)
	}
	opt.ContextTimeoutEnabled = true
	client := redistest.ClientWith(b, opt)
	ctx := context.Background()
	prefix := redistest.Prefix(b)
	h := newMiddleware(b, newRedisStore(b, client)).Handler(allocHandler())
	serve(h, allocRequest("replay"))
	claim := "\x01F\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + "\x40" + string(make([]byte, 64)) + "\x00"
	done := "\x01C\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + string(allocResponseBody)
	if err := rawComplete.Load(ctx, client).Err(); err != nil {
		b.Fatal(err)
	}
	keys := benchtest.Keys("first-", b.N)
	scripts := []string{"evalsha", "eval"}
	phases := []struct {
		name     string
		commands []string // whose time counts
		run      func(i int)
	}{
		{"first", scripts, func(i int) { h.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i])) }},
		{"replay", scripts, func(int) { h.ServeHTTP(httptest.NewRecorder(), allocRequest("replay")) }},
		{"floor-first", []string{"set"}, func(i int) {
			raw := prefix + "raw:" + keys[i]
			check(b, client.SetArgs(ctx, raw, claim, redis.SetArgs{Mode: "NX", TTL: time.Minute}).Err())
			check(b, client.Set(ctx, raw, done, time.Minute).Err())
		}},
		{"floor-replay", []string{"get"}, func(i int) { check(b, client.Get(ctx, prefix+"raw:"+keys[i]).Err()) }},
		// The script floor's first request sends SET, and its script calls
		// SET, which commandstats counts under "set" too: its two commands
		// are phases of their own, so that each counts once.
		{"script-floor-claim", []string{"set"}, func(i int) {
			scripted := prefix + "script:" + keys[i]
			if err := client.SetArgs(ctx, scripted, claim, redis.SetArgs{Mode: "NX", TTL: time.Minute, Get: true}).Err(); err != redis.Nil {
				b.Fatal(err)
			}
		}},
		{"script-floor-complete", scripts, func(i int) {
			check(b, rawComplete.EvalSha(ctx, client, []string{prefix + "script:" + keys[i]}, claim[:29], done, 60000).Err())
		}},
		{"script-floor-replay", []string{"set"}, func(i int) {
			check(b, client.SetArgs(ctx, prefix+"script:"+keys[i], claim, redis.SetArgs{Mode: "NX", TTL: time.Minute, Get: true}).Err())
		}},
	}
	usec := make([]int64, len(phases))
	const block = 100
	b.ResetTimer()
	for start := 0; start < b.N; start += block {
		end := min(start+block, b.N)
		for p, phase := range phases {
			before := commandUsec(b, client, phase.commands)
			for i := start; i < end; i++ {
				phase.run(i)
			}
			usec[p] += commandUsec(b, client, phase.commands) - before
		}
	}
	n := float64(b.N)
	for p, phase := range phases {
		b.ReportMetric(float64(usec[p])/n, phase.name+"-server-µs")
	}
	b.ReportMetric(float64(usec[0])/float64(usec[2]), "first/floor")
	b.ReportMetric(float64(usec[1])/float64(usec[3]), "replay/floor")
	b.ReportMetric(float64(usec[4]+usec[5])/n, "script-floor-first-server-µs")
	b.ReportMetric(float64(usec[0])/float64(usec[4]+usec[5]), "first/script-floor")
	b.ReportMetric(float64(usec[1])/float64(usec[6]), "replay/script-floor")
}

func check(b *testing.B, err error) {
	if err != nil {
		b.Fatal(err)
	}
}

// commandUsec sums the usec that INFO commandstats reports for commands.
func commandUsec(b *testing.B, client *redis.Client, commands []string) int64 {
	info, err := client.Info(context.Background(), "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	var total int64
	for line := range strings.Lines(info) {
		name, stats, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		for _, command := range commands {
			if name != "cmdstat_"+command {
				continue
			}
			for field := range strings.SplitSeq(stats, ",") {
				if v, ok := strings.CutPrefix(field, "usec="); ok {
					n, err := strconv.ParseInt(v, 10, 64)
					if err != nil {
						b.Fatalf("%s: %v", line, err)
					}
					total += n
				}
			}
		}
	}
	return total
}
