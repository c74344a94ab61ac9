package stripefake_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency/stripefake"
)

func start(t *testing.T, opts ...stripefake.Option) (*stripefake.Fake, string) {
	t.Helper()
	fake, srv := stripefake.NewServer(opts...)
	t.Cleanup(srv.Close)
	return fake, srv.URL
}

func accountParams(email string) *stripe.AccountParams {
	p := &stripe.AccountParams{
		Type:    stripe.String(string(stripe.AccountTypeExpress)),
		Country: stripe.String("US"),
		Email:   stripe.String(email),
	}
	p.AddMetadata("venue_id", "venue-42")
	p.AddMetadata("region", "eu")
	p.AddMetadata("tier", "gold")
	return p
}

// post sends a raw form POST, as a client without stripe-go would.
func post(t *testing.T, base, path, key string, form url.Values) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, base+path, strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+stripefake.TestAPIKey)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, body
}

func TestSameKeySameParamsReplaysTheFirstObject(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)

	p1 := accountParams("owner@example.com")
	p1.SetIdempotencyKey("key-1")
	first, err := sc.Accounts.New(p1)
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(first.ID, "acct_"), first.ID)
	assert.Equal(t, "owner@example.com", first.Email)
	assert.Equal(t, "venue-42", first.Metadata["venue_id"])
	assert.Empty(t, first.LastResponse.Header.Get("Idempotent-Replayed"))

	// A new params value: stripe-go encodes metadata from a map, so the
	// parameter order may differ; the fake compares them sorted.
	p2 := accountParams("owner@example.com")
	p2.SetIdempotencyKey("key-1")
	second, err := sc.Accounts.New(p2)
	require.NoError(t, err)
	assert.Equal(t, first.ID, second.ID)
	assert.Equal(t, "true", second.LastResponse.Header.Get("Idempotent-Replayed"))
	assert.Equal(t, "key-1", second.LastResponse.Header.Get("Idempotency-Key"))

	assert.Equal(t, 1, fake.AccountsCreated())
	assert.Equal(t, 1, fake.Replays())
	got, err := sc.Accounts.GetByID(first.ID, nil)
	require.NoError(t, err)
	assert.Equal(t, first.ID, got.ID)
}

func TestSameKeyDifferentParamsIsAnIdempotencyError(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)

	p1 := accountParams("a@example.com")
	p1.SetIdempotencyKey("key-1")
	_, err := sc.Accounts.New(p1)
	require.NoError(t, err)

	p2 := accountParams("b@example.com")
	p2.SetIdempotencyKey("key-1")
	_, err = sc.Accounts.New(p2)
	var stripeErr *stripe.Error
	require.True(t, errors.As(err, &stripeErr), "error %v", err)
	assert.Equal(t, stripe.ErrorTypeIdempotency, stripeErr.Type)
	assert.Equal(t, http.StatusBadRequest, stripeErr.HTTPStatusCode)
	assert.Equal(t, 1, fake.AccountsCreated())

	// The wire shape, as Stripe sends it.
	resp, body := post(t, base, "/v1/accounts", "key-1", url.Values{"email": {"c@example.com"}})
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	var doc struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal(body, &doc))
	assert.Equal(t, "idempotency_error", doc.Error.Type)
	assert.Contains(t, doc.Error.Message, "same parameters")

	// Another endpoint under the same key is a different request too.
	resp, _ = post(t, base, "/v1/transfers", "key-1", url.Values{"email": {"a@example.com"}})
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, 1, fake.AccountsCreated())
	assert.Equal(t, 0, fake.TransfersCreated())
}

func TestNoKeyCreatesAnObjectEachCall(t *testing.T) {
	fake, base := start(t)
	form := url.Values{"type": {"express"}, "email": {"a@example.com"}}
	var ids []string
	for range 3 {
		resp, body := post(t, base, "/v1/accounts", "", form)
		require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
		assert.Empty(t, resp.Header.Get("Idempotent-Replayed"))
		var a stripefake.Account
		require.NoError(t, json.Unmarshal(body, &a))
		ids = append(ids, a.ID)
	}
	assert.Len(t, ids, 3)
	assert.NotEqual(t, ids[0], ids[1])
	assert.NotEqual(t, ids[1], ids[2])
	assert.Equal(t, 3, fake.AccountsCreated())

	// stripe-go sends a fresh random key on every call that has none, so
	// its calls without a key create new objects too.
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	for range 2 {
		_, err := sc.Accounts.New(accountParams("a@example.com"))
		require.NoError(t, err)
	}
	assert.Equal(t, 5, fake.AccountsCreated())
	assert.Equal(t, 0, fake.Replays())
}

