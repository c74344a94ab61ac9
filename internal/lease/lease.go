// Package lease keeps the leases of work that runs as the owner of
// something a store hands out for a limited time: an idempotency key (the
// middleware, the webhook handler) or a stored webhook event (the inbox's
// worker). It renews each lease while its work runs, and gives the work a
// context that ends, with a cause, when the lease is lost, at its
// deadline, or on shutdown.
//
// The deadline is counted the way the store counts the lease: from when
// the claim or the last successful renewal was sent (the store starts the
// lease no earlier than it receives the command), minus a margin for a
// call in flight and for clocks that run at different rates. So the work's
// context ends before the store can hand the lease to anyone else. It
// reads the deadline on the monotonic clock whenever it is asked whether
// it is done, so a process resumed from a pause longer than its lease
// (SIGSTOP, a long GC pause, a frozen VM) sees the lease gone before any
// timer has run.
//
// A Keeper spreads its leases over shards, each with its own mutex, heap
// and timer (armed for the shard's earliest due lease), so that
// concurrent requests do not queue on one lock. A goroutine is started
// only for a renewal that is due: work that ends within a third of its
// lease costs a heap push and pop under its shard's mutex, nothing more.
package lease

import (
	"container/heap"
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Renewer renews one lease in its store; a Lease's owner implements it.
type Renewer interface {
	// Renew extends the lease by the Keeper's Duration, by ctx's deadline.
	Renew(ctx context.Context) error
}

// Keeper keeps leases of one duration. Set its fields, then use it; it is
// safe for concurrent use.
type Keeper struct {
	// Duration is how long a lease lasts without renewal; renewals are
	// sent every Duration/3, so one failed renewal is survived.
	Duration time.Duration
	// Timeout bounds each renewal call.
	Timeout time.Duration
	// Lost reports whether a renewal's error says the lease is gone (the
	// store answered that it belongs to no one, or to someone else),
	// rather than that the call failed and may be tried again.
	Lost func(error) bool
	// LostCause and ExpiredCause are the causes a work's context is
	// cancelled with when a renewal finds the lease gone, and when its
	// deadline passes without a successful renewal.
	LostCause, ExpiredCause error

	next   atomic.Uint32 // picks the shard of the next lease, round robin
	shards [shardCount]shard
}

// shardCount is the number of shards of a Keeper: enough that a few dozen
// cores rarely meet on one mutex, few enough that their idle timers cost
// nothing.
const shardCount = 16

// shard keeps some of a Keeper's leases.
type shard struct {
	keeper   *Keeper
	mu       sync.Mutex
	queue    leaseQueue
	timer    *time.Timer // made on first use; fires at armed
	armed    time.Time   // zero when the timer is not armed
	shutdown error       // set once Shutdown was called
	_        [64]byte    // keeps neighbouring shards' mutexes off one cache line
}

// Lease is one lease a Keeper keeps, with its work's context. Its zero
// value is ready for [Keeper.Start]; embed it in the state of the work so
// that keeping it allocates nothing.
type Lease struct {
	keeper  *Keeper
	shard   *shard
	renewer Renewer
	calls   context.Context // the base of renewal calls: never cancelled
	cancel  context.CancelCauseFunc
	work    workContext

	// expires is deadline on the monotonic clock, as nanoseconds since
	// origin, read without a lock by the work's context; noExpiry once
	// the lease no longer bounds the work.
	expires atomic.Int64

	// Guarded by shard.mu.
	deadline time.Time // cancel the work then unless renewed
	due      time.Time // the next renewal, or the deadline while one runs
	index    int       // in the queue; -1 when not queued
	renewing bool
	ended    bool
}

// origin anchors lease deadlines on the monotonic clock.
var origin = time.Now()

// noExpiry in Lease.expires: no deadline to check.
const noExpiry = math.MaxInt64

// Margin is how long before the store's lease can lapse the work's
// context ends: room for a store call in flight (its timeout, at most a
// quarter lease) and for two clocks running at different rates (0.1%,
// beyond NTP's 500 ppm slew limit).
func Margin(lease, callTimeout time.Duration) time.Duration {
	return min(callTimeout, lease/4) + lease/1000
}

// Start keeps l, whose claim was sent at sent, renewing it with r, and
// returns its work's context: work's values, ended with a cause when the
// lease is lost or at its deadline, on [Keeper.Shutdown], when work ends
// (unless work is detached from cancellation), and by [Lease.End] or
// [Lease.Cancel]. Renewals run on calls, which must carry no
// cancellation (context.WithoutCancel of the caller's context).
func (k *Keeper) Start(l *Lease, work, calls context.Context, sent time.Time, r Renewer) context.Context {
	ctx, cancel := context.WithCancelCause(work)
	s := &k.shards[k.next.Add(1)%shardCount]
	*l = Lease{keeper: k, shard: s, renewer: r, calls: calls, cancel: cancel, index: -1}
	l.expires.Store(noExpiry)
	l.work = workContext{Context: ctx, l: l}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.keeper = k
	if s.shutdown != nil {
		cancel(s.shutdown)
	}
	l.setDeadline(k.deadline(sent))
	l.due = sent.Add(k.renewInterval())
	heap.Push(&s.queue, l)
	s.armLocked(l.due)
	return &l.work
}

// Context returns the work's context, as Start did.
func (l *Lease) Context() context.Context { return &l.work }

// Cancel ends the work's context with cause, as a lost lease does; the
// lease is still kept until Release or End.
func (l *Lease) Cancel(cause error) { l.cancel(cause) }

// Release stops keeping l: no more renewals, no deadline. The work's
// context stays as it is: the caller ends it, or lets the work go on
// without a lease (its outcome is stored). A renewal in flight finishes
// on its own and changes nothing.
func (l *Lease) Release() {
	s := l.shard
	s.mu.Lock()
	defer s.mu.Unlock()
	l.ended = true
	l.expires.Store(noExpiry)
	if l.index >= 0 {
		heap.Remove(&s.queue, l.index)
	}
}

// End releases l and ends its work's context.
func (l *Lease) End() {
	l.Release()
	l.cancel(nil)
}

// Shutdown ends the work of every lease, and of every one started after,
// with cause.
func (k *Keeper) Shutdown(cause error) {
	for i := range k.shards {
		s := &k.shards[i]
		s.mu.Lock()
		s.shutdown = cause
		for _, l := range s.queue {
			l.cancel(cause)
		}
		s.mu.Unlock()
	}
}

func (k *Keeper) renewInterval() time.Duration { return k.Duration / 3 }

func (k *Keeper) deadline(sent time.Time) time.Time {
	return sent.Add(k.Duration - Margin(k.Duration, k.Timeout))
}

// setDeadline moves l's deadline to t; called with its shard's lock
// held, or before l is shared.
func (l *Lease) setDeadline(t time.Time) {
	l.deadline = t
	l.expires.Store(int64(t.Sub(origin)))
}

// check ends the work if l's deadline has passed: the work's context
// calls it whenever it is asked whether it is done. The monotonic clock
// counts the time the process was stopped.
func (l *Lease) check() {
	if exp := l.expires.Load(); exp != noExpiry && int64(time.Since(origin)) >= exp {
		l.cancel(l.keeper.ExpiredCause)
	}
}

// armLocked makes the shard's timer fire by t.
func (s *shard) armLocked(t time.Time) {
	if !s.armed.IsZero() && !t.Before(s.armed) {
		return
	}
	s.armed = t
	d := time.Until(t)
	if s.timer == nil {
		s.timer = time.AfterFunc(d, s.fire)
	} else {
		s.timer.Reset(d)
	}
}

// fire handles every lease of the shard that is due: ends the work of
// those past their deadline and starts a renewal for the others.
func (s *shard) fire() {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keeper
	s.armed = time.Time{}
	now := time.Now()
	for len(s.queue) > 0 && !s.queue[0].due.After(now) {
		l := s.queue[0]
		if !now.Before(l.deadline) {
			heap.Pop(&s.queue)
			l.cancel(k.ExpiredCause)
			continue
		}
		// Until the renewal succeeds, the next thing due is the deadline.
		l.due = l.deadline
		heap.Fix(&s.queue, l.index)
		if !l.renewing {
			l.renewing = true
			go s.renew(l, now, l.deadline)
		}
	}
	if len(s.queue) > 0 {
		s.armLocked(s.queue[0].due)
	}
}

// renew sends one renewal of l at sent; its reply counts only if it
// arrives before deadline.
func (s *shard) renew(l *Lease, sent, deadline time.Time) {
	k := l.keeper
	ctx, cancel := context.WithDeadline(l.calls, earliest(deadline, sent.Add(k.Timeout)))
	err := l.renewer.Renew(ctx)
	cancel()

	s.mu.Lock()
	defer s.mu.Unlock()
	l.renewing = false
	if l.ended || l.index < 0 {
		return
	}
	switch {
	case err == nil:
		l.setDeadline(k.deadline(sent))
		l.due = sent.Add(k.renewInterval())
	case k.Lost(err):
		heap.Remove(&s.queue, l.index)
		l.cancel(k.LostCause)
		return
	default:
		// Try again one interval after this try, if the deadline allows.
		l.due = earliest(sent.Add(k.renewInterval()), l.deadline)
	}
	heap.Fix(&s.queue, l.index)
	s.armLocked(s.queue[0].due)
}

// workContext is the context the work runs in. It checks the lease's
// deadline on the monotonic clock whenever it is asked whether it is done
// (Done, Err, and Value, through which context.Cause asks), rather than
// relying on the timer alone: a process resumed after a pause longer than
// its lease may run the work's next line before any timer, and that line
// must see the lease gone. Contexts derived from it learn of the end when
// the timer runs, or when the work's own context is next asked.
type workContext struct {
	context.Context // a cancel context
	l               *Lease
}

func (c *workContext) Done() <-chan struct{} {
	c.l.check()
	return c.Context.Done()
}

func (c *workContext) Err() error {
	c.l.check()
	return c.Context.Err()
}

func (c *workContext) Value(key any) any {
	c.l.check()
	return c.Context.Value(key)
}

func (c *workContext) String() string { return "idempotency.workContext" }

// leaseQueue is a min-heap of leases by due time.
type leaseQueue []*Lease

func (q leaseQueue) Len() int           { return len(q) }
func (q leaseQueue) Less(i, j int) bool { return q[i].due.Before(q[j].due) }
func (q leaseQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}

func (q *leaseQueue) Push(x any) {
	l := x.(*Lease)
	l.index = len(*q)
	*q = append(*q, l)
}

func (q *leaseQueue) Pop() any {
	old := *q
	l := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	l.index = -1
	return l
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
