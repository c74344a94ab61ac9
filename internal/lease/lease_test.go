package lease

import (
	"context"
	"errors"
	"testing"
	"time"
)

var (
	errLost    = errors.New("lost")
	errExpired = errors.New("expired")
)

// renewer answers each renewal with the next error of its channel.
type renewer struct{ answers chan error }

func (r *renewer) Renew(ctx context.Context) error {
	select {
	case err := <-r.answers:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func newKeeper(d time.Duration) *Keeper {
	return &Keeper{
		Duration: d, Timeout: d / 4,
		Lost:      func(err error) bool { return errors.Is(err, errLost) },
		LostCause: errLost, ExpiredCause: errExpired,
	}
}

// pastDeadline moves l's deadline into the past without any timer firing,
// as a process resumed from a pause longer than its lease finds it.
func pastDeadline(l *Lease) {
	l.shard.mu.Lock()
	defer l.shard.mu.Unlock()
	l.setDeadline(time.Now().Add(-time.Nanosecond))
}

// TestContextTellsTheTruthBeforeAnyTimer: the work's context reports a
// passed deadline at once through Err, Done and context.Cause, and a
// context derived from it before the pause ends with it. The keeper's
// timer is armed an hour away, so no timer ran.
func TestContextTellsTheTruthBeforeAnyTimer(t *testing.T) {
	k := newKeeper(3 * time.Hour)
	var l Lease
	ctx := k.Start(&l, context.Background(), context.Background(), time.Now(), &renewer{})
	defer l.End()
	derived, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := ctx.Err(); err != nil {
		t.Fatalf("a fresh lease: %v", err)
	}
	pastDeadline(&l)
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("Err() = %v after the deadline, want context.Canceled", ctx.Err())
	}
	if cause := context.Cause(ctx); cause != errExpired {
		t.Errorf("Cause = %v, want the expired cause", cause)
	}
	select {
	case <-derived.Done():
	default:
		t.Error("a context derived before the pause is still live")
	}
}

// TestDoneChecksTheDeadline: work that selects on Done() without calling
// Err() sees the lapse too.
func TestDoneChecksTheDeadline(t *testing.T) {
	k := newKeeper(3 * time.Hour)
	var l Lease
	ctx := k.Start(&l, context.Background(), context.Background(), time.Now(), &renewer{})
	defer l.End()
	pastDeadline(&l)
	select {
	case <-ctx.Done():
	default:
		t.Fatal("Done() is open after the deadline")
	}
}

// TestReleasedLeaseHasNoDeadline: once released (the outcome is stored),
// the lease no longer bounds the work.
func TestReleasedLeaseHasNoDeadline(t *testing.T) {
	k := newKeeper(3 * time.Hour)
	var l Lease
	ctx := k.Start(&l, context.Background(), context.Background(), time.Now(), &renewer{})
	l.Release()
	pastDeadline(&l) // what a late renewal could do; Release wins
	l.Release()
	if err := ctx.Err(); err != nil {
		t.Fatalf("a released lease ended the work: %v", err)
	}
	l.End()
	if ctx.Err() == nil {
		t.Fatal("End did not end the work")
	}
}

// TestRenewalsKeepTheLeaseAndALostOneEndsIt: renewals are sent while the
// work runs; the first that finds the lease gone ends the work with the
// lost cause.
func TestRenewalsKeepTheLeaseAndALostOneEndsIt(t *testing.T) {
	k := newKeeper(300 * time.Millisecond)
	r := &renewer{answers: make(chan error)}
	var l Lease
	ctx := k.Start(&l, context.Background(), context.Background(), time.Now(), r)
	defer l.End()
	for range 3 {
		select {
		case r.answers <- nil:
		case <-ctx.Done():
			t.Fatalf("ended while renewals succeed: %v", context.Cause(ctx))
		case <-time.After(10 * time.Second):
			t.Fatal("no renewal came")
		}
	}
	select {
	case r.answers <- errLost:
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal came")
	}
	<-ctx.Done()
	if cause := context.Cause(ctx); cause != errLost {
		t.Fatalf("Cause = %v, want the lost cause", cause)
	}
}

// TestShutdownEndsEveryLease: running work in every shard, and work
// started after.
func TestShutdownEndsEveryLease(t *testing.T) {
	k := newKeeper(time.Hour)
	running := make([]Lease, 2*shardCount)
	var ctxs []context.Context
	for i := range running {
		ctxs = append(ctxs, k.Start(&running[i], context.Background(), context.Background(), time.Now(), &renewer{}))
		defer running[i].End()
	}
	errShutdown := errors.New("shutdown")
	k.Shutdown(errShutdown)
	for range shardCount {
		var l Lease
		ctxs = append(ctxs, k.Start(&l, context.Background(), context.Background(), time.Now(), &renewer{}))
		defer l.End()
	}
	for i, ctx := range ctxs {
		if context.Cause(ctx) != errShutdown {
			t.Errorf("lease %d: Cause = %v, want the shutdown cause", i, context.Cause(ctx))
		}
	}
}

// signaller renews every lease it is asked to, and says so on renewed.
type signaller struct{ renewed chan struct{} }

func (s *signaller) Renew(context.Context) error {
	select {
	case s.renewed <- struct{}{}:
	default: // one signal is all the test waits for
	}
	return nil
}

// TestLeasesSpreadOverShardsAndEachIsRenewed: consecutive leases land in
// different shards (no one mutex for all), and every shard's timer sends
// its leases' renewals.
func TestLeasesSpreadOverShardsAndEachIsRenewed(t *testing.T) {
	k := newKeeper(3 * time.Second) // renewals 1 s in; the deadline is far behind them
	leases := make([]Lease, shardCount)
	renewers := make([]*signaller, shardCount)
	shards := make(map[*shard]bool)
	for i := range leases {
		renewers[i] = &signaller{renewed: make(chan struct{}, 1)}
		k.Start(&leases[i], context.Background(), context.Background(), time.Now(), renewers[i])
		defer leases[i].End()
		shards[leases[i].shard] = true
	}
	if len(shards) != shardCount {
		t.Fatalf("%d leases landed in %d shards, want %d", shardCount, len(shards), shardCount)
	}
	for i, r := range renewers {
		select {
		case <-r.renewed:
		case <-time.After(10 * time.Second):
			t.Fatalf("lease %d: no renewal came", i)
		}
		if err := leases[i].Context().Err(); err != nil {
			t.Fatalf("lease %d ended although its renewals succeed: %v", i, context.Cause(leases[i].Context()))
		}
	}
}
