package inbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore/internal/option"
	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

// Options configures an [Inbox] ([NewInbox]). The zero value is the
// defaults: the tables found through the search_path, the default scope,
// deliveries of at most 64 KiB stored within 5 s, processed events kept
// 45 days, events ordered by [idempotency.WebhookEvent].Object. A value
// out of range makes NewInbox fail.
type Options struct {
	// Schema is where pgstore.Migrate created the tables (its
	// MigrateOptions.Schema). A lower-case SQL identifier. Default: "",
	// the search_path.
	Schema string

	// Scope puts the inbox's events in a namespace of their own, as
	// [idempotency.WebhookOptions].Scope does for the synchronous handler:
	// two endpoints of one provider (two Stripe accounts, two GitHub apps)
	// whose events must be processed apart each get a scope, and a
	// [Worker] with the same [WorkerOptions].Scope. Events are keyed by
	// scope, provider and event ID, so two providers' IDs never collide,
	// whatever the scope. Default: "".
	Scope string

	// MaxBodyBytes caps a delivery's body; a larger one gets 413 and
	// stores nothing. Default: 64 KiB, as the synchronous handler.
	MaxBodyBytes int64

	// Timeout bounds the statement that stores a delivery (and each page
	// of [Inbox.Backfill]); a delivery not stored in time gets 503, and
	// the provider delivers it again. At least 1 ms. Default: 5 s.
	Timeout time.Duration

	// Retention is how long an event stays in webhook_events after it was
	// received, so that redeliveries and backfills of it change nothing;
	// [Inbox.DeleteExpired] deletes processed events after that. Keep it
	// longer than the provider retries and, for Stripe, longer than the
	// 30 days of its events list, or a backfill may feed an event again
	// that was processed and deleted. At least 1 hour. Default: 45 days.
	Retention time.Duration

	// ObjectKey names the object an event is about, for the per-object
	// ordering of [WorkerOptions].ObjectOrdering: events with the same
	// key (and provider and scope) are processed one at a time, in order;
	// "" orders the event with nothing. It runs once per delivery, after
	// the signature is verified; it must be safe for concurrent use.
	// Default: the event's [idempotency.WebhookEvent].Object, as the
	// verifier set it (Stripe's: the data object's id; the Standard
	// Webhooks and GitHub verifiers set none).
	ObjectKey func(ev idempotency.WebhookEvent) string
}

// Defaults of [Options].
const (
	defaultMaxBodyBytes = 64 << 10
	defaultTimeout      = 5 * time.Second
	defaultRetention    = 45 * 24 * time.Hour
)

// settings returns o with the defaults filled in, or why it is invalid.
func (o Options) settings() (Options, error) {
	option.Default(&o.MaxBodyBytes, defaultMaxBodyBytes)
	option.Default(&o.Timeout, defaultTimeout)
	option.Default(&o.Retention, defaultRetention)
	if o.ObjectKey == nil {
		o.ObjectKey = func(ev idempotency.WebhookEvent) string { return ev.Object }
	}
	return o, errors.Join(
		pg.CheckSchemaName(o.Schema),
		option.AtLeast("inbox: body limit", o.MaxBodyBytes, 1),
		option.AtLeast("inbox: timeout", o.Timeout, time.Millisecond),
		option.AtLeast("inbox: retention", o.Retention, time.Hour),
	)
}

// Inbox receives the webhook deliveries of one provider at one endpoint
// into the table webhook_events, to be processed afterwards by a
// [Worker]. Its [idempotency.Verifier] checks each delivery's signature
// before anything else is read, as the synchronous
// [idempotency.WebhookHandler] does; then the inbox stores the event, with
// its provider, type, object, API version and raw payload, in one
// statement (INSERT … ON CONFLICT DO NOTHING on scope, provider and event
// ID, so a redelivery changes nothing), and answers 200
// {"received":true}. The answer never waits for the event's processing.
// Every Stripe API version is accepted: the version is stored, and the
// worker decodes the event as far as stripe-go can.
//
// Its read API ([Inbox.List], [Inbox.Event], [Inbox.Stats]) and redrives
// ([Inbox.Redrive], [Inbox.RedriveType]) are about its own provider's
// events in its scope; [Inbox.Backfill] is Stripe's. Package
// [github.com/seed70ea8305/idempotency/pgstore/inbox/admin] serves them
// over HTTP.
//
// An Inbox is safe for concurrent use; create it with [NewInbox].
type Inbox struct {
	pool     *pgxpool.Pool
	verifier idempotency.Verifier
	provider string
	o        Options
	sql      inboxStatements
}

var _ http.Handler = (*Inbox)(nil)

