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
	"github.com/seed70ea8305/idempotency/internal/recordkey"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// phasedHandler is a handler in two phases, as in Brandur Leach's design:
// it creates an object (counted in created) and records a recovery point
// naming it, then finishes. failFirst makes the first attempt fail after
// its recovery point, as a downstream call would.
type phasedHandler struct {
	created   atomic.Int32
	finished  atomic.Int32
	failFirst atomic.Bool
}

func (h *phasedHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	claim, _ := idempotency.ClaimFromContext(r.Context())
	id := string(claim.RecoveryData)
	if claim.RecoveryPoint != "created" {
		id = fmt.Sprintf("obj_%d", h.created.Add(1))
		if err := claim.Checkpoint(r.Context(), "created", []byte(id)); err != nil {
			http.Error(w, err.Error(), idempotency.StatusCode(err))
			return
		}
	}
	if h.failFirst.CompareAndSwap(true, false) {
		http.Error(w, "downstream failed", http.StatusBadGateway)
		return
	}
	h.finished.Add(1)
	w.WriteHeader(http.StatusCreated)
	io.WriteString(w, id)
}

// TestRecoveryPointResumesAfterFailure: an attempt that failed after its
// recovery point leaves it for the retry, which skips the phase already
// done; meanwhile the key is bound to that request.
func TestRecoveryPointResumesAfterFailure(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			store, _ := kind.new(t)
			h := &phasedHandler{}
			h.failFirst.Store(true)
			mw := newMiddleware(t, store).Handler(h)

			w := serve(mw, post("k1", `{"name":"a"}`))
			require.Equal(t, http.StatusBadGateway, w.Code, w.Body.String())

			w = serve(mw, post("k1", `{"name":"other"}`))
			requireProblem(t, w, http.StatusUnprocessableEntity)

			w = serve(mw, post("k1", `{"name":"a"}`))
			require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
			assert.Equal(t, "obj_1", w.Body.String(), "the retry finishes the object the first attempt created")
			assert.Equal(t, int32(1), h.created.Load(), "the phase before the recovery point ran once")

			w = serve(mw, post("k1", `{"name":"a"}`))
			require.Equal(t, http.StatusCreated, w.Code)
			assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, "obj_1", w.Body.String())
			assert.Equal(t, int32(1), h.finished.Load())

			// A fresh key starts from nothing.
			w = serve(mw, post("k2", `{"name":"a"}`))
			require.Equal(t, http.StatusCreated, w.Code)
			assert.Equal(t, "obj_2", w.Body.String())
		})
	}
}

// TestRecoveryPointAfterCrash: the instance running the handler is cut off
// from Redis after its recovery point (as if it crashed); once its lease
// lapses another instance's retry resumes from that point.
func TestRecoveryPointAfterCrash(t *testing.T) {
	mr, direct := redistest.Miniredis(t)
	proxy := startProxy(t, mr.Addr())
	// Miniredis' clock moves only when told to, so the lease lapses in
	// Redis by FastForward below; in the cut-off instance it lapses by
	// its own clock, after at most a lease. The store timeout leaves its
	// calls before the cut, through the proxy, time on a busy machine.
	const lease, storeTimeout = 2 * time.Second, time.Second
	prefix := idempotency.RedisOptions{Prefix: redistest.Prefix(t)}
	cutOff, err := idempotency.NewRedisStore(faultClient(t, proxy.Addr(), faultReadTimeout), prefix)
	require.NoError(t, err)
	healthy, err := idempotency.NewRedisStore(direct, prefix)
	require.NoError(t, err)

	var created atomic.Int32
	checkpointed := make(chan error, 1)
	crashing := newMiddleware(t, cutOff, idempotency.Options{Lease: lease, StoreTimeout: storeTimeout}).
		Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			claim, _ := idempotency.ClaimFromContext(r.Context())
			created.Add(1)
			checkpointed <- claim.Checkpoint(r.Context(), "created", []byte("obj_1"))
			<-r.Context().Done() // the lease is lost: this attempt is over
		}))
	resumed := make(chan idempotency.Claim, 1)
	survivor := newMiddleware(t, healthy, idempotency.Options{Lease: lease}).
		Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			claim, _ := idempotency.ClaimFromContext(r.Context())
			resumed <- claim
			w.WriteHeader(http.StatusCreated)
			w.Write(claim.RecoveryData)
		}))

	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(crashing, post("k", `{}`)) }()
	require.NoError(t, waitFor(t, checkpointed, eventBound, "the handler did not reach its checkpoint"))
	proxy.Blackhole()
	// The cut-off instance gives up when its lease cannot be renewed.
	waitFor(t, done, eventBound, "the cut-off instance did not give up")

	w := serve(survivor, post("k", `{}`))
	requireProblem(t, w, http.StatusConflict) // the lapsed lease has not ended by Redis' clock yet
	mr.FastForward(lease)

	w = serve(survivor, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
	assert.Equal(t, "obj_1", w.Body.String())
	claim := <-resumed
	assert.Equal(t, "created", claim.RecoveryPoint)
	assert.Equal(t, int32(1), created.Load())
}

