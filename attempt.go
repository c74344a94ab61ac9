package idempotency

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/seed70ea8305/idempotency/internal/lease"
)

// Claim identifies the idempotent work being served. Handlers wrapped by the
// middleware, and webhook functions, find it in their context with
// [ClaimFromContext].
type Claim struct {
	// Kind tells what is being served: "http" for the middleware,
	// "<provider>-webhook" (for example "stripe-webhook") for the webhook
	// handler.
	Kind        string
	Scope       string
	Key         string
	Fingerprint string
	// Route is the route or method that serves the work, a label of low
	// cardinality: the ServeMux pattern for HTTP, the full method for
	// gRPC; "" when none is known.
	Route string

	// Fence is the claim's fencing token: it grows with every new owner of
	// the key, in every store, so a downstream write guarded by it (a
	// version column, UPDATE ... WHERE fence < $1) rejects an owner whose
	// lease lapsed while it still ran.
	Fence uint64

	// RecoveryPoint and RecoveryData are the last recovery point recorded
	// with [Claim.Checkpoint] by an earlier attempt at this key and request
	// that did not finish (it crashed, lost its lease or failed): the work
	// resumes after it. Empty for a fresh start.
	RecoveryPoint string
	RecoveryData  []byte

	created time.Time
	attempt *attempt // nil for a Claim that no attempt runs
}

// Keep decides, for the response of the attempt this claim belongs to, what
// is stored: ttl > 0 keeps it for ttl instead of [Options].TTL, whatever its
// status (the handler's word wins over [Options].Retryable); ttl <= 0
// stores nothing and frees the key, as a 5xx does, so a retry (or a
// waiting duplicate, see [Options].Wait) runs the handler again. A response
// that cannot be replayed (1xx, a handler cut short) is never stored. The
// last call before the handler returns counts; calls after it, and on a
// Claim no attempt runs, do nothing. Safe for concurrent use. For a
// webhook function, ttl <= 0 leaves the event unrecorded, so a later
// delivery processes it again.
func (c Claim) Keep(ttl time.Duration) {
	if c.attempt == nil {
		return
	}
	if ttl <= 0 {
		c.attempt.keep.Store(keepNothing)
		return
	}
	c.attempt.keep.Store(int64(ttl))
}

type claimContextKey struct{}

// ClaimFromContext returns the claim of the idempotent request or webhook
// event that ctx belongs to.
func ClaimFromContext(ctx context.Context) (Claim, bool) {
	c, ok := ctx.Value(claimContextKey{}).(*Claim)
	if !ok {
		return Claim{}, false
	}
	return *c, true
}

// Checkpoint records a recovery point for the work this claim belongs to:
// point names the phase just finished ("venue_created"), data is what the
// rest of the work needs from it (an ID), at most 64 KiB. A later attempt
// at the same key and request, after this one crashed, lost its lease or
// failed, starts with [Claim.RecoveryPoint] and [Claim.RecoveryData] set
// to the last checkpoint recorded, and can skip what was done.
//
// The checkpoint is kept by the store only while this claim still owns the
// key: the error wraps [ErrLeaseLost] when it does not, and the work's
// context is then cancelled with it, as when a renewal finds the key
// taken; it wraps [ErrStoreUnavailable] when the store failed, and
// [errors.ErrUnsupported] when the store keeps no recovery points. A
// stored response ends the recovery point's life. ctx should be the
// handler's context; the call is bounded by the store timeout.
func (c Claim) Checkpoint(ctx context.Context, point string, data []byte) error {
	a := c.attempt
	switch {
	case a == nil:
		return fmt.Errorf("%w: no attempt to checkpoint", ErrNoClaim)
	case point == "" || len(point) > maxRecoveryPoint || !utf8.ValidString(point) || strings.IndexByte(point, 0) >= 0:
		return fmt.Errorf("idempotency: recovery point name must be 1 to %d bytes of UTF-8 without NUL", maxRecoveryPoint)
	case len(data) > maxRecoveryData:
		return fmt.Errorf("idempotency: recovery data of %d bytes exceeds %d", len(data), maxRecoveryData)
	}
	cp, ok := findStore[Checkpointer](a.engine.store)
	if !ok {
		return fmt.Errorf("idempotency: %T keeps no recovery points: %w", a.engine.store, errors.ErrUnsupported)
	}
	callCtx, cancel := a.engine.bound(ctx)
	defer cancel()
	err := cp.Checkpoint(callCtx, a.key, a.token, point, data, a.engine.ttl)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrLeaseLost):
		// The work must stop, as when a renewal finds the key taken.
		a.lease.Cancel(err)
		return err
	default:
		return fmt.Errorf("%w: recording recovery point %q: %w", ErrStoreUnavailable, point, err)
	}
}

