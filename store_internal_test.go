package idempotency

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A Redis client that ignores deadlines: the store's call returns by the
// context's deadline all the same, and leaves the call to finish alone.
func TestRedisCallReturnsByTheDeadline(t *testing.T) {
	s := &RedisStore{honoursDeadlines: false}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	finished := make(chan struct{})
	start := time.Now()
	err := s.call(ctx, 0, func(context.Context) error {
		defer close(finished)
		time.Sleep(200 * time.Millisecond) // a call that ignores its context
		return nil
	})
	if elapsed := time.Since(start); elapsed > 150*time.Millisecond {
		t.Fatalf("returned after %v, want about 20ms", elapsed)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	select {
	case <-finished:
	case <-time.After(2 * time.Second):
		t.Fatal("the abandoned call never finished")
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
