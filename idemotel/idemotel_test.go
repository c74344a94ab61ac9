package idemotel_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
)

// Every key and event ID in these tests contains "secret", as do the
// scope and the request path: no attribute value may.
const leakMarker = "secret"

func assertNoLeak(t *testing.T, c collected) {
	t.Helper()
	for _, kv := range c.attrs {
		assert.NotContains(t, kv, leakMarker, "an attribute carries a key, scope, event ID or raw path")
	}
}

const memory = "memory"

// TestRequestOutcomes drives the real middleware on a MemoryStore wrapped
// by Metrics.Store through each outcome and checks every counter value
// and histogram count exactly.
func TestRequestOutcomes(t *testing.T) {
	fail := func() error { return errors.New("connection refused") }
	leaseLost := func() error { return idempotency.ErrLeaseLost }
	faulty := "*idemotel_test.faultyStore"

	for _, tc := range []struct {
		name    string
		store   func() idempotency.Store // default: a MemoryStore
		handler http.Handler             // default: created (201)
		block   bool                     // the handler is a *blocking, given to drive
		drive   func(t *testing.T, h http.Handler, b *blocking)
		want    map[string]int64
	}{{
		name: "first request",
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			assert.Equal(t, http.StatusCreated, serve(h, newRequest("secret-key-1", body)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeExecuted, 201, ""):               1,
			durationSeries(idempotency.OutcomeExecuted, 201, ""):              1,
			storeSeries("idempotency.store.duration", memory, "acquire", ""):  1,
			storeSeries("idempotency.store.duration", memory, "complete", ""): 1,
		},
	}, {
		name: "replay",
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			serve(h, newRequest("secret-key-1", body))
			for range 2 {
				w := serve(h, newRequest("secret-key-1", body))
				assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
			}
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeExecuted, 201, ""):               1,
			requestSeries(idempotency.OutcomeReplayed, 201, ""):               2,
			durationSeries(idempotency.OutcomeExecuted, 201, ""):              1,
			storeSeries("idempotency.store.duration", memory, "acquire", ""):  3,
			storeSeries("idempotency.store.duration", memory, "complete", ""): 1,
		},
	}, {
		name:  "concurrent duplicate (409)",
		block: true,
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				assert.Equal(t, http.StatusCreated, serve(h, newRequest("secret-key-1", body)).Code)
			}()
			<-b.running
			assert.Equal(t, http.StatusConflict, serve(h, newRequest("secret-key-1", body)).Code)
			close(b.release)
			wg.Wait()
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeExecuted, 201, ""):               1,
			requestSeries(idempotency.OutcomeInFlight, 409, "key_in_use"):     1,
			durationSeries(idempotency.OutcomeExecuted, 201, ""):              1,
			storeSeries("idempotency.store.duration", memory, "acquire", ""):  2,
			storeSeries("idempotency.store.duration", memory, "complete", ""): 1,
		},
	}, {
		name: "same key, other request (422)",
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			serve(h, newRequest("secret-key-1", body))
			assert.Equal(t, http.StatusUnprocessableEntity, serve(h, newRequest("secret-key-1", `{"seats":3}`)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeExecuted, 201, ""):                     1,
			requestSeries(idempotency.OutcomeMismatch, 422, "fingerprint_mismatch"): 1,
			durationSeries(idempotency.OutcomeExecuted, 201, ""):                    1,
			storeSeries("idempotency.store.duration", memory, "acquire", ""):        2,
			storeSeries("idempotency.store.duration", memory, "complete", ""):       1,
		},
	}, {
		name: "missing and malformed keys (400)",
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			assert.Equal(t, http.StatusBadRequest, serve(h, newRequest("", body)).Code)
			assert.Equal(t, http.StatusBadRequest, serve(h, newRequest("secret key with spaces", body)).Code)
			assert.Equal(t, http.StatusBadRequest, serve(h, newRequest(strings.Repeat("secret", 50), body)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeRejected, 400, "key_missing"): 1,
			requestSeries(idempotency.OutcomeRejected, 400, "key_invalid"): 2,
		},
	}, {
		name: "handler fails (500): released",
		handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "boom", http.StatusInternalServerError)
		}),
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			assert.Equal(t, http.StatusInternalServerError, serve(h, newRequest("secret-key-1", body)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeReleased, 500, ""):              1,
			durationSeries(idempotency.OutcomeReleased, 500, ""):             1,
			storeSeries("idempotency.store.duration", memory, "acquire", ""): 1,
			storeSeries("idempotency.store.duration", memory, "release", ""): 1,
		},
	}, {
		name: "store fails after the handler ran",
		store: func() idempotency.Store {
			return &faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), complete: fail}
		},
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			// The response was held: the client gets 503, not a 201
			// the store does not hold.
			assert.Equal(t, http.StatusServiceUnavailable, serve(h, newRequest("secret-key-1", body)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeStoreError, 503, "store_unavailable"):  1,
			durationSeries(idempotency.OutcomeStoreError, 503, "store_unavailable"): 1,
			storeSeries("idempotency.store.duration", faulty, "acquire", ""):        1,
			storeSeries("idempotency.store.duration", faulty, "complete", "_OTHER"): 1,
			storeSeries("idempotency.store.errors", faulty, "complete", "_OTHER"):   1,
			// The key is freed for the client's retry.
			storeSeries("idempotency.store.duration", faulty, "release", ""): 1,
		},
	}, {
		name: "lease lapsed before the response was stored",
		store: func() idempotency.Store {
			return &faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), complete: leaseLost}
		},
		drive: func(t *testing.T, h http.Handler, b *blocking) {
			// The response was held: the client gets 503, not a 201
			// the store does not hold.
			assert.Equal(t, http.StatusServiceUnavailable, serve(h, newRequest("secret-key-1", body)).Code)
		},
		want: map[string]int64{
			requestSeries(idempotency.OutcomeLeaseLost, 503, "lease_lost"):              1,
			durationSeries(idempotency.OutcomeLeaseLost, 503, "lease_lost"):             1,
			series("idempotency.lease.lost", "kind", "http", "outcome", "lease_lost"):   1,
			storeSeries("idempotency.store.duration", faulty, "acquire", ""):            1,
			storeSeries("idempotency.store.duration", faulty, "complete", "lease_lost"): 1,
			storeSeries("idempotency.store.errors", faulty, "complete", "lease_lost"):   1,
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			m, reader := newMetrics(t)
			inner := idempotency.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
			if tc.store != nil {
				inner = tc.store()
			}
			handler, b := tc.handler, newBlocking()
			switch {
			case tc.block:
				handler = b
			case handler == nil:
				handler = created
			}
			h := serveMux(middleware(t, m.Store(inner), idempotency.Options{Observer: m.ObserveRequest}).Handler(handler))
			tc.drive(t, h, b)
			c := collect(t, reader)
			assert.Equal(t, tc.want, c.values, "collected:\n%s", c)
			assertNoLeak(t, c)
		})
	}
}

