package idempotency_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// No answer leaves before its outcome is stored (issue 19): these tests
// look at what the client has received at the moment the store is asked
// to complete the record, and at what it gets when that fails.

// completeHook runs before on each Complete, before the store does; an
// error from it fails the call without reaching the store. With
// loseLease, the claim is first freed, as a lapsed lease is.
type completeHook struct {
	idempotency.Store
	before    func() error
	loseLease bool
}

func (s *completeHook) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if err := s.before(); err != nil {
		if s.loseLease {
			if err := s.Store.Release(ctx, key, token); err != nil {
				return err
			}
		}
		return err
	}
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

// wire is a response writer that tells whether anything reached the
// client yet.
type wire struct {
	*httptest.ResponseRecorder
	sent atomic.Bool
}

func newWire() *wire { return &wire{ResponseRecorder: httptest.NewRecorder()} }

func (w *wire) WriteHeader(code int) {
	if code >= 200 {
		w.sent.Store(true)
	}
	w.ResponseRecorder.WriteHeader(code)
}

func (w *wire) Write(p []byte) (int, error) {
	w.sent.Store(true)
	return w.ResponseRecorder.Write(p)
}

func serveWire(h http.Handler, r *http.Request) *wire {
	w := newWire()
	h.ServeHTTP(w, r)
	return w
}

func TestResponseLeavesOnlyOnceStored(t *testing.T) {
	w := newWire()
	var sentAtComplete atomic.Bool
	store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
		sentAtComplete.Store(w.sent.Load())
		return nil
	}}
	handler := createVenue()
	h := newMiddleware(t, store).Handler(handler)
	h.ServeHTTP(w, post("k", `{}`))

	assert.False(t, sentAtComplete.Load(), "nothing reached the client before the outcome was stored")
	assert.Equal(t, http.StatusCreated, w.Code)
	assert.Equal(t, "/venues/1", w.Header().Get("Location"))
	assert.Equal(t, `{"execution":1,"request":{}}`, w.Body.String())

	replay := serve(h, post("k", `{}`))
	assert.Equal(t, w.Body.String(), replay.Body.String())
	assert.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"))
}

// TestNoSuccessTheStoreDoesNotHold: storing the outcome fails after the
// handler answered 201. Before issue 19 the client had the 201 already,
// nothing was stored, and its retry ran the handler again and answered
// differently. Now the client gets 503 (without the handler's headers),
// the key is free, and the retry's answer is the one that is replayed.
func TestNoSuccessTheStoreDoesNotHold(t *testing.T) {
	for _, tt := range []struct {
		name   string
		err    error
		anchor string
	}{
		{"store fails", errors.New("connection reset"), "#ErrStoreUnavailable"},
		{"lease lost", idempotency.ErrLeaseLost, "#ErrLeaseLost"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var fail atomic.Bool
			fail.Store(true)
			store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
				if fail.Swap(false) {
					return tt.err
				}
				return nil
			}, loseLease: errors.Is(tt.err, idempotency.ErrLeaseLost)}
			obs := &observed{}
			handler := createVenue()
			h := newMiddleware(t, store, idempotency.Options{Observer: obs.observe}).Handler(handler)

			first := serve(h, post("k", `{}`))
			p := requireProblem(t, first, http.StatusServiceUnavailable)
			assert.Contains(t, p.Type, tt.anchor)
			assert.Equal(t, "1", first.Header().Get("Retry-After"))
			assert.Empty(t, first.Header().Get("Location"), "the handler's headers went with its response")
			assert.NotEqual(t, idempotency.OutcomeExecuted, obs.last().Outcome)

			retry := serve(h, post("k", `{}`))
			require.Equal(t, http.StatusCreated, retry.Code, retry.Body)
			assert.Empty(t, retry.Header().Get("X-Idempotent-Replayed"), "the key was free: the handler ran again")
			assert.Equal(t, `{"execution":2,"request":{}}`, retry.Body.String())

			replay := serve(h, post("k", `{}`))
			assert.Equal(t, retry.Body.String(), replay.Body.String(), "the replay is what the client saw")
			assert.Equal(t, int32(2), handler.calls.Load())
		})
	}
}

