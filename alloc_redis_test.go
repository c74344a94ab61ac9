package idempotency_test

import (
	"context"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// The Redis store's allocation budget over the floor of issue 23: the
// bare handler plus the raw commands a first request cannot do without
// (SET NX PX to claim, SET to store) and the one a replay needs (GET),
// through the same go-redis client (with ContextTimeoutEnabled, as the
// README recommends). Counted for whole requests, like
// TestAllocationBudget; the allocations go-redis makes per command are in
// both sides.
const (
	redisAllocBudgetFirst  = 25
	redisAllocBudgetReplay = 12
)

func TestRedisAllocationBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts are for a full run")
	}
	if raceEnabled {
		t.Skip("the race detector allocates on its own; run without -race")
	}
	// A real server: miniredis runs in this process, and its allocations
	// would count.
	opt := redistest.Options(t)
	opt.ContextTimeoutEnabled = true
	client := redistest.ClientWith(t, opt)
	ctx := context.Background()
	prefix := redistest.Prefix(t)
	bare := allocHandler()
	h := newMiddleware(t, newRedisStore(t, client)).Handler(allocHandler())
	serve(h, allocRequest("replay"))
	claim := "\x01F\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + "\x40" + string(make([]byte, 64)) + "\x00"
	done := "\x01C\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + string(allocResponseBody)

	const runs = 200
	keys := make([]string, runs+1) // AllocsPerRun runs once more to warm up
	for i := range keys {
		keys[i] = prefix + "floor-" + strconv.Itoa(i)
	}
	i := 0
	floorFirst := testing.AllocsPerRun(runs, func() {
		bare.ServeHTTP(httptest.NewRecorder(), allocRequest(keys[i]))
		if err := client.SetArgs(ctx, keys[i], claim, redis.SetArgs{Mode: "NX", TTL: time.Minute}).Err(); err != nil {
			t.Fatal(err)
		}
		if err := client.Set(ctx, keys[i], done, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		i++
	})
	floorReplay := testing.AllocsPerRun(runs, func() {
		bare.ServeHTTP(httptest.NewRecorder(), allocRequest("replay"))
		if err := client.Get(ctx, keys[0]).Err(); err != nil {
			t.Fatal(err)
		}
	})
	// allocsOver counts over the bare handler; the floors count it too.
	base := testing.AllocsPerRun(runs, func() { bare.ServeHTTP(httptest.NewRecorder(), allocRequest("k")) })
	first := base + allocsOver(t, h, func(i int) string { return "first-" + strconv.Itoa(i) })
	replay := base + allocsOver(t, h, func(int) string { return "replay" })
	t.Logf("allocations per request: first %.0f against a floor of %.0f, replay %.0f against %.0f (bare handler %.0f)",
		first, floorFirst, replay, floorReplay, base)
	if first > floorFirst+redisAllocBudgetFirst {
		t.Errorf("first request: %.0f allocations, over the floor's %.0f + %d", first, floorFirst, redisAllocBudgetFirst)
	}
	if replay > floorReplay+redisAllocBudgetReplay {
		t.Errorf("replay: %.0f allocations, over the floor's %.0f + %d", replay, floorReplay, redisAllocBudgetReplay)
	}
}
