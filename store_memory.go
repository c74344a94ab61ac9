package idempotency

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"sync"
	"time"
)

// MemoryStore is a [Store] held in process memory: the embedded default for
// a single instance, tests and development. Records do not survive a restart
// and are not shared between processes; use [RedisStore] for that. It keeps
// failure histories ([FailureRecorder]) and recovery points
// ([Checkpointer]), and reads records without claiming them ([Inspector]).
//
// Completed records are kept as given to Complete and handed to every
// replay as they are, without a copy. What the store holds is bounded
// ([MemoryOptions]; by default 1 GiB): at the limit, a claim that needs
// a new record fails, so the middleware answers 503, while the records
// already held keep working; nothing is evicted before it expires. Expired
// records are purged as the store is used, at most 1,000 per hold of the
// store's lock, so a purge never stalls the requests for long. A
// MemoryStore is safe for concurrent use; create it with [NewMemoryStore].
type MemoryStore struct {
	// clock reads the monotonic clock, in nanoseconds since the store was
	// made: every lease and TTL runs on it, so a step of the wall clock
	// (NTP, an operator) changes no outcome. wall is read for fences only.
	clock      func() int64
	wall       func() time.Time
	maxRecords int   // 0: no limit
	maxBytes   int64 // 0: no limit
	seed       maphash.Seed

	mu      sync.Mutex
	records map[string]*memoryEntry
	expiry  memoryHeap
	bytes   int64  // counted for the entries held, expired ones not yet purged included
	fence   uint64 // the last fence handed out, for any key (see nextFenceLocked)
	purging bool   // a background purge is under way
	peak    int    // the most entries held since the map was last rebuilt
	waiting waiters

	// onPurge, when set (by tests), is told of every purge batch: the heap
	// slots it took and how long it held the lock for them.
	onPurge func(slots int, held time.Duration)
}

// memoryEntry is what the store holds under one key: a record (a claim in
// flight, a suspended claim that left a recovery point, or a completed
// record) and, from [MemoryStore.Fail], a failure history, each with its
// own end.
type memoryEntry struct {
	key string
	// The owner while in flight, also once its lease lapsed (a lapsed
	// owner is no owner: see ownedLocked); "" once suspended or completed.
	token string
	// The hash of the token that completed the record, so that a repeated
	// Complete succeeds: 8 bytes instead of the token. Another owner's
	// token matches it with a chance of 2^-64, and then changes nothing
	// either.
	completer   uint64
	fingerprint string  // in flight or suspended; a completed record has its own
	done        *Record // the completed record; nil until then
	extra       *memoryExtra
	created     int64 // in flight or suspended: the claim's CreatedAt, Unix nanoseconds
	// lease, until and at are on the store's clock (monotonic nanoseconds).
	lease int64 // in flight: when the owner's lease ends
	until int64 // when the record ends; 0: none, only a failure history
	at    int64 // the time of e's newest slot in the expiry heap
	size  int64 // the bytes counted for the entry
}

// memoryExtra holds what few entries have: a recovery point, a failure
// history. Out of line, it costs the others one pointer.
type memoryExtra struct {
	point      string // "" when none
	data       []byte
	pointUntil int64
	attempts   int // 0 when no history
	reason     string
	failUntil  int64
	// failer is the hash of the token whose failure was counted last, so
	// that the same Fail repeated returns the count again (as completer).
	failer uint64
}

