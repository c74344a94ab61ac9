package idempotency_test

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// storeKinds are the stores every store-agnostic test runs against. Each
// returns the store and a way to move its clock forward.
var storeKinds = []struct {
	name string
	new  func(t *testing.T) (idempotency.Store, func(time.Duration))
}{
	{"memory", func(t *testing.T) (idempotency.Store, func(time.Duration)) {
		clock := newFakeClock()
		return idempotency.NewMemoryStoreWithClock(clock.Now), clock.Advance
	}},
	{"miniredis", func(t *testing.T) (idempotency.Store, func(time.Duration)) {
		mr, client := redistest.Miniredis(t)
		return newRedisStore(t, client), mr.FastForward
	}},
	{"redis", func(t *testing.T) (idempotency.Store, func(time.Duration)) {
		return newRedisStore(t, redistest.Client(t)), time.Sleep
	}},
	{"cluster", func(t *testing.T) (idempotency.Store, func(time.Duration)) {
		return newRedisStore(t, redistest.Cluster(t)), time.Sleep
	}},
	// Skipped unless IDEMPOTENCY_TEST_DATABASE_URL is set; each test in a
	// schema of its own.
	{"postgres", func(t *testing.T) (idempotency.Store, func(time.Duration)) {
		return pgtest.Store(t), time.Sleep
	}},
}

func newRedisStore(t testing.TB, client idempotency.RedisClient) *idempotency.RedisStore {
	t.Helper()
	store, err := idempotency.NewRedisStore(client, idempotency.WithRedisPrefix(redistest.Prefix(t)))
	require.NoError(t, err)
	return store
}
