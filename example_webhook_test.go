package idempotency_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency"
)

// A webhook endpoint that processes each Stripe event once, however often
// Stripe delivers it. Tests sign their payloads with SignWebhookPayload.
func ExampleNewWebhookHandler() {
	const secret = "whsec_example" // the endpoint's signing secret
	h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(), []string{secret},
		func(ctx context.Context, ev stripe.Event) error {
			fmt.Println("processing", ev.ID, ev.Type)
			return nil
		})
	if err != nil {
		fmt.Println(err)
		return
	}

	payload := []byte(`{"id":"evt_1","object":"event","api_version":"` + stripe.APIVersion +
		`","type":"account.updated","data":{"object":{"id":"acct_1","object":"account"}}}`)
	for range 2 { // Stripe delivers the event twice
		req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
		req.Header.Set("Stripe-Signature", idempotency.SignWebhookPayload(payload, secret, time.Now()))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		fmt.Println(rec.Code, rec.Body.String(), "replayed:", rec.Header().Get("X-Idempotent-Replayed") == "true")
	}

	// A forged delivery never reaches the function.
	req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
	req.Header.Set("Stripe-Signature", idempotency.SignWebhookPayload(payload, "whsec_forged", time.Now()))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	fmt.Println(rec.Code, rec.Header().Get("Content-Type"))
	// Output:
	// processing evt_1 account.updated
	// 200 {"received":true} replayed: false
	// 200 {"received":true} replayed: true
	// 400 application/problem+json
}

// Handle serves deliveries that do not arrive as HTTP requests, such as
// events taken from a queue.
func ExampleWebhookHandler_Handle() {
	const secret = "whsec_example"
	h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(), []string{secret},
		func(ctx context.Context, ev stripe.Event) error { return nil })
	if err != nil {
		fmt.Println(err)
		return
	}
	payload := []byte(`{"id":"evt_2","object":"event","api_version":"` + stripe.APIVersion + `","type":"payout.paid","data":{"object":{}}}`)
	signature := idempotency.SignWebhookPayload(payload, secret, time.Now())

	for range 2 {
		outcome, err := h.Handle(context.Background(), payload, signature)
		fmt.Println(outcome, err)
	}
	outcome, err := h.Handle(context.Background(), payload, "t=1,v1=00")
	fmt.Println(outcome, errors.Is(err, idempotency.ErrWebhookSignature))
	// Output:
	// executed <nil>
	// replayed <nil>
	// rejected true
}

// StripeKey gives a retried request the Stripe idempotency key of its
// first attempt, so Stripe returns the object already created instead of
// creating another.
func ExampleStripeKey() {
	mw, err := idempotency.New(idempotency.NewMemoryStore())
	if err != nil {
		fmt.Println(err)
		return
	}
	var keys []string
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, err := idempotency.StripeKey(r.Context(), "accounts.create")
		if err != nil {
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		keys = append(keys, key)
		// ... sc.Accounts.New(params) with params.SetIdempotencyKey(key) ...
		if len(keys) == 1 {
			http.Error(w, "database unavailable", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusCreated)
	}))

	for range 2 { // the client retries with the same Idempotency-Key
		req := httptest.NewRequest(http.MethodPost, "/venues/42/connect", nil)
		req.Header.Set("Idempotency-Key", "9c1d7e55-venue-42")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		fmt.Println(rec.Code)
	}
	fmt.Println("same Stripe key:", keys[0] == keys[1])

	_, err = idempotency.StripeKey(context.Background(), "accounts.create")
	fmt.Println(errors.Is(err, idempotency.ErrNoClaim))
	// Output:
	// 500
	// 201
	// same Stripe key: true
	// true
}

// StripeKey derives the key that a stripe-go call's parameters carry.
func ExampleStripeKey_params() {
	mw, err := idempotency.New(idempotency.NewMemoryStore())
	if err != nil {
		fmt.Println(err)
		return
	}
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		params := &stripe.TransferParams{
			Amount:      stripe.Int64(4200),
			Currency:    stripe.String(string(stripe.CurrencyEUR)),
			Destination: stripe.String("acct_1Venue42"),
		}
		key, err := idempotency.StripeKey(r.Context(), "transfer:1")
		if err != nil {
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		params.SetIdempotencyKey(key)
		// ... sc.Transfers.New(params) ...
		fmt.Println(*params.IdempotencyKey == idempotency.StripeKeyFrom("http", "", "order-17", "transfer:1"))
	}))
	req := httptest.NewRequest(http.MethodPost, "/orders/17/payout", nil)
	req.Header.Set("Idempotency-Key", "order-17")
	h.ServeHTTP(httptest.NewRecorder(), req)
	// Output:
	// true
}

// A background job has no request to derive keys from: it names its own
// durable parts.
func ExampleStripeKeyFrom() {
	key := idempotency.StripeKeyFrom("payout-job", "2025-11-27", "transfer:venue-42")
	fmt.Println(key)
	fmt.Println(len(key), key == idempotency.StripeKeyFrom("payout-job", "2025-11-27", "transfer:venue-42"))
	fmt.Println(idempotency.StripeKeyFrom("a", "bc") == idempotency.StripeKeyFrom("ab", "c"))
	// Output:
	// idem_44475575c116a59c6cbd151640135491e35e9d0868b9357c542fd2f77975ecd5
	// 69 true
	// false
}
