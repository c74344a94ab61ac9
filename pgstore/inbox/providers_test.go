package inbox_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// The tests here send the inbox deliveries of every provider the root
// package verifies: Stripe (of another API version too), Standard
// Webhooks and GitHub.

// swKey is the Standard Webhooks signing key; its secret is
// "whsec_" + base64(swKey).
var swKey = []byte("standard-webhooks-test-key-32byt")

func swVerifier(t testing.TB) idempotency.Verifier {
	t.Helper()
	v, err := idempotency.NewStandardWebhooksVerifier([]string{"whsec_" + base64.StdEncoding.EncodeToString(swKey)}, 0)
	require.NoError(t, err)
	return v
}

// swHeader signs a Standard Webhooks delivery of payload as id, at at,
// with key.
func swHeader(key []byte, id string, at time.Time, payload []byte) http.Header {
	ts := strconv.FormatInt(at.Unix(), 10)
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "%s.%s.%s", id, ts, payload)
	return http.Header{
		"Webhook-Id":        {id},
		"Webhook-Timestamp": {ts},
		"Webhook-Signature": {"v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))},
	}
}

const ghSecret = "github-test-secret"

func ghVerifier(t testing.TB) idempotency.Verifier {
	t.Helper()
	v, err := idempotency.NewGitHubVerifier([]string{ghSecret})
	require.NoError(t, err)
	return v
}

// ghHeader signs a GitHub delivery of payload as delivery id of type
// event, with secret.
func ghHeader(secret, id, event string, payload []byte) http.Header {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(payload)
	return http.Header{
		"X-Hub-Signature-256": {"sha256=" + hex.EncodeToString(mac.Sum(nil))},
		"X-Github-Delivery":   {id},
		"X-Github-Event":      {event},
	}
}

// clover is an event of a Stripe API version newer than stripe-go's, in
// which two fields changed type: the envelope's request is a string, and
// the account's charges_enabled an object. stripe-go cannot decode it
// whole.
func clover(id string) []byte {
	return []byte(`{"id":"` + id + `","object":"event","api_version":"2026-02-25.clover","created":1800000000,` +
		`"type":"account.updated","data":{"object":{"id":"acct_9","object":"account","charges_enabled":{"status":"active"}}},` +
		`"request":"req_2026","pending_webhooks":1,"livemode":false}`)
}

// TestInboxStripeNewerAPIVersion: an event of the 2026-02-25.clover API
// version, delivered several times at once, is stored once with its
// version and processed once; the function gets it decoded as far as
// stripe-go can, with its raw payload, its version and its object.
func TestInboxStripeNewerAPIVersion(t *testing.T) {
	env := newInboxEnv(t)
	payload := clover("evt_clover")
	require.Error(t, json.Unmarshal(payload, new(stripe.Event)), "the test needs a payload stripe-go cannot decode whole")
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := deliver(env.in, payload, sign(payload, whSecret, time.Now()))
			assert.Equal(t, http.StatusOK, w.Code, w.Body.String())
		}()
	}
	wg.Wait()
	e, err := env.in.Event(context.Background(), "evt_clover")
	require.NoError(t, err)
	assert.Equal(t, "2026-02-25.clover", e.APIVersion, "the version is visible")
	assert.Equal(t, "acct_9", e.ObjectID)
	assert.Equal(t, int64(1800000000), e.Created.Unix())

	got := make(chan idempotency.WebhookEvent, 10)
	runWorker(t, newWorker(t, env.newPool(t), func(_ context.Context, ev idempotency.WebhookEvent) error {
		got <- ev
		return nil
	}, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond}))
	waitFor(t, 5*time.Second, "processed", func() bool { return stats(t, env.in).Processed == 1 })
	ev := <-got
	assert.Empty(t, got, "processed once")
	assert.Equal(t, "stripe", ev.Provider)
	assert.Equal(t, "evt_clover", ev.ID)
	assert.Equal(t, "account.updated", ev.Type)
	assert.Equal(t, "2026-02-25.clover", ev.APIVersion)
	assert.Equal(t, "acct_9", ev.Object)
	assert.Equal(t, payload, ev.Payload)
	require.NotNil(t, ev.Stripe)
	assert.Equal(t, "evt_clover", ev.Stripe.ID)
	assert.Equal(t, stripe.EventType("account.updated"), ev.Stripe.Type)
	assert.Equal(t, "2026-02-25.clover", ev.Stripe.APIVersion)
	assert.Equal(t, int64(1800000000), ev.Stripe.Created)
	assert.Equal(t, "acct_9", ev.Stripe.GetObjectValue("id"))
	assert.Equal(t, map[string]any{"status": "active"}, ev.Stripe.Data.Object["charges_enabled"])

	// The verifier of the synchronous handler reads the same event the
	// same way: one decoding for both paths.
	verified, err := stripeVerifier(t, whSecret).Verify(http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}, payload, time.Now())
	require.NoError(t, err)
	assert.Equal(t, verified.Stripe.ID, ev.Stripe.ID)
	assert.Equal(t, verified.Stripe.Type, ev.Stripe.Type)
	assert.Equal(t, verified.Stripe.APIVersion, ev.Stripe.APIVersion)
	assert.Equal(t, verified.Stripe.Created, ev.Stripe.Created)
	assert.Equal(t, verified.Stripe.Data.Object, ev.Stripe.Data.Object)
	assert.Equal(t, verified.Object, ev.Object)
}

