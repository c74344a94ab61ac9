package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// inboxFigures are the inbox's acknowledgement of a new Stripe event
// against its floor: the same verification, then one INSERT of the same
// row into a table with a primary key and no other index. Both run in
// every iteration on the same one-connection pool.
type inboxFigures struct {
	inbox, floor             []time.Duration
	inboxIndexes, floorIndex int
}

func measureInbox(ctx context.Context, rawURL string, n int) (inboxFigures, error) {
	var out inboxFigures
	e, err := newPGEnv(ctx, rawURL)
	if err != nil {
		return out, err
	}
	defer e.close(context.WithoutCancel(ctx))
	if err := pgstore.Migrate(ctx, e.pool, pgstore.MigrateOptions{Schema: e.schema}); err != nil {
		return out, err
	}
	if _, err := e.pool.Exec(ctx, `CREATE TABLE floor_events (
		scope text NOT NULL, provider text NOT NULL, event_id text NOT NULL,
		type text NOT NULL, object_id text, created bigint NOT NULL, payload bytea,
		received_at timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL,
		PRIMARY KEY (scope, provider, event_id))`); err != nil {
		return out, err
	}
	const secret = "whsec_figures"
	v, err := idempotency.NewStripeVerifier([]string{secret}, 0)
	if err != nil {
		return out, err
	}
	in, err := inbox.NewInbox(ctx, e.pool, v, inbox.Options{Schema: e.schema})
	if err != nil {
		return out, err
	}
	const insert = `INSERT INTO floor_events (scope, provider, event_id, type, object_id, created, payload, expires_at)
		VALUES ('', $1, $2, $3, $4, $5, $6, now() + interval '30 days') ON CONFLICT DO NOTHING`
	delivery := func(id string) (http.Header, []byte) {
		payload, _ := json.Marshal(map[string]any{
			"id": id, "object": "event", "api_version": "2023-10-16", "created": time.Now().Unix(), "type": "account.updated",
			"livemode": false, "pending_webhooks": 1,
			"data": map[string]any{"object": map[string]any{"id": "acct_" + id, "object": "account"}},
		})
		sig := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: time.Now()}).Header
		return http.Header{"Stripe-Signature": {sig}}, payload
	}
	floor := func(header http.Header, payload []byte) error {
		ev, err := v.Verify(header, payload, time.Now())
		if err != nil {
			return err
		}
		_, err = e.pool.Exec(ctx, insert, v.Provider(), ev.ID, ev.Type, "acct_"+ev.ID, time.Now().Unix(), payload)
		return err
	}
	for i := range n + 20 {
		id := "evt_" + strconv.Itoa(i)
		h1, p1 := delivery(id)
		start := time.Now()
		stored, err := in.Receive(ctx, h1, p1)
		d1 := time.Since(start)
		if err != nil || !stored {
			return out, fmt.Errorf("inbox: stored %v, %v", stored, err)
		}
		h2, p2 := delivery(id)
		start = time.Now()
		if err := floor(h2, p2); err != nil {
			return out, fmt.Errorf("floor: %w", err)
		}
		d2 := time.Since(start)
		if i >= 20 { // the first ones warm the connection and the plans
			out.inbox, out.floor = append(out.inbox, d1), append(out.floor, d2)
		}
	}
	count := func(table string) (int, error) {
		var k int
		err := e.admin.QueryRow(ctx, "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = $2", e.schema, table).Scan(&k)
		return k, err
	}
	if out.inboxIndexes, err = count("webhook_events"); err != nil {
		return out, err
	}
	out.floorIndex, err = count("floor_events")
	return out, err
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func mean(d []time.Duration) time.Duration {
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	return sum / time.Duration(len(d))
}