func TestKeysAreScopedByAPIKeyAndAccount(t *testing.T) {
	fake, base := start(t)
	a := stripefake.NewClient(base, "sk_test_a")
	b := stripefake.NewClient(base, "sk_test_b")
	for _, c := range []struct {
		name string
		new  func() error
	}{
		{"key a", func() error {
			p := accountParams("x@example.com")
			p.SetIdempotencyKey("shared")
			_, err := a.Accounts.New(p)
			return err
		}},
		{"key b", func() error {
			p := accountParams("x@example.com")
			p.SetIdempotencyKey("shared")
			_, err := b.Accounts.New(p)
			return err
		}},
		{"key a on behalf of a connected account", func() error {
			p := accountParams("x@example.com")
			p.SetIdempotencyKey("shared")
			p.SetStripeAccount("acct_connected")
			_, err := a.Accounts.New(p)
			return err
		}},
	} {
		require.NoError(t, c.new(), c.name)
	}
	assert.Equal(t, 3, fake.AccountsCreated())
	assert.Equal(t, 0, fake.Replays())
}

func TestConcurrentSameKeyCreatesOneObject(t *testing.T) {
	fake, base := start(t, stripefake.WithLatency(50*time.Millisecond))
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	const n = 10
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := accountParams("a@example.com")
			p.SetIdempotencyKey("concurrent")
			acct, err := sc.Accounts.New(p)
			errs[i] = err
			if err == nil {
				ids[i] = acct.ID
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 1, fake.AccountsCreated())
	var ok int
	for i := range n {
		if errs[i] == nil {
			ok++
			assert.Equal(t, fake.Accounts()[0].ID, ids[i])
			continue
		}
		var stripeErr *stripe.Error
		require.True(t, errors.As(errs[i], &stripeErr), "error %v", errs[i])
		assert.Equal(t, http.StatusConflict, stripeErr.HTTPStatusCode)
		assert.Equal(t, stripe.ErrorCodeIdempotencyKeyInUse, stripeErr.Code)
	}
	assert.GreaterOrEqual(t, ok, 1)
}

func TestTransfers(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	acct, err := sc.Accounts.New(accountParams("a@example.com"))
	require.NoError(t, err)

	params := func(dest string) *stripe.TransferParams {
		p := &stripe.TransferParams{Amount: stripe.Int64(1500), Currency: stripe.String("EUR"), Destination: stripe.String(dest)}
		p.SetIdempotencyKey("payout-1")
		return p
	}

	// A request that fails validation keeps no result: the same key and
	// parameters fail again instead of being replayed.
	for range 2 {
		_, err = sc.Transfers.New(params("acct_missing"))
		var stripeErr *stripe.Error
		require.True(t, errors.As(err, &stripeErr), "error %v", err)
		assert.Equal(t, stripe.ErrorCodeResourceMissing, stripeErr.Code)
		assert.Equal(t, "destination", stripeErr.Param)
	}
	assert.Equal(t, 0, fake.Replays())

	// The key is still free, now with other parameters.
	tr, err := sc.Transfers.New(params(acct.ID))
	require.NoError(t, err)
	again, err := sc.Transfers.New(params(acct.ID))
	require.NoError(t, err)
	assert.Equal(t, tr.ID, again.ID)
	assert.Equal(t, "true", again.LastResponse.Header.Get("Idempotent-Replayed"))
	assert.Equal(t, int64(1500), tr.Amount)
	assert.Equal(t, stripe.CurrencyEUR, tr.Currency)
	assert.Equal(t, acct.ID, tr.Destination.ID)

	got, err := sc.Transfers.Get(tr.ID, nil)
	require.NoError(t, err)
	assert.Equal(t, tr.ID, got.ID)
	assert.Equal(t, 1, fake.TransfersCreated())
	assert.Equal(t, []string{acct.ID}, []string{fake.Transfers()[0].Destination})

	resp, _ := post(t, base, "/v1/transfers", "", url.Values{"currency": {"eur"}, "destination": {acct.ID}})
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
}

func TestErrorsLookLikeStripes(t *testing.T) {
	_, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)

	_, err := sc.Accounts.GetByID("acct_missing", nil)
	var stripeErr *stripe.Error
	require.True(t, errors.As(err, &stripeErr), "error %v", err)
	assert.Equal(t, http.StatusNotFound, stripeErr.HTTPStatusCode)
	assert.Equal(t, stripe.ErrorCodeResourceMissing, stripeErr.Code)

	req, err := http.NewRequest(http.MethodPost, base+"/v1/accounts", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	resp, _ = post(t, base, "/v1/charges", "", nil)
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	resp, _ = post(t, base, "/v1/accounts", strings.Repeat("k", 256), nil)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
}