// HoldResponse makes the middleware hold this claim's response until its
// outcome is stored, also on a route served [Options].Streaming, where
// responses otherwise pass through as they are written (without it, every
// response is held). A store that commits the response with the handler's
// own writes asks for it (pgstore's Tx does), so that a client never sees
// a success that was rolled back. Call it before the handler writes. It
// does nothing for a webhook function, whose answer is written after its
// outcome is stored anyway, or on a Claim no attempt runs.
func (c Claim) HoldResponse() {
	if c.attempt != nil {
		c.attempt.hold.Store(true)
	}
}

// engine runs attempts for the middleware and the webhook helper, one
// protocol for both: claim the key, run the work while its lease is kept,
// then store the outcome or free the key for a retry.
type engine struct {
	store   Store
	lease   time.Duration
	ttl     time.Duration
	timeout time.Duration
	// instant: the store answers from memory at once, so its calls need
	// no deadline (and no timer to enforce one).
	instant bool
	// keepFailures: count failed attempts where the store keeps a history
	// ([FailureRecorder]).
	keepFailures bool
	leases       lease.Keeper
	waiting      waitLimit // duplicates waiting for an outcome ([Options].Wait)
}

func newEngine(store Store, s *settings, keepFailures bool) *engine {
	e := &engine{store: store, lease: s.lease, ttl: s.ttl, timeout: s.storeTimeout, instant: isInstant(store), keepFailures: keepFailures}
	e.waiting.max = s.maxWaiters
	e.leases = lease.Keeper{
		Duration:     s.lease,
		Timeout:      s.storeTimeout,
		Lost:         func(err error) bool { return errors.Is(err, ErrLeaseLost) },
		LostCause:    errLeaseTaken,
		ExpiredCause: errLeaseExpired,
	}
	if s.shutdown != nil {
		// One callback for the engine's life, none per attempt.
		context.AfterFunc(s.shutdown, func() {
			e.leases.Shutdown(fmt.Errorf("%w: %w", ErrShutdown, context.Cause(s.shutdown)))
		})
	}
	return e
}

// isInstant reports whether store is a [MemoryStore], possibly inside
// wrappers (metrics, tracing) that give the store they wrap with Unwrap.
func isInstant(store Store) bool {
	_, ok := findStore[*MemoryStore](store)
	return ok
}

// findStore returns store, or the first store inside it (through the
// Unwrap of wrappers such as the metrics' store) that is a T.
func findStore[T any](store Store) (T, bool) {
	for {
		if t, ok := store.(T); ok {
			return t, true
		}
		u, ok := store.(interface{ Unwrap() Store })
		if !ok {
			var zero T
			return zero, false
		}
		store = u.Unwrap()
	}
}

