package inbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency"
)

// stripeEventsWindow is how far back Stripe's events list goes.
const stripeEventsWindow = 30 * 24 * time.Hour

// backfillBatch is how many listed events one statement stores.
const backfillBatch = 100

// BackfillResult counts what [Inbox.Backfill] did.
type BackfillResult struct {
	// Listed counts the events Stripe listed.
	Listed int
	// Stored counts those that were new to the inbox; the others were in
	// it already (delivered, or fed by an earlier backfill).
	Stored int
	// Skipped counts the events not stored: listed without an ID.
	Skipped int
}

// Backfill asks Stripe, through sc (a stripe-go client; its Events.List
// with delivery_success=false), for the events it has not delivered to a
// webhook endpoint (still pending or failed) created since since, and
// stores those the inbox does not hold yet, as pending, for the workers,
// as deliveries of them would have been stored. It is idempotent: an
// event already in the inbox, whatever its status, is left alone, so it
// may run as often as wanted (e.g. hourly, or after an outage). A zero
// since, or one older than Stripe's 30-day window, means the whole
// window. Events of every API version are stored. Events stored before an
// error stay stored; run it again. Only an inbox of Stripe's deliveries
// (its verifier from [idempotency.NewStripeVerifier]) backfills: Stripe
// has an events API, other providers do not.
//
// The events list shows what Stripe failed to deliver to any endpoint of
// the account, so on an account with several endpoints it may feed events
// that this endpoint does not subscribe to; the function should ignore
// types it does not handle.
func (in *Inbox) Backfill(ctx context.Context, sc *client.API, since time.Time) (BackfillResult, error) {
	var res BackfillResult
	switch {
	case in.provider != providerStripe:
		return res, fmt.Errorf("inbox: backfill: Stripe's events only; this inbox receives %q", in.provider)
	case sc == nil || sc.Events == nil:
		return res, errors.New("inbox: backfill: stripe client is nil")
	}
	if oldest := time.Now().Add(-stripeEventsWindow); since.Before(oldest) {
		since = oldest
	}
	params := &stripe.EventListParams{
		DeliverySuccess: stripe.Bool(false),
		CreatedRange:    &stripe.RangeQueryParams{GreaterThanOrEqual: since.Unix()},
	}
	params.Context = ctx
	params.Limit = stripe.Int64(backfillBatch)
	var batch []idempotency.WebhookEvent
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		n, err := in.store(ctx, batch)
		batch = batch[:0]
		res.Stored += n
		if err != nil {
			return fmt.Errorf("inbox: backfill: %w", err)
		}
		return nil
	}
	it := sc.Events.List(params)
	for it.Next() {
		ev := it.Event()
		res.Listed++
		if ev == nil || ev.ID == "" || len(ev.ID) > maxEventID {
			res.Skipped++
			continue
		}
		payload, err := json.Marshal(ev)
		if err != nil {
			return res, fmt.Errorf("inbox: backfill: event %s: %w", ev.ID, err)
		}
		we := idempotency.WebhookEvent{
			Provider: providerStripe, ID: ev.ID, Type: string(ev.Type), APIVersion: ev.APIVersion, Payload: payload, Stripe: ev,
		}
		if ev.Data != nil {
			we.Object, _ = ev.Data.Object["id"].(string)
		}
		batch = append(batch, we)
		if len(batch) == backfillBatch {
			if err := flush(); err != nil {
				return res, err
			}
		}
	}
	if err := it.Err(); err != nil {
		return res, fmt.Errorf("inbox: backfill: listing Stripe's events: %w", err)
	}
	return res, flush()
}
