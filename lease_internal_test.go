package idempotency

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestWorkContextTellsTheTruthBeforeAnyTimer: a process resumed from a
// pause longer than its lease (SIGSTOP, a GC pause, a frozen VM) finds its
// lease deadline passed before the lease timer has had a chance to run.
// The work's context must report it at once: Err, Done and context.Cause,
// and a context derived from it before the pause. Here the deadline is
// moved into the past without any timer firing (the timer is armed for
// lease/3, an hour away), as the resumed process finds it.
func TestWorkContextTellsTheTruthBeforeAnyTimer(t *testing.T) {
	s := settings{lease: 3 * time.Hour, ttl: 24 * time.Hour, storeTimeout: time.Second}
	e := newEngine(NewMemoryStore(), &s, false)
	a := &attempt{}
	ctx := e.start(a, context.Background(), acquired{fence: 1, sent: time.Now()}, false)
	defer func() {
		e.leases.release(a)
		a.cancel(nil)
	}()
	derived, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := ctx.Err(); err != nil {
		t.Fatalf("a fresh lease: %v", err)
	}

	e.leases.mu.Lock()
	a.setDeadline(time.Now().Add(-time.Nanosecond))
	e.leases.mu.Unlock()

	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("Err() = %v after the deadline, want context.Canceled", ctx.Err())
	}
	if cause := context.Cause(ctx); !errors.Is(cause, ErrLeaseLost) {
		t.Errorf("Cause = %v, want ErrLeaseLost", cause)
	}
	select {
	case <-ctx.Done():
	default:
		t.Error("Done() is open after the deadline")
	}
	select {
	case <-derived.Done():
	default:
		t.Error("a context derived before the pause is still live")
	}
}

// TestWorkContextDoneChecksTheDeadline: a handler that selects on Done()
// without ever calling Err() sees the lapse too.
func TestWorkContextDoneChecksTheDeadline(t *testing.T) {
	s := settings{lease: 3 * time.Hour, ttl: 24 * time.Hour, storeTimeout: time.Second}
	e := newEngine(NewMemoryStore(), &s, false)
	a := &attempt{}
	ctx := e.start(a, context.Background(), acquired{fence: 1, sent: time.Now()}, false)
	defer func() {
		e.leases.release(a)
		a.cancel(nil)
	}()
	e.leases.mu.Lock()
	a.setDeadline(time.Now().Add(-time.Nanosecond))
	e.leases.mu.Unlock()
	select {
	case <-ctx.Done():
	default:
		t.Fatal("Done() is open after the deadline")
	}
	if !errors.Is(context.Cause(ctx), ErrLeaseLost) {
		t.Errorf("Cause = %v, want ErrLeaseLost", context.Cause(ctx))
	}
}
