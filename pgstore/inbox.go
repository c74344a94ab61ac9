package pgstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency"
)

// Inbox defaults.
const (
	// DefaultInboxMaxBodyBytes is the largest delivery an [Inbox] accepts
	// unless [WithInboxMaxBodyBytes] says otherwise, as the root's
	// WebhookHandler.
	DefaultInboxMaxBodyBytes = 64 << 10
	// DefaultInboxTimeout bounds the one statement that stores a delivery
	// unless [WithInboxTimeout] says otherwise.
	DefaultInboxTimeout = 5 * time.Second
	// DefaultInboxRetention is how long a processed event is remembered
	// (so a redelivery or a backfill of it is a no-op) unless
	// [WithInboxRetention] says otherwise: longer than Stripe's 3 days of
	// retries and its 30-day events list.
	DefaultInboxRetention = 45 * 24 * time.Hour
	// webhookTolerance is the oldest a signature's timestamp may be:
	// stripe-go's default, as the root's WebhookHandler.
	webhookTolerance = webhook.DefaultTolerance
	// maxEventIDLength is the root's limit on event ids.
	maxEventIDLength = 255
)

type inboxConfig struct {
	maxBodyBytes     int64
	timeout          time.Duration
	retention        time.Duration
	ignoreAPIVersion bool
}

func defaultInboxConfig() inboxConfig {
	return inboxConfig{maxBodyBytes: DefaultInboxMaxBodyBytes, timeout: DefaultInboxTimeout, retention: DefaultInboxRetention}
}

// WithInboxMaxBodyBytes sets the largest delivery the [Inbox] accepts;
// larger ones get 413. At least 1. NewInbox. Default:
// [DefaultInboxMaxBodyBytes] (64 KiB).
func WithInboxMaxBodyBytes(n int64) Option {
	return Option{name: "WithInboxMaxBodyBytes", use: forInbox, apply: func(c *config) error {
		if n < 1 {
			return fmt.Errorf("limit %d is not positive", n)
		}
		c.inbox.maxBodyBytes = n
		return nil
	}}
}

// WithInboxTimeout bounds the statement that stores a delivery (and each
// page of [Inbox.Backfill]); a delivery not stored in time gets 503. At
// least 1 ms. NewInbox. Default: [DefaultInboxTimeout] (5 s).
func WithInboxTimeout(d time.Duration) Option {
	return Option{name: "WithInboxTimeout", use: forInbox, apply: func(c *config) error {
		if d < time.Millisecond {
			return fmt.Errorf("timeout %v is shorter than 1ms", d)
		}
		c.inbox.timeout = d
		return nil
	}}
}

// WithInboxRetention sets how long an event stays in webhook_events after
// it was received, so that redeliveries and backfills of it are no-ops;
// [Inbox.DeleteExpired] deletes processed events after that. Keep it
// longer than 30 days, Stripe's events list window, or a backfill may feed
// an event again that was processed and deleted. At least 1 hour.
// NewInbox. Default: [DefaultInboxRetention] (45 days).
func WithInboxRetention(d time.Duration) Option {
	return Option{name: "WithInboxRetention", use: forInbox, apply: func(c *config) error {
		if d < time.Hour {
			return fmt.Errorf("retention %v is shorter than 1h", d)
		}
		c.inbox.retention = d
		return nil
	}}
}

// WithInboxIgnoreAPIVersion accepts events whose api_version differs from
// [stripe.APIVersion], as the root's WithWebhookIgnoreAPIVersion does; their
// objects may then decode incompletely. NewInbox. Default: such deliveries
// get 400 and [Inbox.Backfill] skips such events.
func WithInboxIgnoreAPIVersion() Option {
	return Option{name: "WithInboxIgnoreAPIVersion", use: forInbox, apply: func(c *config) error {
		c.inbox.ignoreAPIVersion = true
		return nil
	}}
}

// Inbox receives Stripe webhooks into the table webhook_events, to be
// processed afterwards by a [Worker]: it verifies the delivery's
// signature with stripe-go (the root's WebhookHandler rules: every listed
// secret, a timestamp at most 300 s old, the event's api_version equal to
// [stripe.APIVersion], an event id of 1 to 255 bytes), then stores the raw
// payload in one statement (INSERT … ON CONFLICT DO NOTHING on the event
// id, so a redelivery is a no-op) and answers 200 {"received":true}. The
// answer never waits for the event's processing.
//
// It also holds the operator functions ([Inbox.List], [Inbox.Event],
// [Inbox.Redrive], [Inbox.RedriveType], [Inbox.Stats],
// [Inbox.AdminHandler]) and [Inbox.Backfill].
//
// An Inbox is safe for concurrent use; create it with [NewInbox].
type Inbox struct {
	pool    *pgxpool.Pool
	secrets []string
	c       inboxConfig
	sql     inboxStatements
}

