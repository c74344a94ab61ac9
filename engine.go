package idempotency

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

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
	leases       leases
	waiting      waitLimit // duplicates waiting for an outcome ([WithWait])
}

func newEngine(store Store, s *settings, keepFailures bool) *engine {
	e := &engine{store: store, lease: s.lease, ttl: s.ttl, timeout: s.storeTimeout, instant: isInstant(store), keepFailures: keepFailures}
	e.waiting.max = s.maxWaiters
	e.leases = leases{store: store, lease: s.lease, timeout: s.storeTimeout}
	if s.shutdown != nil {
		// One callback for the engine's life, none per attempt.
		context.AfterFunc(s.shutdown, func() {
			e.leases.stop(fmt.Errorf("%w: %w", ErrShutdown, context.Cause(s.shutdown)))
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
	work     workContext  // the work's context, on detached or on the caller's
	cancel   context.CancelCauseFunc

	// expires is deadline on the monotonic clock, as nanoseconds since
	// monotonicOrigin, read without a lock by the work's context.
	expires atomic.Int64

	// Guarded by the engine's leases.mu.
	deadline time.Time // cancel the work then unless renewed
	due      time.Time // the next renewal, or the deadline while one runs
	index    int       // in the lease queue; -1 when not queued
	renewing bool
	ended    bool

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
	ctx, cancel := context.WithCancelCause(base)
	a.cancel = cancel
	a.index = -1
	a.expires.Store(noExpiry)
	a.work = workContext{Context: ctx, a: a}
	e.leases.keep(a, got.sent)
	return &a.work
}

// workContext is the context the work runs in. It checks the lease's
// deadline on the monotonic clock whenever it is asked whether it is done
// (Done, Err, and Value, through which [context.Cause] asks), rather than
// relying on the lease timer alone: a process resumed after a pause
// longer than its lease may run the work's next line before any timer,
// and that line must see the lease gone. Contexts derived from it learn
// of the end when the timer runs, or when the work's own context is next
// asked.
type workContext struct {
	context.Context // a cancel context, cancelled on a lost lease, on shutdown, at the end
	a               *attempt
}

func (c *workContext) Done() <-chan struct{} {
	c.a.checkLease()
	return c.Context.Done()
}

func (c *workContext) Err() error {
	c.a.checkLease()
	return c.Context.Err()
}

func (c *workContext) Value(key any) any {
	c.a.checkLease()
	return c.Context.Value(key)
}

func (c *workContext) String() string { return "idempotency.workContext" }

// execute runs w as the owner of a's key and settles the outcome: the
// response is stored, or the key freed. On a panic it frees the key in a
// deferred call, without recovering, so the panic goes on with its stack.
func (e *engine) execute(ctx context.Context, a *attempt, w work) {
	returned := false
	defer func() {
		if !returned {
			e.leases.release(a)
			a.cancel(nil)
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
	e.leases.release(a)
	a.cancel(nil)
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
		a.engine.leases.release(a)
		a.expires.Store(noExpiry)
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
