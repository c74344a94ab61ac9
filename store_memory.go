package idempotency

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// MemoryStore is a [Store] held in process memory: the embedded default for
// a single instance, tests and development. Records do not survive a restart
// and are not shared between processes; use [RedisStore] for that.
//
// Completed records are kept as given to Complete and handed to every
// replay as they are, without a copy. Expired records are purged as the
// store is used, so memory stays bounded by the number of live records. A
// MemoryStore is safe for concurrent use; create it with [NewMemoryStore].
type MemoryStore struct {
	now func() time.Time

	mu        sync.Mutex
	records   map[string]memoryEntry
	failures  map[string]memoryFailures
	fence     uint64 // the last fence handed out, for any key
	nextSweep int64  // Unix nanoseconds
	waiting   waiters
}

type memoryFailures struct {
	attempts   int
	lastReason string
	expires    int64 // Unix nanoseconds
}

type memoryEntry struct {
	token       string  // the owner while in flight, then the one that completed it
	fingerprint string  // while in flight
	created     int64   // Unix nanoseconds, while in flight
	done        *Record // the completed record; nil while in flight
	expires     int64   // Unix nanoseconds
}

// memorySweepInterval bounds how long expired records may linger; a sweep
// walks every record, so it runs at most this often.
const memorySweepInterval = time.Minute

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{now: time.Now, records: make(map[string]memoryEntry), failures: make(map[string]memoryFailures)}
}

var (
	_ Store           = (*MemoryStore)(nil)
	_ FailureRecorder = (*MemoryStore)(nil)
	_ waker           = (*MemoryStore)(nil)
)

// Acquire implements [Store]. Fences come from one counter for the whole
// store, so they grow per key too.
func (s *MemoryStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (uint64, *Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return 0, nil, err
	}
	if err := ctx.Err(); err != nil {
		return 0, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now().UnixNano()
	s.sweepLocked(now)
	e, ok := s.records[key]
	if ok && now < e.expires {
		if e.done != nil {
			return 0, e.done, nil
		}
		return 0, &Record{Token: e.token, Fingerprint: e.fingerprint, CreatedAt: time.Unix(0, e.created), LeaseLeft: time.Duration(e.expires - now)}, nil
	}
	s.fence++
	s.records[key] = memoryEntry{token: claim.Token, fingerprint: claim.Fingerprint, created: claim.CreatedAt.UnixNano(), expires: now + int64(lease)}
	return s.fence, nil, nil
}

// Extend implements [Store].
func (s *MemoryStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.withInFlight(ctx, key, token, func(now int64, e memoryEntry) {
		e.expires = now + int64(lease)
		s.records[key] = e
	})
}

// Complete implements [Store]; the store keeps rec itself.
func (s *MemoryStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := validateCompletion(rec, ttl); err != nil {
		return err
	}
	return s.withOwned(ctx, key, token, func(now int64, e memoryEntry) error {
		if e.done == nil { // else a repeated call, already stored
			rec.Token, rec.LeaseLeft = "", 0
			s.records[key] = memoryEntry{token: token, done: rec, expires: now + int64(ttl)}
			s.wakeLocked(key)
		}
		return nil
	})
}

// Release implements [Store].
func (s *MemoryStore) Release(ctx context.Context, key, token string) error {
	return s.withInFlight(ctx, key, token, func(int64, memoryEntry) {
		delete(s.records, key)
		s.wakeLocked(key)
	})
}

// Fail implements [FailureRecorder].
func (s *MemoryStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("idempotency: failure TTL %v is not positive", ttl)
	}
	var attempts int
	err := s.withInFlight(ctx, key, token, func(now int64, _ memoryEntry) {
		delete(s.records, key)
		s.wakeLocked(key)
		f := s.failures[key]
		if now >= f.expires {
			f = memoryFailures{}
		}
		f.attempts++
		f.lastReason, f.expires = reason, now+int64(ttl)
		s.failures[key] = f
		attempts = f.attempts
	})
	return attempts, err
}

// Failures implements [FailureRecorder].
func (s *MemoryStore) Failures(ctx context.Context, key string) (int, string, error) {
	if err := ctx.Err(); err != nil {
		return 0, "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.failures[key]
	if !ok || s.now().UnixNano() >= f.expires {
		return 0, "", nil
	}
	return f.attempts, f.lastReason, nil
}

// watch implements waker: a condition per waiter, signalled under the
// store's lock by the call that completes or frees key.
func (s *MemoryStore) watch(_ context.Context, key string) (<-chan struct{}, func(), error) {
	s.mu.Lock()
	ch := s.waiting.add(key)
	s.mu.Unlock()
	return ch, func() {
		s.mu.Lock()
		s.waiting.remove(key, ch)
		s.mu.Unlock()
	}, nil
}

// wakeLocked wakes the waiters on key; a map lookup when there are some,
// a length check when there are none.
func (s *MemoryStore) wakeLocked(key string) {
	if len(s.waiting.byKey) > 0 {
		s.waiting.wake(key)
	}
}

// withInFlight runs change under the lock if token owns a live in-flight
// record under key.
func (s *MemoryStore) withInFlight(ctx context.Context, key, token string, change func(now int64, e memoryEntry)) error {
	return s.withOwned(ctx, key, token, func(now int64, e memoryEntry) error {
		if e.done != nil {
			return ErrLeaseLost
		}
		change(now, e)
		return nil
	})
}

// withOwned runs change under the lock if the live record under key is
// token's: in flight, or completed by it.
func (s *MemoryStore) withOwned(ctx context.Context, key, token string, change func(now int64, e memoryEntry) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now().UnixNano()
	e, ok := s.records[key]
	if !ok || now >= e.expires || token == "" || e.token != token {
		return ErrLeaseLost
	}
	return change(now, e)
}

func (s *MemoryStore) sweepLocked(now int64) {
	if now < s.nextSweep {
		return
	}
	s.nextSweep = now + int64(memorySweepInterval)
	for k, e := range s.records {
		if now >= e.expires {
			delete(s.records, k)
		}
	}
	for k, f := range s.failures {
		if now >= f.expires {
			delete(s.failures, k)
		}
	}
}