// TestInboxProvidersExactlyOnce: three inboxes on one table, Stripe,
// Standard Webhooks and GitHub, receive the same event IDs; each delivery
// is sent three times at once, beside two badly signed copies. The bad
// ones get 400 and store nothing; every provider's event is stored apart
// (the same ID from two providers is two events) and processed once by
// the same workers, which see its provider, type and payload.
func TestInboxProvidersExactlyOnce(t *testing.T) {
	const events, copies = 30, 3
	env := newInboxEnv(t)
	swIn := env.newInbox(t, swVerifier(t))
	ghIn := env.newInbox(t, ghVerifier(t))

	type delivery struct {
		h       http.Handler
		payload []byte
		header  http.Header
		status  int
	}
	var all []delivery
	now := time.Now()
	for i := range events {
		id := fmt.Sprintf("evt_%d", i)
		sp := eventPayload(id, "account.updated", fmt.Sprintf("acct_%d", i), now.Unix())
		wp := []byte(fmt.Sprintf(`{"type":"invoice.paid","data":{"n":%d}}`, i))
		gp := []byte(fmt.Sprintf(`{"action":"opened","number":%d}`, i))
		for range copies {
			all = append(all,
				delivery{env.in, sp, http.Header{"Stripe-Signature": {sign(sp, whSecret, now)}}, 200},
				delivery{swIn, wp, swHeader(swKey, id, now, wp), 200},
				delivery{ghIn, gp, ghHeader(ghSecret, id, "issues", gp), 200})
		}
		all = append(all,
			delivery{env.in, sp, http.Header{"Stripe-Signature": {sign(sp, "whsec_other", now)}}, 400},
			delivery{env.in, append(sp, ' '), http.Header{"Stripe-Signature": {sign(sp, whSecret, now)}}, 400},
			delivery{swIn, wp, swHeader([]byte("another key of 32 bytes, wrong!!"), id, now, wp), 400},
			delivery{swIn, append(wp, ' '), swHeader(swKey, id, now, wp), 400},
			delivery{ghIn, gp, ghHeader("wrong-secret", id, "issues", gp), 400},
			delivery{ghIn, append(gp, ' '), ghHeader(ghSecret, id, "issues", gp), 400})
	}

	var mu sync.Mutex
	processed := map[string]int{} // provider/id
	seen := map[string]idempotency.WebhookEvent{}
	fn := func(_ context.Context, ev idempotency.WebhookEvent) error {
		mu.Lock()
		defer mu.Unlock()
		processed[ev.Provider+"/"+ev.ID]++
		seen[ev.Provider+"/"+ev.ID] = ev
		return nil
	}
	for range 2 {
		runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{Concurrency: 3, PollInterval: 5 * time.Millisecond}))
	}

	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for _, d := range all {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			w := deliverWith(d.h, d.payload, d.header)
			if assert.Equal(t, d.status, w.Code, w.Body.String()) && d.status != http.StatusOK {
				assert.Equal(t, "application/problem+json", w.Header().Get("Content-Type"))
			}
		}()
	}
	wg.Wait()
	require.Equal(t, 3*events, count(t, env.pool, "SELECT count(*) FROM webhook_events"), "one row per provider and ID, none for a bad delivery")
	for _, in := range []*inbox.Inbox{env.in, swIn, ghIn} {
		waitFor(t, 10*time.Second, "every event processed", func() bool { return stats(t, in).Processed == events })
	}
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, processed, 3*events)
	for key, n := range processed {
		require.Equal(t, 1, n, key)
	}
	sw := seen["standard-webhooks/evt_7"]
	assert.Equal(t, "invoice.paid", sw.Type)
	assert.JSONEq(t, `{"type":"invoice.paid","data":{"n":7}}`, string(sw.Payload))
	assert.Nil(t, sw.Stripe)
	gh := seen["github/evt_7"]
	assert.Equal(t, "issues", gh.Type, "GitHub's type comes from a header, kept at receipt")
	assert.JSONEq(t, `{"action":"opened","number":7}`, string(gh.Payload))
	st := seen["stripe/evt_7"]
	require.NotNil(t, st.Stripe)
	assert.Equal(t, "acct_7", st.Object)
	t.Logf("%d events x 3 providers x %d deliveries (+ %d bad ones), 2 workers x 3: each processed once",
		events, copies, 6*events)
}

