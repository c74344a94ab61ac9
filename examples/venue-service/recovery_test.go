package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestResumesAfterCrash: a venue creation that crashes after a step
// (CHAOS_CRASH_AFTER: the handler panics, the client gets no answer) is
// resumed by the retry with the same key, after that step: one venue, one
// Stripe account, on memory and on PostgreSQL.
func TestResumesAfterCrash(t *testing.T) {
	stores := []struct {
		name string
		env  func(t *testing.T) []string
	}{
		{"memory", func(*testing.T) []string { return nil }},
		{"postgres", func(t *testing.T) []string { return []string{databaseURLEnv(t)} }},
	}
	for _, store := range stores {
		for _, point := range []string{"venue_created", "account_created"} {
			t.Run(store.name+"/"+point, func(t *testing.T) {
				p := start(t, append(store.env(t), "CHAOS_CRASH_AFTER="+point)...)
				key, body := uniqueKey(), `{"name":"Hall","slug":"hall"}`

				req, err := http.NewRequest(http.MethodPost, p.url+"/venues", strings.NewReader(body))
				require.NoError(t, err)
				req.Header.Set("Authorization", "Bearer dev-key-a")
				req.Header.Set("Content-Type", "application/json") // as createVenue's retries send it
				req.Header.Set("Idempotency-Key", key)
				resp, err := http.DefaultClient.Do(req)
				if err == nil {
					resp.Body.Close()
				}
				require.Error(t, err, "the crashed request gets no answer")

				list := do(t, http.MethodGet, p.url+"/venues?slug=hall", "")
				var pending []Venue
				list.json(t, &pending)
				require.Len(t, pending, 1, "the first step's venue is there")
				assert.Equal(t, venuePending, pending[0].Status)
				assert.Equal(t, point == "account_created", pending[0].StripeAccountID != "")

				other := p.createVenue(key, `{"name":"Other","slug":"other"}`)
				assert.Equal(t, http.StatusUnprocessableEntity, other.status, "the key is bound to the half-done creation")

				retry := p.createVenue(key, body)
				require.Equal(t, http.StatusCreated, retry.status, "%s", retry.body)
				var venue Venue
				retry.json(t, &venue)
				assert.Equal(t, pending[0].ID, venue.ID, "the retry finished the venue the crash left")
				assert.Equal(t, venueActive, venue.Status)
				assert.True(t, strings.HasPrefix(venue.StripeAccountID, "acct_"))

				replay := p.createVenue(key, body)
				assert.Equal(t, "true", replay.header.Get("X-Idempotent-Replayed"))
				assert.Equal(t, string(retry.body), string(replay.body))

				list = do(t, http.MethodGet, p.url+"/venues?slug=hall", "")
				var venues []Venue
				list.json(t, &venues)
				assert.Equal(t, []Venue{venue}, venues, "one venue")
				s := p.stats()
				assert.Equal(t, 1, s.StripeAccountsCreated, "one Stripe account")
				assert.Equal(t, 1, s.VenuesCreated)
				p.stop()
			})
		}
	}
}

// TestPostgresResumesAfterKill: the process is killed (SIGKILL) while a
// venue creation waits for Stripe, after its first step committed. A new
// process on the same database answers the retry 409 until the dead
// claim's lease (30 s) lapses, then resumes after that step: the same
// venue, made active, and no second one.
func TestPostgresResumesAfterKill(t *testing.T) {
	databaseURL := databaseURLEnv(t)
	// The creation is held just before its Stripe call, after its first
	// step committed, until the process is killed.
	p := start(t, databaseURL, "CHAOS_HOLD=1")
	p.hold()
	key, body := uniqueKey(), `{"name":"Hall","slug":"hall"}`
	go func() {
		req, _ := http.NewRequest(http.MethodPost, p.url+"/venues", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer dev-key-a")
		req.Header.Set("Content-Type", "application/json") // as createVenue's retries send it
		req.Header.Set("Idempotency-Key", key)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	p.awaitHeld(1)
	var pending []Venue
	do(t, http.MethodGet, p.url+"/venues?slug=hall", "").json(t, &pending)
	require.Len(t, pending, 1, "the first step committed")
	require.Equal(t, venuePending, pending[0].Status)
	require.NoError(t, p.cmd.Process.Kill())
	receive(t, p.done, "the killed process did not end")
	killed := time.Now()

	p = start(t, databaseURL)
	var retry response
	// Polls: the dead claim's lease lapses by PostgreSQL's clock, an
	// event this test cannot be told of.
	for {
		retry = p.createVenue(key, body, "Prefer", "wait=0")
		if retry.status != http.StatusConflict || time.Since(killed) > 45*time.Second {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	require.Equal(t, http.StatusCreated, retry.status, "%s", retry.body)
	t.Logf("the retry resumed %v after the kill", time.Since(killed).Round(100*time.Millisecond))
	var venue Venue
	retry.json(t, &venue)
	assert.Equal(t, pending[0].ID, venue.ID, "the venue the killed process stored")
	assert.Equal(t, venueActive, venue.Status)
	var venues []Venue
	do(t, http.MethodGet, p.url+"/venues?slug=hall", "").json(t, &venues)
	assert.Equal(t, []Venue{venue}, venues, "one venue")
	p.stop()
}
