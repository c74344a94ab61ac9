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
	l.keeper.mu.Lock()
	defer l.keeper.mu.Unlock()
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

// TestShutdownEndsEveryLease: running work and work started after.
func TestShutdownEndsEveryLease(t *testing.T) {
	k := newKeeper(time.Hour)
	var a, b Lease
	ctxA := k.Start(&a, context.Background(), context.Background(), time.Now(), &renewer{})
	defer a.End()
	errShutdown := errors.New("shutdown")
	k.Shutdown(errShutdown)
	ctxB := k.Start(&b, context.Background(), context.Background(), time.Now(), &renewer{})
	defer b.End()
	for _, ctx := range []context.Context{ctxA, ctxB} {
		if context.Cause(ctx) != errShutdown {
			t.Errorf("Cause = %v, want the shutdown cause", context.Cause(ctx))
		}
	}
}
