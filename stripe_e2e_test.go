package idempotency_test

import (
	"context"
	"encoding/json"
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
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/stripefake"
)

// stripeConnectService is the venue service's onboarding endpoint in miniature:
// it creates a Connect account for a venue, then writes to its database,
// which fails on the first attempt. stripeKey chooses the Stripe
// idempotency key.
func stripeConnectService(t *testing.T, store idempotency.Store, sc *client.API, stripeKey func(r *http.Request, venueID string) (string, error)) (url string, attempts *atomic.Int64) {
	t.Helper()
	attempts = &atomic.Int64{}
	mw, err := idempotency.New(store, idempotency.Options{})
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.Handle("POST /venues/{id}/connect", mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		venueID := r.PathValue("id")
		params := &stripe.AccountParams{
			Type:    stripe.String(string(stripe.AccountTypeExpress)),
			Country: stripe.String("DE"),
			Email:   stripe.String("owner@" + venueID + ".example"),
		}
		params.AddMetadata("venue_id", venueID)
		key, err := stripeKey(r, venueID)
		if err != nil {
			http.Error(w, "no idempotency key", http.StatusInternalServerError)
			return
		}
		params.SetIdempotencyKey(key)
		acct, err := sc.Accounts.New(params)
		if err != nil {
			http.Error(w, "stripe failed", http.StatusBadGateway)
			return
		}
		if attempts.Add(1) == 1 {
			http.Error(w, "database unavailable", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]string{"account_id": acct.ID})
	})))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL, attempts
}

// stripeConnect is the client's call, always with the same Idempotency-Key.
func stripeConnect(t *testing.T, url string) (status int, body, replayed string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url+"/venues/venue-42/connect", strings.NewReader(`{"plan":"standard"}`))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", "5f0c2a7e-connect-venue-42")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b), resp.Header.Get(idempotency.DefaultReplayHeader)
}

func TestStripeKeyRetriedRequestCreatesOneConnectAccount(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		fake, srv := stripefake.NewServer()
		t.Cleanup(srv.Close)
		url, attempts := stripeConnectService(t, store, stripefake.NewClient(srv.URL, stripefake.TestAPIKey),
			func(r *http.Request, _ string) (string, error) {
				return idempotency.StripeKey(r.Context(), "accounts.create")
			})

		status, _, _ := stripeConnect(t, url)
		assert.Equal(t, http.StatusInternalServerError, status, "the first attempt fails after creating the account")

		status, body, replayed := stripeConnect(t, url)
		assert.Equal(t, http.StatusCreated, status)
		assert.Empty(t, replayed, "the retry ran the handler again")
		var created struct {
			AccountID string `json:"account_id"`
		}
		require.NoError(t, json.Unmarshal([]byte(body), &created))

		status, again, replayed := stripeConnect(t, url)
		assert.Equal(t, http.StatusCreated, status)
		assert.Equal(t, "true", replayed)
		assert.JSONEq(t, body, again)

		assert.EqualValues(t, 2, attempts.Load())
		require.Equal(t, 1, fake.AccountsCreated(), "exactly one Connect account")
		assert.Equal(t, created.AccountID, fake.Accounts()[0].ID)
		assert.Equal(t, "venue-42", fake.Accounts()[0].Metadata["venue_id"])
		assert.Equal(t, 1, fake.Replays(), "Stripe replayed the account to the retry")
	})
}

// TestAuditTimestampKeyCreatesTwoConnectAccounts keeps the audit's
// suggested key, connect:${venueId}:${Date.now()}, to show why it is not
// idempotent: the retry comes later, gets another timestamp, hence another
// key, and Stripe creates a second account.
func TestAuditTimestampKeyCreatesTwoConnectAccounts(t *testing.T) {
	fake, srv := stripefake.NewServer()
	t.Cleanup(srv.Close)
	var clock atomic.Int64
	clock.Store(time.Date(2025, 11, 27, 10, 0, 0, 0, time.UTC).UnixMilli())
	dateNow := func() int64 { return clock.Add(1500) } // each attempt 1.5 s after the previous
	url, attempts := stripeConnectService(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), stripefake.NewClient(srv.URL, stripefake.TestAPIKey),
		func(_ *http.Request, venueID string) (string, error) {
			return fmt.Sprintf("connect:%s:%d", venueID, dateNow()), nil
		})

	status, _, _ := stripeConnect(t, url)
	assert.Equal(t, http.StatusInternalServerError, status)
	status, _, _ = stripeConnect(t, url)
	assert.Equal(t, http.StatusCreated, status)

	assert.EqualValues(t, 2, attempts.Load())
	assert.Equal(t, 2, fake.AccountsCreated(), "the timestamp key let the retry create a duplicate account")
	assert.Equal(t, 0, fake.Replays())
	accounts := fake.Accounts()
	assert.Equal(t, accounts[0].Metadata, accounts[1].Metadata, "two accounts for the same venue")
}

func TestStripeKeyInWebhookFunctionSurvivesARedelivery(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		fake, srv := stripefake.NewServer()
		t.Cleanup(srv.Close)
		sc := stripefake.NewClient(srv.URL, stripefake.TestAPIKey)
		venue, err := sc.Accounts.New(&stripe.AccountParams{Type: stripe.String("express")})
		require.NoError(t, err)

		var calls atomic.Int64
		h := whNew(t, store, func(ctx context.Context, ev stripe.Event) error {
			params := &stripe.TransferParams{
				Amount:      stripe.Int64(4200),
				Currency:    stripe.String(string(stripe.CurrencyEUR)),
				Destination: stripe.String(venue.ID),
			}
			key, err := idempotency.StripeKey(ctx, "transfer:payout")
			if err != nil {
				return err
			}
			params.SetIdempotencyKey(key)
			if _, err := sc.Transfers.New(params); err != nil {
				return err
			}
			if calls.Add(1) == 1 {
				return errors.New("ledger write failed")
			}
			return nil
		})
		payload := whEvent("evt_payout")

		whAssertProblem(t, serve(h, whRequest(payload, whSecret)), http.StatusInternalServerError)
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), false)
		whAssertReceived(t, serve(h, whRequest(payload, whSecret)), true)

		assert.EqualValues(t, 2, calls.Load())
		assert.Equal(t, 1, fake.TransfersCreated(), "exactly one transfer")
		assert.Equal(t, 1, fake.Replays())
	})
}
