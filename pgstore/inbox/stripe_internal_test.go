package inbox

import (
	"testing"

	"github.com/seed70ea8305/idempotency"
)

// TestStripeProviderName: the provider name the inbox treats as Stripe's
// (and migration 0004 gives older rows) is the root verifier's.
func TestStripeProviderName(t *testing.T) {
	v, err := idempotency.NewStripeVerifier([]string{"whsec_x"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if v.Provider() != providerStripe {
		t.Fatalf("the Stripe verifier names %q, the inbox expects %q", v.Provider(), providerStripe)
	}
}

// TestDecodeStripe: a stored payload decodes whole when stripe-go can,
// falls back to the envelope and the data object when a field has another
// type (as the root's verifier does), and is refused when it names another
// event.
func TestDecodeStripe(t *testing.T) {
	whole := []byte(`{"id":"evt_1","type":"account.updated","api_version":"2023-10-16","created":5,"livemode":true,"data":{"object":{"id":"acct_1"}}}`)
	ev, err := decodeStripe(whole, "evt_1")
	if err != nil || ev.Type != "account.updated" || !ev.Livemode || ev.GetObjectValue("id") != "acct_1" {
		t.Fatalf("whole: %+v, %v", ev, err)
	}
	changed := []byte(`{"id":"evt_2","type":"account.updated","api_version":"2026-02-25.clover","created":7,"request":"req_1","data":{"object":{"id":"acct_2","x":{"y":1}}}}`)
	ev, err = decodeStripe(changed, "evt_2")
	if err != nil || ev.APIVersion != "2026-02-25.clover" || ev.Created != 7 || ev.GetObjectValue("id") != "acct_2" {
		t.Fatalf("changed: %+v, %v", ev, err)
	}
	noData := []byte(`{"id":"evt_3","request":"req_1","data":"none"}`)
	if ev, err = decodeStripe(noData, "evt_3"); err != nil || ev.Data != nil {
		t.Fatalf("no data: %+v, %v", ev, err)
	}
	if _, err := decodeStripe(whole, "evt_other"); err == nil {
		t.Fatal("a payload of another event was accepted")
	}
}
