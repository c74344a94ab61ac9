package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
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

// EventInfo is one event of the inbox, as the operator functions show it.
type EventInfo struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	ObjectID string `json:"object_id,omitempty"`
	// Created is Stripe's created time of the event.
	Created time.Time `json:"created"`
	// Status is one of StatusPending, StatusProcessing, StatusProcessed
	// and StatusFailed.
	Status string `json:"status"`
	// Attempts is how many attempts ran (or run) for it.
	Attempts int `json:"attempts"`
	// LastError is the error of the last failed attempt, if any.
	LastError   string    `json:"last_error,omitempty"`
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

const eventColumns = `event_id, type, coalesce(object_id, ''), created, status, attempts, coalesce(last_error, ''),
    received_at, processed_at, next_attempt_at`

func scanEvent(row pgx.Row, payload bool) (EventInfo, error) {
	var e EventInfo
	var created int64
	var processed, next *time.Time
	dest := []any{&e.ID, &e.Type, &e.ObjectID, &created, &e.Status, &e.Attempts, &e.LastError, &e.ReceivedAt, &processed, &next}
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
		return nil, fmt.Errorf("pgstore: limit %d is not between 1 and 1000", f.Limit)
	}
	if f.Status != "" && !validStatus(f.Status) {
		return nil, fmt.Errorf("pgstore: unknown status %q", f.Status)
	}
	var before any
	if !f.Before.IsZero() {
		before = f.Before
	}
	rows, err := in.pool.Query(ctx, `SELECT `+eventColumns+` FROM `+in.sql.table+`
WHERE ($1 = '' OR status = $1) AND ($2 = '' OR type = $2) AND ($3::timestamptz IS NULL OR received_at < $3)
ORDER BY received_at DESC, event_id LIMIT $4`, f.Status, f.Type, before, f.Limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: inbox: list: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (EventInfo, error) { return scanEvent(row, false) })
	if err != nil {
		return nil, fmt.Errorf("pgstore: inbox: list: %w", err)
	}
	return out, nil
}

func validStatus(s string) bool {
	switch s {
	case StatusPending, StatusProcessing, StatusProcessed, StatusFailed:
		return true
	}
	return false
}

// Event returns one event with its payload, or an error wrapping
// [ErrEventNotFound].
func (in *Inbox) Event(ctx context.Context, id string) (EventInfo, error) {
	e, err := scanEvent(in.pool.QueryRow(ctx, `SELECT `+eventColumns+`, payload FROM `+in.sql.table+` WHERE event_id = $1`, id), true)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return e, fmt.Errorf("%w: %q", ErrEventNotFound, id)
	case err != nil:
		return e, fmt.Errorf("pgstore: inbox: event: %w", err)
	}
	return e, nil
}

// Redrive makes a failed event pending again, with its attempts counted
// from zero (its last error is kept until the next attempt), so a worker
// processes it at once. It returns an error wrapping [ErrEventNotFound] or
// [ErrNotFailed] when the event is absent or not failed.
func (in *Inbox) Redrive(ctx context.Context, id string) error {
	tag, err := in.pool.Exec(ctx, `UPDATE `+in.sql.table+` SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp()
WHERE event_id = $1 AND status = 'failed'`, id)
	if err != nil {
		return fmt.Errorf("pgstore: inbox: redrive: %w", err)
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	var status string
	err = in.pool.QueryRow(ctx, `SELECT status FROM `+in.sql.table+` WHERE event_id = $1`, id).Scan(&status)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("%w: %q", ErrEventNotFound, id)
	case err != nil:
		return fmt.Errorf("pgstore: inbox: redrive: %w", err)
	}
	return fmt.Errorf("%w: %q is %s", ErrNotFailed, id, status)
}