// TestCheckpointAndGetMeasured: a handler's recovery point and a webhook
// event lookup go through the wrapper, which times them.
func TestCheckpointAndGetMeasured(t *testing.T) {
	m, reader := newMetrics(t)
	store := m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	h := serveMux(middleware(t, store, idempotency.Options{Observer: m.ObserveRequest}).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		claim, _ := idempotency.ClaimFromContext(r.Context())
		require.NoError(t, claim.Checkpoint(r.Context(), "step", []byte("x")))
		created.ServeHTTP(w, r)
	})))
	assert.Equal(t, http.StatusCreated, serve(h, newRequest("secret-key-1", body)).Code)
	got, err := store.(idempotency.Inspector).Get(context.Background(), "no-such-key")
	require.NoError(t, err)
	assert.Nil(t, got)
	c := collect(t, reader)
	assert.Equal(t, int64(1), c.values[storeSeries("idempotency.store.duration", memory, "checkpoint", "")], "collected:\n%s", c)
	assert.Equal(t, int64(1), c.values[storeSeries("idempotency.store.duration", memory, "get", "")], "collected:\n%s", c)
	assertNoLeak(t, c)
}

// blocking answers 201 once released.
type blocking struct {
	running chan struct{}
	release chan struct{}
}

func newBlocking() *blocking {
	return &blocking{running: make(chan struct{}, 1), release: make(chan struct{})}
}