// attempt is one run of the work as the owner of a claimed key.
type attempt struct {
	engine   *engine
	claim    Claim
	key      string // the record's key in the store
	token    string
	detached claimContext // the caller's values and the claim, never cancelled
	lease    lease.Lease  // the claim's lease and the work's context

	failures int // failed attempts the store has counted, this one included

	// early is the outcome settled while the work still ran (a held
	// response that outgrew the stored-size limit), with earlyErr; "" if
	// none was. Only the work's goroutine touches them.
	early    Outcome
	earlyErr error

	// keep is what the work asked for its outcome with [Claim.Keep]: 0
	// nothing, keepNothing to store nothing, else the record's TTL.
	keep atomic.Int64
	// hold: the response waits for its outcome to be stored
	// ([Claim.HoldResponse]).
	hold atomic.Bool
}

// keepNothing in attempt.keep: store nothing, free the key.
const keepNothing = -1

// work is what an attempt runs. run does the work and says what to keep:
// a response to store (made with newCompletion), or nil and a cause: the
// key is to be freed, with reason as the failure text a store may keep.
// settled is then told the outcome, also when run panicked, before the
// panic continues.
type work interface {
	run(ctx context.Context) (done *Record, reason string, cause error)
	settled(outcome Outcome, err error)
}

// completion holds a completed record and its response in one allocation.
type completion struct {
	rec  Record
	resp Response
}

// newCompletion returns a record for resp, which the engine completes
// with the claim's fingerprint and time.
func newCompletion(resp Response) *Record {
	c := &completion{resp: resp}
	c.rec.Response = &c.resp
	return &c.rec
}

// newCompletionCopy returns a record for resp with body as its body. A
// body of up to 8 KB is copied into the record's own allocation, sized to
// an allocation class so that it wastes no more than a body of its own
// would; a larger one is kept as it is, so the caller gives it up when
// kept reports so.
func newCompletionCopy(resp Response, body []byte) (rec *Record, kept bool) {
	if len(body) == 0 {
		return newCompletion(resp), false
	}
	for _, size := range inlineBodySizes {
		if len(body) <= size.max {
			return size.make(resp, body), false
		}
	}
	resp.Body = body
	return newCompletion(resp), true
}

// inlineBody returns a completion holding resp and, in its buffer B (a
// byte array), a copy of body, which fits in it.
func inlineBody[B any](resp Response, body []byte) *Record {
	c := new(struct {
		completion
		buf B
	})
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&c.buf)), unsafe.Sizeof(c.buf))
	resp.Body = buf[:copy(buf, body):len(body)]
	c.resp = resp
	c.rec.Response = &c.resp
	return &c.rec
}

// inlineBodySizes are the bodies newCompletionCopy keeps with their
// record: each buffer takes a completion (160 bytes) up to one of Go's
// allocation size classes, counting the 8-byte header that objects with
// pointers get beyond 512 bytes (TestCompletionSizes).
var inlineBodySizes = [...]struct {
	max  int
	make func(Response, []byte) *Record
}{
	{16, inlineBody[[16]byte]}, {32, inlineBody[[32]byte]}, {48, inlineBody[[48]byte]},
	{64, inlineBody[[64]byte]}, {80, inlineBody[[80]byte]}, {96, inlineBody[[96]byte]},
	{128, inlineBody[[128]byte]}, {160, inlineBody[[160]byte]}, {192, inlineBody[[192]byte]},
	{224, inlineBody[[224]byte]}, {256, inlineBody[[256]byte]}, {288, inlineBody[[288]byte]},
	{320, inlineBody[[320]byte]}, {352, inlineBody[[352]byte]}, {408, inlineBody[[408]byte]},
	{472, inlineBody[[472]byte]}, {536, inlineBody[[536]byte]}, {600, inlineBody[[600]byte]},
	{728, inlineBody[[728]byte]}, {856, inlineBody[[856]byte]}, {984, inlineBody[[984]byte]},
	{1112, inlineBody[[1112]byte]}, {1240, inlineBody[[1240]byte]}, {1368, inlineBody[[1368]byte]},
	{1624, inlineBody[[1624]byte]}, {1880, inlineBody[[1880]byte]}, {2136, inlineBody[[2136]byte]},
	{2520, inlineBody[[2520]byte]}, {2904, inlineBody[[2904]byte]}, {3032, inlineBody[[3032]byte]},
	{3288, inlineBody[[3288]byte]}, {3928, inlineBody[[3928]byte]}, {4696, inlineBody[[4696]byte]},
	{5208, inlineBody[[5208]byte]}, {5976, inlineBody[[5976]byte]}, {6360, inlineBody[[6360]byte]},
	{6616, inlineBody[[6616]byte]}, {6744, inlineBody[[6744]byte]}, {8024, inlineBody[[8024]byte]},
}