// TestLargeResponseStoredBeforeItsFirstByte: a response that outgrows
// WithMaxStoredBytes is stored (status and headers, body omitted) as it
// passes the limit, before any of it is sent; the client still gets it
// whole, and a replay gets the status and headers with an empty body.
func TestLargeResponseStoredBeforeItsFirstByte(t *testing.T) {
	w := newWire()
	var sentAtComplete atomic.Bool
	store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
		sentAtComplete.Store(w.sent.Load())
		return nil
	}}
	chunk := strings.Repeat("x", 10)
	h := newMiddleware(t, store, idempotency.Options{MaxStoredBytes: 25}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusCreated)
		for range 5 {
			_, err := io.WriteString(w, chunk)
			require.NoError(t, err)
		}
	}))
	h.ServeHTTP(w, post("k", `{}`))
	assert.False(t, sentAtComplete.Load(), "the outcome was stored before the first byte left")
	assert.Equal(t, http.StatusCreated, w.Code)
	assert.Equal(t, strings.Repeat(chunk, 5), w.Body.String(), "the client got the whole body")

	replay := serve(h, post("k", `{}`))
	assert.Equal(t, http.StatusCreated, replay.Code)
	assert.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, "text/plain", replay.Header().Get("Content-Type"))
	assert.Equal(t, "0", replay.Header().Get("Content-Length"))
	assert.Empty(t, replay.Body.String())
}

// TestLargeResponseStoringFails: when storing a large response fails as it
// passes the limit, the client gets 503 and nothing of the response; the
// handler's next Write fails and its context ends, so it can stop; the
// key is free for the retry.
func TestLargeResponseStoringFails(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
		if fail.Swap(false) {
			return errors.New("connection reset")
		}
		return nil
	}}
	var writeErr, ctxErr error
	var calls atomic.Int32
	h := newMiddleware(t, store, idempotency.Options{MaxStoredBytes: 8}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		w.WriteHeader(http.StatusOK)
		for i := range 3 {
			if _, err := fmt.Fprintf(w, "execution %d part %d;", n, i); err != nil {
				writeErr, ctxErr = err, r.Context().Err()
				return
			}
		}
	}))
	first := serveWire(h, post("k", `{}`))
	requireProblem(t, first.ResponseRecorder, http.StatusServiceUnavailable)
	assert.ErrorIs(t, writeErr, idempotency.ErrStoreUnavailable, "the handler learns that its response was given up")
	assert.Error(t, ctxErr, "and its context ended")

	retry := serve(h, post("k", `{}`))
	assert.Equal(t, http.StatusOK, retry.Code)
	assert.Equal(t, "execution 2 part 0;execution 2 part 1;execution 2 part 2;", retry.Body.String())
}

// TestStreamingPassesThrough: WithStreaming sends the response as it is
// written (the weaker promise, chosen per route), and Flush writes through.
func TestStreamingPassesThrough(t *testing.T) {
	w := newWire()
	var sentAtComplete, sentAfterFlush atomic.Bool
	store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
		sentAtComplete.Store(w.sent.Load())
		return nil
	}}
	h := newMiddleware(t, store, idempotency.Options{Streaming: true}).Handler(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		io.WriteString(rw, "part 1;")
		assert.NoError(t, http.NewResponseController(rw).Flush())
		sentAfterFlush.Store(w.sent.Load())
		io.WriteString(rw, "part 2")
	}))
	h.ServeHTTP(w, post("k", `{}`))
	assert.True(t, sentAfterFlush.Load(), "Flush wrote through")
	assert.True(t, sentAtComplete.Load(), "streamed before it was stored")
	assert.Equal(t, "part 1;part 2", w.Body.String())
	assert.Equal(t, "part 1;part 2", serve(h, post("k", `{}`)).Body.String(), "and stored whole")
}

// releaseFails is a store whose Release always fails.
type releaseFails struct{ idempotency.Store }

func (s *releaseFails) Release(context.Context, string, string) error {
	return errors.New("connection reset")
}

// TestOwnErrorSentWhenFreeingFails: a handler's own 503 is not a response
// to store, so its client gets it even when freeing the key fails (before,
// the held 503 became a 500 problem). Found by internal/lincheck.
func TestOwnErrorSentWhenFreeingFails(t *testing.T) {
	h := newMiddleware(t, &releaseFails{idempotency.NewMemoryStore(idempotency.MemoryOptions{})}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "busy")
	}))
	w := serve(h, post("k", `{}`))
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)
	assert.Equal(t, "busy", w.Body.String())
	assert.Equal(t, "7", w.Header().Get("Retry-After"))
}