// NewInbox returns an inbox on the tables that pgstore.Migrate created,
// verifying deliveries with v. It checks, in one round trip under ctx,
// that the tables are there at the migration this version needs, and
// fails otherwise: with an error wrapping pgstore.ErrNotMigrated when they
// are missing or older, or with the database's error when it could not
// ask. A nil pool or verifier, or an invalid option, fails before
// anything is sent.
func NewInbox(ctx context.Context, pool *pgxpool.Pool, v idempotency.Verifier, opts Options) (*Inbox, error) {
	switch {
	case v == nil:
		return nil, errors.New("inbox: verifier is nil")
	case v.Provider() == "":
		return nil, fmt.Errorf("inbox: verifier %T names no provider", v)
	}
	o, err := opts.settings()
	if err == nil {
		err = pg.Check(ctx, pool, o.Schema)
	}
	if err != nil {
		return nil, err
	}
	return &Inbox{pool: pool, verifier: v, provider: v.Provider(), o: o, sql: newInboxStatements(o.Schema)}, nil
}

// inboxStatements are the inbox's SQL with its table name filled in.
// Each one's index is asserted by TestQueryPlans.
type inboxStatements struct {
	insert, insertOne                                        string
	list, event, status, redrive, redriveType, stats, expire string
}

func newInboxStatements(schema string) inboxStatements {
	t := pg.Table(schema, "webhook_events")
	// redrive makes failed events pending again.
	const redrive = `SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp()`
	return inboxStatements{
		// $1 scope, $2 provider, then one array element per event: $3
		// IDs, $4 types, $5 objects, $6 API versions, $7 created times
		// (NULL: the time of receipt), $8 payloads; $9 retention in ms.
		// Returns how many events were new.
		insert: `INSERT INTO ` + t + ` AS e (scope, provider, event_id, type, object_id, api_version, created, payload,
    received_at, next_attempt_at, expires_at)
SELECT $1, $2, u.i, u.ty, u.o, u.v, coalesce(u.c, floor(extract(epoch FROM c.now))::bigint), u.p,
    c.now, c.now, c.now + $9::bigint * interval '1 millisecond'
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bytea[]) AS u(i, ty, o, v, c, p),
    (SELECT clock_timestamp() AS now) AS c
ON CONFLICT (scope, provider, event_id) DO NOTHING`,
		// insertOne is insert for one event (a delivery), its parameters
		// single values: no arrays to encode and unnest.
		insertOne: `INSERT INTO ` + t + ` AS e (scope, provider, event_id, type, object_id, api_version, created, payload,
    received_at, next_attempt_at, expires_at)
SELECT $1::text, $2::text, $3::text, $4::text, $5::text, $6::text, coalesce($7::bigint, floor(extract(epoch FROM c.now))::bigint), $8::bytea,
    c.now, c.now, c.now + $9::bigint * interval '1 millisecond'
FROM (SELECT clock_timestamp() AS now) AS c
ON CONFLICT (scope, provider, event_id) DO NOTHING`,

		// Every statement below is about the inbox's events: $1 its
		// scope, $2 its provider.

		// $3 status, $4 type ('' for any), $5 received before (NULL for
		// any time), $6 limit.
		list: `SELECT ` + eventColumns + ` FROM ` + t + `
WHERE ` + mine + ` AND ($3 = '' OR status = $3) AND ($4 = '' OR type = $4) AND ($5::timestamptz IS NULL OR received_at < $5)
ORDER BY received_at DESC, event_id LIMIT $6`,
		// $3 event ID.
		event:   `SELECT ` + eventColumns + `, payload FROM ` + t + ` WHERE ` + mine + ` AND event_id = $3`,
		status:  `SELECT status FROM ` + t + ` WHERE ` + mine + ` AND event_id = $3`,
		redrive: `UPDATE ` + t + ` ` + redrive + ` WHERE ` + mine + ` AND event_id = $3 AND status = 'failed'`,
		// $3 type ('' for any).
		redriveType: `UPDATE ` + t + ` ` + redrive + ` WHERE ` + mine + ` AND status = 'failed' AND ($3 = '' OR type = $3)`,
		stats: `SELECT
    count(*) FILTER (WHERE status = 'pending'),
    count(*) FILTER (WHERE status = 'processing'),
    count(*) FILTER (WHERE status = 'failed'),
    count(*) FILTER (WHERE status = 'processed'),
    count(*) FILTER (WHERE status = 'pending' AND attempts > 0),
    coalesce(extract(epoch FROM clock_timestamp() - min(received_at) FILTER (WHERE status IN ('pending', 'processing'))) * 1000, 0)::float8,
    coalesce(sum(attempts) FILTER (WHERE status IN ('pending', 'processing')), 0)::bigint
FROM ` + t + ` WHERE ` + mine,
		// $1 batch size; every scope and provider. The batch is found
		// with now(), not clock_timestamp(): the planner estimates how
		// many rows expired from a stable now() (and then reads
		// webhook_events_expires_at), while a volatile clock makes it
		// guess a third of the table and scan it.
		expire: `DELETE FROM ` + t + ` WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM ` + t + ` WHERE status = 'processed' AND expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED)) AND status = 'processed' AND expires_at <= clock_timestamp()`,
	}
}

const webhookReceived = `{"received":true}`