// claimContext is the context of an attempt's store calls and the base of
// its work's: the caller's values and the claim, without the caller's
// cancellation, as context.WithoutCancel plus context.WithValue in one
// value that lives inside the attempt, so it costs no allocation.
type claimContext struct {
	parent context.Context
	claim  *Claim
}

func (c *claimContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *claimContext) Done() <-chan struct{}       { return nil }
func (c *claimContext) Err() error                  { return nil }

func (c *claimContext) Value(key any) any {
	if key == (claimContextKey{}) {
		return c.claim
	}
	return c.parent.Value(key)
}

func (c *claimContext) String() string { return "idempotency.claimContext" }

// noCancel stands in for the cancel function of a context that needs none.
func noCancel() {}

// bound limits a store call to the store timeout, unless the store needs
// no deadline.
func (e *engine) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if e.instant {
		return ctx, noCancel
	}
	return context.WithTimeout(ctx, e.timeout)
}

// acquired is what acquire found: a claim (fence > 0), possibly resuming
// from a recovery point, or the record already there.
type acquired struct {
	fence    uint64
	existing *Record // the record that holds the key; nil when claimed
	resumed  *Record // on a claim: the suspended record it took over ([Checkpointer])
	sent     time.Time
}

// acquire claims key for rec.Token, or returns the record already there.
// It also returns when the claim was sent, from which its lease counts.
func (e *engine) acquire(ctx context.Context, key string, rec Record) (acquired, error) {
	callCtx, cancel := e.bound(ctx)
	got := acquired{sent: time.Now()}
	var err error
	got.fence, got.existing, err = e.store.Acquire(callCtx, key, rec, e.lease)
	cancel()
	if err != nil {
		if errors.Is(err, ErrRecordUnreadable) {
			// The store read a record and claimed nothing: no outage, and
			// nothing to take back.
			return acquired{sent: got.sent}, fmt.Errorf("idempotency: acquire: %w", err)
		}
		if !e.instant {
			e.takeBack(ctx, key, rec.Token)
		}
		return acquired{sent: got.sent}, fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
	}
	if got.fence > 0 {
		got.resumed, got.existing = got.existing, nil
	}
	return got, nil
}

// takeBackDelays space the attempts to free a claim whose acquire failed.
var takeBackDelays = [...]time.Duration{0, 250 * time.Millisecond}

// takeBack frees a claim whose acquire failed: it may have landed without
// a reply saying so (a connection reset after the command ran, a reply
// that came after the deadline). Stores refuse to claim after the call's
// deadline, so a claim can only have landed before now; the later tries
// cover a store whose clock runs behind ours. The release is owner-checked,
// so it changes nothing when the claim never landed. It runs in the
// background, on the failure path only, so the caller's 503 is not delayed.
func (e *engine) takeBack(ctx context.Context, key, token string) {
	ctx = context.WithoutCancel(ctx)
	go func() {
		for _, delay := range takeBackDelays {
			time.Sleep(delay)
			callCtx, cancel := context.WithTimeout(ctx, e.timeout)
			err := e.store.Release(callCtx, key, token)
			cancel()
			if err == nil {
				return
			}
		}
	}()
}