// TestCheckpointErrors: what Checkpoint refuses, and a store without
// recovery points.
func TestCheckpointErrors(t *testing.T) {
	var claim idempotency.Claim
	assert.ErrorIs(t, claim.Checkpoint(context.Background(), "x", nil), idempotency.ErrNoClaim)

	store, _ := storeKinds[1].new(t) // miniredis
	var errs []error
	mw := newMiddleware(t, onlyStore{store}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		claim, _ := idempotency.ClaimFromContext(r.Context())
		errs = append(errs,
			claim.Checkpoint(r.Context(), "", nil),
			claim.Checkpoint(r.Context(), strings.Repeat("p", 256), nil),
			claim.Checkpoint(r.Context(), "p", make([]byte, 64<<10+1)),
			claim.Checkpoint(r.Context(), "p", nil))
	}))
	serve(mw, post("k", `{}`))
	require.Len(t, errs, 4)
	for _, err := range errs[:3] {
		assert.Error(t, err)
	}
	assert.ErrorIs(t, errs[3], errors.ErrUnsupported, "a store without recovery points")
}

// onlyStore hides every method of a store but the Store interface's.
type onlyStore struct{ idempotency.Store }

// TestHeldResponse: a held response reaches the client only once it is
// stored; when storing it fails the client gets 503, not the success.
func TestHeldResponse(t *testing.T) {
	mr, _ := redistest.Miniredis(t)
	proxy := startProxy(t, mr.Addr())
	// go-redis waits up to faultReadTimeout for a reply, longer than the
	// store timeout, so the late reply below is not retried and answered
	// in time.
	store, err := idempotency.NewRedisStore(faultClient(t, proxy.Addr(), faultReadTimeout), idempotency.RedisOptions{Prefix: redistest.Prefix(t)})
	require.NoError(t, err)

	var runs atomic.Int32
	flushed, release := make(chan struct{}, 1), make(chan struct{})
	var slowStore atomic.Bool
	// The store timeout leaves the store calls time on a busy machine; the
	// delayed reply below comes after it, when Heal sends it.
	const storeTimeout = time.Second
	mw := newMiddleware(t, store, idempotency.Options{StoreTimeout: storeTimeout}).
		Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			claim, _ := idempotency.ClaimFromContext(r.Context())
			claim.HoldResponse()
			runs.Add(1)
			w.Header().Set("Location", "/venues/1")
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, `{"id":1}`)
			http.NewResponseController(w).Flush() // does nothing while held
			flushed <- struct{}{}
			<-release
			if slowStore.Load() {
				proxy.DelayNextReplies(1, time.Minute) // the completion's reply
			}
		}))
	// What reached the connection: whatever the middleware lets through
	// is written to it by the handler's goroutine, before the handler
	// returns, so this is exact at any moment the handler is blocked.
	var reached atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mw.ServeHTTP(&connWriter{ResponseWriter: w, reached: &reached}, r)
	}))
	t.Cleanup(srv.Close)
	send := func(key string) chan *http.Response {
		got := make(chan *http.Response, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(`{}`))
			req.Header.Set("Idempotency-Key", key)
			resp, err := srv.Client().Do(req)
			if err != nil {
				close(got)
				return
			}
			got <- resp
		}()
		return got
	}
	body := func(resp *http.Response) string {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return string(b)
	}

	got := send("k1")
	waitFor(t, flushed, eventBound, "the handler did not write its response")
	require.False(t, reached.Load(), "the response was sent before it was stored")
	release <- struct{}{}
	resp := waitFor(t, got, eventBound, "no response")
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, `{"id":1}`, body(resp))
	assert.Equal(t, "/venues/1", resp.Header.Get("Location"))

	resp = waitFor(t, send("k1"), eventBound, "no replay")
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "true", resp.Header.Get("X-Idempotent-Replayed"))
	assert.Equal(t, `{"id":1}`, body(resp))
	assert.Equal(t, int32(1), runs.Load())

	// The completion's reply comes after the store timeout: the client
	// gets 503, not a 201 that might not have been stored. Here it was
	// (the reply was late, not the write), so the retry replays it.
	slowStore.Store(true)
	got = send("k2")
	waitFor(t, flushed, eventBound, "the handler did not write its response")
	release <- struct{}{}
	resp = waitFor(t, got, eventBound, "no response")
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, body(resp))
	assert.Equal(t, "application/problem+json", resp.Header.Get("Content-Type"))
	proxy.Heal() // sends the delayed reply now; the retry does not wait for it
	resp = waitFor(t, send("k2"), eventBound, "no replay")
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "true", resp.Header.Get("X-Idempotent-Replayed"))
	assert.Equal(t, `{"id":1}`, body(resp))
	assert.Equal(t, int32(2), runs.Load())
}