func TestLatency(t *testing.T) {
	fake, base := start(t, stripefake.WithLatency(30*time.Millisecond))
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	began := time.Now()
	_, err := sc.Accounts.New(accountParams("a@example.com"))
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(began), 30*time.Millisecond)
	assert.Equal(t, 1, fake.AccountsCreated())
	assert.Equal(t, 1, fake.Requests())
}

func TestEvents(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	acct, err := sc.Accounts.New(accountParams("a@example.com"))
	require.NoError(t, err)
	assert.Empty(t, fake.Events(), "creating an account emits nothing")

	var transfers []string
	for i := range 3 {
		p := &stripe.TransferParams{Amount: stripe.Int64(100), Currency: stripe.String("eur"), Destination: stripe.String(acct.ID)}
		p.SetIdempotencyKey(fmt.Sprintf("payout-%d", i))
		tr, err := sc.Transfers.New(p)
		require.NoError(t, err)
		transfers = append(transfers, tr.ID)
	}
	updated, err := fake.UpdateAccount(acct.ID, func(a *stripefake.Account) { a.ChargesEnabled = true })
	require.NoError(t, err)
	assert.Equal(t, "account.updated", updated.Type)
	assert.Equal(t, acct.ID, updated.Account)
	_, err = fake.UpdateAccount("acct_missing", func(*stripefake.Account) {})
	assert.ErrorIs(t, err, stripefake.ErrNoSuchAccount)

	events := fake.Events()
	require.Len(t, events, 4)
	assert.Equal(t, "transfer.created", events[0].Type)
	assert.Equal(t, "payout-0", events[0].Request.IdempotencyKey)
	assert.Equal(t, updated, events[3])

	// A replayed POST emits nothing.
	p := &stripe.TransferParams{Amount: stripe.Int64(100), Currency: stripe.String("eur"), Destination: stripe.String(acct.ID)}
	p.SetIdempotencyKey("payout-0")
	_, err = sc.Transfers.New(p)
	require.NoError(t, err)
	assert.Len(t, fake.Events(), 4)

	// stripe-go's list iterator pages through them, newest first, with a
	// type filter; limit 2 makes it follow starting_after.
	params := &stripe.EventListParams{Type: stripe.String("transfer.created")}
	params.Limit = stripe.Int64(2)
	var listed []string
	it := sc.Events.List(params)
	for it.Next() {
		e := it.Event()
		var tr stripe.Transfer
		require.NoError(t, json.Unmarshal(e.Data.Raw, &tr))
		listed = append(listed, tr.ID)
	}
	require.NoError(t, it.Err())
	assert.Equal(t, []string{transfers[2], transfers[1], transfers[0]}, listed)

	got, err := sc.Events.Get(updated.ID, nil)
	require.NoError(t, err)
	var a stripe.Account
	require.NoError(t, json.Unmarshal(got.Data.Raw, &a))
	assert.True(t, a.ChargesEnabled)
	assert.Equal(t, acct.ID, got.Account)

	_, err = sc.Events.Get("evt_missing", nil)
	var stripeErr *stripe.Error
	require.True(t, errors.As(err, &stripeErr), "error %v", err)
	assert.Equal(t, http.StatusNotFound, stripeErr.HTTPStatusCode)
}

// TestEventsDeliveryAndCreatedFilters: delivery_success lists the events
// marked delivered (true) or the others (false); created[...] bounds them.
func TestEventsDeliveryAndCreatedFilters(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	acct, err := sc.Accounts.New(accountParams("a@example.com"))
	require.NoError(t, err)
	var ids []string
	for range 3 {
		ev, err := fake.UpdateAccount(acct.ID, func(a *stripefake.Account) { a.ChargesEnabled = true })
		require.NoError(t, err)
		ids = append(ids, ev.ID)
	}
	assert.True(t, fake.SetDelivered(ids[1], true))
	assert.False(t, fake.SetDelivered("evt_missing", true))
	list := func(p *stripe.EventListParams) []string {
		var out []string
		it := sc.Events.List(p)
		for it.Next() {
			out = append(out, it.Event().ID)
		}
		require.NoError(t, it.Err())
		return out
	}
	assert.Equal(t, []string{ids[2], ids[0]}, list(&stripe.EventListParams{DeliverySuccess: stripe.Bool(false)}))
	assert.Equal(t, []string{ids[1]}, list(&stripe.EventListParams{DeliverySuccess: stripe.Bool(true)}))
	now := time.Now().Unix()
	assert.Len(t, list(&stripe.EventListParams{CreatedRange: &stripe.RangeQueryParams{GreaterThanOrEqual: now - 60}}), 3)
	assert.Empty(t, list(&stripe.EventListParams{CreatedRange: &stripe.RangeQueryParams{GreaterThan: now + 60}}))
	assert.Empty(t, list(&stripe.EventListParams{CreatedRange: &stripe.RangeQueryParams{LesserThan: now - 60}}))
	assert.Len(t, list(&stripe.EventListParams{CreatedRange: &stripe.RangeQueryParams{LesserThanOrEqual: now + 60}}), 3)

	for _, q := range []string{"delivery_success=maybe", "created[gte]=soon"} {
		req, err := http.NewRequest(http.MethodGet, base+"/v1/events?"+q, nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+stripefake.TestAPIKey)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, q)
	}
}