// start makes a the owner of its claim, sent at sent, and returns the
// context the work runs in: it carries the claim and parent's values, and
// is cancelled when the lease is lost, on shutdown, and (only if
// cancelWithParent) when parent is.
func (e *engine) start(a *attempt, parent context.Context, got acquired, cancelWithParent bool) context.Context {
	a.engine = e
	a.claim.attempt = a
	a.claim.Fence = got.fence
	if r := got.resumed; r != nil {
		a.claim.RecoveryPoint, a.claim.RecoveryData = r.RecoveryPoint, r.RecoveryData
	}
	a.detached = claimContext{parent: parent, claim: &a.claim}
	var base context.Context = &a.detached
	if cancelWithParent {
		base = context.WithValue(parent, claimContextKey{}, &a.claim)
	}
	return e.leases.Start(&a.lease, base, &a.detached, got.sent, a)
}

// Renew implements lease.Renewer: one renewal of a's claim.
func (a *attempt) Renew(ctx context.Context) error {
	return a.engine.store.Extend(ctx, a.key, a.token, a.engine.lease)
}

// Causes of a work's context ended by its lease.
var (
	errLeaseExpired = fmt.Errorf("%w: not renewed by its deadline", ErrLeaseLost)
	errLeaseTaken   = fmt.Errorf("%w: the key is no longer this attempt's", ErrLeaseLost)
)

// execute runs w as the owner of a's key and settles the outcome: the
// response is stored, or the key freed. On a panic it frees the key in a
// deferred call, without recovering, so the panic goes on with its stack.
func (e *engine) execute(ctx context.Context, a *attempt, w work) {
	returned := false
	defer func() {
		if !returned {
			a.lease.End()
			if a.early != "" {
				w.settled(a.early, a.earlyErr)
				return
			}
			cause := errors.New("idempotency: panic")
			w.settled(e.free(a, cause, "panic"))
		}
	}()
	done, reason, cause := w.run(ctx)
	returned = true
	a.lease.End()
	if a.early != "" {
		w.settled(a.early, a.earlyErr)
		return
	}
	if done != nil && a.keep.Load() == keepNothing {
		done, cause, reason = nil, errKeptNothing, errKeptNothing.Error()
	}
	if done == nil {
		w.settled(e.free(a, cause, reason))
		return
	}
	outcome, err := e.complete(a, done)
	if outcome == OutcomeStoreError && a.hold.Load() {
		// The client has not seen the response; free the key for its
		// retry. Owner-checked: a completion that landed after all stays.
		e.free(a, err, "")
	}
	w.settled(outcome, err)
}

// settle records the outcome of a's attempt, settled (with complete)
// while its work still runs. Once it is stored, the lease is no longer
// kept, and the work's context no longer ends with it: the key is not
// claimed any more, it is done. When storing failed, the key is freed
// (owner-checked: a completion that landed after all stays).
func (a *attempt) settle(outcome Outcome, err error) {
	a.early, a.earlyErr = outcome, err
	switch outcome {
	case OutcomeExecuted:
		a.lease.Release()
	case OutcomeStoreError:
		a.engine.free(a, err, "")
	}
}

// complete stores rec as the outcome of a's claim, detached from the
// caller's cancellation: a client that hung up must not lose the record.
func (e *engine) complete(a *attempt, rec *Record) (Outcome, error) {
	rec.Fingerprint, rec.CreatedAt = a.claim.Fingerprint, a.claim.created
	ttl := e.ttl
	if keep := a.keep.Load(); keep > 0 {
		ttl = time.Duration(keep)
	}
	ctx, cancel := e.bound(&a.detached)
	err := e.store.Complete(ctx, a.key, a.token, rec, ttl)
	cancel()
	switch {
	case err == nil:
		return OutcomeExecuted, nil
	case errors.Is(err, ErrLeaseLost):
		return OutcomeLeaseLost, err
	default:
		return OutcomeStoreError, fmt.Errorf("%w: storing the outcome: %w", ErrStoreUnavailable, err)
	}
}