// Purge and accounting constants.
const (
	// memoryPurgeBatch bounds the expiry slots a purge takes per hold of
	// the lock: about 0.3 ms of work at 1,000,000 records (see
	// TestMemoryStoreScale), where walking them all took 250 ms.
	memoryPurgeBatch = 1000

	// memoryEntryOverhead is what a record costs beyond the bytes counted
	// for it: the entry, its map and expiry slots, the completed Record
	// and Response, and the rounding of its strings to allocation sizes.
	// Measured with TestMemoryStoreScale as live heap less the bytes
	// counted, for completed records with 44-byte keys, 64-byte
	// fingerprints, 100-byte bodies and no header: 331 to 350 bytes a
	// record from 100,000 to 3,000,000 records. A claim in flight costs
	// about 160 less (no Record, no Response).
	memoryEntryOverhead = 350

	// A stored header map costs memoryHeaderMapOverhead per 8 names or
	// part of 8 (Go allocates a map's slots 8 at a time) and
	// memoryHeaderValueOverhead per value, beyond the text. Measured the
	// same way with 1, 2, 4, 8 and 9 names.
	memoryHeaderMapOverhead   = 400
	memoryHeaderValueOverhead = 16

	// defaultMemoryMaxBytes is the default byte limit of a MemoryStore.
	defaultMemoryMaxBytes = 1 << 30
)

// MemoryOptions bounds what a [MemoryStore] holds ([NewMemoryStore]). The
// zero value is the defaults: no limit on records, 1 GiB.
//
// A record counts the bytes of its key, owner token, fingerprint, stored
// header names and values, stored body (its capacity), recovery point and
// data and last failure reason, plus a fixed overhead for the store's own
// structures, measured: 350 bytes a record, 400 a header map (per 8
// names) and 16 a header value.
//
// At a limit, a claim that needs a new record fails, after the store
// purged what had expired, with an error naming the limit (the middleware
// answers 503 as for any store error); nothing is evicted before it
// expires, and the records held keep answering. What a claim in flight
// stores is always accepted, or a client that already has its response
// would see the work run again on its retry: the responses, recovery
// points and failure histories of the claims in flight can take the store
// past MaxBytes.
type MemoryOptions struct {
	// MaxRecords is the most keys the store holds; 0 or less: no limit.
	MaxRecords int
	// MaxBytes is the most bytes the store holds; 0: 1 GiB; less than 0:
	// no limit.
	MaxBytes int64
}

// errMemoryFull is the cause of a claim refused at the store's limits.
var errMemoryFull = errors.New("idempotency: memory store full (see MemoryOptions)")

// NewMemoryStore returns an empty MemoryStore that holds what opts allows.
func NewMemoryStore(opts MemoryOptions) *MemoryStore {
	start := time.Now()
	return &MemoryStore{
		clock:      func() int64 { return int64(time.Since(start)) },
		wall:       time.Now,
		records:    make(map[string]*memoryEntry),
		seed:       maphash.MakeSeed(),
		maxRecords: max(opts.MaxRecords, 0),
		maxBytes:   max(or(opts.MaxBytes, defaultMemoryMaxBytes), 0),
	}
}

var (
	_ Store           = (*MemoryStore)(nil)
	_ FailureRecorder = (*MemoryStore)(nil)
	_ Checkpointer    = (*MemoryStore)(nil)
	_ Inspector       = (*MemoryStore)(nil)
	_ waker           = (*MemoryStore)(nil)
)

