package idempotency

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// leases keeps the leases of the attempts an engine is running: it renews
// each every lease/3 and cancels an attempt's context at its deadline
// unless a renewal sent in time has succeeded.
//
// The deadline is counted the way the store counts the lease: from when
// the claim or the last successful renewal was sent (the store starts the
// lease no earlier than it receives the command), minus a margin. So the
// context is cancelled before the store can hand the key to anyone else,
// whether or not a renewal is still waiting for its reply.
//
// One timer serves every attempt, armed for the earliest due one, and a
// goroutine is started only for a renewal that is due: a request that ends
// within lease/3 costs a heap push and pop under a mutex, nothing more.
type leases struct {
	store   Store
	lease   time.Duration
	timeout time.Duration

	mu       sync.Mutex
	queue    attemptQueue
	timer    *time.Timer // made on first use; fires at armed
	armed    time.Time   // zero when the timer is not armed
	shutdown error       // set once the shutdown context ended
}

// renewInterval is how often a lease is renewed: twice more before it
// would lapse, so one failed renewal is survived.
func (l *leases) renewInterval() time.Duration { return l.lease / 3 }

// leaseMargin is how long before the store's lease can lapse the work's
// context is cancelled: room for a store call in flight (its timeout,
// at most a quarter lease) and for the two clocks running at different
// rates (0.1%, beyond NTP's 500 ppm slew limit).
func leaseMargin(lease, storeTimeout time.Duration) time.Duration {
	return min(storeTimeout, lease/4) + lease/1000
}

func (l *leases) deadline(sent time.Time) time.Time {
	return sent.Add(l.lease - leaseMargin(l.lease, l.timeout))
}

// keep starts keeping a's lease, whose claim was sent at sent.
func (l *leases) keep(a *attempt, sent time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.shutdown != nil {
		a.cancel(l.shutdown)
	}
	a.setDeadline(l.deadline(sent))
	a.due = sent.Add(l.renewInterval())
	heap.Push(&l.queue, a)
	l.armLocked(a.due)
}

// release stops keeping a's lease. A renewal still in flight finishes on
// its own and changes nothing.
func (l *leases) release(a *attempt) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a.ended = true
	if a.index >= 0 {
		heap.Remove(&l.queue, a.index)
	}
}

// armLocked makes the timer fire by t.
func (l *leases) armLocked(t time.Time) {
	if !l.armed.IsZero() && !t.Before(l.armed) {
		return
	}
	l.armed = t
	d := time.Until(t)
	if l.timer == nil {
		l.timer = time.AfterFunc(d, l.fire)
	} else {
		l.timer.Reset(d)
	}
}

// fire handles every attempt that is due: cancels those past their
// deadline and starts a renewal for the others.
func (l *leases) fire() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.armed = time.Time{}
	now := time.Now()
	for len(l.queue) > 0 && !l.queue[0].due.After(now) {
		a := l.queue[0]
		if !now.Before(a.deadline) {
			heap.Pop(&l.queue)
			a.cancel(errLeaseExpired)
			continue
		}
		// Until the renewal succeeds, the next thing due is the deadline.
		a.due = a.deadline
		heap.Fix(&l.queue, a.index)
		if !a.renewing {
			a.renewing = true
			go l.renew(a, now, a.deadline)
		}
	}
	if len(l.queue) > 0 {
		l.armLocked(l.queue[0].due)
	}
}

// renew sends one renewal of a's lease at sent; its reply counts only if
// it arrives before deadline.
func (l *leases) renew(a *attempt, sent, deadline time.Time) {
	ctx, cancel := context.WithDeadline(&a.detached, earliest(deadline, sent.Add(l.timeout)))
	err := l.store.Extend(ctx, a.key, a.token, l.lease)
	cancel()

	l.mu.Lock()
	defer l.mu.Unlock()
	a.renewing = false
	if a.ended || a.index < 0 {
		return
	}
	switch {
	case err == nil:
		a.setDeadline(l.deadline(sent))
		a.due = sent.Add(l.renewInterval())
	case errors.Is(err, ErrLeaseLost):
		heap.Remove(&l.queue, a.index)
		a.cancel(fmt.Errorf("%w: the key is no longer this attempt's", ErrLeaseLost))
		return
	default:
		// Try again one interval after this try, if the deadline allows.
		a.due = earliest(sent.Add(l.renewInterval()), a.deadline)
	}
	heap.Fix(&l.queue, a.index)
	l.armLocked(l.queue[0].due)
}

// errLeaseExpired is the cause of a work's context whose lease deadline
// passed without a renewal.
var errLeaseExpired = fmt.Errorf("%w: not renewed by its deadline", ErrLeaseLost)

// monotonicOrigin anchors the attempts' lease deadlines on the monotonic
// clock, as nanoseconds since it, so that the work's context can check
// its deadline with one atomic load and no lock.
var monotonicOrigin = time.Now()

// setDeadline moves a's lease deadline to t; called with the leases' lock
// held, or before a is shared.
func (a *attempt) setDeadline(t time.Time) {
	a.deadline = t
	a.expires.Store(int64(t.Sub(monotonicOrigin)))
}

// checkLease cancels a's work if its lease deadline has passed: the
// work's context calls it whenever it is asked whether it is done, so it
// tells the truth the moment the deadline passes, also in a process that
// was stopped (SIGSTOP, a long GC pause, a frozen VM) and has not run its
// timers yet. The monotonic clock counts the time the process was stopped.
func (a *attempt) checkLease() {
	if exp := a.expires.Load(); exp != noExpiry && int64(time.Since(monotonicOrigin)) >= exp {
		a.cancel(errLeaseExpired)
	}
}

// noExpiry in attempt.expires: no lease to check (the outcome is stored).
const noExpiry = math.MaxInt64

// stop cancels every running attempt, and every later one as it starts,
// with cause.
func (l *leases) stop(cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.shutdown = cause
	for _, a := range l.queue {
		a.cancel(cause)
	}
}

// attemptQueue is a min-heap of attempts by due time.
type attemptQueue []*attempt

func (q attemptQueue) Len() int           { return len(q) }
func (q attemptQueue) Less(i, j int) bool { return q[i].due.Before(q[j].due) }
func (q attemptQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}

func (q *attemptQueue) Push(x any) {
	a := x.(*attempt)
	a.index = len(*q)
	*q = append(*q, a)
}

func (q *attemptQueue) Pop() any {
	old := *q
	a := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	a.index = -1
	return a
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