// TestInboxProvidersReadAndRedrive: an inbox's read API, stats and
// redrives are about its own provider's events: a GitHub event that
// failed its attempts is a dead letter there, not in the Stripe inbox
// that holds an event of the same ID; a redrive processes it.
func TestInboxProvidersReadAndRedrive(t *testing.T) {
	ctx := context.Background()
	env := newInboxEnv(t)
	ghIn := env.newInbox(t, ghVerifier(t))
	now := time.Now()
	sp := eventPayload("dup_1", "account.updated", "acct_1", now.Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, sp, sign(sp, whSecret, now)).Code)
	gp := []byte(`{"action":"opened"}`)
	require.Equal(t, http.StatusOK, deliverWith(ghIn, gp, ghHeader(ghSecret, "dup_1", "issues", gp)).Code)

	var fail sync.Map
	fail.Store("github", true)
	runWorker(t, newWorker(t, env.newPool(t), func(_ context.Context, ev idempotency.WebhookEvent) error {
		if f, _ := fail.Load(ev.Provider); f == true {
			return fmt.Errorf("%s is down", ev.Provider)
		}
		return nil
	}, inbox.WorkerOptions{MaxAttempts: 2, PollInterval: 5 * time.Millisecond, BackoffMin: 5 * time.Millisecond}))
	waitFor(t, 5*time.Second, "the GitHub event failed", func() bool { return stats(t, ghIn).Failed == 1 })
	waitFor(t, 5*time.Second, "the Stripe event processed", func() bool { return stats(t, env.in).Processed == 1 })
	assert.Zero(t, stats(t, env.in).Failed)

	e, err := ghIn.Event(ctx, "dup_1")
	require.NoError(t, err)
	assert.Equal(t, "github", e.Provider)
	assert.Equal(t, inbox.StatusFailed, e.Status)
	assert.Equal(t, 2, e.Attempts)
	assert.Equal(t, "github is down", e.LastError)
	e, err = env.in.Event(ctx, "dup_1")
	require.NoError(t, err)
	assert.Equal(t, inbox.StatusProcessed, e.Status)
	list, err := ghIn.List(ctx, inbox.Filter{})
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.Equal(t, "github", list[0].Provider)

	require.ErrorIs(t, env.in.Redrive(ctx, "dup_1"), inbox.ErrNotFailed, "Stripe's dup_1 is processed")
	fail.Store("github", false)
	require.NoError(t, ghIn.Redrive(ctx, "dup_1"))
	waitFor(t, 5*time.Second, "the GitHub event processed", func() bool { return stats(t, ghIn).Processed == 1 })
}

// TestInboxObjectKeyOrdering: a key function of the inbox's (here: the
// GitHub issue's number) orders a provider's events per object: the
// events of one issue run one at a time, in the order they arrived, and
// the function sees the key as the event's Object.
func TestInboxObjectKeyOrdering(t *testing.T) {
	const issues, perIssue = 4, 6
	env := newInboxEnv(t)
	ghIn := env.newInbox(t, ghVerifier(t), inbox.Options{ObjectKey: func(ev idempotency.WebhookEvent) string {
		var p struct{ Issue struct{ Number int } }
		if json.Unmarshal(ev.Payload, &p) != nil || p.Issue.Number == 0 {
			return ""
		}
		return "issue-" + strconv.Itoa(p.Issue.Number)
	}})
	for k := range perIssue {
		for i := 1; i <= issues; i++ {
			p := []byte(fmt.Sprintf(`{"issue":{"number":%d},"seq":%d}`, i, k))
			require.Equal(t, http.StatusOK, deliverWith(ghIn, p, ghHeader(ghSecret, fmt.Sprintf("d_%d_%d", i, k), "issues", p)).Code)
		}
	}
	var mu sync.Mutex
	running := map[string]bool{}
	order := map[string][]int{}
	var violations []string
	fn := func(_ context.Context, ev idempotency.WebhookEvent) error {
		var p struct{ Seq int }
		_ = json.Unmarshal(ev.Payload, &p)
		mu.Lock()
		if running[ev.Object] {
			violations = append(violations, ev.ID+" runs beside another event of "+ev.Object)
		}
		running[ev.Object] = true
		mu.Unlock()
		time.Sleep(time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		running[ev.Object] = false
		order[ev.Object] = append(order[ev.Object], p.Seq)
		return nil
	}
	for range 2 {
		runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{ObjectOrdering: true, Concurrency: 3, PollInterval: 5 * time.Millisecond}))
	}
	waitFor(t, 10*time.Second, "every event processed", func() bool { return stats(t, ghIn).Processed == issues*perIssue })
	mu.Lock()
	defer mu.Unlock()
	require.Empty(t, violations)
	require.Len(t, order, issues)
	for obj, seqs := range order {
		require.Equal(t, []int{0, 1, 2, 3, 4, 5}, seqs, obj)
	}
}

