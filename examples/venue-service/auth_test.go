package main

// Tests of authentication: the tenant comes from the API key, and a request
// without valid credentials is turned away before the idempotency
// middleware runs.

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// doBare sends a request with no credentials but those header sets.
func doBare(t *testing.T, method, url, body string, header ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return response{resp.StatusCode, resp.Header, b}
}

// TestUnauthenticatedRequestsStoreNothing: without a valid API key POST
// /venues and GET /venues answer 401 problem+json with WWW-Authenticate;
// the middleware never ran (no metric series, nothing claimed: the same
// Idempotency-Key then runs for the real tenant), nothing was created, and
// X-Tenant-ID does not stand in for a key.
func TestUnauthenticatedRequestsStoreNothing(t *testing.T) {
	p := start(t)
	key := uniqueKey()
	body := `{"name":"Hall","slug":"hall"}`
	for name, header := range map[string][]string{
		"no credentials":     nil,
		"X-Tenant-ID only":   {"X-Tenant-ID", "tenant-a"},
		"unknown key":        {"Authorization", "Bearer not-a-key", "X-Tenant-ID", "tenant-a"},
		"empty bearer":       {"Authorization", "Bearer "},
		"basic auth":         {"Authorization", "Basic ZGV2LWtleS1hOg=="},
		"key without scheme": {"Authorization", "dev-key-a"},
	} {
		r := doBare(t, http.MethodPost, p.url+"/venues", body, append([]string{"Idempotency-Key", key}, header...)...)
		assert.Equal(t, http.StatusUnauthorized, r.status, "%s: %s", name, r.body)
		assert.Equal(t, "application/problem+json", r.header.Get("Content-Type"), name)
		assert.Equal(t, `Bearer realm="venue-service"`, r.header.Get("WWW-Authenticate"), name)
		assert.Empty(t, r.header.Get("X-Idempotent-Replayed"), name)

		r = doBare(t, http.MethodGet, p.url+"/venues", "", header...)
		assert.Equal(t, http.StatusUnauthorized, r.status, "GET /venues, %s", name)
	}
	assert.Equal(t, stats{}, p.stats(), "nothing created")
	metrics := doBare(t, http.MethodGet, p.url+"/metrics", "")
	require.Equal(t, http.StatusOK, metrics.status, "/metrics needs no credentials")
	assert.NotContains(t, string(metrics.body), "idempotency_requests_total{", "the middleware never ran")
	assert.NotContains(t, string(metrics.body), `operation="acquire"`, "no store call")
	assert.Equal(t, http.StatusOK, doBare(t, http.MethodGet, p.url+"/healthz", "").status)

	// The key was never claimed: tenant-a's request with it runs.
	r := doBare(t, http.MethodPost, p.url+"/venues", body, "Idempotency-Key", key, "Authorization", "Bearer dev-key-a")
	assert.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	assert.Empty(t, r.header.Get("X-Idempotent-Replayed"))
	assert.Equal(t, stats{VenuesCreated: 1, StripeAccountsCreated: 1}, p.stats())
	p.stop()
}

// TestTenantComesFromTheAPIKey: records and venues belong to the key's
// tenant; X-Tenant-ID changes nothing.
func TestTenantComesFromTheAPIKey(t *testing.T) {
	p := start(t)
	key := uniqueKey()
	a := []string{"Authorization", "Bearer dev-key-a"}
	b := []string{"Authorization", "Bearer dev-key-b"}
	post := func(body string, header ...string) response {
		return doBare(t, http.MethodPost, p.url+"/venues", body, append([]string{"Idempotency-Key", key}, header...)...)
	}
	first := post(`{"name":"Hall","slug":"hall"}`, a...)
	require.Equal(t, http.StatusCreated, first.status, "%s", first.body)
	var va Venue
	first.json(t, &va)
	assert.Equal(t, "tenant-a", va.Tenant)

	// Claiming to be tenant-b in a header does not reach tenant-b's records.
	spoof := post(`{"name":"Hall","slug":"hall"}`, append([]string{"X-Tenant-ID", "tenant-b"}, a...)...)
	assert.Equal(t, "true", spoof.header.Get("X-Idempotent-Replayed"), "still tenant-a: the replay")
	assert.Equal(t, first.body, spoof.body)

	// The same key and body for tenant-b is tenant-b's own request, and
	// tenant-b may use the same slug.
	other := post(`{"name":"Hall","slug":"hall"}`, b...)
	require.Equal(t, http.StatusCreated, other.status, "%s", other.body)
	assert.Empty(t, other.header.Get("X-Idempotent-Replayed"))
	var vb Venue
	other.json(t, &vb)
	assert.Equal(t, "tenant-b", vb.Tenant)
	assert.NotEqual(t, va.StripeAccountID, vb.StripeAccountID)

	var list []Venue
	doBare(t, http.MethodGet, p.url+"/venues", "", b...).json(t, &list)
	assert.Equal(t, []Venue{vb}, list, "tenant-b sees its venues only")
	doBare(t, http.MethodGet, p.url+"/venues?slug=hall", "", a...).json(t, &list)
	assert.Equal(t, []Venue{va}, list)
	doBare(t, http.MethodGet, p.url+"/venues?slug=nope", "", a...).json(t, &list)
	assert.Empty(t, list)

	// The Location of a created venue, for its tenant only.
	loc := first.header.Get("Location")
	var got Venue
	doBare(t, http.MethodGet, p.url+loc, "", a...).json(t, &got)
	assert.Equal(t, va, got)
	assert.Equal(t, http.StatusNotFound, doBare(t, http.MethodGet, p.url+loc, "", b...).status)
	p.stop()
}

// TestAPIKeysFromTheEnvironment: API_KEYS (or -api-keys) replaces the
// development keys, and the startup line names the tenants, not the keys.
func TestAPIKeysFromTheEnvironment(t *testing.T) {
	p := start(t, "API_KEYS=k-acme-1:acme, k-acme-2:acme,k-globex:globex")
	assert.Contains(t, p.logText(), "tenants=acme,globex")
	assert.NotContains(t, p.logText(), "k-acme-1", "keys are not logged")
	assert.NotContains(t, p.logText(), "api_keys=", "no development keys")
	assert.Equal(t, http.StatusUnauthorized, doBare(t, http.MethodGet, p.url+"/venues", "", "Authorization", "Bearer dev-key-a").status)
	for _, key := range []string{"k-acme-1", "k-acme-2"} {
		r := doBare(t, http.MethodPost, p.url+"/venues", `{"name":"Hall","slug":"hall"}`,
			"Idempotency-Key", "same", "Authorization", "Bearer "+key)
		require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
		if key == "k-acme-2" {
			assert.Equal(t, "true", r.header.Get("X-Idempotent-Replayed"), "two keys of one tenant share its records")
		}
	}
	p.stop()
}
