package idempotency

import (
	"context"
	"encoding/binary"
	"errors"
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
	// must carry a Response, and keeps it for ttl. Repeating the call with
	// the same token after it succeeded succeeds again and changes
	// nothing: a client library may re-send a call whose reply it lost.
	Complete(ctx context.Context, key, token string, rec Record, ttl time.Duration) error

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

// bounded runs call with ctx limited to timeout, and returns by that
// deadline even when call does not: go-redis, for one, reads with its own
// ReadTimeout and ignores the context's deadline unless the client has
// ContextTimeoutEnabled. A call given up on runs to its end in the
// background; its result then goes to abandoned, if that is not nil.
func bounded[T any](ctx context.Context, timeout time.Duration, call func(context.Context) (T, error), abandoned func(T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	var (
		mu       sync.Mutex
		finished = make(chan struct{})
		gaveUp   bool
		value    T
		err      error
	)
	go func() {
		defer cancel()
		v, e := call(ctx)
		mu.Lock()
		if gaveUp {
			mu.Unlock()
			if abandoned != nil {
				abandoned(v, e)
			}
			return
		}
		value, err = v, e
		close(finished)
		mu.Unlock()
	}()
	select {
	case <-finished:
		return value, err
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	select {
	case <-finished: // finished while we took the lock
		return value, err
	default:
		gaveUp = true
		var zero T
		return zero, fmt.Errorf("idempotency: store call abandoned: %w", context.Cause(ctx))
	}
}

// claims runs the claim protocol on a Store for the middleware and the
// webhook helper: every call bounded by the store timeout, and the calls
// after the work detached from the caller's cancellation.
type claims struct {
	store   Store
	lease   time.Duration
	ttl     time.Duration
	timeout time.Duration
}

// acquire claims key for claim.Token, or returns the record already there.
func (c claims) acquire(ctx context.Context, key string, claim Record) (*Record, error) {
	existing, err := bounded(ctx, c.timeout,
		func(ctx context.Context) (*Record, error) { return c.store.Acquire(ctx, key, claim, c.lease) },
		func(existing *Record, err error) {
			if err == nil && existing == nil { // the claim landed after we gave up on it
				c.release(ctx, key, claim.Token)
			}
		})
	if err != nil {
		// The claim may have landed without a reply saying so (a
		// connection reset after the server ran the command, a deadline
		// that passed after it was sent). Take it back, or the client's
		// retry would meet 409 until the lease lapsed. The release is
		// owner-checked, so it changes nothing when the claim never
		// landed; it runs in the background so the error is not delayed.
		go c.release(ctx, key, claim.Token)
	}
	return existing, err
}

// complete stores rec as the outcome of the work token owns.
func (c claims) complete(ctx context.Context, key, token string, rec Record) error {
	return c.write(ctx, func(ctx context.Context) error { return c.store.Complete(ctx, key, token, rec, c.ttl) })
}

// release frees the key token owns. A lost lease is no error here: the key
// is no longer ours to free.
func (c claims) release(ctx context.Context, key, token string) error {
	err := c.write(ctx, func(ctx context.Context) error { return c.store.Release(ctx, key, token) })
	if errors.Is(err, ErrLeaseLost) {
		return nil
	}
	return err
}

// fail frees the key token owns after the work failed, counting the
// failure when the store keeps a history (see [FailureRecorder]); it
// returns the failed attempts counted so far, 0 without a history. Like
// release, a lost lease is no error.
func (c claims) fail(ctx context.Context, key, token, reason string) (int, error) {
	recorder, ok := c.store.(FailureRecorder)
	if !ok {
		return 0, c.release(ctx, key, token)
	}
	var attempts int
	err := c.write(ctx, func(ctx context.Context) error {
		var err error
		attempts, err = recorder.Fail(ctx, key, token, reason, c.ttl)
		return err
	})
	if errors.Is(err, ErrLeaseLost) {
		return 0, nil
	}
	return attempts, err
}

// write runs a store write that must outlive the request: detached from
// its cancellation, bounded by the store timeout.
func (c claims) write(ctx context.Context, write func(context.Context) error) error {
	_, err := bounded(context.WithoutCancel(ctx), c.timeout, func(ctx context.Context) (struct{}, error) {
		return struct{}{}, write(ctx)
	}, nil)
	return err
}

// keepLease renews the lease of token on key every lease/3 until stop is
// called. When the lease cannot be kept (the token lost the key, or
// renewals kept failing for a whole lease), it cancels the work's context
// with an error wrapping [ErrLeaseLost]: another owner may hold the key.
func (c claims) keepLease(ctx context.Context, cancel context.CancelCauseFunc, key, token string) (stop func()) {
	interval := c.lease / leaseRenewalsPerPeriod
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		renewed := time.Now()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
			_, err := bounded(context.WithoutCancel(ctx), min(c.timeout, interval), func(ctx context.Context) (struct{}, error) {
				return struct{}{}, c.store.Extend(ctx, key, token, c.lease)
			}, nil)
			switch {
			case err == nil:
				renewed = time.Now()
			case errors.Is(err, ErrLeaseLost), time.Since(renewed) >= c.lease:
				cancel(fmt.Errorf("%w: %w", ErrLeaseLost, err))
				return
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			wg.Wait()
		})
	}
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
	failures  map[string]memoryFailures
	nextSweep int64 // Unix nanoseconds
}

type memoryFailures struct {
	attempts   int
	lastReason string
	expires    int64 // Unix nanoseconds
}

// memoryEntry holds a record in its encoded form: one pointer-free string
// instead of a tree of maps and slices, so a store holding millions of
// records costs the garbage collector almost nothing to scan.
type memoryEntry struct {
	value   string
	token   string // the owner while in flight, then the one that completed it
	done    bool
	expires int64 // Unix nanoseconds
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
	s := &MemoryStore{now: time.Now, records: make(map[string]memoryEntry), failures: make(map[string]memoryFailures)}
	for _, opt := range opts {
		opt(s)
	}
	return s
}

var (
	_ Store           = (*MemoryStore)(nil)
	_ FailureRecorder = (*MemoryStore)(nil)
)

// Acquire implements [Store].
func (s *MemoryStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (*Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	value := encodeRecord(&claim, claim.Token)
	s.mu.Lock()
	now := s.now().UnixNano()
	s.sweepLocked(now)
	e, ok := s.records[key]
	if !ok || now >= e.expires {
		s.records[key] = memoryEntry{value: value, token: claim.Token, expires: now + int64(lease)}
		s.mu.Unlock()
		return nil, nil
	}
	s.mu.Unlock()
	rec, _, err := decodeRecord([]byte(e.value))
	return rec, err
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

// Complete implements [Store].
func (s *MemoryStore) Complete(ctx context.Context, key, token string, rec Record, ttl time.Duration) error {
	if err := validateCompletion(&rec, ttl); err != nil {
		return err
	}
	rec.Token = ""
	value := encodeRecord(&rec, token)
	return s.withOwned(ctx, key, token, func(now int64, e memoryEntry) error {
		if !e.done { // done: a repeated call, already stored
			s.records[key] = memoryEntry{value: value, token: token, done: true, expires: now + int64(ttl)}
		}
		return nil
	})
}

// Release implements [Store].
func (s *MemoryStore) Release(ctx context.Context, key, token string) error {
	return s.withInFlight(ctx, key, token, func(int64, memoryEntry) {
		delete(s.records, key)
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

// withInFlight runs change under the lock if token owns a live in-flight
// record under key.
func (s *MemoryStore) withInFlight(ctx context.Context, key, token string, change func(now int64, e memoryEntry)) error {
	return s.withOwned(ctx, key, token, func(now int64, e memoryEntry) error {
		if e.done {
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

// Len returns how many records the store holds, counting expired records
// not yet purged; failure histories are not counted.
func (s *MemoryStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.records)
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

// Record encoding, version 1. One value per record, compact, binary-safe:
//
//	in flight: 0x01 'F' token fingerprint createdAt
//	completed: 0x01 'C' token fingerprint createdAt status flags headers body
//
// Strings and the body are uvarint-length-prefixed; createdAt is a varint of
// Unix milliseconds; headers are a uvarint count of names, each followed by
// a uvarint count of values. The prefix up to the end of the token names
// the owner (in flight) or the owner that completed the record, which is
// what the scripts compare.
const (
	recordVersion   = 0x01
	stateInFlight   = 'F'
	stateCompleted  = 'C'
	flagBodyOmitted = 0x01
)

// ownerPrefix starts the value of an in-flight record that token owns.
func ownerPrefix(token string) string { return tokenPrefix(stateInFlight, token) }

// completedPrefix starts the value of a record that token completed.
func completedPrefix(token string) string { return tokenPrefix(stateCompleted, token) }

func tokenPrefix(state byte, token string) string {
	return string(appendString([]byte{recordVersion, state}, token))
}

// encodeRecord encodes rec; token is its owner when rec is in flight, else
// the owner that completed it.
func encodeRecord(rec *Record, token string) string {
	if rec.InFlight() {
		b := []byte(ownerPrefix(token))
		b = appendString(b, rec.Fingerprint)
		b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
		return string(b)
	}
	resp := rec.Response
	size := 32 + len(rec.Fingerprint) + len(resp.Body)
	for name, values := range resp.Header {
		size += 2 + len(name)
		for _, v := range values {
			size += 2 + len(v)
		}
	}
	b := make([]byte, 0, size+len(token))
	b = append(b, completedPrefix(token)...)
	b = appendString(b, rec.Fingerprint)
	b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
	b = binary.AppendUvarint(b, uint64(resp.StatusCode))
	var flags byte
	if resp.BodyOmitted {
		flags |= flagBodyOmitted
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, uint64(len(resp.Header)))
	for name, values := range resp.Header {
		b = appendString(b, name)
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = appendString(b, v)
		}
	}
	b = appendString(b, string(resp.Body))
	return string(b)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

var errCorruptRecord = errors.New("idempotency: corrupt record")

// decodeRecord parses a stored value and returns the record and the token
// of its owner (in flight) or of the owner that completed it; a completed
// Record's Token is empty. It never panics: the value comes from a server
// and may be anything.
func decodeRecord(b []byte) (*Record, string, error) {
	d := decoder{b: b}
	if d.byte() != recordVersion {
		return nil, "", fmt.Errorf("%w: unknown version", errCorruptRecord)
	}
	rec := &Record{}
	state := d.byte()
	token := d.string()
	if token == "" {
		d.fail("no owner token")
	}
	switch state {
	case stateInFlight:
		rec.Token = token
		rec.Fingerprint = d.string()
		rec.CreatedAt = d.time()
	case stateCompleted:
		rec.Fingerprint = d.string()
		rec.CreatedAt = d.time()
		resp := &Response{StatusCode: int(d.uvarint(999))}
		if resp.StatusCode < 100 {
			d.fail("bad status")
		}
		resp.BodyOmitted = d.byte()&flagBodyOmitted != 0
		// Each header takes at least two bytes, which bounds the count
		// before anything is allocated.
		if n := d.uvarint(uint64(len(d.b))); n > 0 {
			resp.Header = make(http.Header, n)
			for i := uint64(0); i < n && d.err == nil; i++ {
				name := d.string()
				values := make([]string, d.uvarint(uint64(len(d.b))))
				for i := range values {
					values[i] = d.string()
				}
				resp.Header[name] = values
			}
		}
		if body := d.string(); body != "" {
			resp.Body = []byte(body)
		}
		rec.Response = resp
	default:
		return nil, "", fmt.Errorf("%w: unknown state", errCorruptRecord)
	}
	if d.err != nil {
		return nil, "", d.err
	}
	if len(d.b) != 0 {
		return nil, "", fmt.Errorf("%w: %d trailing bytes", errCorruptRecord, len(d.b))
	}
	return rec, token, nil
}

// decoder reads from b; after the first error every read returns a zero
// value and err keeps that first error.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", errCorruptRecord, what)
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail("truncated")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

// uvarint reads a minimally encoded uvarint: one value, one encoding, so
// a decoded owner token re-encodes to the bytes the scripts compare.
func (d *decoder) uvarint(limit uint64) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 || n != uvarintLen(v) || v > limit {
		d.fail("bad length")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint(uint64(len(d.b)))
	if n > uint64(len(d.b)) {
		d.fail("bad length")
	}
	if d.err != nil {
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func uvarintLen(v uint64) int {
	var buf [binary.MaxVarintLen64]byte
	return binary.PutUvarint(buf[:], v)
}

func (d *decoder) time() time.Time {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("bad time")
		return time.Time{}
	}
	d.b = d.b[n:]
	return time.UnixMilli(v)
}