// free releases a's key after a failed attempt (counting the failure
// where the store keeps a history), detached from the caller's
// cancellation. A lost lease is no error here: the key is not ours to free.
func (e *engine) free(a *attempt, cause error, reason string) (Outcome, error) {
	ctx, cancel := e.bound(&a.detached)
	defer cancel()
	var err error
	if recorder, ok := e.store.(FailureRecorder); ok && e.keepFailures {
		a.failures, err = recorder.Fail(ctx, a.key, a.token, truncate(reason, maxFailureReason), e.ttl)
	} else {
		err = e.store.Release(ctx, a.key, a.token)
	}
	if err != nil && !errors.Is(err, ErrLeaseLost) {
		return OutcomeStoreError, fmt.Errorf("%w (freeing the key failed, it frees itself when its lease lapses: %w)", cause, err)
	}
	return OutcomeReleased, cause
}

// errKeptNothing is the cause of an attempt whose work asked, with
// [Claim.Keep], that its outcome not be stored.
var errKeptNothing = errors.New("idempotency: the handler asked not to store its response")

// maxFailureReason caps the error text kept with a failed attempt.
const maxFailureReason = 1 << 10

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// waker is implemented by stores that can wake a request waiting for the
// outcome of a key another request holds (see [Options].Wait): [MemoryStore]
// with a channel per waiter, [RedisStore] with pub/sub. It is unexported
// because the engine relies on details a store outside this package
// cannot see; such a store still works, its waiters re-read it every
// fallbackPoll.
type waker interface {
	// watch registers a waiter on key and returns once the registration is
	// in place, so that a record completed or released after watch
	// returns wakes it (best effort: a lost notification is covered by the
	// caller's re-read at its deadline). wake receives, possibly
	// spuriously, after such a change; stop unregisters and must be called
	// once. An error means no wake-ups: the caller falls back to its timer.
	watch(ctx context.Context, key string) (wake <-chan struct{}, stop func(), err error)
}

// waiters maps keys to the wake channels of the requests waiting on them.
// The zero value is ready; its user guards it.
type waiters struct {
	byKey map[string]map[chan struct{}]struct{}
}

func (w *waiters) add(key string) chan struct{} {
	if w.byKey == nil {
		w.byKey = make(map[string]map[chan struct{}]struct{})
	}
	set := w.byKey[key]
	if set == nil {
		set = make(map[chan struct{}]struct{}, 1)
		w.byKey[key] = set
	}
	ch := make(chan struct{}, 1)
	set[ch] = struct{}{}
	return ch
}

// remove unregisters ch and reports whether key has no waiter left.
func (w *waiters) remove(key string, ch chan struct{}) bool {
	set := w.byKey[key]
	delete(set, ch)
	if len(set) == 0 {
		delete(w.byKey, key)
		return true
	}
	return false
}

// wake signals every waiter on key without blocking: a channel that
// already holds a signal needs no second one.
func (w *waiters) wake(key string) {
	for ch := range w.byKey[key] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// waitLimit counts the requests of one engine that wait, up to max.
type waitLimit struct {
	mu     sync.Mutex
	n, max int
}

func (l *waitLimit) enter() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n >= l.max {
		return false
	}
	l.n++
	return true
}

func (l *waitLimit) leave() {
	l.mu.Lock()
	l.n--
	l.mu.Unlock()
}

// fallbackPoll is how often a waiter re-reads a key in a store that
// cannot wake it (not a waker).
const fallbackPoll = 100 * time.Millisecond

// leaseSlack is how long after an in-flight record's lease should have
// lapsed a waiter re-reads it to take the key over: room for the two
// clocks and the store's expiry to disagree a little.
const leaseSlack = 5 * time.Millisecond