var _ http.Handler = (*Inbox)(nil)

// NewInbox returns an inbox on the tables that [Migrate] created (with the
// same [WithSchema], if any), verifying deliveries against secrets (the
// endpoint's signing secrets, "whsec_..."; list the old and the new one
// while rolling a secret). It takes [WithSchema] and the WithInbox
// options. It sends nothing to the database.
func NewInbox(pool *pgxpool.Pool, secrets []string, opts ...Option) (*Inbox, error) {
	switch {
	case pool == nil:
		return nil, errors.New("pgstore: pool is nil")
	case len(secrets) == 0:
		return nil, errors.New("pgstore: no webhook signing secret")
	}
	for i, s := range secrets {
		if s == "" {
			return nil, fmt.Errorf("pgstore: webhook signing secret %d is empty", i)
		}
	}
	c, err := newConfigFor(forInbox, opts)
	if err != nil {
		return nil, err
	}
	return &Inbox{pool: pool, secrets: append([]string(nil), secrets...), c: c.inbox, sql: newInboxStatements(c.schema)}, nil
}

// inboxStatements are the inbox's SQL with its table name filled in.
type inboxStatements struct {
	table, insert, insertMany string
}

func newInboxStatements(schema string) inboxStatements {
	t := name(schema, "webhook_events")
	return inboxStatements{
		table: t,
		// $1 id, $2 type, $3 object id, $4 created, $5 payload, $6
		// retention in ms.
		insert: `INSERT INTO ` + t + ` AS e (event_id, type, object_id, created, payload, next_attempt_at, expires_at)
VALUES ($1, $2, $3, $4, $5, clock_timestamp(), clock_timestamp() + $6::bigint * interval '1 millisecond')
ON CONFLICT (event_id) DO NOTHING`,
		insertMany: `INSERT INTO ` + t + ` AS e (event_id, type, object_id, created, payload, next_attempt_at, expires_at)
SELECT i, ty, o, c, p, clock_timestamp(), clock_timestamp() + $6::bigint * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bytea[]) AS u(i, ty, o, c, p)
ON CONFLICT (event_id) DO NOTHING`,
	}
}

// Errors of the inbox.
var (
	// ErrEventNotFound: no event with that id is in webhook_events.
	ErrEventNotFound = errors.New("pgstore: webhook event not found")
	// ErrNotFailed: a redrive named an event that is not failed.
	ErrNotFailed = errors.New("pgstore: webhook event is not failed")
)

const (
	webhookReceived        = `{"received":true}`
	webhookSignatureHeader = "Stripe-Signature"
)

// ServeHTTP handles one delivery from Stripe and answers once:
//
//   - 200 {"received":true} when the event is stored, or was already
//     (with X-Idempotent-Replayed: true then);
//   - 400 (bad signature or payload) or 413 (body too large), having
//     stored nothing;
//   - 503 with Retry-After when the database did not store it in time.
//
// Error answers are the root package's application/problem+json
// ([idempotency.WriteError]).
func (in *Inbox) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	payload, err := readLimited(r.Body, in.c.maxBodyBytes)
	if err != nil {
		idempotency.WriteError(w, r, err)
		return
	}
	stored, err := in.Receive(r.Context(), payload, r.Header.Get(webhookSignatureHeader))
	if err != nil {
		idempotency.WriteError(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(webhookReceived)))
	if !stored {
		h.Set("X-Idempotent-Replayed", "true")
	}
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, webhookReceived)
}

// readLimited reads body, failing with [idempotency.ErrBodyTooLarge] past
// limit bytes.
func readLimited(body io.Reader, limit int64) ([]byte, error) {
	if body == nil {
		return nil, nil
	}
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(body, limit+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("%w: %w", idempotency.ErrBodyUnreadable, err)
	case n > limit:
		return nil, fmt.Errorf("%w: over %d bytes", idempotency.ErrBodyTooLarge, limit)
	}
	return buf.Bytes(), nil
}