// connWriter records whether anything of a response reached the
// connection under it.
type connWriter struct {
	http.ResponseWriter
	reached *atomic.Bool
}

func (w *connWriter) WriteHeader(code int) {
	w.reached.Store(true)
	w.ResponseWriter.WriteHeader(code)
}

func (w *connWriter) Write(p []byte) (int, error) {
	w.reached.Store(true)
	return w.ResponseWriter.Write(p)
}

func (w *connWriter) Flush() {
	w.reached.Store(true)
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *connWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// TestCheckpointFindsLeaseLost: a checkpoint refused because another
// attempt took the key over cancels the work, as a failed renewal does,
// and the report says the lease was lost.
func TestCheckpointFindsLeaseLost(t *testing.T) {
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	obs := &observed{}
	taken := make(chan struct{})
	var checkpointErr, cause error
	entered := make(chan struct{})
	mw := newMiddleware(t, store, idempotency.Options{Observer: obs.observe}).
		Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(entered)
			<-taken
			claim, _ := idempotency.ClaimFromContext(r.Context())
			checkpointErr = claim.Checkpoint(r.Context(), "step", nil)
			cause = context.Cause(r.Context())
			idempotency.WriteError(w, r, checkpointErr)
		}))
	done := make(chan *httptest.ResponseRecorder, 1)
	go func() { done <- serve(mw, post("k", `{}`)) }()

	// Once the handler runs, the key is claimed. The store's clock passes
	// the lease (the engine's timer has not) and another owner claims it.
	waitFor(t, entered, eventBound, "the handler did not start")
	rec, err := store.Get(context.Background(), recordkey.Name("http", "", "k"))
	require.NoError(t, err)
	require.NotNil(t, rec, "the key is claimed while the handler runs")
	clock.Advance(time.Minute)
	fence, _, err := store.Acquire(context.Background(), recordkey.Name("http", "", "k"), idempotency.Record{Token: "other", Fingerprint: "x"}, time.Minute)
	require.NoError(t, err)
	require.NotZero(t, fence)
	close(taken)

	requireProblem(t, waitFor(t, done, eventBound, "the request did not end"), http.StatusServiceUnavailable)
	assert.ErrorIs(t, checkpointErr, idempotency.ErrLeaseLost)
	assert.ErrorIs(t, cause, idempotency.ErrLeaseLost, "the work's context was cancelled with it")
	assert.ErrorIs(t, obs.last().Err, idempotency.ErrLeaseLost, "the report says why the attempt ended")
}
