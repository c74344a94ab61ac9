package idempotency_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// Helpers in this file start with "wh" to stay clear of the core's test
// helpers in the same package.

const (
	whSecret    = "whsec_test_current"
	whOldSecret = "whsec_test_previous"
)

// whStores lists the stores every webhook behaviour is checked against.
// The real Redis is skipped unless IDEMPOTENCY_TEST_REDIS_URL is set;
// pgstore runs these behaviours in its own module.
var whStores = []struct {
	name string
	new  func(t *testing.T) idempotency.Store
}{
	{"memory", func(t *testing.T) idempotency.Store { return idempotency.NewMemoryStore(idempotency.MemoryOptions{}) }},
	{"miniredis", func(t *testing.T) idempotency.Store {
		_, client := redistest.Miniredis(t)
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{})
		require.NoError(t, err)
		return store
	}},
	{"redis", func(t *testing.T) idempotency.Store {
		client := redistest.Client(t)
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: redistest.Prefix(t)})
		require.NoError(t, err)
		return store
	}},
}

func whForEachStore(t *testing.T, test func(t *testing.T, store idempotency.Store)) {
	t.Helper()
	for _, s := range whStores {
		t.Run(s.name, func(t *testing.T) { test(t, s.new(t)) })
	}
}

// whEvent is a Stripe event payload as Stripe sends it.
func whEvent(id string) []byte {
	return fmt.Appendf(nil, `{
  "id": %q,
  "object": "event",
  "api_version": %q,
  "created": 1700000000,
  "livemode": false,
  "pending_webhooks": 1,
  "request": {"id": null, "idempotency_key": null},
  "type": "account.updated",
  "data": {"object": {"id": "acct_1", "object": "account", "charges_enabled": true}}
}`, id, stripe.APIVersion)
}

// whRequest builds a delivery of payload signed with secret now.
func whRequest(payload []byte, secret string) *http.Request {
	req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
	req.Header.Set("Stripe-Signature", idempotency.SignWebhookPayload(payload, secret, time.Now()))
	return req
}

// whServeRecover serves req and returns what the handler panicked with.
func whServeRecover(h http.Handler, req *http.Request) (rec *httptest.ResponseRecorder, panicked any) {
	rec = httptest.NewRecorder()
	defer func() { panicked = recover() }()
	h.ServeHTTP(rec, req)
	return rec, nil
}

// whNew returns a handler of Stripe deliveries signed with whSecret that
// runs fn with each event as stripe-go decodes it.
func whNew(t *testing.T, store idempotency.Store, fn func(context.Context, stripe.Event) error, opts ...idempotency.WebhookOptions) *idempotency.WebhookHandler {
	t.Helper()
	return whNewWith(t, store, whVerifier(t, 0, whSecret), fn, opts...)
}

// whNewWith is whNew with a verifier of the test's own.
func whNewWith(t *testing.T, store idempotency.Store, v idempotency.Verifier, fn func(context.Context, stripe.Event) error, opts ...idempotency.WebhookOptions) *idempotency.WebhookHandler {
	t.Helper()
	h, err := idempotency.NewWebhookHandler(store, v, whStripe(fn), merged(opts...))
	require.NoError(t, err)
	return h
}

// whStripe adapts a function of stripe-go events to the handler's.
func whStripe(fn func(context.Context, stripe.Event) error) func(context.Context, idempotency.WebhookEvent) error {
	return func(ctx context.Context, ev idempotency.WebhookEvent) error { return fn(ctx, *ev.Stripe) }
}

// whVerifier is a Stripe verifier of secrets with tolerance (0: 5 min).
func whVerifier(t testing.TB, tolerance time.Duration, secrets ...string) idempotency.Verifier {
	t.Helper()
	v, err := idempotency.NewStripeVerifier(secrets, tolerance)
	require.NoError(t, err)
	return v
}

func whAssertReceived(t *testing.T, rec *httptest.ResponseRecorder, replayed bool) {
	t.Helper()
	assert.Equal(t, http.StatusOK, rec.Code)
	assert.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	assert.JSONEq(t, `{"received":true}`, rec.Body.String())
	if replayed {
		assert.Equal(t, "true", rec.Header().Get(idempotency.DefaultReplayHeader))
	} else {
		assert.Empty(t, rec.Header().Get(idempotency.DefaultReplayHeader))
	}
}

type whProblem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

func whAssertProblem(t *testing.T, rec *httptest.ResponseRecorder, status int) whProblem {
	t.Helper()
	assert.Equal(t, status, rec.Code)
	assert.Equal(t, "application/problem+json", rec.Header().Get("Content-Type"))
	var p whProblem
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &p), rec.Body.String())
	assert.Equal(t, status, p.Status)
	assert.NotEmpty(t, p.Title)
	return p
}

func TestWebhookProcessesAnEventOnce(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		var calls atomic.Int64
		var seen stripe.Event
		obs := &observed{}
		h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
			calls.Add(1)
			seen = ev
			return nil
		}, idempotency.WebhookOptions{Observer: obs.observe})

		payload := whEvent("evt_once")
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		require.EqualValues(t, 1, calls.Load())
		assert.Equal(t, "evt_once", seen.ID)
		assert.Equal(t, stripe.EventType("account.updated"), seen.Type)
		assert.Equal(t, "acct_1", seen.GetObjectValue("id"))

		// Stripe delivers the event again (new signature, same event),
		// and once more with the very same request.
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)
		same := whRequest(payload, whSecret)
		sig := same.Header.Get("Stripe-Signature")
		whAssertReceived(t, serve(h, same), true)
		again := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
		again.Header.Set("Stripe-Signature", sig)
		whAssertReceived(t, serve(h, again), true)
		assert.EqualValues(t, 1, calls.Load())

		assert.Equal(t, []idempotency.Outcome{
			idempotency.OutcomeExecuted, idempotency.OutcomeReplayed,
			idempotency.OutcomeReplayed, idempotency.OutcomeReplayed,
		}, obs.outcomes())
		ev := obs.last()
		assert.Equal(t, "evt_once", ev.Key)
		assert.Equal(t, http.StatusOK, ev.Status)
		assert.Equal(t, http.MethodPost, ev.Method)
		assert.Equal(t, "/stripe/webhook", ev.Path)
		assert.NoError(t, ev.Err)

		// Another event is processed.
		whAssertReceived(t, serve(h, whRequest(whEvent("evt_other"), whSecret)), false)
		assert.EqualValues(t, 2, calls.Load())
	})
}