func (b *blocking) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.running <- struct{}{}
	<-b.release
	created.ServeHTTP(w, r)
}

// TestStoreUnavailable: the claim fails, so the request is refused (503)
// and the store call counted as an error. The engine then frees the claim
// in the background, in case it landed: the release finds nothing held,
// which is success, so it is not tried again.
func TestStoreUnavailable(t *testing.T) {
	m, reader := newMetrics(t)
	store := m.Store(&faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), acquire: func() error { return errors.New("connection refused") }})
	h := serveMux(middleware(t, store, idempotency.Options{Observer: m.ObserveRequest}).Handler(created))
	w := serve(h, newRequest("secret-key-1", body))
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)

	faulty := "*idemotel_test.faultyStore"
	want := map[string]int64{
		requestSeries(idempotency.OutcomeStoreError, 503, "store_unavailable"): 1,
		storeSeries("idempotency.store.duration", faulty, "acquire", "_OTHER"): 1,
		storeSeries("idempotency.store.errors", faulty, "acquire", "_OTHER"):   1,
		storeSeries("idempotency.store.duration", faulty, "release", ""):       1,
	}
	var c collected
	require.Eventually(t, func() bool {
		c = collect(t, reader)
		return assert.ObjectsAreEqual(want, c.values)
	}, 5*time.Second, 10*time.Millisecond, "collected:\n%s", &c)
	assertNoLeak(t, c)
}

// TestLeaseLostWhileRunning: a renewal finds the key taken, the handler's
// context is cancelled and it answers nothing: the request is released
// with 503, a lost lease and a failed renewal are counted.
func TestLeaseLostWhileRunning(t *testing.T) {
	m, reader := newMetrics(t)
	inner := &faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), extend: func() error { return idempotency.ErrLeaseLost }}
	waitForCancel := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	h := serveMux(middleware(t, m.Store(inner), idempotency.Options{Observer: m.ObserveRequest}, idempotency.Options{Lease: 30 * time.Millisecond}).Handler(waitForCancel))
	assert.Equal(t, http.StatusServiceUnavailable, serve(h, newRequest("secret-key-1", body)).Code)

	faulty := "*idemotel_test.faultyStore"
	c := collect(t, reader)
	assert.Equal(t, map[string]int64{
		requestSeries(idempotency.OutcomeReleased, 503, "lease_lost"):                     1,
		durationSeries(idempotency.OutcomeReleased, 503, "lease_lost"):                    1,
		series("idempotency.lease.lost", "kind", "http", "outcome", "released"):           1,
		series("idempotency.lease.renewals", "store", faulty, "error.type", "lease_lost"): 1,
		storeSeries("idempotency.store.duration", faulty, "acquire", ""):                  1,
		storeSeries("idempotency.store.duration", faulty, "extend", "lease_lost"):         1,
		storeSeries("idempotency.store.errors", faulty, "extend", "lease_lost"):           1,
		storeSeries("idempotency.store.duration", faulty, "release", ""):                  1,
	}, c.values, "collected:\n%s", c)
	assertNoLeak(t, c)
}

// TestLeaseRenewals: a handler that outlives several renewal intervals;
// every renewal goes through the wrapper and is counted once.
func TestLeaseRenewals(t *testing.T) {
	m, reader := newMetrics(t)
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(120 * time.Millisecond)
		created.ServeHTTP(w, r)
	})
	h := serveMux(middleware(t, m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: m.ObserveRequest}, idempotency.Options{Lease: 60 * time.Millisecond}).Handler(slow))
	assert.Equal(t, http.StatusCreated, serve(h, newRequest("secret-key-1", body)).Code)

	c := collect(t, reader)
	renewals := c.values[series("idempotency.lease.renewals", "store", memory)]
	assert.GreaterOrEqual(t, renewals, int64(3), "a renewal every 20 ms for 120 ms:\n%s", c)
	assert.Equal(t, renewals, c.values[storeSeries("idempotency.store.duration", memory, "extend", "")])
	assert.Empty(t, c.only("idempotency.store.errors"))
	assert.Empty(t, c.only("idempotency.lease.lost"))
	assert.Equal(t, int64(1), c.values[requestSeries(idempotency.OutcomeExecuted, 201, "")])
}

