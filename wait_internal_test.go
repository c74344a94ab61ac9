package idempotency

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
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
		s, err := NewRedisStore(client)
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
	first, err := New(silent)
	if err != nil {
		t.Fatal(err)
	}
	const bound = 700 * time.Millisecond
	waiting, err := New(listening, WithWait(bound, 10))
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
	<-entered
	start := time.Now()
	go func() { time.Sleep(100 * time.Millisecond); close(release) }()
	w := httptest.NewRecorder()
	waiting.Handler(handler).ServeHTTP(w, req())
	took := time.Since(start)
	<-done
	if w.Code != http.StatusCreated || w.Header().Get("X-Idempotent-Replayed") != "true" {
		t.Fatalf("got %d %q, want the replay", w.Code, w.Body)
	}
	if took < bound || took > bound+500*time.Millisecond {
		t.Errorf("answered after %v; without a wake-up it re-reads at the %v deadline", took, bound)
	}
}