// RedriveType makes every failed event of type eventType pending again,
// as [Inbox.Redrive] does, and returns how many. An empty eventType
// redrives every failed event.
func (in *Inbox) RedriveType(ctx context.Context, eventType string) (int, error) {
	tag, err := in.pool.Exec(ctx, `UPDATE `+in.sql.table+` SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp()
WHERE status = 'failed' AND ($1 = '' OR type = $1)`, eventType)
	if err != nil {
		return 0, fmt.Errorf("pgstore: inbox: redrive: %w", err)
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

// Stats reads the inbox's counts in one statement. It scans the table, so
// call it at metric-scrape intervals, not per request.
func (in *Inbox) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	var oldestMS float64
	err := in.pool.QueryRow(ctx, `SELECT
    count(*) FILTER (WHERE status = 'pending'),
    count(*) FILTER (WHERE status = 'processing'),
    count(*) FILTER (WHERE status = 'failed'),
    count(*) FILTER (WHERE status = 'processed'),
    count(*) FILTER (WHERE status = 'pending' AND attempts > 0),
    coalesce(extract(epoch FROM clock_timestamp() - min(received_at) FILTER (WHERE status IN ('pending', 'processing'))) * 1000, 0)::float8,
    coalesce(sum(attempts) FILTER (WHERE status IN ('pending', 'processing')), 0)::bigint
FROM `+in.sql.table).Scan(&s.Pending, &s.Processing, &s.Failed, &s.Processed, &s.Retrying, &oldestMS, &s.Attempts)
	if err != nil {
		return s, fmt.Errorf("pgstore: inbox: stats: %w", err)
	}
	s.OldestPending = time.Duration(oldestMS * float64(time.Millisecond))
	return s, nil
}

// WithAdminRedrive lets the handler of [Inbox.AdminHandler] redrive
// failed events (its POST routes). Inbox.AdminHandler. Default: the
// handler is read-only, and its POST routes answer 403.
func WithAdminRedrive() Option {
	return Option{name: "WithAdminRedrive", use: forAdmin, apply: func(c *config) error {
		c.adminRedrive = true
		return nil
	}}
}

// AdminHandler returns a small JSON API over the operator functions, to
// mount behind the application's own authentication (it has none), e.g.
// with http.StripPrefix:
//
//	GET  /events?status=failed&type=account.updated&limit=50&before=RFC3339
//	GET  /events/{id}             one event with its payload
//	GET  /stats                   [Stats]
//	POST /events/{id}/redrive     with [WithAdminRedrive] only
//	POST /redrive?type=T          every failed event of type T (all types
//	                              when T is empty); WithAdminRedrive only
//
// Errors are application/problem+json. It takes [WithAdminRedrive].
func (in *Inbox) AdminHandler(opts ...Option) (http.Handler, error) {
	c, err := newConfigFor(forAdmin, opts)
	if err != nil {
		return nil, err
	}
	a := &admin{in: in, redrive: c.adminRedrive}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", a.list)
	mux.HandleFunc("GET /events/{id}", a.event)
	mux.HandleFunc("GET /stats", a.stats)
	mux.HandleFunc("POST /events/{id}/redrive", a.redriveOne)
	mux.HandleFunc("POST /redrive", a.redriveType)
	return mux, nil
}

type admin struct {
	in      *Inbox
	redrive bool
}

func (a *admin) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := Filter{Status: q.Get("status"), Type: q.Get("type")}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			writeAdminProblem(w, http.StatusBadRequest, "limit must be an integer from 1 to 1000")
			return
		}
		f.Limit = n
	}
	if v := q.Get("before"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			writeAdminProblem(w, http.StatusBadRequest, "before must be an RFC 3339 time")
			return
		}
		f.Before = t
	}
	if f.Status != "" && !validStatus(f.Status) {
		writeAdminProblem(w, http.StatusBadRequest, "status must be pending, processing, processed or failed")
		return
	}
	events, err := a.in.List(r.Context(), f)
	if err != nil {
		writeAdminProblem(w, http.StatusServiceUnavailable, "database unavailable")
		return
	}
	if events == nil {
		events = []EventInfo{}
	}
	writeAdminJSON(w, http.StatusOK, map[string]any{"events": events})
}

func (a *admin) event(w http.ResponseWriter, r *http.Request) {
	e, err := a.in.Event(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, ErrEventNotFound):
		writeAdminProblem(w, http.StatusNotFound, "no such event")
	case err != nil:
		writeAdminProblem(w, http.StatusServiceUnavailable, "database unavailable")
	default:
		writeAdminJSON(w, http.StatusOK, e)
	}
}

func (a *admin) stats(w http.ResponseWriter, r *http.Request) {
	s, err := a.in.Stats(r.Context())
	if err != nil {
		writeAdminProblem(w, http.StatusServiceUnavailable, "database unavailable")
		return
	}
	writeAdminJSON(w, http.StatusOK, map[string]any{
		"pending": s.Pending, "processing": s.Processing, "failed": s.Failed, "processed": s.Processed,
		"retrying": s.Retrying, "attempts": s.Attempts, "oldest_pending_seconds": s.OldestPending.Seconds(),
	})
}

func (a *admin) redriveOne(w http.ResponseWriter, r *http.Request) {
	if !a.redrive {
		writeAdminProblem(w, http.StatusForbidden, "redrive is not enabled on this handler")
		return
	}
	err := a.in.Redrive(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, ErrEventNotFound):
		writeAdminProblem(w, http.StatusNotFound, "no such event")
	case errors.Is(err, ErrNotFailed):
		writeAdminProblem(w, http.StatusConflict, "the event is not failed")
	case err != nil:
		writeAdminProblem(w, http.StatusServiceUnavailable, "database unavailable")
	default:
		writeAdminJSON(w, http.StatusOK, map[string]any{"redriven": 1})
	}
}

func (a *admin) redriveType(w http.ResponseWriter, r *http.Request) {
	if !a.redrive {
		writeAdminProblem(w, http.StatusForbidden, "redrive is not enabled on this handler")
		return
	}
	n, err := a.in.RedriveType(r.Context(), r.URL.Query().Get("type"))
	if err != nil {
		writeAdminProblem(w, http.StatusServiceUnavailable, "database unavailable")
		return
	}
	writeAdminJSON(w, http.StatusOK, map[string]any{"redriven": n})
}

func writeAdminJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeAdminProblem(w, http.StatusInternalServerError, "encoding failed")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeAdminProblem(w http.ResponseWriter, status int, detail string) {
	body, _ := json.Marshal(map[string]any{"title": http.StatusText(status), "status": status, "detail": detail})
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Cache-Control", "no-store")
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
