package idempotency

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"sync"
	"sync/atomic"
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
// already held keep working; nothing is evicted before it expires.
//
// Keys are spread by their hash over 64 shards, each with its own lock,
// so that requests for different keys seldom wait for each other. Expired
// records are purged as the store is used, at most 1,000 per hold of a
// shard's lock, so a purge never stalls the requests for long: a claim
// purges a batch of what has expired in its own shard, unless a
// background pass over every shard runs; it starts one when its shard has
// more due, and otherwise at most every 100 ms. At a limit, what has
// expired in any shard makes room before a claim is refused. A
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

	// What the limits count, over every shard: the entries held and their
	// bytes, expired ones not yet purged included. Written by most calls,
	// they have a cache line of their own, away from the fields above,
	// which every call reads.
	_       [64]byte
	records atomic.Int64
	bytes   atomic.Int64
	_       [48]byte

	// The background purge of every shard (see sweep): when the next may
	// start, on the store's clock; whether one runs; and, under sweepMu,
	// the channel closed when the one running ends (nil when none runs).
	nextSweep atomic.Int64
	sweeping  atomic.Bool
	sweepMu   sync.Mutex
	sweepDone chan struct{}

	shards [memoryShards]memoryShard

	// onPurge, when set (by tests), is told of every purge batch: the heap
	// slots it took and how long it held its shard's lock. Its calls are
	// serialized by onPurgeMu.
	onPurge   atomic.Pointer[func(slots int, held time.Duration)]
	onPurgeMu sync.Mutex
}

// memoryShard holds the keys whose hash selects it. Its fields other than
// mu are guarded by mu.
type memoryShard struct {
	mu      sync.Mutex
	records map[string]*memoryEntry
	expiry  memoryHeap
	fence   uint64 // the last fence handed out, for any key of the shard (see nextFenceLocked)
	peak    int    // the most entries held since the map was last rebuilt
	waiting waiters
	// due is when the first slot of expiry is due, 0 when none: written
	// under mu, read without it by the passes over every shard, which
	// skip a shard with nothing due without taking its lock.
	due atomic.Int64
	_   [memoryShardPad]byte
}

// memoryShards is how many shards a MemoryStore spreads its keys over: a
// power of two, enough that the requests running on a machine's cores
// rarely meet in one. memoryShardPad rounds a shard up to 128 bytes (two
// cache lines), so that no two shards' locks share a line.
const (
	memoryShards   = 64
	memoryShardPad = 128 - (8 + 8 + 24 + 8 + 8 + 8 + 8)
)

// shard returns the shard that holds key.
func (s *MemoryStore) shard(key string) *memoryShard {
	return &s.shards[maphash.String(s.seed, key)&(memoryShards-1)]
}

// memoryEntry is what the store holds under one key: a record (a claim in
// flight, a suspended claim that left a recovery point, or a completed
// record) and, from [MemoryStore.Fail], a failure history, each with its
// own end.
type memoryEntry struct {
	key string
	// The owner while in flight, also once its lease lapsed (a lapsed
	// owner is no owner: see ownedLocked); "" once suspended or completed.
	token       string
	fingerprint string  // in flight or suspended; a completed record has its own
	done        *Record // the completed record; nil until then
	extra       *memoryExtra
	created     int64 // in flight or suspended: the claim's CreatedAt, Unix nanoseconds
	// In flight: when the owner's lease ends, on the store's clock.
	// Completed: the hash of the token that completed the record (see
	// completer); one field for both keeps an entry in 112 bytes.
	lease int64
	// until and at are on the store's clock (monotonic nanoseconds).
	until int64 // when the record ends; 0: none, only a failure history
	at    int64 // when e's one live slot in the expiry heap is due; 0: none
	size  int64 // the bytes counted for the entry
}

// completer returns the hash of the token that completed e's record, so
// that a repeated Complete succeeds: 8 bytes instead of the token. Another
// owner's token matches it with a chance of 2^-64, and then changes
// nothing either.
func (e *memoryEntry) completer() uint64 { return uint64(e.lease) }

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
	s := &MemoryStore{
		clock:      func() int64 { return int64(time.Since(start)) },
		wall:       time.Now,
		seed:       maphash.MakeSeed(),
		maxRecords: max(opts.MaxRecords, 0),
		maxBytes:   max(or(opts.MaxBytes, defaultMemoryMaxBytes), 0),
	}
	for i := range s.shards {
		s.shards[i].records = make(map[string]*memoryEntry)
	}
	s.nextSweep.Store(memorySweepEvery)
	return s
}

