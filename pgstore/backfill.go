package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"
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
	// Skipped counts the events not stored: no id, or another API version
	// (see [WithInboxIgnoreAPIVersion]).
	Skipped int
}

// Backfill asks Stripe, through sc (a stripe-go client; its Events.List
// with delivery_success=false), for the events it has not delivered to a
// webhook endpoint (still pending or failed) created since since, and
// stores those the inbox does not hold yet, as pending, for the workers.
// It is idempotent: an event already in the inbox, whatever its status, is
// left alone, so it may run as often as wanted (e.g. hourly, or after an
// outage). A zero since, or one older than Stripe's 30-day window, means
// the whole window. Events of another API version are skipped unless
// [WithInboxIgnoreAPIVersion]. Events stored before an error stay stored;
// run it again.
//
// The events list shows what Stripe failed to deliver to any endpoint of
// the account, so on an account with several endpoints it may feed events
// that this endpoint does not subscribe to; the function should ignore
// types it does not handle.
func (in *Inbox) Backfill(ctx context.Context, sc *client.API, since time.Time) (BackfillResult, error) {
	var res BackfillResult
	if sc == nil || sc.Events == nil {
		return res, errors.New("pgstore: backfill: stripe client is nil")
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
	var batch []stripe.Event
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		n, err := in.storeEvents(ctx, batch)
		batch = batch[:0]
		res.Stored += n
		return err
	}
	it := sc.Events.List(params)
	for it.Next() {
		ev := it.Event()
		res.Listed++
		if ev == nil || in.checkEvent(ev) != nil {
			res.Skipped++
			continue
		}
		batch = append(batch, *ev)
		if len(batch) == backfillBatch {
			if err := flush(); err != nil {
				return res, err
			}
		}
	}
	if err := it.Err(); err != nil {
		return res, fmt.Errorf("pgstore: backfill: listing Stripe's events: %w", err)
	}
	return res, flush()
}

// storeEvents inserts events in one statement and returns how many were
// new.
func (in *Inbox) storeEvents(ctx context.Context, events []stripe.Event) (int, error) {
	n := len(events)
	ids, types, objects := make([]string, n), make([]string, n), make([]*string, n)
	created, payloads := make([]int64, n), make([][]byte, n)
	for i, ev := range events {
		payload, err := json.Marshal(ev)
		if err != nil {
			return 0, fmt.Errorf("pgstore: backfill: event %s: %w", ev.ID, err)
		}
		ids[i], types[i], created[i], payloads[i] = ev.ID, string(ev.Type), ev.Created, payload
		if id, ok := objectID(ev).(string); ok {
			objects[i] = &id
		}
	}
	ctx, cancel := context.WithTimeout(ctx, in.c.timeout)
	defer cancel()
	var stored int64
	err := resend(ctx, in.pool, func() error {
		tag, err := in.pool.Exec(ctx, in.sql.insertMany, ids, types, objects, created, payloads, in.c.retention.Milliseconds())
		stored = tag.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("pgstore: backfill: storing events: %w", err)
	}
	return int(stored), nil
}
