package transporttest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// Store wraps a store: it can be taken down (every call fails, as a
// store that does not answer), and it records the Acquire calls by the
// claim's token, one per call of a transport, so that a scenario knows
// when a duplicate waits: a waiting duplicate reads its key again once
// its watch is in place. The middleware finds the wrapped store's
// optional interfaces (wake-ups, recovery points) through Unwrap.
type Store struct {
	idempotency.Store
	down atomic.Bool

	mu      sync.Mutex
	byToken map[string]int
	changed chan struct{}
}

// NewStore wraps store.
func NewStore(store idempotency.Store) *Store {
	return &Store{Store: store, byToken: map[string]int{}, changed: make(chan struct{})}
}

// Unwrap returns the wrapped store.
func (s *Store) Unwrap() idempotency.Store { return s.Store }

// SetDown takes the store down (true) or brings it back.
func (s *Store) SetDown(down bool) { s.down.Store(down) }

var errDown = errors.New("transporttest: store down")

// Acquire records the call, and fails while the store is down.
func (s *Store) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	if s.down.Load() {
		return 0, nil, errDown
	}
	fence, existing, err := s.Store.Acquire(ctx, key, claim, lease)
	s.mu.Lock()
	s.byToken[claim.Token]++
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	return fence, existing, err
}

// Extend fails while the store is down.
func (s *Store) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if s.down.Load() {
		return errDown
	}
	return s.Store.Extend(ctx, key, token, lease)
}

// Complete fails while the store is down.
func (s *Store) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if s.down.Load() {
		return errDown
	}
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

// Release fails while the store is down.
func (s *Store) Release(ctx context.Context, key, token string) error {
	if s.down.Load() {
		return errDown
	}
	return s.Store.Release(ctx, key, token)
}

// AwaitWaiting returns once n calls wait for their key, and fails t after
// EventBound.
func (s *Store) AwaitWaiting(t *testing.T, n int) {
	t.Helper()
	timeout := time.NewTimer(EventBound)
	defer timeout.Stop()
	for {
		s.mu.Lock()
		waiting, changed := 0, s.changed
		for _, calls := range s.byToken {
			if calls > 1 {
				waiting++
			}
		}
		s.mu.Unlock()
		if waiting >= n {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("%d calls waiting after %v, want %d", waiting, EventBound, n)
		}
	}
}
