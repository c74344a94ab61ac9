package idempotency_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency"
)

// signStripe signs payload as Stripe does, with stripe-go's test helper.
func signStripe(payload []byte, secret string) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: time.Now()}).Header
}

// A webhook endpoint that processes each Stripe event once, however often
// Stripe delivers it, whatever the API version of the account's events.
func ExampleNewWebhookHandler() {
	const secret = "whsec_example" // the endpoint's signing secret
	verifier, err := idempotency.NewStripeVerifier([]string{secret}, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), verifier,
		func(ctx context.Context, ev idempotency.WebhookEvent) error {
			fmt.Println("processing", ev.ID, ev.Type, ev.APIVersion, ev.Stripe.GetObjectValue("id"))
			return nil
		}, idempotency.WebhookOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}

	payload := []byte(`{"id":"evt_1","object":"event","api_version":"2026-02-25.clover",` +
		`"type":"account.updated","data":{"object":{"id":"acct_1","object":"account"}}}`)
	for range 2 { // Stripe delivers the event twice
		req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
		req.Header.Set("Stripe-Signature", signStripe(payload, secret))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		fmt.Println(rec.Code, rec.Body.String(), "replayed:", rec.Header().Get("X-Idempotent-Replayed") == "true")
	}

	// A forged delivery never reaches the function.
	req := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
	req.Header.Set("Stripe-Signature", signStripe(payload, "whsec_forged"))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	fmt.Println(rec.Code, rec.Header().Get("Content-Type"))
	// Output:
	// processing evt_1 account.updated 2026-02-25.clover acct_1
	// 200 {"received":true} replayed: false
	// 200 {"received":true} replayed: true
	// 400 application/problem+json
}

// Handle serves deliveries that do not arrive as HTTP requests, such as
// events taken from a queue.
func ExampleWebhookHandler_Handle() {
	const secret = "whsec_example"
	verifier, err := idempotency.NewStripeVerifier([]string{secret}, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), verifier,
		func(ctx context.Context, ev idempotency.WebhookEvent) error { return nil }, idempotency.WebhookOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	payload := []byte(`{"id":"evt_2","object":"event","api_version":"` + stripe.APIVersion + `","type":"payout.paid","data":{"object":{}}}`)
	header := http.Header{"Stripe-Signature": {signStripe(payload, secret)}}

	for range 2 {
		outcome, err := h.Handle(context.Background(), header, payload)
		fmt.Println(outcome, err)
	}
	outcome, err := h.Handle(context.Background(), http.Header{"Stripe-Signature": {"t=1,v1=00"}}, payload)
	fmt.Println(outcome, errors.Is(err, idempotency.ErrWebhookSignature))
	// Output:
	// executed <nil>
	// replayed <nil>
	// rejected true
}

// Deliveries signed as the Standard Webhooks specification says (Svix and
// the providers that follow it): the webhook-id is the event's ID.
func ExampleNewStandardWebhooksVerifier() {
	// The specification's own example secret and signature.
	v, err := idempotency.NewStandardWebhooksVerifier([]string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	header := http.Header{
		"Webhook-Id":        {"msg_p5jXN8AQM9LWM0D4loKWxJek"},
		"Webhook-Timestamp": {"1614265330"},
		"Webhook-Signature": {"v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="},
	}
	ev, err := v.Verify(header, []byte(`{"test": 2432232314}`), time.Unix(1614265330, 0))
	fmt.Println(ev.ID, err)
	_, err = v.Verify(header, []byte(`{"test": 2432232315}`), time.Unix(1614265330, 0))
	fmt.Println(errors.Is(err, idempotency.ErrWebhookSignature))
	// Output:
	// msg_p5jXN8AQM9LWM0D4loKWxJek <nil>
	// true
}

// shopify is a Verifier for a provider this package has none for:
// Shopify signs the body with HMAC-SHA256 in base64 and names each
// delivery's event in headers of its own.
type shopify struct{ secret []byte }

func (shopify) Provider() string { return "shopify" }

func (v shopify) Verify(header http.Header, payload []byte, _ time.Time) (idempotency.WebhookEvent, error) {
	mac := hmac.New(sha256.New, v.secret)
	mac.Write(payload)
	got, err := base64.StdEncoding.DecodeString(header.Get("X-Shopify-Hmac-Sha256"))
	if err != nil || !hmac.Equal(got, mac.Sum(nil)) {
		return idempotency.WebhookEvent{}, fmt.Errorf("%w: X-Shopify-Hmac-Sha256 does not match", idempotency.ErrWebhookSignature)
	}
	return idempotency.WebhookEvent{ID: header.Get("X-Shopify-Webhook-Id"), Type: header.Get("X-Shopify-Topic"), Payload: payload}, nil
}

// Another provider takes a Verifier of a few lines; its events get the
// same exactly-once processing, in records of their own.
func ExampleVerifier() {
	secret := []byte("shpss_example")
	h, err := idempotency.NewWebhookHandler(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), shopify{secret},
		func(ctx context.Context, ev idempotency.WebhookEvent) error {
			fmt.Println("processing", ev.Provider, ev.ID, ev.Type)
			return nil
		}, idempotency.WebhookOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	payload := []byte(`{"id":820982911946154508}`)
	mac := hmac.New(sha256.New, secret)
	mac.Write(payload)
	for range 2 {
		req := httptest.NewRequest(http.MethodPost, "/webhooks/shopify", bytes.NewReader(payload))
		req.Header.Set("X-Shopify-Hmac-Sha256", base64.StdEncoding.EncodeToString(mac.Sum(nil)))
		req.Header.Set("X-Shopify-Webhook-Id", "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043")
		req.Header.Set("X-Shopify-Topic", "orders/create")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		fmt.Println(rec.Code, "replayed:", rec.Header().Get("X-Idempotent-Replayed") == "true")
	}
	// Output:
	// processing shopify b54557e4-bdd9-4b37-8a5f-bf7d70bcd043 orders/create
	// 200 replayed: false
	// 200 replayed: true
}

// StripeKey gives a retried request the Stripe idempotency key of its
// first attempt, so Stripe returns the object already created instead of
// creating another.
func ExampleStripeKey() {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
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
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
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
