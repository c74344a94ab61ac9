package inbox

import (
	"fmt"

	"github.com/seed70ea8305/idempotency/internal/stripeevent"
	"github.com/stripe/stripe-go/v76"
)

// providerStripe is the provider name of the root's Stripe verifier
// (idempotency.NewStripeVerifier), which pgstore migration 0004 gives the
// events stored before it. A test holds the two equal.
const providerStripe = "stripe"

// decodeStripe decodes a stored Stripe event as the root's Stripe
// verifier decoded it at receipt (package internal/stripeevent: as far as
// stripe-go can, for any API version).
func decodeStripe(payload []byte, id string) (*stripe.Event, error) {
	ev, err := stripeevent.Decode(payload)
	if err != nil {
		return nil, err
	}
	if ev.ID != id {
		return nil, fmt.Errorf("the stored payload is not the event %s", id)
	}
	return ev, nil
}
