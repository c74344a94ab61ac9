package idempotency

import (
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
// Every call must return by its context's deadline: the middleware gives
// each call one (the store timeout), except to [MemoryStore], whose calls
// never wait. A call that returns an error may still have taken effect.
//
// Implementations must be safe for concurrent use, also from several
// processes sharing one backend. Keys are opaque strings built by this
// package; they may hold any byte.
type Store interface {
	// Acquire claims key for claim.Token for the given lease when no live
	// record exists under key, and returns the claim's fencing token: a
	// number greater than every fence it returned for key before. When a
	// record exists (in flight or completed), Acquire changes nothing and
	// returns it; the caller must not modify it. claim must be in flight
	// (Token set, Response nil). Acquire must not claim after ctx's
	// deadline has passed, so that a caller that gave up on the call can
	// tell when a late claim could still land.
	Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (fence uint64, existing *Record, err error)

	// Extend renews the lease of the in-flight record that token owns.
	Extend(ctx context.Context, key, token string, lease time.Duration) error

	// Complete replaces the in-flight record that token owns with rec, which
	// must carry a Response, and keeps it for ttl. The store may keep rec
	// itself; the caller must not modify it afterwards. Repeating the call
	// with the same token after it succeeded succeeds again and changes
	// nothing: a client library may re-send a call whose reply it lost.
	Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error

	// Release deletes the in-flight record that token owns, so the key can be
	// claimed again.
	Release(ctx context.Context, key, token string) error
}

// FailureRecorder is implemented by stores that keep a history of failed
// attempts per key. The webhook helper uses it, when its store has it,
// instead of [Store.Release] after the webhook function failed, so an
// operator can see how often an event failed and why (see
// [WebhookHandler.Failures]).
type FailureRecorder interface {
	// Fail releases the in-flight record that token owns, as Release does,
	// and counts a failed attempt under key with reason as the last error,
	// keeping both for ttl after this failure. It returns the number of
	// failed attempts counted so far, or ErrLeaseLost (and counts nothing)
	// when token does not own the key.
	Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (attempts int, err error)

	// Failures returns the failed attempts counted under key and the last
	// reason; zero and "" when none were, or their history expired.
	Failures(ctx context.Context, key string) (attempts int, lastReason string, err error)
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

	// LeaseLeft, on an in-flight record that [Store.Acquire] returns, is
	// how long its lease has left unless renewed, by the store's clock: the
	// middleware derives a 409's Retry-After from it, and a waiting
	// duplicate ([WithWait]) re-reads the key when it ends. Zero when the
	// store does not tell; stores ignore it in what they are given.
	LeaseLeft time.Duration
}

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
	case rec == nil || rec.Response == nil:
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
