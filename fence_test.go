package idempotency_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// Fences never go backwards (issue 19): a downstream system that
// remembers the greatest fence it saw must never be handed a smaller one
// by a later owner, also when the store lost its memory.

func claimFor(fingerprint string) idempotency.Record {
	return idempotency.Record{Token: rand.Text(), Fingerprint: fingerprint, CreatedAt: time.Now()}
}

// acquireFences claims and releases key n times and returns the fences.
func acquireFences(t *testing.T, store idempotency.Store, key string, n int) []uint64 {
	t.Helper()
	ctx := context.Background()
	var fences []uint64
	for range n {
		c := claimFor("fp")
		fence, existing, err := store.Acquire(ctx, key, c, time.Minute)
		require.NoError(t, err)
		require.Nil(t, existing)
		require.NoError(t, store.Release(ctx, key, c.Token))
		fences = append(fences, fence)
	}
	return fences
}

// TestRedisFencesSurviveARestartWithoutPersistence: a redis-server that
// keeps nothing on disk is killed and started again; the fences handed out
// after the restart are greater than every fence before it. Before issue
// 19 the fence was a plain counter, and went 1, 2, 3, 4, then 1.
func TestRedisFencesSurviveARestartWithoutPersistence(t *testing.T) {
	addr, stop := redistest.StartServer(t) // --save "" --appendonly no
	newStore := func() idempotency.Store {
		store, err := idempotency.NewRedisStore(redistest.ClientFor(t, addr), idempotency.RedisOptions{})
		require.NoError(t, err)
		return store
	}
	before := acquireFences(t, newStore(), "k", 4)
	stop()
	redistest.StartServerAt(t, addr)
	after := acquireFences(t, newStore(), "k", 4)
	t.Logf("fences before the restart %v, after %v", before, after)
	all := append(before, after...)
	for i := 1; i < len(all); i++ {
		assert.Greater(t, all[i], all[i-1], "fence %d", i)
	}
}

// TestMemoryFencesAboveTheLastProcess: a MemoryStore in a new process
// (nothing of the old one's records survive) starts its fences above
// those the store before it handed out.
func TestMemoryFencesAboveTheLastProcess(t *testing.T) {
	clock := newFakeClock()
	first := idempotency.NewMemoryStoreWithClock(clock.Now)
	before := acquireFences(t, first, "k", 1000)
	clock.Advance(time.Millisecond) // the restart
	second := idempotency.NewMemoryStoreWithClock(clock.Now)
	after := acquireFences(t, second, "k", 3)
	assert.Greater(t, after[0], before[len(before)-1])
}

// TestMemoryStoreIgnoresWallClockSteps: MemoryStore keeps leases and TTLs
// on the monotonic clock. Before issue 19 it read the wall clock, and a
// 2 s forward step freed a key whose owner's handler was still running.
func TestMemoryStoreIgnoresWallClockSteps(t *testing.T) {
	ctx := context.Background()
	for _, step := range []time.Duration{2 * time.Second, -2 * time.Second, 24 * time.Hour} {
		t.Run(fmt.Sprint(step), func(t *testing.T) {
			monotonic, wall := newFakeClock(), newFakeClock()
			store := idempotency.NewMemoryStoreWithClocks(monotonic.Now, wall.Now)
			owner := claimFor("fp")
			f1, existing, err := store.Acquire(ctx, "k", owner, time.Second)
			require.NoError(t, err)
			require.Nil(t, existing)

			wall.Advance(step)
			f2, existing, err := store.Acquire(ctx, "k", claimFor("fp"), time.Second)
			require.NoError(t, err)
			assert.Zero(t, f2, "a wall-clock step freed nothing")
			require.NotNil(t, existing)
			assert.Equal(t, owner.Token, existing.Token)
			require.NoError(t, store.Extend(ctx, "k", owner.Token, time.Second))

			monotonic.Advance(time.Second)
			f3, existing, err := store.Acquire(ctx, "k", claimFor("fp"), time.Second)
			require.NoError(t, err)
			assert.Nil(t, existing, "one lease of monotonic time freed the key")
			assert.Greater(t, f3, f1, "fences grow whatever the wall clock did")
		})
	}
}

// TestMiddlewareOnMemoryIgnoresWallClockSteps: the same through the
// middleware: while the first request's handler runs, a wall-clock step
// forward lets no duplicate run (409).
func TestMiddlewareOnMemoryIgnoresWallClockSteps(t *testing.T) {
	monotonic, wall := newFakeClock(), newFakeClock()
	store := idempotency.NewMemoryStoreWithClocks(monotonic.Now, wall.Now)
	entered, finish := make(chan struct{}), make(chan struct{})
	handler := createVenue()
	serveVenue := handler.serve
	handler.serve = func(w http.ResponseWriter, r *http.Request) {
		if handler.calls.Load() == 1 {
			close(entered)
			<-finish
		}
		serveVenue(w, r)
	}
	h := newMiddleware(t, store, idempotency.Options{Lease: 2 * time.Second}).Handler(handler)
	done := make(chan *httptest.ResponseRecorder)
	go func() { done <- serve(h, post("k", `{}`)) }()
	<-entered
	wall.Advance(2 * time.Second)
	requireProblem(t, serve(h, post("k", `{}`)), http.StatusConflict)
	close(finish)
	assert.Equal(t, http.StatusCreated, (<-done).Code)
	assert.Equal(t, int32(1), handler.calls.Load())
}
