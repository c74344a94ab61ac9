package main

import (
	"crypto/rand"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

// TestPostgresSurvivesARestart: with DATABASE_URL the venues and the
// idempotency records live in PostgreSQL (tables created at start), so a
// restarted service still replays a request it answered before, and lists
// the venue that replay describes.
func TestPostgresSurvivesARestart(t *testing.T) {
	databaseURL := databaseURLEnv(t)

	p := start(t, databaseURL)
	key := uniqueKey()
	body := `{"name":"Concert Hall","slug":"concert-hall"}`
	first := p.createVenue(key, body)
	require.Equal(t, http.StatusCreated, first.status, "%s", first.body)
	var created Venue
	first.json(t, &created)
	p.stop()

	p = start(t, databaseURL)
	retry := p.createVenue(key, body)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "true", retry.header.Get("X-Idempotent-Replayed"), "the record outlived the process")
	assert.Equal(t, string(first.body), string(retry.body))

	list := do(t, http.MethodGet, p.url+"/venues", "")
	require.Equal(t, http.StatusOK, list.status)
	var venues []Venue
	list.json(t, &venues)
	assert.Equal(t, []Venue{created}, venues, "the venue the replay describes is there, once")
	assert.Equal(t, stats{}, p.stats(), "this process did no work: it replayed")
	p.stop()
}

// TestPostgresAndRedisExclude: the records live in one place.
func TestPostgresAndRedisExclude(t *testing.T) {
	_, err := loadConfig(nil, func(name string) string {
		switch name {
		case "REDIS_URL":
			return "redis://127.0.0.1:6379/0"
		case "DATABASE_URL":
			return "postgres://postgres@127.0.0.1:5432/test"
		}
		return ""
	})
	assert.ErrorContains(t, err, "choose where the records live")
}

// databaseURLEnv returns DATABASE_URL=... for a schema of the test's own,
// or skips the test without a database.
func databaseURLEnv(t *testing.T) string {
	t.Helper()
	schema := pgtest.Schema(pgtest.Config(t))
	u, err := url.Parse(os.Getenv(pgtest.URLEnv))
	require.NoError(t, err)
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return "DATABASE_URL=" + u.String()
}

// TestPostgresWebhookInbox: with DATABASE_URL, a delivery is stored and
// answered 200 at once; the worker then processes it, here after two
// failed attempts (CHAOS_FAIL_WEBHOOK=2), which GET /stats shows; a
// redelivery is a duplicate and runs nothing.
func TestPostgresWebhookInbox(t *testing.T) {
	p := start(t, databaseURLEnv(t), "CHAOS_FAIL_WEBHOOK=2")
	created := p.createVenue(uniqueKey(), `{"name":"Hall","slug":"hall"}`)
	require.Equal(t, http.StatusCreated, created.status)
	var venue Venue
	created.json(t, &venue)

	payload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"account.updated","api_version":%q,"created":%d,`+
		`"data":{"object":{"id":%q,"object":"account","charges_enabled":true}}}`,
		rand.Text(), stripe.APIVersion, time.Now().Unix(), venue.StripeAccountID)
	signature := signWithBinary(t, payload)
	start := time.Now()
	first := do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signature)
	acked := time.Since(start)
	require.Equal(t, http.StatusOK, first.status, "%s", first.body)
	t.Logf("acknowledged in %v", acked)
	second := do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signature)
	assert.Equal(t, http.StatusOK, second.status)
	assert.Equal(t, "true", second.header.Get("X-Idempotent-Replayed"))

	require.Eventually(t, func() bool { return p.stats().WebhookEventsProcessed == 1 }, 10*time.Second, 50*time.Millisecond,
		"the worker processed the event")
	assert.Equal(t, stats{VenuesCreated: 1, StripeAccountsCreated: 1, WebhookEventsProcessed: 1, WebhookEventsDuplicate: 1, WebhookAttemptsFailed: 2}, p.stats())
	var list []Venue
	do(t, http.MethodGet, p.url+"/venues", "").json(t, &list)
	require.Len(t, list, 1)
	assert.True(t, list[0].ChargesEnabled, "account.updated enabled charges on the venue")
	p.stop()
}

// TestPostgresInboxAdmin: with ADMIN_KEY the inbox's operator API is
// mounted under /admin/webhooks/, for that key only, read-only unless
// ADMIN_REDRIVE=1; a failed event is listed with its last error and, once
// redriven, processed.
func TestPostgresInboxAdmin(t *testing.T) {
	const adminKey = "admin-key-test"
	// The function fails as often as the example's worker tries (5), so
	// the event ends failed; the redrive's attempt then succeeds.
	p := start(t, databaseURLEnv(t), "ADMIN_KEY="+adminKey, "ADMIN_REDRIVE=1", "CHAOS_FAIL_WEBHOOK=5")
	payload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"customer.created","api_version":%q,"created":%d,"data":{"object":{"id":"cus_1","object":"customer"}}}`,
		rand.Text(), stripe.APIVersion, time.Now().Unix())
	require.Equal(t, http.StatusOK, do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signWithBinary(t, payload)).status)

	admin := func(method, path string, key string) response {
		return doBare(t, method, p.url+"/admin/webhooks"+path, "", "Authorization", "Bearer "+key)
	}
	assert.Equal(t, http.StatusUnauthorized, admin(http.MethodGet, "/events", "dev-key-a").status, "a tenant's key is no admin key")

	var listed struct {
		Events []struct {
			ID        string `json:"id"`
			Attempts  int    `json:"attempts"`
			LastError string `json:"last_error"`
		} `json:"events"`
	}
	require.Eventually(t, func() bool {
		r := admin(http.MethodGet, "/events?status=failed", adminKey)
		if r.status != http.StatusOK {
			return false
		}
		r.json(t, &listed)
		return len(listed.Events) == 1
	}, 30*time.Second, 100*time.Millisecond, "the event ends failed after the worker's attempts")
	assert.Equal(t, 5, listed.Events[0].Attempts)
	assert.Contains(t, listed.Events[0].LastError, "CHAOS_FAIL_WEBHOOK")

	r := admin(http.MethodPost, "/events/"+listed.Events[0].ID+"/redrive", adminKey)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Eventually(t, func() bool { return p.stats().WebhookEventsProcessed == 1 }, 10*time.Second, 50*time.Millisecond,
		"the redriven event is processed")
	p.stop()
}