func TestWebhookConcurrentDeliveriesRunOnce(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		const deliveries = 20
		var calls atomic.Int64
		gate := make(chan struct{})
		var closeGate sync.Once
		release := func() { closeGate.Do(func() { close(gate) }) }
		t.Cleanup(release)
		h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
			calls.Add(1)
			<-gate
			return nil
		})
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)

		payload := whEvent("evt_concurrent")
		type result struct {
			status     int
			retryAfter string
			replayed   string
		}
		results := make(chan result, deliveries)
		start := make(chan struct{})
		for range deliveries {
			go func() {
				<-start
				req, _ := http.NewRequest(http.MethodPost, srv.URL, bytes.NewReader(payload))
				req.Header.Set("Stripe-Signature", idempotency.SignWebhookPayload(payload, whSecret, time.Now()))
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					results <- result{status: -1}
					return
				}
				resp.Body.Close()
				results <- result{resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get(idempotency.DefaultReplayHeader)}
			}()
		}
		close(start)

		// One delivery holds the event; every other one must be turned
		// away while it does.
		var got []result
		timeout := time.After(20 * time.Second)
		for len(got) < deliveries-1 {
			select {
			case r := <-results:
				got = append(got, r)
			case <-timeout:
				t.Fatalf("only %d deliveries answered; function ran %d times", len(got), calls.Load())
			}
		}
		release()
		got = append(got, <-results)

		var ok, conflict int
		for _, r := range got {
			switch r.status {
			case http.StatusOK:
				ok++
				assert.Empty(t, r.replayed)
			case http.StatusConflict:
				conflict++
				assert.Equal(t, "1", r.retryAfter)
			default:
				t.Errorf("unexpected status %d", r.status)
			}
		}
		assert.Equal(t, 1, ok)
		assert.Equal(t, deliveries-1, conflict)
		assert.EqualValues(t, 1, calls.Load())

		// Stripe's retry of a 409 finds the event processed.
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)
		assert.EqualValues(t, 1, calls.Load())
	})
}

func TestWebhookRejectsBadDeliveries(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	valid := whEvent("evt_bad")
	twoSigs := func(payload []byte, at time.Time, secrets ...string) string {
		h := fmt.Sprintf("t=%d", at.Unix())
		for _, s := range secrets {
			h += fmt.Sprintf(",v1=%x", webhook.ComputeSignature(at, payload, s))
		}
		return h
	}
	oversize := append(bytes.Repeat([]byte(" "), idempotency.DefaultWebhookMaxBodyBytes), valid...)

	tests := []struct {
		name    string
		payload []byte
		header  string
		status  int
		errs    []error // what Handle's error wraps
		detail  string  // part of the problem detail, if one is shown
	}{
		{"no signature", valid, "", 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNotSigned}, "no Stripe-Signature header"},
		{"malformed header", valid, "garbage", 400, []error{idempotency.ErrWebhookSignature, webhook.ErrInvalidHeader}, "invalid Stripe-Signature header"},
		{"no v1 signature", valid, fmt.Sprintf("t=%d,v0=abc", now.Unix()), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, "no valid signature"},
		{"wrong secret", valid, idempotency.SignWebhookPayload(valid, "whsec_wrong", now), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, ""},
		{"tampered payload", bytes.Replace(valid, []byte("evt_bad"), []byte("evt_bad2"), 1), idempotency.SignWebhookPayload(valid, whSecret, now), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, ""},
		{"signed with the rotated-out secret", valid, idempotency.SignWebhookPayload(valid, whOldSecret, now), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, ""},
		{"timestamp too old", valid, idempotency.SignWebhookPayload(valid, whSecret, now.Add(-idempotency.DefaultWebhookTolerance-time.Second)), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrTooOld}, "timestamp wasn't within tolerance"},
		{"no timestamp", valid, fmt.Sprintf("v1=%x", webhook.ComputeSignature(time.Time{}, valid, whSecret)), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrTooOld}, ""},
		{"signature of another timestamp", valid, strings.Replace(idempotency.SignWebhookPayload(valid, whSecret, now), fmt.Sprint(now.Unix()), fmt.Sprint(now.Unix()+1), 1), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, ""},
		{"malformed JSON", []byte(`{"id":"evt_1",`), idempotency.SignWebhookPayload([]byte(`{"id":"evt_1",`), whSecret, now), 400, []error{idempotency.ErrWebhookPayload}, ""},
		{"not an event", []byte(`{"id":5}`), idempotency.SignWebhookPayload([]byte(`{"id":5}`), whSecret, now), 400, []error{idempotency.ErrWebhookPayload}, ""},
		{"no event id", []byte(`{"object":"event","api_version":"` + stripe.APIVersion + `"}`), idempotency.SignWebhookPayload([]byte(`{"object":"event","api_version":"`+stripe.APIVersion+`"}`), whSecret, now), 400, []error{idempotency.ErrWebhookPayload}, ""},
		{"empty event id", []byte(`{"id":"","object":"event"}`), idempotency.SignWebhookPayload([]byte(`{"id":"","object":"event"}`), whSecret, now), 400, []error{idempotency.ErrWebhookPayload}, "without an id"},
		{"body over 64 KiB", oversize, idempotency.SignWebhookPayload(oversize, whSecret, now), 413, []error{idempotency.ErrBodyTooLarge}, ""},
		{"both signatures, old one bad", valid, twoSigs(valid, now, "whsec_wrong", "whsec_wrong2"), 400, []error{idempotency.ErrWebhookSignature, webhook.ErrNoValidSignature}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
			var calls atomic.Int64
			obs := &observed{}
			h := whNew(t, store, func(context.Context, stripe.Event) error { calls.Add(1); return nil },
				idempotency.WebhookOptions{Observer: obs.observe})
			idempotency.SetWebhookClock(h, func() time.Time { return now })

			req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(tc.payload))
			if tc.header != "" {
				req.Header.Set("Stripe-Signature", tc.header)
			}
			rec := serve(h, req)
			p := whAssertProblem(t, rec, tc.status)
			if tc.detail != "" {
				assert.Contains(t, p.Detail, tc.detail)
			}
			assert.NotContains(t, rec.Body.String(), whSecret)
			assert.Equal(t, []idempotency.Outcome{idempotency.OutcomeRejected}, obs.outcomes())
			assert.Equal(t, tc.status, obs.last().Status)

			outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {tc.header}}, tc.payload)
			assert.Equal(t, idempotency.OutcomeRejected, outcome)
			for _, want := range tc.errs {
				assert.ErrorIs(t, err, want)
			}

			assert.Zero(t, calls.Load(), "the function must not run")
			assert.Zero(t, store.Len(), "nothing may be recorded")
		})
	}
}