// wait lets a duplicate of an in-flight request wait, until deadline, for
// the outcome of the attempt that holds key. existing is what the first
// acquire returned. Each wake-up (from the store, or a timer at the
// lease's end or at the deadline) re-reads the key with acquire, so a
// freed key is claimed by exactly one waiter, which then runs the work;
// the others see its claim and keep waiting. wait returns what the last
// acquire returned; an in-flight existing means the wait ended first.
func (e *engine) wait(ctx context.Context, key string, claim Record, got acquired, deadline time.Time) (acquired, error) {
	if !e.waiting.enter() {
		return got, nil
	}
	defer e.waiting.leave()

	var wake <-chan struct{}
	poll := time.Duration(0)
	if w, ok := findStore[waker](e.store); !ok {
		// A store without wake-ups (one from another package) is re-read
		// at a modest pace instead.
		poll = fallbackPoll
	} else {
		watchCtx, cancel := context.WithDeadline(ctx, deadline)
		ch, stop, werr := w.watch(watchCtx, key)
		cancel()
		if werr == nil {
			wake = ch
			defer stop()
		}
	}
	// One timer per waiting request, none for a request that does not
	// wait; it is re-armed for the next lease end or the deadline.
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		// Re-read after the watch is in place: an outcome stored between
		// the first read and the watch is seen here, not missed.
		var err error
		got, err = e.acquire(ctx, key, claim)
		rec := got.existing
		if err != nil || rec == nil || rec.Response != nil || rec.Fingerprint != claim.Fingerprint {
			return got, err
		}
		now := time.Now()
		if !now.Before(deadline) || ctx.Err() != nil {
			return got, nil
		}
		next := deadline
		if poll > 0 {
			if t := now.Add(poll); t.Before(next) {
				next = t
			}
		}
		if rec.LeaseLeft > 0 {
			if t := now.Add(rec.LeaseLeft + leaseSlack); t.Before(next) {
				next = t
			}
		}
		timer.Reset(next.Sub(now))
		select {
		case <-wake:
		case <-timer.C:
		case <-ctx.Done():
			return got, nil
		}
	}
}

// waitFor returns how long a duplicate with headers h may wait: what its
// Prefer: wait=N header asks (RFC 7240, seconds), never more than limit,
// which is also what a request that asks nothing gets.
func waitFor(h http.Header, limit time.Duration) time.Duration {
	if d, ok := preferWait(h["Prefer"]); ok {
		return min(d, limit)
	}
	return limit
}

// preferWait finds the wait preference in Prefer header values: a
// comma-separated list of preferences, each token[=value] with optional
// ;parameters; names are case-insensitive and the first wait counts.
func preferWait(values []string) (time.Duration, bool) {
	for _, v := range values {
		for v != "" {
			var pref string
			pref, v, _ = strings.Cut(v, ",")
			pref, _, _ = strings.Cut(pref, ";")
			name, value, _ := strings.Cut(pref, "=")
			if !strings.EqualFold(strings.TrimSpace(name), "wait") {
				continue
			}
			value = strings.Trim(strings.TrimSpace(value), `"`)
			n, err := strconv.ParseUint(value, 10, 32)
			if err != nil {
				return 0, false
			}
			return time.Duration(n) * time.Second, true
		}
	}
	return 0, false
}

// inUseError is the 409 for a key still in flight, with the time the
// client should wait before retrying: the rest of the holder's lease.
type inUseError struct {
	retryAfter time.Duration // 0: unknown
}

func (e *inUseError) Error() string { return ErrKeyInUse.Error() }
func (e *inUseError) Unwrap() error { return ErrKeyInUse }

// keyInUse returns the 409 error for an in-flight record.
func keyInUse(rec *Record) error {
	if rec == nil || rec.LeaseLeft <= 0 {
		return ErrKeyInUse
	}
	return &inUseError{retryAfter: rec.LeaseLeft}
}

// retryAfter is the Retry-After value for err: whole seconds, rounded up,
// at least 1.
func retryAfter(err error) string {
	var iu *inUseError
	if !errors.As(err, &iu) || iu.retryAfter <= time.Second {
		return retryAfterSeconds
	}
	return strconv.FormatInt(int64(math.Ceil(iu.retryAfter.Seconds())), 10)
}