// TestWebhookDeliveries drives the real webhook handler: a new event, its
// redelivery, a bad signature, a failing function and a delivery through
// Handle (no HTTP request).
func TestWebhookDeliveries(t *testing.T) {
	m, reader := newMetrics(t)
	fn := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		if strings.HasPrefix(ev.ID, "evt_fail") {
			return errors.New("downstream unavailable")
		}
		return nil
	}
	verifier, err := idempotency.NewStripeVerifier([]string{secret}, 0)
	require.NoError(t, err)
	wh, err := idempotency.NewWebhookHandler(m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), verifier, fn, idempotency.WebhookOptions{Observer: m.ObserveWebhook})
	require.NoError(t, err)

	payload, sig := event("evt_secret_1")
	assert.Equal(t, http.StatusOK, serve(wh, delivery(payload, sig)).Code)
	w := serve(wh, delivery(payload, sig))
	assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, http.StatusBadRequest, serve(wh, delivery(payload, "t=1,v1=00")).Code)
	failing, failingSig := event("evt_fail_secret")
	assert.Equal(t, http.StatusInternalServerError, serve(wh, delivery(failing, failingSig)).Code)
	other, otherSig := event("evt_secret_2")
	outcome, err := wh.Handle(context.Background(), http.Header{"Stripe-Signature": {otherSig}}, other)
	require.NoError(t, err)
	assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	ev, err := wh.Event(context.Background(), "evt_fail_secret")
	require.NoError(t, err)
	assert.Equal(t, 1, ev.Attempts, "the wrapper passes the failure history through")
	assert.Equal(t, "failed", ev.Status)

	// Every series names the provider; a verified event's, its Stripe API
	// version too (a rejected delivery has none).
	deliveries := func(outcome idempotency.Outcome, method string, status int, errorType string) string {
		kv := []any{"outcome", string(outcome), "http.response.status_code", status, "webhook.provider", "stripe"}
		if outcome != idempotency.OutcomeRejected {
			kv = append(kv, "stripe.api_version", stripe.APIVersion)
		}
		if method != "" {
			kv = append(kv, "http.request.method", method)
		}
		if errorType != "" {
			kv = append(kv, "error.type", errorType)
		}
		return series("idempotency.webhook.deliveries", kv...)
	}
	duration := func(outcome idempotency.Outcome, method string, status int, errorType string) string {
		return strings.Replace(deliveries(outcome, method, status, errorType), "idempotency.webhook.deliveries", "idempotency.webhook.duration#count", 1)
	}
	c := collect(t, reader)
	assert.Equal(t, map[string]int64{
		deliveries(idempotency.OutcomeExecuted, "POST", 200, ""):                  1,
		deliveries(idempotency.OutcomeReplayed, "POST", 200, ""):                  1,
		deliveries(idempotency.OutcomeRejected, "POST", 400, "webhook_signature"): 1,
		deliveries(idempotency.OutcomeReleased, "POST", 500, "webhook_failed"):    1,
		deliveries(idempotency.OutcomeExecuted, "", 200, ""):                      1,
		duration(idempotency.OutcomeExecuted, "POST", 200, ""):                    1,
		duration(idempotency.OutcomeReleased, "POST", 500, "webhook_failed"):      1,
		duration(idempotency.OutcomeExecuted, "", 200, ""):                        1,
		storeSeries("idempotency.store.duration", memory, "acquire", ""):          4,
		storeSeries("idempotency.store.duration", memory, "complete", ""):         2,
		storeSeries("idempotency.store.duration", memory, "fail", ""):             1,
		storeSeries("idempotency.store.duration", memory, "failures", ""):         1,
		storeSeries("idempotency.store.duration", memory, "get", ""):              1,
	}, c.values, "collected:\n%s", c)
	assertNoLeak(t, c)
}