func TestWebhookAcceptsRotatedSecrets(t *testing.T) {
	now := time.Now()
	payload := func(id string) []byte { return whEvent(id) }
	sign := func(p []byte, secrets ...string) string {
		h := fmt.Sprintf("t=%d", now.Unix())
		for _, s := range secrets {
			h += fmt.Sprintf(",v1=%x", webhook.ComputeSignature(now, p, s))
		}
		return h
	}
	var calls atomic.Int64
	fn := func(context.Context, stripe.Event) error { calls.Add(1); return nil }

	// While a secret is rolled, the endpoint knows both.
	both := whNewWith(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), whVerifier(t, 0, whOldSecret, whSecret), fn)
	for i, header := range []string{
		sign(payload("evt_r0"), whOldSecret),
		sign(payload("evt_r1"), whSecret),
		sign(payload("evt_r2"), "whsec_unrelated", whSecret),
	} {
		outcome, err := both.Handle(context.Background(), http.Header{"Stripe-Signature": {header}}, payload(fmt.Sprintf("evt_r%d", i)))
		require.NoError(t, err, "delivery %d", i)
		assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	}

	// Stripe signs with both secrets during the roll-over; an endpoint that
	// already knows only the new one accepts that, not the old one alone.
	onlyNew := whNew(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), fn)
	outcome, err := onlyNew.Handle(context.Background(), http.Header{"Stripe-Signature": {sign(payload("evt_r3"), whOldSecret, whSecret)}}, payload("evt_r3"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	outcome, err = onlyNew.Handle(context.Background(), http.Header{"Stripe-Signature": {sign(payload("evt_r4"), whOldSecret)}}, payload("evt_r4"))
	assert.Equal(t, idempotency.OutcomeRejected, outcome)
	assert.ErrorIs(t, err, webhook.ErrNoValidSignature)
	assert.EqualValues(t, 4, calls.Load())
}

func TestWebhookTolerance(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	payload := whEvent("evt_tolerance")
	var calls atomic.Int64
	h := whNewWith(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), whVerifier(t, 10*time.Second, whSecret),
		func(context.Context, stripe.Event) error { calls.Add(1); return nil })
	idempotency.SetWebhookClock(h, func() time.Time { return now })
	signed := func(at time.Time) http.Header {
		return http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, at)}}
	}

	_, err := h.Handle(context.Background(), signed(now.Add(-11*time.Second)), payload)
	assert.ErrorIs(t, err, webhook.ErrTooOld)
	assert.Zero(t, calls.Load())

	outcome, err := h.Handle(context.Background(), signed(now.Add(-10*time.Second)), payload)
	require.NoError(t, err)
	assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	assert.EqualValues(t, 1, calls.Load())
}

// TestWebhookAcceptsEveryStripeAPIVersion: an event in today's API
// version (which stripe-go v76 does not know) is processed once, with its
// version, its raw JSON and what stripe-go could decode; the version shows
// in the report, and one log line per version says so. Before issue 21 it
// got 400 unless an option said otherwise, so a real endpoint failed every
// delivery until Stripe disabled it.
func TestWebhookAcceptsEveryStripeAPIVersion(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		// In the new version, charges_enabled became an object: stripe-go's
		// Account cannot hold it, and the event is decoded as far as it can.
		payload := []byte(`{"id":"evt_clover","object":"event","api_version":"2026-02-25.clover","created":1800000000,` +
			`"type":"account.updated","data":{"object":{"id":"acct_9","object":"account","charges_enabled":{"status":"active"}}},` +
			`"request":{"id":null},"pending_webhooks":1,"livemode":false}`)
		var got []idempotency.WebhookEvent
		var logs bytes.Buffer
		obs := &observed{}
		h, err := idempotency.NewWebhookHandler(store, whVerifier(t, 0, whSecret), func(_ context.Context, ev idempotency.WebhookEvent) error {
			got = append(got, ev)
			return nil
		}, idempotency.WebhookOptions{Observer: obs.observe, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		require.NoError(t, err)
		for range 3 {
			rec := serve(h, whRequest(payload, whSecret))
			assert.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		}
		require.Len(t, got, 1, "processed once")
		ev := got[0]
		assert.Equal(t, "stripe", ev.Provider)
		assert.Equal(t, "evt_clover", ev.ID)
		assert.Equal(t, "2026-02-25.clover", ev.APIVersion)
		assert.Equal(t, payload, ev.Payload)
		assert.Equal(t, "acct_9", ev.Object)
		require.NotNil(t, ev.Stripe)
		assert.Equal(t, stripe.EventType("account.updated"), ev.Stripe.Type)
		assert.Equal(t, "acct_9", ev.Stripe.GetObjectValue("id"))
		assert.Equal(t, "2026-02-25.clover", obs.last().APIVersion)
		assert.Equal(t, 1, strings.Count(logs.String(), "2026-02-25.clover"), "one log line per version: %s", logs.String())
	})
}