// Acquire implements [Store]. Fences come from one counter for the whole
// store, so they grow per key too (see nextFenceLocked for where it starts).
func (s *MemoryStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (uint64, *Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return 0, nil, err
	}
	if err := ctx.Err(); err != nil {
		return 0, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock()
	if !s.purging && len(s.expiry) > 0 && s.expiry[0].at <= now && s.purgeLocked(now) {
		// More has expired than one batch takes: the rest in the
		// background, so this request pays for one batch only.
		s.purging = true
		go s.purge()
	}
	e := s.records[key]
	if e != nil && e.until != 0 {
		if now < e.until {
			switch {
			case e.done != nil:
				return 0, e.done, nil
			case e.inFlight(now):
				return 0, e.record(now), nil
			case e.fingerprint != claim.Fingerprint:
				// Suspended: bound to work partly done for another request.
				return 0, e.record(now), nil
			}
			// Suspended, for this request: resume it.
			resumed := e.record(now)
			e.token, e.created, e.lease = claim.Token, claim.CreatedAt.UnixNano(), now+int64(lease)
			e.until = e.lease
			if x := e.extra; x != nil {
				e.until = max(e.lease, x.pointUntil)
			}
			s.settleLocked(e)
			return s.nextFenceLocked(), resumed, nil
		}
		// The record ended; a failure history may stay.
		e.clearRecord()
		s.settleLocked(e)
		e = s.records[key]
	}

	need := memoryEntryOverhead + int64(len(key)+len(claim.Token)+len(claim.Fingerprint))
	if s.fullLocked(e == nil, need) {
		// What has expired makes room first.
		if s.purgeLocked(now) && !s.purging {
			s.purging = true
			go s.purge()
		}
		e = s.records[key]
		if s.fullLocked(e == nil, need) {
			return 0, nil, fmt.Errorf("%w: %d records of %d bytes held, limits %d records, %d bytes (0: none)",
				errMemoryFull, len(s.records), s.bytes, s.maxRecords, s.maxBytes)
		}
	}
	if e == nil {
		e = &memoryEntry{key: key}
		s.records[key] = e
		s.peak = max(s.peak, len(s.records))
	}
	e.token, e.fingerprint, e.created = claim.Token, claim.Fingerprint, claim.CreatedAt.UnixNano()
	e.lease = now + int64(lease)
	e.until = e.lease
	s.settleLocked(e)
	return s.nextFenceLocked(), nil, nil
}

// nextFenceLocked hands out a fence: one more than the last, or the wall
// clock in nanoseconds if that is greater. Fences thus grow within the
// store, and a store in a new process (whose records are gone, but whose
// fences may be remembered downstream) starts above those of the process
// before it, unless the wall clock stepped back by more than the restart
// took.
func (s *MemoryStore) nextFenceLocked() uint64 {
	s.fence = max(s.fence+1, uint64(max(s.wall().UnixNano(), 0)))
	return s.fence
}

// fullLocked reports whether need more bytes, in a new entry if newEntry,
// would take the store past its limits.
func (s *MemoryStore) fullLocked(newEntry bool, need int64) bool {
	return (s.maxRecords > 0 && newEntry && len(s.records) >= s.maxRecords) ||
		(s.maxBytes > 0 && s.bytes+need > s.maxBytes)
}

// Extend implements [Store].
func (s *MemoryStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.withInFlight(ctx, key, token, func(now int64, e *memoryEntry) {
		e.lease = now + int64(lease)
		e.until = e.lease
		if x := e.extra; x != nil && x.point != "" {
			e.until = max(e.lease, x.pointUntil)
		}
		s.settleLocked(e)
	})
}

// Complete implements [Store]; the store keeps rec itself, without its
// recovery point, and accepts it even at its limits (see
// [MemoryOptions]).
func (s *MemoryStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := validateCompletion(rec, ttl); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock()
	e := s.ownedLocked(key, token, now)
	switch {
	case e == nil:
		return ErrLeaseLost
	case e.done != nil:
		return nil // a repeated call, already stored
	}
	rec.Token, rec.LeaseLeft, rec.RecoveryPoint, rec.RecoveryData = "", 0, "", nil
	e.dropPoint()
	e.done, e.completer = rec, maphash.String(s.seed, token)
	e.token, e.fingerprint, e.created, e.lease = "", "", 0, 0
	e.until = now + int64(ttl)
	s.settleLocked(e)
	s.wakeLocked(key)
	return nil
}

// Release implements [Store]. A claim that recorded a recovery point is
// suspended rather than deleted (see [Checkpointer]). As the contract
// says, it refuses only when someone else holds the key: a key that
// nothing holds (free, suspended, or token's own lapsed claim) is left
// as it is, and the call succeeds.
func (s *MemoryStore) Release(ctx context.Context, key, token string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if token == "" {
		return ErrLeaseLost // no claim has it
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock()
	e := s.records[key]
	switch {
	case e == nil || now >= e.until:
		return nil // free
	case e.done != nil:
		return ErrLeaseLost // completed: the outcome stays
	case !e.inFlight(now):
		return nil // suspended, or token's own lapsed claim with a recovery point
	case e.token != token:
		return ErrLeaseLost
	}
	s.freeLocked(e, now)
	return nil
}

// Fail implements [FailureRecorder]; like Release, it suspends a claim
// that recorded a recovery point.
func (s *MemoryStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("idempotency: failure TTL %v is not positive", ttl)
	}
	var attempts int
	err := s.withInFlight(ctx, key, token, func(now int64, e *memoryEntry) {
		x := e.extras()
		if now >= x.failUntil {
			x.attempts = 0
		}
		x.attempts++
		x.reason, x.failUntil = reason, now+int64(ttl)
		x.failer = maphash.String(s.seed, token)
		attempts = x.attempts
		s.freeLocked(e, now)
	})
	if errors.Is(err, ErrLeaseLost) && token != "" {
		// The same call again, after it succeeded: the same count, as the
		// stores that can lose a reply answer.
		s.mu.Lock()
		defer s.mu.Unlock()
		if e := s.records[key]; e != nil && e.extra != nil {
			if x := e.extra; x.attempts > 0 && s.clock() < x.failUntil && x.failer == maphash.String(s.seed, token) {
				return x.attempts, nil
			}
		}
	}
	return attempts, err
}

// freeLocked ends the claim in flight in e: suspended when it holds a
// recovery point, else gone.
func (s *MemoryStore) freeLocked(e *memoryEntry, now int64) {
	key := e.key
	if x := e.extra; x != nil && x.point != "" && now < x.pointUntil {
		e.token, e.lease, e.until = "", 0, x.pointUntil
	} else {
		e.clearRecord()
	}
	s.settleLocked(e)
	s.wakeLocked(key)
}

// Failures implements [FailureRecorder].
func (s *MemoryStore) Failures(ctx context.Context, key string) (int, string, error) {
	if err := ctx.Err(); err != nil {
		return 0, "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.records[key]
	if e == nil || e.extra == nil || s.clock() >= e.extra.failUntil {
		return 0, "", nil
	}
	return e.extra.attempts, e.extra.reason, nil
}

// Checkpoint implements [Checkpointer]. The store keeps a copy of data.
func (s *MemoryStore) Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error {
	switch {
	case point == "":
		return errors.New("idempotency: empty recovery point")
	case ttl <= 0:
		return fmt.Errorf("idempotency: recovery point TTL %v is not positive", ttl)
	}
	data = bytes.Clone(data)
	return s.withInFlight(ctx, key, token, func(now int64, e *memoryEntry) {
		x := e.extras()
		x.point, x.data, x.pointUntil = point, data, now+int64(ttl)
		e.until = max(e.lease, x.pointUntil)
		s.settleLocked(e)
	})
}

// Get implements [Inspector].
func (s *MemoryStore) Get(ctx context.Context, key string) (*Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock()
	e := s.records[key]
	switch {
	case e == nil || now >= e.until:
		return nil, nil
	case e.done != nil:
		return e.done, nil
	}
	return e.record(now), nil
}

// Remove implements [Inspector].
func (s *MemoryStore) Remove(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.records[key]; e != nil {
		e.clearRecord()
		e.extra = nil
		s.settleLocked(e)
		s.wakeLocked(key)
	}
	return nil
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

// withInFlight runs change under the lock if token owns a live claim in
// flight under key; else it returns ErrLeaseLost (or the store's error, or
// ctx's).
func (s *MemoryStore) withInFlight(ctx context.Context, key, token string, change func(now int64, e *memoryEntry)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock()
	e := s.ownedLocked(key, token, now)
	if e == nil || e.done != nil {
		return ErrLeaseLost
	}
	change(now, e)
	return nil
}

// ownedLocked returns the entry under key if token owns its record: in
// flight with its lease running, or completed by it. The lease, not the
// record's end: a suspended record, or one whose lease lapsed, has no
// owner.
func (s *MemoryStore) ownedLocked(key, token string, now int64) *memoryEntry {
	e := s.records[key]
	switch {
	case e == nil || token == "" || now >= e.until:
		return nil
	case e.done != nil:
		if e.completer == maphash.String(s.seed, token) {
			return e
		}
	case e.token == token && now < e.lease:
		return e
	}
	return nil
}

// settleLocked accounts for a change to e: it recounts e's bytes,
// schedules its next end, and drops e when it holds nothing any more. e
// must not be used after it was dropped.
func (s *MemoryStore) settleLocked(e *memoryEntry) {
	next := e.next()
	if next == 0 {
		delete(s.records, e.key)
		s.bytes -= e.size
		*e = memoryEntry{} // its slots left in the heap are stale now
		s.compactLocked()
		return
	}
	size := e.bytes()
	s.bytes += size - e.size
	e.size = size
	if next != e.at {
		e.at = next
		s.expiry.push(memorySlot{at: next, e: e})
	}
}

// The purge. Ends come from leases (renewed every lease/3), completions
// with any TTL and recovery points, so they are in no order a queue could
// keep; a binary heap orders them, and the purge pops exactly what has
// expired, a batch at a time. The heap is lazy: a change pushes a new slot
// rather than moving the old one, which stays until its time and is then
// dropped as stale. A change then costs one push (the slots carry their
// time, so sifting reads no entry), and a heap of the slots of the last
// lease and of every live record costs 16 bytes a slot.

// memorySlot schedules a look at e at time at; it is stale unless e's
// newest slot is for the same time.
type memorySlot struct {
	at int64
	e  *memoryEntry
}

// purgeLocked takes up to memoryPurgeBatch slots that are due and drops
// what has expired, and reports whether more slots are due.
func (s *MemoryStore) purgeLocked(now int64) (more bool) {
	var start time.Time
	if s.onPurge != nil {
		start = time.Now()
	}
	n := 0
	for ; n < memoryPurgeBatch && len(s.expiry) > 0 && s.expiry[0].at <= now; n++ {
		slot := s.expiry.pop()
		e := slot.e
		if slot.at != e.at {
			continue // stale: the entry changed or is gone
		}
		e.at = 0 // its slot is gone: settleLocked pushes one if it stays
		if e.until != 0 && now >= e.until {
			e.clearRecord()
		}
		if x := e.extra; x != nil && x.attempts > 0 && now >= x.failUntil {
			x.attempts, x.reason, x.failUntil, x.failer = 0, "", 0, 0
			if x.point == "" {
				e.extra = nil
			}
		}
		s.settleLocked(e)
	}
	s.compactLocked()
	if s.onPurge != nil {
		s.onPurge(n, time.Since(start))
	}
	return len(s.expiry) > 0 && s.expiry[0].at <= now
}

// compactLocked gives back the memory of a map and heap sized for many
// more records than are left (Go maps never shrink), only while that is
// cheap, so the lock is never held for long. The map is rebuilt from the
// heap's live slots, one per entry, because ranging over a map costs its
// size at its peak, not its length.
func (s *MemoryStore) compactLocked() {
	if n := len(s.expiry); n > 4*memoryPurgeBatch {
		return
	}
	if cap(s.expiry) >= 8*max(len(s.expiry), memoryPurgeBatch) {
		s.expiry = append(memoryHeap(nil), s.expiry...)
	}
	if n := len(s.records); n <= memoryPurgeBatch && s.peak >= 8*memoryPurgeBatch {
		m := make(map[string]*memoryEntry, n)
		for _, slot := range s.expiry {
			if e := slot.e; slot.at == e.at {
				m[e.key] = e
			}
		}
		if len(m) == n { // else an entry without a slot: keep the map
			s.records = m
		}
		s.peak = n
	}
}

// purge takes what has expired a batch at a time, letting others have
// the lock between batches, until nothing more is due.
func (s *MemoryStore) purge() {
	for {
		runtime.Gosched() // the callers that waited for the lock go first
		s.mu.Lock()
		more := s.purgeLocked(s.clock())
		s.purging = more
		s.mu.Unlock()
		if !more {
			return
		}
	}
}

// inFlight reports whether e's record is a claim whose owner's lease runs.
func (e *memoryEntry) inFlight(now int64) bool {
	return e.done == nil && e.token != "" && now < e.lease
}

// record returns e's record in flight or suspended, as Acquire and Get
// return it.
func (e *memoryEntry) record(now int64) *Record {
	r := &Record{Fingerprint: e.fingerprint, CreatedAt: time.Unix(0, e.created)}
	if e.inFlight(now) {
		r.Token, r.LeaseLeft = e.token, time.Duration(e.lease-now)
	}
	if x := e.extra; x != nil {
		r.RecoveryPoint, r.RecoveryData = x.point, x.data
	}
	return r
}

// next returns when e's record or failure history, whichever comes
// first, ends; 0 when e holds neither.
func (e *memoryEntry) next() int64 {
	at := e.until
	if x := e.extra; x != nil && x.attempts > 0 && (at == 0 || x.failUntil < at) {
		at = x.failUntil
	}
	return at
}

// extras returns e's out-of-line part, made if e has none.
func (e *memoryEntry) extras() *memoryExtra {
	if e.extra == nil {
		e.extra = new(memoryExtra)
	}
	return e.extra
}

// clearRecord drops e's record, keeping its failure history.
func (e *memoryEntry) clearRecord() {
	e.dropPoint()
	e.token, e.fingerprint, e.done, e.completer = "", "", nil, 0
	e.created, e.lease, e.until = 0, 0, 0
}

func (e *memoryEntry) dropPoint() {
	if x := e.extra; x != nil {
		x.point, x.data, x.pointUntil = "", nil, 0
		if x.attempts == 0 {
			e.extra = nil
		}
	}
}

// bytes returns what e counts against the store's limits.
func (e *memoryEntry) bytes() int64 {
	n := memoryEntryOverhead + len(e.key) + len(e.token) + len(e.fingerprint)
	if x := e.extra; x != nil {
		n += len(x.point) + cap(x.data) + len(x.reason)
	}
	if r := e.done; r != nil {
		n += len(r.Fingerprint)
		if resp := r.Response; resp != nil {
			n += cap(resp.Body)
			if len(resp.Header) > 0 {
				n += memoryHeaderMapOverhead * ((len(resp.Header) + 7) / 8)
			}
			for name, values := range resp.Header {
				n += len(name) + memoryHeaderValueOverhead*len(values)
				for _, v := range values {
					n += len(v)
				}
			}
		}
	}
	return int64(n)
}

// memoryHeap is a binary min-heap of slots by time. Written out rather
// than with container/heap, whose Push would allocate for every slot.
type memoryHeap []memorySlot

func (h *memoryHeap) push(slot memorySlot) {
	*h = append(*h, slot)
	q := *h
	i := len(q) - 1
	for i > 0 {
		parent := (i - 1) / 2
		if q[parent].at <= slot.at {
			break
		}
		q[i] = q[parent]
		i = parent
	}
	q[i] = slot
}

func (h *memoryHeap) pop() memorySlot {
	q := *h
	top := q[0]
	last := q[len(q)-1]
	q[len(q)-1] = memorySlot{} // the entry may go
	q = q[:len(q)-1]
	*h = q
	if len(q) == 0 {
		return top
	}
	i := 0
	for {
		child := 2*i + 1
		if child >= len(q) {
			break
		}
		if right := child + 1; right < len(q) && q[right].at < q[child].at {
			child = right
		}
		if last.at <= q[child].at {
			break
		}
		q[i] = q[child]
		i = child
	}
	q[i] = last
	return top
}