func TestEventPayloadVerifiesWithStripeGo(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	acct, err := sc.Accounts.New(accountParams("a@example.com"))
	require.NoError(t, err)
	e, err := fake.UpdateAccount(acct.ID, func(a *stripefake.Account) { a.ChargesEnabled = true })
	require.NoError(t, err)

	payload := e.Payload()
	event, err := webhook.ConstructEvent(payload, stripefake.Sign(payload, "whsec_test"), "whsec_test")
	require.NoError(t, err)
	assert.Equal(t, e.ID, event.ID)
	assert.Equal(t, stripe.EventTypeAccountUpdated, event.Type)
	_, err = webhook.ConstructEvent(payload, stripefake.Sign(payload, "whsec_other"), "whsec_test")
	assert.Error(t, err)
}

func TestFailureBeforeTheRequestRuns(t *testing.T) {
	fake, base := start(t)
	sc := stripefake.NewClient(base, stripefake.TestAPIKey)
	fake.Fail(stripefake.Failure{Method: http.MethodPost, Path: "/v1/accounts", Times: 2, Status: http.StatusServiceUnavailable})

	// A GET does not match.
	_, err := sc.Accounts.GetByID("acct_missing", nil)
	var stripeErr *stripe.Error
	require.True(t, errors.As(err, &stripeErr), "error %v", err)
	assert.Equal(t, http.StatusNotFound, stripeErr.HTTPStatusCode)

	for range 2 {
		p := accountParams("a@example.com")
		p.SetIdempotencyKey("key-1")
		_, err := sc.Accounts.New(p)
		require.True(t, errors.As(err, &stripeErr), "error %v", err)
		assert.Equal(t, http.StatusServiceUnavailable, stripeErr.HTTPStatusCode)
		assert.Equal(t, stripe.ErrorTypeAPI, stripeErr.Type)
	}
	assert.Equal(t, 0, fake.AccountsCreated(), "nothing created")

	// The key stayed free: the third attempt runs.
	p := accountParams("a@example.com")
	p.SetIdempotencyKey("key-1")
	acct, err := sc.Accounts.New(p)
	require.NoError(t, err)
	assert.Empty(t, acct.LastResponse.Header.Get("Idempotent-Replayed"))
	assert.Equal(t, 1, fake.AccountsCreated())

	fake.Fail(stripefake.Failure{Status: http.StatusTooManyRequests})
	_, err = sc.Accounts.GetByID(acct.ID, nil)
	require.True(t, errors.As(err, &stripeErr), "error %v", err)
	assert.Equal(t, http.StatusTooManyRequests, stripeErr.HTTPStatusCode)
	_, err = sc.Accounts.GetByID(acct.ID, nil)
	assert.NoError(t, err, "the failure was used up")
}

func TestFailureAfterCreateIsALostResponse(t *testing.T) {
	for _, drop := range []bool{false, true} {
		t.Run(fmt.Sprintf("drop=%v", drop), func(t *testing.T) {
			fake, base := start(t, stripefake.WithFailure(stripefake.Failure{Path: "/v1/accounts", AfterCreate: true, Drop: drop}))
			sc := stripefake.NewClient(base, stripefake.TestAPIKey)
			p := accountParams("a@example.com")
			p.SetIdempotencyKey("key-1")
			_, err := sc.Accounts.New(p)
			require.Error(t, err)
			var stripeErr *stripe.Error
			if drop {
				assert.False(t, errors.As(err, &stripeErr), "a network error, not an answer: %v", err)
			} else {
				require.True(t, errors.As(err, &stripeErr), "error %v", err)
				assert.Equal(t, http.StatusInternalServerError, stripeErr.HTTPStatusCode)
			}
			require.Equal(t, 1, fake.AccountsCreated(), "the account exists although the client got an error")

			p = accountParams("a@example.com")
			p.SetIdempotencyKey("key-1")
			acct, err := sc.Accounts.New(p)
			require.NoError(t, err)
			assert.Equal(t, "true", acct.LastResponse.Header.Get("Idempotent-Replayed"))
			assert.Equal(t, fake.Accounts()[0].ID, acct.ID)
			assert.Equal(t, 1, fake.AccountsCreated())
		})
	}
}