func TestWebhookFailureIsRetried(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		var calls atomic.Int64
		errDownstream := errors.New("database password rejected for user admin")
		obs := &observed{}
		h := whNew(t, store, func(context.Context, stripe.Event) error {
			if calls.Add(1) == 1 {
				return errDownstream
			}
			return nil
		}, idempotency.WebhookOptions{Observer: obs.observe})
		payload := whEvent("evt_fails_once")

		rec := serve(h, whRequest(payload, whSecret))
		p := whAssertProblem(t, rec, http.StatusInternalServerError)
		assert.Equal(t, "Webhook processing failed", p.Title)
		assert.NotContains(t, rec.Body.String(), "password", "the function's error must not reach the sender")
		ev := obs.last()
		assert.Equal(t, idempotency.OutcomeReleased, ev.Outcome)
		assert.ErrorIs(t, ev.Err, idempotency.ErrWebhookFailed)
		assert.ErrorIs(t, ev.Err, errDownstream)
		assert.Equal(t, "evt_fails_once", ev.Key)

		// Stripe's retry processes the event; later deliveries do not.
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)
		assert.EqualValues(t, 2, calls.Load())
		assert.Equal(t, []idempotency.Outcome{
			idempotency.OutcomeReleased, idempotency.OutcomeExecuted, idempotency.OutcomeReplayed,
		}, obs.outcomes())
	})
}

// TestWebhookCountsFailedAttempts: the store keeps how often the function
// failed for an event and the last error (audit WH4, WH9); the observer
// sees the count with each failure.
func TestWebhookCountsFailedAttempts(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		var calls atomic.Int64
		obs := &observed{}
		h := whNew(t, store, func(context.Context, stripe.Event) error {
			switch calls.Add(1) {
			case 1:
				return errors.New("ledger timeout")
			case 2:
				panic("nil map")
			case 3:
				return errors.New("ledger refused the entry")
			}
			return nil
		}, idempotency.WebhookOptions{Observer: obs.observe})
		payload := whEvent("evt_flaky")

		ev, err := h.Event(context.Background(), "evt_flaky")
		require.NoError(t, err)
		assert.Equal(t, idempotency.WebhookEvent{Provider: "stripe", ID: "evt_flaky", Status: "unseen"}, ev)

		whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusInternalServerError)
		assert.Equal(t, 1, obs.last().Attempts)
		_, panicked := whServeRecover(h, whRequest(payload, whSecret))
		assert.Equal(t, "nil map", panicked)
		assert.Equal(t, 2, obs.last().Attempts)
		whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusInternalServerError)
		assert.Equal(t, 3, obs.last().Attempts)

		ev, err = h.Event(context.Background(), "evt_flaky")
		require.NoError(t, err)
		assert.Equal(t, "failed", ev.Status)
		assert.Equal(t, 3, ev.Attempts)
		assert.Equal(t, "ledger refused the entry", ev.LastError)
		assert.Zero(t, ev.ClaimedAt)

		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		assert.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome)
		ev, err = h.Event(context.Background(), "evt_flaky")
		require.NoError(t, err)
		assert.Equal(t, "processed", ev.Status)
		assert.False(t, ev.ClaimedAt.IsZero())
		assert.Equal(t, 3, ev.Attempts, "the history outlives the success")
		assert.Empty(t, ev.Payload, "not kept without WithWebhookPayload")
		assert.EqualValues(t, 4, calls.Load())
	})

	t.Run("store that cannot read records", func(t *testing.T) {
		h := whNew(t, &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{})}, func(context.Context, stripe.Event) error {
			return errors.New("boom")
		})
		whAssertProblem(t, serve(h, whRequest(whEvent("evt_x"), whSecret)), http.StatusInternalServerError)
		_, err := h.Event(context.Background(), "evt_x")
		assert.ErrorIs(t, err, errors.ErrUnsupported)
	})
}

func TestWebhookPanicIsRetried(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		var calls atomic.Int64
		obs := &observed{}
		h := whNew(t, store, func(context.Context, stripe.Event) error {
			if calls.Add(1) == 1 {
				panic("nil map write in handler")
			}
			return nil
		}, idempotency.WebhookOptions{Observer: obs.observe})
		payload := whEvent("evt_panics_once")

		rec, panicked := whServeRecover(h, whRequest(payload, whSecret))
		assert.Equal(t, "nil map write in handler", panicked, "the original panic continues")
		p := whAssertProblem(t, rec, http.StatusInternalServerError)
		assert.NotContains(t, rec.Body.String(), "nil map")
		assert.Equal(t, "Webhook processing failed", p.Title)
		assert.Equal(t, idempotency.OutcomeReleased, obs.last().Outcome)
		assert.ErrorIs(t, obs.last().Err, idempotency.ErrWebhookFailed)

		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)
		assert.EqualValues(t, 2, calls.Load())

		// Handle lets the panic through as well, after releasing the event.
		calls.Store(0)
		payload = whEvent("evt_panics_in_handle")
		func() {
			defer func() { assert.Equal(t, "nil map write in handler", recover()) }()
			h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}, payload)
		}()
		outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}, payload)
		require.NoError(t, err)
		assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	})
}