// ServeHTTP handles one delivery and answers once:
//
//   - 200 {"received":true} when the event is stored, or was already
//     (with X-Idempotent-Replayed: true then);
//   - 400 when the signature does not verify (a header missing or
//     malformed, no secret matching, too old), or the payload is not
//     JSON or names no event, having stored nothing;
//   - 413 when the body is larger than [Options].MaxBodyBytes, having
//     stored nothing;
//   - 503 with Retry-After when the database did not store it in time.
//
// Error answers are the root package's application/problem+json
// ([idempotency.WriteError]).
func (in *Inbox) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	payload, err := in.readBody(w, r)
	if err == nil {
		var stored bool
		stored, err = in.Receive(r.Context(), r.Header, payload)
		if err == nil {
			h := w.Header()
			h.Set("Content-Type", "application/json")
			h.Set("Content-Length", strconv.Itoa(len(webhookReceived)))
			if !stored {
				h.Set("X-Idempotent-Replayed", "true")
			}
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, webhookReceived)
			return
		}
	}
	idempotency.WriteError(w, r, err)
}

// readBody reads the body, failing with [idempotency.ErrBodyTooLarge]
// past the limit.
func (in *Inbox) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.Body == nil {
		return nil, nil
	}
	payload, err := io.ReadAll(http.MaxBytesReader(w, r.Body, in.o.MaxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return nil, fmt.Errorf("%w: over %d bytes", idempotency.ErrBodyTooLarge, in.o.MaxBodyBytes)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", idempotency.ErrBodyUnreadable, err)
	}
	return payload, nil
}

// maxEventID is the longest event ID the inbox keys, as the root's
// handler.
const maxEventID = 255

// Receive is the core of ServeHTTP, for deliveries that do not arrive as
// an [http.Request]: it verifies payload against header (the delivery's
// HTTP header) and stores the event, in one statement. stored is false
// when the event was in the inbox already. Its errors wrap the root's
// [idempotency.ErrWebhookSignature], [idempotency.ErrWebhookPayload],
// [idempotency.ErrBodyTooLarge] or, when the database failed,
// [idempotency.ErrStoreUnavailable]; [idempotency.StatusCode] of the
// error is the status ServeHTTP answers.
func (in *Inbox) Receive(ctx context.Context, header http.Header, payload []byte) (stored bool, err error) {
	if int64(len(payload)) > in.o.MaxBodyBytes {
		return false, fmt.Errorf("%w: %d bytes, limit %d", idempotency.ErrBodyTooLarge, len(payload), in.o.MaxBodyBytes)
	}
	ev, err := in.verifier.Verify(header, payload, time.Now())
	switch {
	case err != nil && !errors.Is(err, idempotency.ErrWebhookSignature) && !errors.Is(err, idempotency.ErrWebhookPayload):
		// A verifier of the user's own that said nothing of the kind.
		return false, fmt.Errorf("%w: %w", idempotency.ErrWebhookSignature, err)
	case err != nil:
		return false, err
	case ev.ID == "":
		return false, fmt.Errorf("%w: event without an id", idempotency.ErrWebhookPayload)
	case len(ev.ID) > maxEventID:
		return false, fmt.Errorf("%w: event id longer than %d bytes", idempotency.ErrWebhookPayload, maxEventID)
	case !json.Valid(payload):
		// The inbox keeps events as JSON (its read API shows them so).
		return false, fmt.Errorf("%w: the payload is not JSON", idempotency.ErrWebhookPayload)
	}
	ev.Provider, ev.Payload = in.provider, payload
	n, err := in.store(ctx, []idempotency.WebhookEvent{ev})
	if err != nil {
		return false, fmt.Errorf("%w: %w", idempotency.ErrStoreUnavailable, err)
	}
	return n == 1, nil
}

// store inserts events, all of the inbox's provider, in one statement
// bounded by the inbox's timeout, and returns how many were new.
func (in *Inbox) store(ctx context.Context, events []idempotency.WebhookEvent) (int, error) {
	n := len(events)
	ids, types, objects, versions := make([]string, n), make([]string, n), make([]*string, n), make([]string, n)
	created, payloads := make([]*int64, n), make([][]byte, n)
	for i, ev := range events {
		ids[i], types[i], versions[i], payloads[i] = ev.ID, ev.Type, ev.APIVersion, ev.Payload
		if obj := in.o.ObjectKey(ev); obj != "" {
			objects[i] = &obj
		}
		if ev.Stripe != nil && ev.Stripe.Created > 0 {
			created[i] = &ev.Stripe.Created
		}
	}
	ctx, cancel := context.WithTimeout(ctx, in.o.Timeout)
	defer cancel()
	sql, args := in.sql.insert, []any{in.o.Scope, in.provider, ids, types, objects, versions, created, payloads, in.o.Retention.Milliseconds()}
	if n == 1 {
		sql, args = in.sql.insertOne, []any{in.o.Scope, in.provider, ids[0], types[0], objects[0], versions[0], created[0], payloads[0], in.o.Retention.Milliseconds()}
	}
	var stored int64
	err := pg.Resend(ctx, in.pool, func() error {
		return pg.WithConn(ctx, in.pool, func(ctx context.Context, conn *pgx.Conn) error {
			tag, err := conn.Exec(ctx, sql, args...)
			stored = tag.RowsAffected()
			return err
		})
	})
	if err != nil {
		return 0, fmt.Errorf("inbox: storing events: %w", err)
	}
	return int(stored), nil
}
