package idempotency_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/overlay"
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
}

func newRedisStore(t testing.TB, client idempotency.RedisClient) *idempotency.RedisStore {
	t.Helper()
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: redistest.Prefix(t)})
	require.NoError(t, err)
	return store
}

// eventBound is how long a test waits for an event (a handler entered,
// duplicates waiting, an outcome stored) before it fails: far beyond what a
// loaded machine needs, so it never decides a result; it only turns a bug
// that would hang the test into a failure that says what did not happen.
const eventBound = 30 * time.Second

// acquireLog records the Acquire calls made through the stores it wraps,
// by the claim's token (one per request), so that a test waits until
// duplicates wait, or checks that a request did not wait, instead of
// sleeping or timing it: a duplicate that waits re-reads the key once its
// watch is in place (so a second call means it is waiting, and will be
// woken), and a request answered at once reads the key once.
type acquireLog struct {
	mu      sync.Mutex
	calls   int
	byToken map[string]int
	tokens  []string      // in the order of their first call
	changed chan struct{} // closed and replaced at each call
}

func newAcquireLog() *acquireLog {
	return &acquireLog{byToken: make(map[string]int), changed: make(chan struct{})}
}

// wrap returns store with its Acquire calls recorded. The middleware finds
// the store's optional interfaces (wake-ups, recovery points) through
// Unwrap, so the wrapped store behaves as the store itself.
func (l *acquireLog) wrap(store idempotency.Store) idempotency.Store {
	return &loggedStore{Store: store, log: l}
}

type loggedStore struct {
	idempotency.Store
	log *acquireLog
}

func (s *loggedStore) Unwrap() idempotency.Store { return s.Store }

func (s *loggedStore) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	fence, existing, err := s.Store.Acquire(ctx, key, claim, lease)
	s.log.mu.Lock()
	s.log.calls++
	if s.log.byToken[claim.Token] == 0 {
		s.log.tokens = append(s.log.tokens, claim.Token)
	}
	s.log.byToken[claim.Token]++
	close(s.log.changed)
	s.log.changed = make(chan struct{})
	s.log.mu.Unlock()
	return fence, existing, err
}

// count returns how many Acquire calls have returned.
func (l *acquireLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}

// mark returns a mark for readsSince.
func (l *acquireLog) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.tokens)
}

// readsSince returns how many times each request that first read its key
// after mark has read it: [1] for one request answered without waiting,
// whatever the requests that were there before did meanwhile.
func (l *acquireLog) readsSince(mark int) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	var reads []int
	for _, token := range l.tokens[mark:] {
		reads = append(reads, l.byToken[token])
	}
	return reads
}

// waitingLocked returns how many requests have read their key more than
// once, that is, wait.
func (l *acquireLog) waitingLocked() int {
	n := 0
	for _, calls := range l.byToken {
		if calls > 1 {
			n++
		}
	}
	return n
}

// waiting returns how many requests wait.
func (l *acquireLog) waiting() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waitingLocked()
}

// awaitWaiting returns once n requests wait, and fails t after eventBound.
func (l *acquireLog) awaitWaiting(t testing.TB, n int) {
	t.Helper()
	if !l.until(func() bool { return l.waitingLocked() >= n }) {
		t.Fatalf("%d requests waiting after %v, want %d (%d Acquire calls)", l.waiting(), eventBound, n, l.count())
	}
}

// until returns true once cond, called with l's lock held, is true, or
// false after eventBound. Unlike awaitWaiting it may run outside the
// test's goroutine, in a handler.
func (l *acquireLog) until(cond func() bool) bool {
	timeout := time.NewTimer(eventBound)
	defer timeout.Stop()
	for {
		l.mu.Lock()
		ok, changed := cond(), l.changed
		l.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-changed:
		case <-timeout.C:
			return false
		}
	}
}

// merged overlays opts: a field set in a later one wins. The tests build
// a route's options in layers (a helper's, then a case's).
func merged[T any](opts ...T) T { return overlay.Merge(opts...) }