func TestWebhookHandleOutcomes(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		entered := make(chan struct{})
		gate := make(chan struct{})
		var closeGate sync.Once
		open := func() { closeGate.Do(func() { close(gate) }) }
		t.Cleanup(open)
		errFn := errors.New("downstream failed")
		h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
			switch ev.ID {
			case "evt_slow":
				close(entered)
				<-gate
			case "evt_error":
				return errFn
			}
			return nil
		})
		ctx := context.Background()
		handle := func(id string) (idempotency.Outcome, error) {
			p := whEvent(id)
			return h.Handle(ctx, http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(p, whSecret, time.Now())}}, p)
		}

		outcome, err := handle("evt_ok")
		assert.Equal(t, idempotency.OutcomeExecuted, outcome)
		assert.NoError(t, err)
		outcome, err = handle("evt_ok")
		assert.Equal(t, idempotency.OutcomeReplayed, outcome)
		assert.NoError(t, err)

		outcome, err = handle("evt_error")
		assert.Equal(t, idempotency.OutcomeReleased, outcome)
		assert.ErrorIs(t, err, idempotency.ErrWebhookFailed)
		assert.ErrorIs(t, err, errFn)

		done := make(chan struct{})
		go func() {
			defer close(done)
			outcome, err := handle("evt_slow")
			assert.Equal(t, idempotency.OutcomeExecuted, outcome)
			assert.NoError(t, err)
		}()
		<-entered
		outcome, err = handle("evt_slow")
		assert.Equal(t, idempotency.OutcomeInFlight, outcome)
		assert.ErrorIs(t, err, idempotency.ErrKeyInUse)
		open()
		<-done
		outcome, _ = handle("evt_slow")
		assert.Equal(t, idempotency.OutcomeReplayed, outcome)

		big := bytes.Repeat([]byte("x"), idempotency.DefaultWebhookMaxBodyBytes+1)
		outcome, err = h.Handle(ctx, http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(big, whSecret, time.Now())}}, big)
		assert.Equal(t, idempotency.OutcomeRejected, outcome)
		assert.ErrorIs(t, err, idempotency.ErrBodyTooLarge)
	})
}

func TestWebhookClaimInContext(t *testing.T) {
	var claim idempotency.Claim
	var claimed bool
	var key string
	var keyErr error
	h := whNew(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), func(ctx context.Context, ev stripe.Event) error {
		claim, claimed = idempotency.ClaimFromContext(ctx)
		key, keyErr = idempotency.StripeKey(ctx, "transfer:payout")
		return nil
	}, idempotency.WebhookOptions{Scope: "acct_platform_eu"})
	whAssertReceived(t, serve(h, whRequest(whEvent("evt_claim"), whSecret)), false)

	require.True(t, claimed)
	assert.Equal(t, "stripe-webhook", claim.Kind)
	assert.Equal(t, "acct_platform_eu", claim.Scope)
	assert.Equal(t, "evt_claim", claim.Key)
	assert.NotZero(t, claim.Fence)
	require.NoError(t, keyErr)
	assert.Equal(t, idempotency.StripeKeyFrom("stripe-webhook", "acct_platform_eu", "evt_claim", "transfer:payout"), key)
}

func TestWebhookScopesShareAStore(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		var calls atomic.Int64
		fn := func(context.Context, stripe.Event) error { calls.Add(1); return nil }
		eu := whNew(t, store, fn, idempotency.WebhookOptions{Scope: "eu"})
		us := whNew(t, store, fn, idempotency.WebhookOptions{Scope: "us"})
		euAgain := whNew(t, store, fn, idempotency.WebhookOptions{Scope: "eu"})
		payload := whEvent("evt_scoped")

		whAssertReceived(t, serve(eu, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(us, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(euAgain, whRequest(payload, whSecret)), true)
		assert.EqualValues(t, 2, calls.Load())
	})
}

func TestWebhookRemembersEventsForTheTTL(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }
	store := idempotency.NewMemoryStoreWithClock(clock)
	var calls atomic.Int64
	h := whNew(t, store, func(context.Context, stripe.Event) error { calls.Add(1); return nil })
	idempotency.SetWebhookClock(h, clock)
	payload := whEvent("evt_ttl")
	deliver := func() (idempotency.Outcome, error) {
		return h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, clock())}}, payload)
	}

	outcome, err := deliver()
	require.NoError(t, err)
	assert.Equal(t, idempotency.OutcomeExecuted, outcome)
	advance(3 * 24 * time.Hour) // the end of Stripe's retries
	outcome, _ = deliver()
	assert.Equal(t, idempotency.OutcomeReplayed, outcome)
	advance(idempotency.DefaultWebhookTTL - 3*24*time.Hour - time.Second)
	outcome, _ = deliver()
	assert.Equal(t, idempotency.OutcomeReplayed, outcome)
	advance(time.Second)
	outcome, _ = deliver()
	assert.Equal(t, idempotency.OutcomeExecuted, outcome, "forgotten after 7 days")
	assert.EqualValues(t, 2, calls.Load())
}

// whRecordingStore wraps a store, records the completions and can fail
// chosen calls.
type whRecordingStore struct {
	idempotency.Store
	mu          sync.Mutex
	keys        []string
	completed   []idempotency.Record
	extends     atomic.Int64
	onExtended  func(n int64) // called after the nth renewal that succeeded, when set
	acquireErr  error
	completeErr error
	releaseErr  error
	extendErr   error
}

func (s *whRecordingStore) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	if s.acquireErr != nil {
		return 0, nil, s.acquireErr
	}
	return s.Store.Acquire(ctx, key, claim, lease)
}

func (s *whRecordingStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	n := s.extends.Add(1)
	if s.extendErr != nil {
		return s.extendErr
	}
	err := s.Store.Extend(ctx, key, token, lease)
	if err == nil && s.onExtended != nil {
		s.onExtended(n)
	}
	return err
}

func (s *whRecordingStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	s.mu.Lock()
	s.keys = append(s.keys, key)
	s.completed = append(s.completed, *rec)
	s.mu.Unlock()
	if s.completeErr != nil {
		return s.completeErr
	}
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

func (s *whRecordingStore) Release(ctx context.Context, key, token string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("release with a cancelled context: %w", err)
	}
	if s.releaseErr != nil {
		return s.releaseErr
	}
	return s.Store.Release(ctx, key, token)
}

