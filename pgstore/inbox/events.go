package inbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Statuses of an event in webhook_events.
const (
	// StatusPending: waiting for a worker (a first attempt, or a retry
	// after a failed one).
	StatusPending = "pending"
	// StatusProcessing: a worker's attempt holds it.
	StatusProcessing = "processing"
	// StatusProcessed: the function succeeded.
	StatusProcessed = "processed"
	// StatusFailed: the last attempt failed (dead letter); a redrive makes
	// it pending again.
	StatusFailed = "failed"
)

// Errors of the read API and of redrives.
var (
	// ErrEventNotFound: no event with that ID is in the inbox.
	ErrEventNotFound = errors.New("inbox: webhook event not found")
	// ErrNotFailed: a redrive named an event that is not failed.
	ErrNotFailed = errors.New("inbox: webhook event is not failed")
)

// EventInfo is one event of the inbox, as the read API shows it.
type EventInfo struct {
	// ID is the provider's event ID, unique for the provider.
	ID string `json:"id"`
	// Provider is the verifier's name ("stripe", "github", ...).
	Provider string `json:"provider"`
	// Type is the event's type where the delivery says it.
	Type string `json:"type"`
	// ObjectID is the object the event is about ([Options].ObjectKey),
	// if any.
	ObjectID string `json:"object_id,omitempty"`
	// APIVersion is the API version of a Stripe event's payload (any
	// version is accepted); empty for other providers, and for events
	// stored before pgstore migration 0004.
	APIVersion string `json:"api_version,omitempty"`
	// Created is the provider's creation time of the event (Stripe's
	// created), or when it was first received where the provider says
	// none; seconds.
	Created time.Time `json:"created"`
	// Status is one of StatusPending, StatusProcessing, StatusProcessed
	// and StatusFailed.
	Status string `json:"status"`
	// Attempts is how many attempts ran (or run) for it.
	Attempts int `json:"attempts"`
	// LastError is the error of the last failed attempt, if any.
	LastError string `json:"last_error,omitempty"`
	// ReceivedAt is when the event was first stored, ProcessedAt when
	// its function succeeded (zero until then), by the database's clock.
	ReceivedAt  time.Time `json:"received_at"`
	ProcessedAt time.Time `json:"processed_at,omitzero"`
	// NextAttemptAt is when a pending event is due, or when a processing
	// event's lease lapses.
	NextAttemptAt time.Time `json:"next_attempt_at,omitzero"`
	// Payload is the event as received; only [Inbox.Event] fills it in.
	Payload json.RawMessage `json:"payload,omitempty"`
}

// Filter selects events for [Inbox.List]. Its zero value lists the
// newest 100 events of any status and type.
type Filter struct {
	// Status, if set, is one of the Status constants.
	Status string
	// Type, if set, is an event type, e.g. "account.updated".
	Type string
	// Before, if set, lists only events received before it (for paging:
	// pass the ReceivedAt of the last event of the previous page).
	Before time.Time
	// Limit is how many events to list, 1 to 1000; 0 means 100.
	Limit int
}

// ValidStatus reports whether s is one of the Status constants.
func ValidStatus(s string) bool {
	switch s {
	case StatusPending, StatusProcessing, StatusProcessed, StatusFailed:
		return true
	}
	return false
}

// Every statement of the read API is about the inbox's events: $1 its
// scope, $2 its provider.
const (
	eventColumns = `event_id, provider, type, coalesce(object_id, ''), api_version, created, status, attempts,
    coalesce(last_error, ''), received_at, processed_at, next_attempt_at`
	mine = `scope = $1 AND provider = $2`
)

func scanEvent(row pgx.Row, payload bool) (EventInfo, error) {
	var e EventInfo
	var created int64
	var processed, next *time.Time
	dest := []any{&e.ID, &e.Provider, &e.Type, &e.ObjectID, &e.APIVersion, &created, &e.Status, &e.Attempts, &e.LastError,
		&e.ReceivedAt, &processed, &next}
	var p []byte
	if payload {
		dest = append(dest, &p)
	}
	if err := row.Scan(dest...); err != nil {
		return e, err
	}
	e.Created = time.Unix(created, 0).UTC()
	if processed != nil {
		e.ProcessedAt = *processed
	}
	if next != nil {
		e.NextAttemptAt = *next
	}
	if json.Valid(p) {
		e.Payload = p
	}
	return e, nil
}