// Receive is the core of ServeHTTP, for deliveries that do not arrive as
// an [http.Request]: it verifies payload against signatureHeader (the
// Stripe-Signature header's value) and stores the event, in one statement.
// stored is false when the event was in the inbox already. Its errors
// wrap the root's [idempotency.ErrWebhookSignature],
// [idempotency.ErrWebhookPayload], [idempotency.ErrBodyTooLarge] or, when
// the database failed, [idempotency.ErrStoreUnavailable];
// [idempotency.StatusCode] of the error is the status ServeHTTP answers.
func (in *Inbox) Receive(ctx context.Context, payload []byte, signatureHeader string) (stored bool, err error) {
	if int64(len(payload)) > in.c.maxBodyBytes {
		return false, fmt.Errorf("%w: %d bytes, limit %d", idempotency.ErrBodyTooLarge, len(payload), in.c.maxBodyBytes)
	}
	event, err := in.verify(payload, signatureHeader)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, in.c.timeout)
	defer cancel()
	var n int64
	err = resend(ctx, in.pool, func() error {
		tag, err := in.pool.Exec(ctx, in.sql.insert, event.ID, string(event.Type), objectID(event), event.Created, payload, in.c.retention.Milliseconds())
		n = tag.RowsAffected()
		return err
	})
	if err != nil {
		return false, fmt.Errorf("%w: pgstore: inbox: %w", idempotency.ErrStoreUnavailable, err)
	}
	return n == 1, nil
}

// verify checks the signature with stripe-go against each secret, then the
// timestamp's age, and only then parses the payload, as the root's
// WebhookHandler does.
func (in *Inbox) verify(payload []byte, header string) (stripe.Event, error) {
	var event stripe.Event
	var err error
	for _, secret := range in.secrets {
		err = webhook.ValidatePayloadIgnoringTolerance(payload, header, secret)
		if !errors.Is(err, webhook.ErrNoValidSignature) {
			break
		}
	}
	if err != nil {
		return event, fmt.Errorf("%w: %w", idempotency.ErrWebhookSignature, err)
	}
	if time.Since(signatureTime(header)) > webhookTolerance {
		return event, fmt.Errorf("%w: %w", idempotency.ErrWebhookSignature, webhook.ErrTooOld)
	}
	if err := json.Unmarshal(payload, &event); err != nil {
		return event, fmt.Errorf("%w: not a JSON event", idempotency.ErrWebhookPayload)
	}
	if err := in.checkEvent(&event); err != nil {
		return event, err
	}
	return event, nil
}

// checkEvent applies the root's event rules to a parsed event.
func (in *Inbox) checkEvent(event *stripe.Event) error {
	switch {
	case event.ID == "":
		return fmt.Errorf("%w: event without an id", idempotency.ErrWebhookPayload)
	case len(event.ID) > maxEventIDLength:
		return fmt.Errorf("%w: event id longer than %d characters", idempotency.ErrWebhookPayload, maxEventIDLength)
	case !in.c.ignoreAPIVersion && event.APIVersion != stripe.APIVersion:
		return fmt.Errorf("%w: event has API version %q, stripe-go expects %q", idempotency.ErrWebhookPayload, event.APIVersion, stripe.APIVersion)
	}
	return nil
}

// objectID is data.object.id of an event, or nil.
func objectID(event stripe.Event) any {
	if event.Data == nil {
		return nil
	}
	if id, ok := event.Data.Object["id"].(string); ok && id != "" {
		return id
	}
	return nil
}

// signatureTime returns the timestamp of a Stripe-Signature header that
// stripe-go has accepted, read as stripe-go reads it: the last "t=" pair
// wins.
func signatureTime(header string) time.Time {
	var t time.Time
	for _, pair := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok || k != "t" {
			continue
		}
		if unix, err := strconv.ParseInt(v, 10, 64); err == nil {
			t = time.Unix(unix, 0)
		}
	}
	return t
}

// DeleteExpired deletes processed events received longer than the
// retention ago ([WithInboxRetention]), in batches of at most batch rows
// (1 to 100,000), until a batch comes back short or ctx ends, and returns
// how many it deleted. Pending, processing and failed events are kept.
func (in *Inbox) DeleteExpired(ctx context.Context, batch int) (deleted int, err error) {
	if batch < 1 || batch > maxBatch {
		return 0, fmt.Errorf("pgstore: batch %d is not between 1 and %d", batch, maxBatch)
	}
	stmt := `DELETE FROM ` + in.sql.table + ` WHERE event_id = ANY(ARRAY(
    SELECT event_id FROM ` + in.sql.table + ` WHERE status = 'processed' AND expires_at <= clock_timestamp()
    LIMIT $1 FOR UPDATE SKIP LOCKED)) AND status = 'processed'`
	for {
		tag, err := in.pool.Exec(ctx, stmt, batch)
		if err != nil {
			return deleted, fmt.Errorf("pgstore: inbox: delete expired: %w", err)
		}
		n := int(tag.RowsAffected())
		deleted += n
		if n < batch {
			return deleted, nil
		}
	}
}
