package idempotency

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Store keeps one [Record] per key: claimed by one owner while the work
// runs, then holding the outcome for later retries.
//
// The protocol is "claim, then record the outcome":
//
//   - [Store.Acquire] claims a free key for a short lease, or returns the
//     record already there;
//   - while the work runs, the owner renews the lease with [Store.Extend];
//   - the owner then either stores the outcome with [Store.Complete] or frees
//     the key with [Store.Release] so a retry can run the work again.
//
// Every call after Acquire names the owner's token and must change nothing
// unless that token still owns the key; otherwise it returns [ErrLeaseLost].
// That is what keeps an owner whose lease lapsed from overwriting or deleting
// the record of the owner that came after it.
//
// Implementations must be safe for concurrent use, also from several
// processes sharing one backend. Keys are opaque strings built by this
// package; they may hold any byte.
type Store interface {
	// Acquire claims key for claim.Token for the given lease when no record
	// exists under key, and returns nil. When a record exists (in flight or
	// completed), Acquire changes nothing and returns a copy of it.
	// claim must be an in-flight record: Token set, Response nil.
	Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (*Record, error)

	// Extend renews the lease of the in-flight record that token owns.
	Extend(ctx context.Context, key, token string, lease time.Duration) error

	// Complete replaces the in-flight record that token owns with rec, which
	// must carry a Response, and keeps it for ttl.
	Complete(ctx context.Context, key, token string, rec Record, ttl time.Duration) error

	// Release deletes the in-flight record that token owns, so the key can be
	// claimed again.
	Release(ctx context.Context, key, token string) error
}

// Record is what a [Store] keeps under one key.
type Record struct {
	// Token identifies the owner of an in-flight record. It is empty once
	// the record is completed.
	Token string

	// Fingerprint identifies the request that claimed the key; a later
	// request with the same key and another fingerprint is rejected.
	Fingerprint string

	// CreatedAt is when the key was claimed.
	CreatedAt time.Time

	// Response is the stored outcome; nil while the record is in flight.
	Response *Response
}

// InFlight reports whether the record is still owned by running work.
func (r *Record) InFlight() bool { return r.Response == nil }

// Response is a stored outcome: for the middleware, the HTTP response the
// handler wrote; for the webhook helper, the answer given to Stripe.
type Response struct {
	StatusCode int
	Header     http.Header
	Body       []byte

	// BodyOmitted is set when the body exceeded the storage cap and was
	// not stored; Body is then empty.
	BodyOmitted bool
}

func (r *Record) clone() *Record {
	c := *r
	if r.Response != nil {
		resp := *r.Response
		resp.Header = r.Response.Header.Clone()
		resp.Body = bytes.Clone(r.Response.Body)
		c.Response = &resp
	}
	return &c
}

func validateClaim(claim *Record, lease time.Duration) error {
	switch {
	case claim.Token == "":
		return fmt.Errorf("idempotency: claim without an owner token")
	case claim.Response != nil:
		return fmt.Errorf("idempotency: claim must be in flight (Response nil)")
	case lease <= 0:
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return nil
}

func validateCompletion(rec *Record, ttl time.Duration) error {
	switch {
	case rec.Response == nil:
		return fmt.Errorf("idempotency: completion without a response")
	case ttl <= 0:
		return fmt.Errorf("idempotency: record TTL %v is not positive", ttl)
	}
	return nil
}

// MemoryStore is a [Store] held in process memory: the embedded default for
// a single instance, tests and development. Records do not survive a restart
// and are not shared between processes; use [RedisStore] for that.
//
// Expired records are purged as the store is used, so memory stays bounded
// by the number of live records. A MemoryStore is safe for concurrent use;
// create it with [NewMemoryStore].
type MemoryStore struct {
	now func() time.Time

	mu        sync.Mutex
	records   map[string]memoryEntry
	nextSweep time.Time
}

type memoryEntry struct {
	rec     *Record
	expires time.Time
}

// memorySweepInterval bounds how long expired records may linger; a sweep
// walks every record, so it runs at most this often.
const memorySweepInterval = time.Minute

// MemoryOption configures a [MemoryStore].
type MemoryOption func(*MemoryStore)

// WithMemoryClock makes the store read the time from now instead of
// [time.Now], so tests can move time forward without sleeping.
// Default: time.Now.
func WithMemoryClock(now func() time.Time) MemoryOption {
	return func(s *MemoryStore) {
		if now != nil {
			s.now = now
		}
	}
}

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore(opts ...MemoryOption) *MemoryStore {
	s := &MemoryStore{now: time.Now, records: make(map[string]memoryEntry)}
	for _, opt := range opts {
		opt(s)
	}
	return s
}

var _ Store = (*MemoryStore)(nil)

// Acquire implements [Store].
func (s *MemoryStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (*Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.sweepLocked(now)
	if e, ok := s.records[key]; ok && now.Before(e.expires) {
		return e.rec.clone(), nil
	}
	s.records[key] = memoryEntry{rec: claim.clone(), expires: now.Add(lease)}
	return nil, nil
}

// Extend implements [Store].
func (s *MemoryStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.withOwned(ctx, key, token, func(now time.Time, e *memoryEntry) {
		e.expires = now.Add(lease)
		s.records[key] = *e
	})
}

// Complete implements [Store].
func (s *MemoryStore) Complete(ctx context.Context, key, token string, rec Record, ttl time.Duration) error {
	if err := validateCompletion(&rec, ttl); err != nil {
		return err
	}
	rec.Token = ""
	stored := rec.clone()
	return s.withOwned(ctx, key, token, func(now time.Time, _ *memoryEntry) {
		s.records[key] = memoryEntry{rec: stored, expires: now.Add(ttl)}
	})
}

// Release implements [Store].
func (s *MemoryStore) Release(ctx context.Context, key, token string) error {
	return s.withOwned(ctx, key, token, func(time.Time, *memoryEntry) {
		delete(s.records, key)
	})
}

// withOwned runs change under the lock if token owns a live in-flight record
// under key.
func (s *MemoryStore) withOwned(ctx context.Context, key, token string, change func(now time.Time, e *memoryEntry)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	e, ok := s.records[key]
	if !ok || !now.Before(e.expires) || !e.rec.InFlight() || e.rec.Token != token || token == "" {
		return ErrLeaseLost
	}
	change(now, &e)
	return nil
}

// Len returns how many records the store holds, counting expired records
// not yet purged.
func (s *MemoryStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.records)
}

func (s *MemoryStore) sweepLocked(now time.Time) {
	if now.Before(s.nextSweep) {
		return
	}
	s.nextSweep = now.Add(memorySweepInterval)
	for k, e := range s.records {
		if !now.Before(e.expires) {
			delete(s.records, k)
		}
	}
}