// List returns the events that f selects, newest received first.
func (in *Inbox) List(ctx context.Context, f Filter) ([]EventInfo, error) {
	switch {
	case f.Limit == 0:
		f.Limit = 100
	case f.Limit < 1 || f.Limit > 1000:
		return nil, fmt.Errorf("inbox: limit %d is not between 1 and 1000", f.Limit)
	}
	if f.Status != "" && !ValidStatus(f.Status) {
		return nil, fmt.Errorf("inbox: unknown status %q", f.Status)
	}
	var before any
	if !f.Before.IsZero() {
		before = f.Before
	}
	rows, err := in.pool.Query(ctx, in.sql.list, in.o.Scope, in.provider, f.Status, f.Type, before, f.Limit)
	if err != nil {
		return nil, fmt.Errorf("inbox: list: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (EventInfo, error) { return scanEvent(row, false) })
	if err != nil {
		return nil, fmt.Errorf("inbox: list: %w", err)
	}
	return out, nil
}

// Event returns one event with its payload, or an error wrapping
// [ErrEventNotFound].
func (in *Inbox) Event(ctx context.Context, id string) (EventInfo, error) {
	e, err := scanEvent(in.pool.QueryRow(ctx, in.sql.event, in.o.Scope, in.provider, id), true)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return e, fmt.Errorf("%w: %q", ErrEventNotFound, id)
	case err != nil:
		return e, fmt.Errorf("inbox: event: %w", err)
	}
	return e, nil
}

// Redrive makes a failed event pending again, with its attempts counted
// from zero (its last error is kept until the next attempt), so a worker
// processes it at once. It returns an error wrapping [ErrEventNotFound] or
// [ErrNotFailed] when the event is absent or not failed.
func (in *Inbox) Redrive(ctx context.Context, id string) error {
	tag, err := in.pool.Exec(ctx, in.sql.redrive, in.o.Scope, in.provider, id)
	if err != nil {
		return fmt.Errorf("inbox: redrive: %w", err)
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	var status string
	err = in.pool.QueryRow(ctx, in.sql.status, in.o.Scope, in.provider, id).Scan(&status)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("%w: %q", ErrEventNotFound, id)
	case err != nil:
		return fmt.Errorf("inbox: redrive: %w", err)
	}
	return fmt.Errorf("%w: %q is %s", ErrNotFailed, id, status)
}

// RedriveType makes every failed event of type eventType pending again,
// as [Inbox.Redrive] does, and returns how many. An empty eventType
// redrives every failed event.
func (in *Inbox) RedriveType(ctx context.Context, eventType string) (int, error) {
	tag, err := in.pool.Exec(ctx, in.sql.redriveType, in.o.Scope, in.provider, eventType)
	if err != nil {
		return 0, fmt.Errorf("inbox: redrive: %w", err)
	}
	return int(tag.RowsAffected()), nil
}

// Stats is the inbox's state at one moment, for metrics.
type Stats struct {
	// Pending counts the events waiting for a worker, Processing those an
	// attempt holds, Failed the dead letters, Processed those done and
	// not yet deleted.
	Pending, Processing, Failed, Processed int64
	// Retrying counts the pending events that failed at least once.
	Retrying int64
	// OldestPending is how long the oldest pending or processing event
	// has waited since it was received; 0 when there is none.
	OldestPending time.Duration
	// Attempts sums the attempts of the unfinished (pending and
	// processing) events.
	Attempts int64
}

// Stats reads the inbox's counts in one statement. It scans the inbox's
// events, so call it at metric-scrape intervals, not per request.
func (in *Inbox) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	var oldestMS float64
	err := in.pool.QueryRow(ctx, in.sql.stats, in.o.Scope, in.provider).Scan(
		&s.Pending, &s.Processing, &s.Failed, &s.Processed, &s.Retrying, &oldestMS, &s.Attempts)
	if err != nil {
		return s, fmt.Errorf("inbox: stats: %w", err)
	}
	s.OldestPending = time.Duration(oldestMS * float64(time.Millisecond))
	return s, nil
}

// maxBatch bounds a cleanup batch, so that no single DELETE holds many row
// locks or writes much WAL in one transaction.
const maxBatch = 100_000

// DeleteExpired deletes processed events received longer than their
// retention ago ([Options].Retention when they were stored), whatever
// their provider or scope, in batches of at most batch rows (1 to
// 100,000), until a batch comes back short or ctx ends, and returns how
// many it deleted. Pending, processing and failed events are kept.
func (in *Inbox) DeleteExpired(ctx context.Context, batch int) (deleted int, err error) {
	if batch < 1 || batch > maxBatch {
		return 0, fmt.Errorf("inbox: batch %d is not between 1 and %d", batch, maxBatch)
	}
	for {
		tag, err := in.pool.Exec(ctx, in.sql.expire, batch)
		if err != nil {
			return deleted, fmt.Errorf("inbox: delete expired: %w", err)
		}
		n := int(tag.RowsAffected())
		deleted += n
		if n < batch {
			return deleted, nil
		}
	}
}