var (
	_ Store           = (*MemoryStore)(nil)
	_ FailureRecorder = (*MemoryStore)(nil)
	_ Checkpointer    = (*MemoryStore)(nil)
	_ Inspector       = (*MemoryStore)(nil)
	_ waker           = (*MemoryStore)(nil)
)

// Acquire implements [Store]. Fences come from one counter per shard, and
// a key always lives in the same shard, so they grow per key (see
// nextFenceLocked for where they start).
func (s *MemoryStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (uint64, *Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return 0, nil, err
	}
	if err := ctx.Err(); err != nil {
		return 0, nil, err
	}
	sh := s.shard(key)
	fence, existing, full := s.acquire(sh, key, &claim, lease, true)
	for more := true; full && more; {
		// What has expired, in any shard, makes room before a claim is
		// refused: a batch of a shard at a time, each under that shard's
		// lock only, until there is room or nothing more is due.
		more = false
		now := s.clock()
		for i := 0; full && i < len(s.shards); i++ {
			took, m := s.purgeShard(&s.shards[i], now)
			more = more || m
			if took > 0 {
				fence, existing, full = s.acquire(sh, key, &claim, lease, false)
			}
		}
		if full {
			// A background pass may have taken what was due before this
			// one reached it: the room it made counts too.
			fence, existing, full = s.acquire(sh, key, &claim, lease, false)
		}
	}
	if full {
		return 0, nil, fmt.Errorf("%w: %d records of %d bytes held, limits %d records, %d bytes (0: none)",
			errMemoryFull, s.records.Load(), s.bytes.Load(), s.maxRecords, s.maxBytes)
	}
	return fence, existing, nil
}

// acquire is Acquire in sh, which holds key; with purge, it first takes a
// batch of what has expired in sh. full reports a claim refused at the
// store's limits, which changed nothing.
func (s *MemoryStore) acquire(sh *memoryShard, key string, claim *Record, lease time.Duration, purge bool) (fence uint64, existing *Record, full bool) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.clock()
	if purge {
		s.purgeDueLocked(sh, now)
	}
	e := sh.records[key]
	if e != nil && e.until != 0 {
		if now < e.until {
			switch {
			case e.done != nil:
				return 0, e.done, false
			case e.inFlight(now):
				return 0, e.record(now), false
			case e.fingerprint != claim.Fingerprint:
				// Suspended: bound to work partly done for another request.
				return 0, e.record(now), false
			}
			// Suspended, for this request: resume it.
			resumed := e.record(now)
			e.token, e.created, e.lease = claim.Token, claim.CreatedAt.UnixNano(), now+int64(lease)
			e.until = e.lease
			if x := e.extra; x != nil {
				e.until = max(e.lease, x.pointUntil)
			}
			s.settleLocked(sh, e)
			return s.nextFenceLocked(sh), resumed, false
		}
		// The record ended; a failure history may stay.
		e.clearRecord()
		s.settleLocked(sh, e)
		e = sh.records[key]
	}

	// The claim's bytes, and its entry if new, are reserved against the
	// limits before anything changes, so that claims in other shards,
	// under other locks, cannot pass a limit together.
	need := memoryEntryOverhead + int64(len(key)+len(claim.Token)+len(claim.Fingerprint))
	if !reserve(&s.bytes, need, s.maxBytes) {
		return 0, nil, true
	}
	if e == nil {
		if !reserve(&s.records, 1, int64(s.maxRecords)) {
			s.bytes.Add(-need)
			return 0, nil, true
		}
		e = &memoryEntry{key: key}
		sh.records[key] = e
		sh.peak = max(sh.peak, len(sh.records))
	}
	e.size += need // the reservation is the entry's now; settleLocked recounts it
	e.token, e.fingerprint, e.created = claim.Token, claim.Fingerprint, claim.CreatedAt.UnixNano()
	e.lease = now + int64(lease)
	e.until = e.lease
	s.settleLocked(sh, e)
	return s.nextFenceLocked(sh), nil, false
}

