package idempotency

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestBoundedReturnsByTheDeadline(t *testing.T) {
	late := make(chan int, 1)
	start := time.Now()
	_, err := bounded(context.Background(), 20*time.Millisecond, func(ctx context.Context) (int, error) {
		time.Sleep(200 * time.Millisecond) // a call that ignores its context
		return 42, nil
	}, func(v int, err error) { late <- v })
	if elapsed := time.Since(start); elapsed > 150*time.Millisecond {
		t.Fatalf("returned after %v, want about 20ms", elapsed)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	select {
	case v := <-late:
		if v != 42 {
			t.Fatalf("abandoned result %d, want 42", v)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the abandoned call's result never arrived")
	}
}

func TestBoundedPassesResults(t *testing.T) {
	boom := errors.New("boom")
	v, err := bounded(context.Background(), time.Second, func(ctx context.Context) (int, error) {
		if _, ok := ctx.Deadline(); !ok {
			t.Error("the call's context has no deadline")
		}
		return 7, boom
	}, func(int, error) { t.Error("a finished call is not abandoned") })
	if v != 7 || err != boom {
		t.Fatalf("got %d, %v", v, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = bounded(ctx, time.Second, func(ctx context.Context) (int, error) {
		<-ctx.Done()
		return 0, ctx.Err()
	}, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want Canceled", err)
	}
}
