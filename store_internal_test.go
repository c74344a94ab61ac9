package idempotency

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A Redis client that ignores deadlines: the store's call returns by the
// context's deadline all the same, and leaves the call to finish alone.
// The call blocks until the test lets it go, so returning at all proves
// the store did not wait for it, however slow the machine.
func TestRedisCallReturnsByTheDeadline(t *testing.T) {
	s := &RedisStore{honoursDeadlines: false}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	release, finished := make(chan struct{}), make(chan struct{})
	defer func() {
		close(release)
		select {
		case <-finished:
		case <-time.After(30 * time.Second):
			t.Fatal("the abandoned call never finished")
		}
	}()
	returned := make(chan error, 1)
	start := time.Now()
	go func() {
		returned <- s.call(ctx, 0, func(context.Context) error {
			defer close(finished)
			<-release // a call that ignores its context
			return nil
		})
	}()
	select {
	case err := <-returned:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		// About 20 ms; the margin is for a loaded machine.
		if elapsed := time.Since(start); elapsed > 2*time.Second {
			t.Fatalf("returned after %v, want about 20ms", elapsed)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the store's call waited for the Redis call that ignores its deadline")
	}
}

func TestRedisCallPassesResults(t *testing.T) {
	boom := errors.New("boom")
	for _, honours := range []bool{false, true} {
		s := &RedisStore{honoursDeadlines: honours}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		v := 0
		err := s.call(ctx, 0, func(ctx context.Context) error {
			if _, ok := ctx.Deadline(); !ok {
				t.Error("the call's context has no deadline")
			}
			v = 7
			return boom
		})
		cancel()
		if v != 7 || err != boom {
			t.Fatalf("honours=%v: got %d, %v", honours, v, err)
		}
	}
}
