package idempotency

import (
	"context"
	"errors"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// waker is implemented by stores that can wake a request waiting for the
// outcome of a key another request holds (see [WithWait]): [MemoryStore]
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
			next = earliest(next, now.Add(poll))
		}
		if rec.LeaseLeft > 0 {
			next = earliest(next, now.Add(rec.LeaseLeft+leaseSlack))
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