// reserve adds n to *count unless that would take it past limit (0: no
// limit), and reports whether it did.
func reserve(count *atomic.Int64, n, limit int64) bool {
	if limit <= 0 {
		count.Add(n)
		return true
	}
	for {
		c := count.Load()
		if c+n > limit {
			return false
		}
		if count.CompareAndSwap(c, c+n) {
			return true
		}
	}
}

// nextFenceLocked hands out a fence: one more than the last of sh, or the
// wall clock in nanoseconds if that is greater. Fences thus grow within
// each key, and a store in a new process (whose records are gone, but
// whose fences may be remembered downstream) starts above those of the
// process before it, unless the wall clock stepped back by more than the
// restart took.
func (s *MemoryStore) nextFenceLocked(sh *memoryShard) uint64 {
	sh.fence = max(sh.fence+1, uint64(max(s.wall().UnixNano(), 0)))
	return sh.fence
}

// Extend implements [Store].
func (s *MemoryStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.withInFlight(ctx, key, token, func(sh *memoryShard, now int64, e *memoryEntry) {
		e.lease = now + int64(lease)
		e.until = e.lease
		if x := e.extra; x != nil && x.point != "" {
			e.until = max(e.lease, x.pointUntil)
		}
		s.settleLocked(sh, e)
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
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.clock()
	e := s.ownedLocked(sh, key, token, now)
	switch {
	case e == nil:
		return ErrLeaseLost
	case e.done != nil:
		return nil // a repeated call, already stored
	}
	rec.Token, rec.LeaseLeft, rec.RecoveryPoint, rec.RecoveryData = "", 0, "", nil
	e.dropPoint()
	e.done = rec
	e.token, e.fingerprint, e.created = "", "", 0
	e.lease = int64(maphash.String(s.seed, token)) // see completer
	e.until = now + int64(ttl)
	s.settleLocked(sh, e)
	sh.wakeLocked(key)
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
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.clock()
	e := sh.records[key]
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
	s.freeLocked(sh, e, now)
	return nil
}

// Fail implements [FailureRecorder]; like Release, it suspends a claim
// that recorded a recovery point.
func (s *MemoryStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("idempotency: failure TTL %v is not positive", ttl)
	}
	var attempts int
	err := s.withInFlight(ctx, key, token, func(sh *memoryShard, now int64, e *memoryEntry) {
		x := e.extras()
		if now >= x.failUntil {
			x.attempts = 0
		}
		x.attempts++
		x.reason, x.failUntil = reason, now+int64(ttl)
		x.failer = maphash.String(s.seed, token)
		attempts = x.attempts
		s.freeLocked(sh, e, now)
	})
	if errors.Is(err, ErrLeaseLost) && token != "" {
		// The same call again, after it succeeded: the same count, as the
		// stores that can lose a reply answer.
		sh := s.shard(key)
		sh.mu.Lock()
		defer sh.mu.Unlock()
		if e := sh.records[key]; e != nil && e.extra != nil {
			if x := e.extra; x.attempts > 0 && s.clock() < x.failUntil && x.failer == maphash.String(s.seed, token) {
				return x.attempts, nil
			}
		}
	}
	return attempts, err
}

// freeLocked ends the claim in flight in e: suspended when it holds a
// recovery point, else gone.
func (s *MemoryStore) freeLocked(sh *memoryShard, e *memoryEntry, now int64) {
	key := e.key
	if x := e.extra; x != nil && x.point != "" && now < x.pointUntil {
		e.token, e.lease, e.until = "", 0, x.pointUntil
	} else {
		e.clearRecord()
	}
	s.settleLocked(sh, e)
	sh.wakeLocked(key)
}

// Failures implements [FailureRecorder].
func (s *MemoryStore) Failures(ctx context.Context, key string) (int, string, error) {
	if err := ctx.Err(); err != nil {
		return 0, "", err
	}
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.records[key]
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
	return s.withInFlight(ctx, key, token, func(sh *memoryShard, now int64, e *memoryEntry) {
		x := e.extras()
		x.point, x.data, x.pointUntil = point, data, now+int64(ttl)
		e.until = max(e.lease, x.pointUntil)
		s.settleLocked(sh, e)
	})
}

// Get implements [Inspector].
func (s *MemoryStore) Get(ctx context.Context, key string) (*Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.clock()
	e := sh.records[key]
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
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if e := sh.records[key]; e != nil {
		e.clearRecord()
		e.extra = nil
		s.settleLocked(sh, e)
		sh.wakeLocked(key)
	}
	return nil
}

// watch implements waker: a condition per waiter, signalled under the
// shard's lock by the call that completes or frees key.
func (s *MemoryStore) watch(_ context.Context, key string) (<-chan struct{}, func(), error) {
	sh := s.shard(key)
	sh.mu.Lock()
	ch := sh.waiting.add(key)
	sh.mu.Unlock()
	return ch, func() {
		sh.mu.Lock()
		sh.waiting.remove(key, ch)
		sh.mu.Unlock()
	}, nil
}

// wakeLocked wakes the waiters on key; a map lookup when there are some,
// a length check when there are none.
func (sh *memoryShard) wakeLocked(key string) {
	if len(sh.waiting.byKey) > 0 {
		sh.waiting.wake(key)
	}
}

// withInFlight runs change under the shard's lock if token owns a live
// claim in flight under key; else it returns ErrLeaseLost (or the store's
// error, or ctx's).
func (s *MemoryStore) withInFlight(ctx context.Context, key, token string, change func(sh *memoryShard, now int64, e *memoryEntry)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.clock()
	e := s.ownedLocked(sh, key, token, now)
	if e == nil || e.done != nil {
		return ErrLeaseLost
	}
	change(sh, now, e)
	return nil
}

// ownedLocked returns the entry under key if token owns its record: in
// flight with its lease running, or completed by it. The lease, not the
// record's end: a suspended record, or one whose lease lapsed, has no
// owner.
func (s *MemoryStore) ownedLocked(sh *memoryShard, key, token string, now int64) *memoryEntry {
	e := sh.records[key]
	switch {
	case e == nil || token == "" || now >= e.until:
		return nil
	case e.done != nil:
		if e.completer() == maphash.String(s.seed, token) {
			return e
		}
	case e.token == token && now < e.lease:
		return e
	}
	return nil
}

// settleLocked accounts for a change to e, in sh: it recounts e's bytes,
// schedules its next end, and drops e when it holds nothing any more. e
// must not be used after it was dropped.
func (s *MemoryStore) settleLocked(sh *memoryShard, e *memoryEntry) {
	next := e.next()
	if next == 0 {
		delete(sh.records, e.key)
		s.records.Add(-1)
		s.bytes.Add(-e.size)
		*e = memoryEntry{} // its slots left in the heap are stale now
		sh.compactLocked()
		return
	}
	if size := e.bytes(); size != e.size {
		s.bytes.Add(size - e.size)
		e.size = size
	}
	// One live slot per entry: a new one only when e ends before its slot
	// is due. A later end (a renewal, a completion) keeps the slot, which
	// when due finds e alive and schedules the next.
	if e.at == 0 || next < e.at {
		e.at = next
		sh.expiry.push(memorySlot{at: next, e: e})
		if sh.expiry[0].at == next {
			sh.due.Store(next)
		}
	}
}

// The purge. Ends come from leases (renewed every lease/3), completions
// with any TTL and recovery points, so they are in no order a queue could
// keep; a binary heap per shard orders them, and the purge pops exactly
// what is due, a batch at a time. The heap is lazy: an entry has one live
// slot, due at or before its end. An end that moves later (a renewal, a
// completion) leaves the slot as it is: when due, it finds the entry
// alive and pushes a slot for its end. An end that moves earlier (a
// release) pushes a new slot, and the old one, when due, is dropped as
// stale. A change then costs at most one push (the slots carry their
// time, so sifting reads no entry), and the heap about one 16-byte slot
// per entry.
//
// A claim pays for one batch of its own shard's purge, when no background
// pass (sweep) runs; the rest of that shard, and every other shard, is
// taken by a pass, which a claim starts when its shard has more than a
// batch due, and at most every memorySweepEvery otherwise: so a shard
// that no request touches is purged too.

// memorySweepEvery is the least time, on the store's clock, between two
// background passes over every shard that no shard asked for.
const memorySweepEvery = int64(100 * time.Millisecond)

// memorySlot schedules a look at e at time at; it is stale unless e's
// newest slot is for the same time.
type memorySlot struct {
	at int64
	e  *memoryEntry
}

// purgeDueLocked purges a batch of sh when something in it has expired,
// and starts a background pass over every shard when more is due there,
// or when the last pass is memorySweepEvery old. While a pass runs, it
// leaves the purge to it: when much expires at once, a claim then waits
// at most for the one batch the pass holds a lock for, and does none.
func (s *MemoryStore) purgeDueLocked(sh *memoryShard, now int64) {
	if s.sweeping.Load() {
		return
	}
	more := sh.dueLocked(now) && s.purgeLocked(sh, now) > 0 && sh.dueLocked(now)
	if (more || now >= s.nextSweep.Load()) && s.sweeping.CompareAndSwap(false, true) {
		s.nextSweep.Store(now + memorySweepEvery)
		done := make(chan struct{})
		s.sweepMu.Lock()
		s.sweepDone = done
		s.sweepMu.Unlock()
		go s.sweep(done)
	}
}

// dueLocked reports whether a slot of sh is due at now.
func (sh *memoryShard) dueLocked(now int64) bool {
	return len(sh.expiry) > 0 && sh.expiry[0].at <= now
}

// purgeLocked takes up to memoryPurgeBatch slots of sh that are due and
// drops what has expired, and returns how many slots it took.
func (s *MemoryStore) purgeLocked(sh *memoryShard, now int64) int {
	hook := s.onPurge.Load()
	var start time.Time
	if hook != nil {
		start = time.Now()
	}
	n := 0
	for ; n < memoryPurgeBatch && sh.dueLocked(now); n++ {
		slot := sh.expiry.pop()
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
		s.settleLocked(sh, e)
	}
	sh.compactLocked()
	if len(sh.expiry) > 0 {
		sh.due.Store(sh.expiry[0].at)
	} else {
		sh.due.Store(0)
	}
	if hook != nil {
		held := time.Since(start)
		s.onPurgeMu.Lock()
		(*hook)(n, held)
		s.onPurgeMu.Unlock()
	}
	return n
}

// purgeShard takes a batch of what has expired in sh under its lock, and
// reports how many slots it took and whether more are due.
func (s *MemoryStore) purgeShard(sh *memoryShard, now int64) (took int, more bool) {
	if due := sh.due.Load(); due == 0 || due > now {
		return 0, false
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if !sh.dueLocked(now) {
		return 0, false
	}
	took = s.purgeLocked(sh, now)
	return took, sh.dueLocked(now)
}

// sweep takes what has expired in every shard, a batch per hold of a
// shard's lock, letting the callers that waited for the lock go first
// between batches, until nothing more is due; then it closes done.
func (s *MemoryStore) sweep(done chan struct{}) {
	for more := true; more; {
		more = false
		now := s.clock()
		for i := range s.shards {
			if took, m := s.purgeShard(&s.shards[i], now); took > 0 {
				more = more || m
				runtime.Gosched()
			}
		}
	}
	s.sweepMu.Lock()
	s.sweepDone = nil
	s.sweeping.Store(false)
	s.sweepMu.Unlock()
	close(done)
}

// compactLocked gives back the memory of a map and heap sized for many
// more records than are left (Go maps never shrink), only while that is
// cheap, so the lock is never held for long. The map is rebuilt from the
// heap's live slots, one per entry, because ranging over a map costs its
// size at its peak, not its length. Each shrinks when an eighth (the map)
// or a quarter (the heap) of it is used, so that what a shard keeps after
// a mass expiry is in proportion to what it still holds: with 64 shards,
// fixed floors of a batch each would keep megabytes.
func (sh *memoryShard) compactLocked() {
	n := len(sh.expiry)
	if n > 4*memoryPurgeBatch {
		return
	}
	if c := cap(sh.expiry); c >= memoryCompactMin && c >= 4*n {
		sh.expiry = append(memoryHeap(nil), sh.expiry...)
	}
	if r := len(sh.records); r <= memoryPurgeBatch && sh.peak >= memoryCompactMin && sh.peak >= 8*r {
		m := make(map[string]*memoryEntry, r)
		for _, slot := range sh.expiry {
			if e := slot.e; slot.at == e.at {
				m[e.key] = e
			}
		}
		if len(m) == r { // else an entry without a slot: keep the map
			sh.records = m
		}
		sh.peak = r
	}
}

// memoryCompactMin is the smallest map (in entries held at its peak) or
// heap (in slots) compactLocked shrinks: below it, shrinking saves too
// little to be worth its copy.
const memoryCompactMin = 64

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
	e.token, e.fingerprint, e.done = "", "", nil
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
