package idempotency

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// TestWaitLostNotificationEndsAtDeadline: the instance that completes the
// key publishes nothing (a notification lost), so the waiter on another
// instance is never woken; its re-read at the deadline still finds the
// outcome and replays it instead of answering 409.
func TestWaitLostNotificationEndsAtDeadline(t *testing.T) {
	mr := miniredis.RunT(t)
	newStore := func() *RedisStore {
		client := redis.NewClient(&redis.Options{Addr: mr.Addr()})
		t.Cleanup(func() { client.Close() })
		s, err := NewRedisStore(client, RedisOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	silent, listening := newStore(), newStore()
	silent.publish = "" // its Complete wakes nobody

	entered, release := make(chan struct{}), make(chan struct{})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "created")
	})
	first, err := New(silent, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const bound = 700 * time.Millisecond
	// The first request completes once the waiter waits: a waiter
	// re-reads the key once its watch is in place.
	watched := &onAcquire{Store: listening, n: 2, do: func() { close(release) }}
	waiting, err := New(watched, Options{Wait: bound, MaxWaiters: 10})
	if err != nil {
		t.Fatal(err)
	}
	req := func() *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(`{}`))
		r.Header.Set("Idempotency-Key", "k")
		return r
	}
	done := make(chan struct{})
	go func() { first.Handler(handler).ServeHTTP(httptest.NewRecorder(), req()); close(done) }()
	select {
	case <-entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the first handler did not start")
	}
	start := time.Now()
	w := httptest.NewRecorder()
	waiting.Handler(handler).ServeHTTP(w, req())
	took := time.Since(start)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the first request did not end")
	}
	if w.Code != http.StatusCreated || w.Header().Get("X-Idempotent-Replayed") != "true" {
		t.Fatalf("got %d %q, want the replay", w.Code, w.Body)
	}
	// Not woken: it answered at the deadline, and not at the end of the
	// 30 s lease either (the margin is for a loaded machine).
	if took < bound || took > bound+2*time.Second {
		t.Errorf("answered after %v; without a wake-up it re-reads at the %v deadline", took, bound)
	}
}

// onAcquire is a store that calls do once, after its nth Acquire call.
type onAcquire struct {
	Store
	calls atomic.Int32
	n     int32
	do    func()
}

func (s *onAcquire) Unwrap() Store { return s.Store }

func (s *onAcquire) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (uint64, *Record, error) {
	fence, existing, err := s.Store.Acquire(ctx, key, claim, lease)
	if s.calls.Add(1) == s.n {
		s.do()
	}
	return fence, existing, err
}