// TestStoreWrapperInterfaces: the wrapper is a FailureRecorder exactly
// when the store is, and returns the store's errors unchanged.
func TestStoreWrapperInterfaces(t *testing.T) {
	m, _ := newMetrics(t)
	_, ok := m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})).(idempotency.FailureRecorder)
	assert.True(t, ok, "MemoryStore keeps a failure history")
	_, ok = m.Store(&faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{})}).(idempotency.FailureRecorder)
	assert.False(t, ok, "a store without Fail does not gain one")
	_, ok = m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})).(idempotency.Checkpointer)
	assert.True(t, ok, "MemoryStore keeps recovery points")
	_, ok = m.Store(&faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{})}).(idempotency.Inspector)
	assert.False(t, ok, "a store without Get does not gain one")

	inner := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	unwrapper, ok := m.Store(inner).(interface{ Unwrap() idempotency.Store })
	require.True(t, ok)
	assert.Same(t, inner, unwrapper.Unwrap())

	want := errors.New("the store's own error")
	s := m.Store(&faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), extend: func() error { return want }})
	assert.Same(t, want, s.Extend(context.Background(), "k", "t", time.Second))
}

func TestNewRejectsBadInput(t *testing.T) {
	_, err := idemotel.New(nil)
	assert.ErrorContains(t, err, "meter provider is nil")
	for name, opt := range map[string]idemotel.Option{
		"nil option":            nil,
		"no duration buckets":   idemotel.WithDurationBuckets(),
		"descending buckets":    idemotel.WithDurationBuckets(1, 0.5),
		"repeated store bucket": idemotel.WithStoreBuckets(0.1, 0.1),
	} {
		_, err := idemotel.New(noop.NewMeterProvider(), opt)
		assert.Error(t, err, name)
	}
}

func TestBuckets(t *testing.T) {
	m, reader := newMetrics(t)
	h := serveMux(middleware(t, m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: m.ObserveRequest}).Handler(created))
	serve(h, newRequest("secret-key-1", body))
	c := collect(t, reader)
	assert.Equal(t, []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}, c.bounds["idempotency.handler.duration"])
	assert.Equal(t, []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}, c.bounds["idempotency.store.duration"])

	m, reader = newMetrics(t, idemotel.WithDurationBuckets(0.1, 1), idemotel.WithStoreBuckets(0.001))
	h = serveMux(middleware(t, m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: m.ObserveRequest}).Handler(created))
	serve(h, newRequest("secret-key-1", body))
	c = collect(t, reader)
	assert.Equal(t, []float64{0.1, 1}, c.bounds["idempotency.handler.duration"])
	assert.Equal(t, []float64{0.001}, c.bounds["idempotency.store.duration"])
}

// TestMethodsAreBounded: a method a client invents is "_OTHER".
func TestMethodsAreBounded(t *testing.T) {
	m, reader := newMetrics(t)
	mw := middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: m.ObserveRequest}, idempotency.Options{Methods: []string{"POST", "BREW"}})
	r := newRequest("secret-key-1", body)
	r.Method = "BREW"
	serve(mw.Handler(created), r)
	c := collect(t, reader)
	assert.Equal(t, map[string]int64{
		series("idempotency.requests", "outcome", "executed", "http.request.method", "_OTHER", "http.response.status_code", 201):               1,
		series("idempotency.handler.duration#count", "outcome", "executed", "http.request.method", "_OTHER", "http.response.status_code", 201): 1,
	}, c.values)
}

// TestObserverComposes: an observer of the application's own calls
// ObserveRequest, and both see every report.
func TestObserverComposes(t *testing.T) {
	m, reader := newMetrics(t)
	var mu sync.Mutex
	var audited []idempotency.Outcome
	observe := idempotency.Options{Observer: func(ctx context.Context, r idempotency.Report) {
		m.ObserveRequest(ctx, r)
		mu.Lock()
		audited = append(audited, r.Outcome)
		mu.Unlock()
	}}
	h := serveMux(middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), observe).Handler(created))
	serve(h, newRequest("secret-key-1", body))
	serve(h, newRequest("secret-key-1", body))
	assert.Equal(t, []idempotency.Outcome{idempotency.OutcomeExecuted, idempotency.OutcomeReplayed}, audited)
	c := collect(t, reader)
	assert.Equal(t, int64(1), c.values[requestSeries(idempotency.OutcomeExecuted, 201, "")])
	assert.Equal(t, int64(1), c.values[requestSeries(idempotency.OutcomeReplayed, 201, "")])
}