func TestWebhookKeepsThePayload(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		rs := &whRecordingStore{Store: store}
		fn := func(context.Context, stripe.Event) error { return nil }
		kept := whNew(t, rs, fn, idempotency.WebhookOptions{KeepPayload: true, Scope: "kept"})
		plain := whNew(t, rs, fn, idempotency.WebhookOptions{Scope: "plain"})
		payload := whEvent("evt_payload")

		whAssertReceived(t, serve(kept, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(plain, whRequest(payload, whSecret)), false)
		require.Len(t, rs.completed, 2)
		assert.Equal(t, http.StatusOK, rs.completed[0].Response.StatusCode)
		assert.Equal(t, payload, rs.completed[0].Response.Body)
		assert.Equal(t, "application/json", rs.completed[0].Response.Header.Get("Content-Type"))
		assert.Equal(t, http.StatusOK, rs.completed[1].Response.StatusCode)
		assert.Empty(t, rs.completed[1].Response.Body)

		// The store returns it on a later lookup.
		_, rec, err := store.Acquire(context.Background(), rs.keys[0], idempotency.Record{Token: "reader", CreatedAt: time.Now()}, time.Second)
		require.NoError(t, err)
		require.NotNil(t, rec)
		require.NotNil(t, rec.Response)
		assert.Equal(t, payload, rec.Response.Body)
		assert.False(t, rec.CreatedAt.IsZero())
	})
}

// TestWebhookEventLookup: an operator reads an event's status while it is
// processed and after, with the payload when it is kept.
func TestWebhookEventLookup(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		entered, proceed := make(chan struct{}), make(chan struct{})
		h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
			close(entered)
			<-proceed
			return nil
		}, idempotency.WebhookOptions{KeepPayload: true})
		payload := whEvent("evt_lookup")
		done := make(chan *httptest.ResponseRecorder)
		go func() { done <- serve(h, whRequest(payload, whSecret)) }()
		<-entered
		ev, err := h.Event(context.Background(), "evt_lookup")
		require.NoError(t, err)
		assert.Equal(t, "processing", ev.Status)
		assert.False(t, ev.ClaimedAt.IsZero())
		close(proceed)
		whAssertReceived(t, <-done, false)

		ev, err = h.Event(context.Background(), "evt_lookup")
		require.NoError(t, err)
		assert.Equal(t, "processed", ev.Status)
		assert.Equal(t, payload, ev.Payload, "the raw event, kept with WithWebhookPayload")
		assert.Zero(t, ev.Attempts)
	})
}

func TestWebhookStoreFailures(t *testing.T) {
	errStore := errors.New("redis: connection refused on 10.0.0.7:6379")
	payload := whEvent("evt_store")

	t.Run("claim fails", func(t *testing.T) {
		var calls atomic.Int64
		obs := &observed{}
		rs := &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), acquireErr: errStore}
		h := whNew(t, rs, func(context.Context, stripe.Event) error { calls.Add(1); return nil }, idempotency.WebhookOptions{Observer: obs.observe})
		rec := serve(h, whRequest(payload, whSecret))
		whAssertProblem(t, rec, http.StatusServiceUnavailable)
		assert.Equal(t, "1", rec.Header().Get("Retry-After"))
		assert.NotContains(t, rec.Body.String(), "10.0.0.7")
		assert.Zero(t, calls.Load())
		assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome)
		assert.ErrorIs(t, obs.last().Err, idempotency.ErrStoreUnavailable)
		assert.ErrorIs(t, obs.last().Err, errStore)
	})

	t.Run("marking processed fails", func(t *testing.T) {
		var calls atomic.Int64
		obs := &observed{}
		rs := &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), completeErr: errStore}
		h := whNew(t, rs, func(context.Context, stripe.Event) error { calls.Add(1); return nil }, idempotency.WebhookOptions{Observer: obs.observe})
		// The event was processed: Stripe must not send it again.
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome)
		assert.ErrorIs(t, obs.last().Err, idempotency.ErrWebhookNotRecorded)

		outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(whEvent("evt_store2"), whSecret, time.Now())}}, whEvent("evt_store2"))
		assert.Equal(t, idempotency.OutcomeStoreError, outcome)
		assert.ErrorIs(t, err, idempotency.ErrWebhookNotRecorded)
		assert.ErrorIs(t, err, idempotency.ErrStoreUnavailable)
		assert.ErrorIs(t, err, errStore)
		assert.EqualValues(t, 2, calls.Load())
	})

	t.Run("claim lapsed before marking processed", func(t *testing.T) {
		var calls atomic.Int64
		obs := &observed{}
		rs := &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), completeErr: idempotency.ErrLeaseLost}
		h := whNew(t, rs, func(context.Context, stripe.Event) error { calls.Add(1); return nil }, idempotency.WebhookOptions{Observer: obs.observe})
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		assert.Equal(t, idempotency.OutcomeLeaseLost, obs.last().Outcome)
		assert.ErrorIs(t, obs.last().Err, idempotency.ErrWebhookNotRecorded)
		assert.ErrorIs(t, obs.last().Err, idempotency.ErrLeaseLost)
		assert.EqualValues(t, 1, calls.Load())
	})

	t.Run("releasing fails", func(t *testing.T) {
		obs := &observed{}
		rs := &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), releaseErr: errStore}
		errFn := errors.New("downstream failed")
		h := whNew(t, rs, func(context.Context, stripe.Event) error { return errFn }, idempotency.WebhookOptions{Observer: obs.observe})
		whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusInternalServerError)
		ev := obs.last()
		assert.Equal(t, idempotency.OutcomeStoreError, ev.Outcome)
		assert.ErrorIs(t, ev.Err, idempotency.ErrWebhookFailed)
		assert.ErrorIs(t, ev.Err, errFn)
		assert.ErrorIs(t, ev.Err, errStore)
	})

	t.Run("redis down", func(t *testing.T) {
		mr, client := redistest.Miniredis(t)
		store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{})
		require.NoError(t, err)
		var calls atomic.Int64
		h := whNew(t, store, func(context.Context, stripe.Event) error { calls.Add(1); return nil }, idempotency.WebhookOptions{StoreTimeout: 500 * time.Millisecond})
		mr.Close()
		whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusServiceUnavailable)
		assert.Zero(t, calls.Load())
	})
}