// TestInboxBadInput: for every provider, a delivery the inbox cannot take
// (a signature header missing or malformed, a body too large, a body that
// is not JSON, an event without an ID) gets a clear 4xx problem, and
// nothing is stored.
func TestInboxBadInput(t *testing.T) {
	env := newInboxEnv(t, inbox.Options{MaxBodyBytes: 1024})
	small := inbox.Options{MaxBodyBytes: 1024}
	swIn := env.newInbox(t, swVerifier(t), small)
	ghIn := env.newInbox(t, ghVerifier(t), small)
	noID := env.newInbox(t, idless{swVerifier(t)}, small)
	now := time.Now()
	good := []byte(`{"type":"x"}`)
	large := append(append([]byte(`{"pad":"`), bytes.Repeat([]byte("x"), 1100)...), `"}`...)
	notJSON := []byte("{not json")
	stripeEv := eventPayload("evt_1", "account.updated", "acct_1", now.Unix())
	without := func(h http.Header, name string) http.Header {
		h = h.Clone()
		h.Del(name)
		return h
	}
	with := func(h http.Header, name, value string) http.Header {
		h = h.Clone()
		h.Set(name, value)
		return h
	}
	sw := swHeader(swKey, "msg_1", now, good)
	gh := ghHeader(ghSecret, "d_1", "push", good)
	cases := []struct {
		name    string
		h       http.Handler
		payload []byte
		header  http.Header
		status  int
	}{
		{"stripe: no signature", env.in, stripeEv, http.Header{}, 400},
		{"stripe: malformed signature", env.in, stripeEv, http.Header{"Stripe-Signature": {"v1=zz"}}, 400},
		{"stripe: not JSON", env.in, notJSON, http.Header{"Stripe-Signature": {sign(notJSON, whSecret, now)}}, 400},
		{"stripe: too large", env.in, large, http.Header{"Stripe-Signature": {sign(large, whSecret, now)}}, 413},
		{"standard webhooks: no id", swIn, good, without(sw, "Webhook-Id"), 400},
		{"standard webhooks: no timestamp", swIn, good, without(sw, "Webhook-Timestamp"), 400},
		{"standard webhooks: no signature", swIn, good, without(sw, "Webhook-Signature"), 400},
		{"standard webhooks: timestamp not a number", swIn, good, with(sw, "Webhook-Timestamp", "soon"), 400},
		{"standard webhooks: signature without a version", swIn, good, with(sw, "Webhook-Signature", "c2lnbmF0dXJl"), 400},
		{"standard webhooks: old timestamp", swIn, good, swHeader(swKey, "msg_1", now.Add(-time.Hour), good), 400},
		{"standard webhooks: not JSON", swIn, notJSON, swHeader(swKey, "msg_2", now, notJSON), 400},
		{"standard webhooks: too large", swIn, large, swHeader(swKey, "msg_3", now, large), 413},
		{"github: no signature", ghIn, good, without(gh, "X-Hub-Signature-256"), 400},
		{"github: signature not sha256", ghIn, good, with(gh, "X-Hub-Signature-256", "sha1=00"), 400},
		{"github: signature not hex", ghIn, good, with(gh, "X-Hub-Signature-256", "sha256=zz"), 400},
		{"github: no delivery id", ghIn, good, without(gh, "X-Github-Delivery"), 400},
		{"github: not JSON", ghIn, notJSON, ghHeader(ghSecret, "d_2", "push", notJSON), 400},
		{"github: too large", ghIn, large, ghHeader(ghSecret, "d_3", "push", large), 413},
		{"a verifier of one's own: empty id", noID, good, swHeader(swKey, "msg_4", now, good), 400},
	}
	for _, c := range cases {
		requireProblem(t, deliverWith(c.h, c.payload, c.header), c.status, c.name)
	}
	require.Zero(t, count(t, env.pool, "SELECT count(*) FROM webhook_events"), "nothing stored")
}

// idless is a verifier of the user's own that names no event ID.
type idless struct{ idempotency.Verifier }

func (v idless) Provider() string { return "idless" }

func (v idless) Verify(h http.Header, payload []byte, now time.Time) (idempotency.WebhookEvent, error) {
	ev, err := v.Verifier.Verify(h, payload, now)
	ev.ID = ""
	return ev, err
}