func TestWebhookLeaseIsRenewedWhileTheFunctionRuns(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		// Renewals every lease/3 must come before the work's deadline,
		// three quarters of a lease after the last: a renewal may come
		// up to 500 ms late, for a loaded machine under -race.
		const lease = 1200 * time.Millisecond
		renewed := make(chan struct{})
		rs := &whRecordingStore{Store: store, onExtended: func(n int64) {
			if n == 4 {
				close(renewed)
			}
		}}
		entered := make(chan struct{})
		gate := make(chan struct{})
		var closeGate sync.Once
		open := func() { closeGate.Do(func() { close(gate) }) }
		t.Cleanup(open)
		var calls atomic.Int64
		h := whNew(t, rs, func(ctx context.Context, ev stripe.Event) error {
			calls.Add(1)
			close(entered)
			<-gate
			return ctx.Err()
		}, idempotency.WebhookOptions{Lease: lease})
		payload := whEvent("evt_long")

		done := make(chan idempotency.Outcome, 1)
		go func() {
			outcome, _ := h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}, payload)
			done <- outcome
		}()
		waitFor(t, entered, eventBound, "the function did not start")
		// Three renewals span more than the lease: without them the claim
		// would have lapsed and a second delivery would run the function.
		waitFor(t, renewed, eventBound, "the lease was not renewed four times")
		outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}, payload)
		assert.Equal(t, idempotency.OutcomeInFlight, outcome)
		assert.ErrorIs(t, err, idempotency.ErrKeyInUse)
		open()
		assert.Equal(t, idempotency.OutcomeExecuted, waitFor(t, done, eventBound, "the first delivery did not end"))
		assert.EqualValues(t, 1, calls.Load())
	})
}

func TestWebhookLostLeaseCancelsTheFunction(t *testing.T) {
	rs := &whRecordingStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), extendErr: idempotency.ErrLeaseLost}
	var cause error
	h := whNew(t, rs, func(ctx context.Context, ev stripe.Event) error {
		select {
		case <-ctx.Done():
			cause = context.Cause(ctx)
			return ctx.Err()
		case <-time.After(10 * time.Second):
			return errors.New("the function's context was never cancelled")
		}
	}, idempotency.WebhookOptions{Lease: 30 * time.Millisecond})
	payload := whEvent("evt_lost")
	outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}, payload)
	assert.Equal(t, idempotency.OutcomeReleased, outcome)
	assert.ErrorIs(t, err, idempotency.ErrWebhookFailed)
	assert.ErrorIs(t, cause, idempotency.ErrLeaseLost)
}

// TestWebhookSenderHangingUpDoesNotCancel: Stripe times out and closes
// the connection while the function runs; the function's context stays
// live, its success is recorded, and the next delivery is a duplicate.
func TestWebhookSenderHangingUpDoesNotCancel(t *testing.T) {
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	ctx, hangUp := context.WithCancel(context.Background())
	var calls atomic.Int64
	var fnErr error
	h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
		calls.Add(1)
		hangUp() // Stripe timed out and closed the connection
		fnErr = ctx.Err()
		return nil
	})
	payload := whEvent("evt_hangup")
	whAssertReceived(t, serve(h, whRequest(payload, whSecret).WithContext(ctx)), false)
	assert.NoError(t, fnErr, "the sender's hang-up does not reach the function")

	whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)
	assert.EqualValues(t, 1, calls.Load())
}

func TestWebhookLogger(t *testing.T) {
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, nil))
	h := whNew(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), func(context.Context, stripe.Event) error {
		return errors.New("ledger write failed")
	}, idempotency.WebhookOptions{Logger: logger})
	serve(h, whRequest(whEvent("evt_logged"), whSecret))

	var line map[string]any
	require.NoError(t, json.Unmarshal(bytes.SplitN(buf.Bytes(), []byte("\n"), 2)[0], &line), buf.String())
	assert.Equal(t, "WARN", line["level"])
	assert.Equal(t, "evt_logged", line["event_id"])
	assert.Equal(t, "account.updated", line["event_type"])
	assert.Contains(t, line["error"], "ledger write failed")
}

func TestNewWebhookHandlerValidates(t *testing.T) {
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	fn := func(context.Context, stripe.Event) error { return nil }
	v := whVerifier(t, 0, whSecret)
	wfn := whStripe(fn)
	var typedNil *idempotency.MemoryStore
	tests := []struct {
		name  string
		store idempotency.Store
		v     idempotency.Verifier
		fn    func(context.Context, idempotency.WebhookEvent) error
		opts  idempotency.WebhookOptions
	}{
		{"nil store", nil, v, wfn, idempotency.WebhookOptions{}},
		{"typed nil store", typedNil, v, wfn, idempotency.WebhookOptions{}},
		{"nil verifier", store, nil, wfn, idempotency.WebhookOptions{}},
		{"nil function", store, v, nil, idempotency.WebhookOptions{}},
		{"ttl", store, v, wfn, idempotency.WebhookOptions{TTL: -time.Second}},
		{"lease", store, v, wfn, idempotency.WebhookOptions{Lease: time.Microsecond}},
		{"lease not shorter than ttl", store, v, wfn, idempotency.WebhookOptions{TTL: time.Minute, Lease: time.Minute}},
		{"max body", store, v, wfn, idempotency.WebhookOptions{MaxBodyBytes: -1}},
		{"store timeout", store, v, wfn, idempotency.WebhookOptions{StoreTimeout: -time.Second}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := idempotency.NewWebhookHandler(tc.store, tc.v, tc.fn, tc.opts)
			assert.Error(t, err)
			assert.Nil(t, h)
			assert.True(t, strings.HasPrefix(err.Error(), "idempotency: "), err.Error())
		})
	}
	for name, secrets := range map[string][]string{"no secret": nil, "empty secret": {whSecret, ""}} {
		_, err := idempotency.NewStripeVerifier(secrets, 0)
		assert.Error(t, err, name)
	}
	_, err := idempotency.NewStripeVerifier([]string{whSecret}, -time.Second)
	assert.Error(t, err, "negative tolerance")
}

func TestWebhookMaxBodyBytesOption(t *testing.T) {
	payload := whEvent("evt_small_cap")
	h := whNew(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), func(context.Context, stripe.Event) error { return nil }, idempotency.WebhookOptions{MaxBodyBytes: int64(len(payload) - 1)})
	whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusRequestEntityTooLarge)

	h = whNew(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), func(context.Context, stripe.Event) error { return nil }, idempotency.WebhookOptions{MaxBodyBytes: int64(len(payload))})
	whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
}

// FuzzWebhookHandle feeds arbitrary payloads and Stripe-Signature headers
// to a handler. With sign set, the header is replaced by a valid signature,
// so the fuzzer reaches the payload checks. The function must run only for
// payloads whose signature verifies, at most once per event, and nothing
// may panic.
func FuzzWebhookHandle(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	valid := whEvent("evt_fuzz")
	f.Add(valid, idempotency.SignWebhookPayload(valid, whSecret, now), false)
	f.Add(valid, "", true)
	f.Add(valid, idempotency.SignWebhookPayload(valid, whSecret, now.Add(-time.Hour)), false)
	f.Add(valid, "t=1800000000,v1=zz,v1=,t=x", false)
	f.Add([]byte(`{"id":"evt_1","api_version":"`+stripe.APIVersion+`"}`), "", true)
	f.Add([]byte(`{"id":"evt_1","api_version":"2020-08-27"}`), "", true)
	f.Add([]byte(`{"id":"evt_1","api_version":"`+stripe.APIVersion+`","data":{"object":[]}}`), "", true)
	f.Add([]byte(`{"id":"evt_1","api_version":"`+stripe.APIVersion+`","data":{}}`), "", true)
	f.Add([]byte(`{"id":5}`), "", true)
	f.Add([]byte(`not json`), "t=1,v1=00", false)
	f.Add([]byte(""), "", false)
	f.Add([]byte("{}"), "t=,v1=", true)

	secrets := []string{whOldSecret, whSecret}
	verifier, err := idempotency.NewStripeVerifier(secrets, 0)
	if err != nil {
		f.Fatal(err)
	}
	sentinels := []error{idempotency.ErrWebhookSignature, idempotency.ErrWebhookPayload, idempotency.ErrWebhookPayload, idempotency.ErrBodyTooLarge}
	f.Fuzz(func(t *testing.T, payload []byte, header string, sign bool) {
		if sign {
			header = idempotency.SignWebhookPayload(payload, whSecret, now)
		}
		var calls int
		var got stripe.Event
		h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), verifier,
			func(_ context.Context, ev idempotency.WebhookEvent) error { calls++; got = *ev.Stripe; return nil },
			idempotency.WebhookOptions{})
		if err != nil {
			t.Fatal(err)
		}
		idempotency.SetWebhookClock(h, func() time.Time { return now })
		outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {header}}, payload)

		verified := false
		for _, s := range secrets {
			verified = verified || webhook.ValidatePayloadIgnoringTolerance(payload, header, s) == nil
		}
		switch {
		case calls > 0 && !verified:
			t.Fatalf("the function ran for a payload whose signature does not verify (header %q)", header)
		case calls > 1:
			t.Fatalf("the function ran %d times", calls)
		case calls == 1 && (outcome != idempotency.OutcomeExecuted || err != nil):
			t.Fatalf("the function ran, but Handle returned %s, %v", outcome, err)
		case calls == 0 && outcome != idempotency.OutcomeRejected:
			t.Fatalf("the function did not run, but Handle returned %s, %v", outcome, err)
		}
		if outcome == idempotency.OutcomeRejected {
			known := false
			for _, s := range sentinels {
				known = known || errors.Is(err, s)
			}
			if !known {
				t.Fatalf("rejected with an unexpected error: %v", err)
			}
			return
		}
		if got.ID == "" || !json.Valid(payload) {
			t.Fatalf("processed an event without id or a payload that is not JSON: %q", payload)
		}

		// Delivered again over HTTP, the event is a duplicate.
		req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
		req.Header.Set("Stripe-Signature", header)
		rec := serve(h, req)
		if rec.Code != http.StatusOK || rec.Header().Get(idempotency.DefaultReplayHeader) != "true" || calls != 1 {
			t.Fatalf("second delivery: status %d, replayed %q, %d calls", rec.Code, rec.Header().Get(idempotency.DefaultReplayHeader), calls)
		}
	})
}

// TestWebhookUnreadableRecord: an event whose record cannot be read gets
// 500 on every delivery, runs nothing, and is processed again once an
// operator removes the record.
func TestWebhookUnreadableRecord(t *testing.T) {
	mr, client := redistest.Miniredis(t)
	store := newRedisStore(t, client)
	var calls atomic.Int64
	obs := &observed{}
	h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
		calls.Add(1)
		return nil
	}, idempotency.WebhookOptions{Observer: obs.observe})
	payload := whEvent("evt_unreadable")
	whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
	keys := recordKeys(mr)
	require.Len(t, keys, 1)
	require.NoError(t, mr.Set(keys[0], "\x01Cgarbage"))

	p := whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusInternalServerError)
	assert.Contains(t, p.Type, "#ErrRecordUnreadable")
	assert.Equal(t, idempotency.OutcomeUnreadable, obs.last().Outcome)
	assert.EqualValues(t, 1, calls.Load())

	require.NoError(t, h.Remove(context.Background(), "evt_unreadable"))
	whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
	assert.EqualValues(t, 2, calls.Load())
}
