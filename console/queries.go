package console

// The queries the inbox's API has no method for, on pgstore's
// webhook_events table: which inboxes (scope and provider) hold events,
// counts per type, events processed per minute, the object filter and the
// count of a filter's failed events; and a record's fence, on
// idempotency_keys. They only read. Everything else goes through the
// inbox's API, on read handles that this file makes.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// inboxRef names one inbox: the events of one provider in one scope.
type inboxRef struct {
	Provider, Scope string
}

// ID is how a page names the inbox: "provider:scope" (a provider's name
// holds no colon; a scope may).
func (r inboxRef) ID() string { return r.Provider + ":" + r.Scope }

// Label is how a page shows it.
func (r inboxRef) Label() string {
	if r.Scope == "" {
		return r.Provider
	}
	return r.Provider + " · " + r.Scope
}

func parseInboxRef(id string) (inboxRef, bool) {
	p, s, ok := strings.Cut(id, ":")
	return inboxRef{Provider: p, Scope: s}, ok && p != ""
}

// providerName is a verifier that only names a provider, for the read
// handles: the console never receives deliveries with them.
type providerName string

func (p providerName) Provider() string { return string(p) }

func (p providerName) Verify(http.Header, []byte, time.Time) (idempotency.WebhookEvent, error) {
	return idempotency.WebhookEvent{}, fmt.Errorf("%w: the console receives no deliveries", idempotency.ErrWebhookSignature)
}

// inbox returns the read handle of ref's events, made on first use (which
// checks the tables, one round trip).
func (c *Console) inbox(ctx context.Context, ref inboxRef) (*inbox.Inbox, error) {
	c.mu.Lock()
	in := c.inboxes[ref]
	c.mu.Unlock()
	if in != nil {
		return in, nil
	}
	in, err := inbox.NewInbox(ctx, c.o.Pool, providerName(ref.Provider), inbox.Options{Schema: c.o.Schema, Scope: ref.Scope})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.inboxes[ref]; old != nil {
		return old, nil
	}
	if len(c.inboxes) >= maxInboxHandles {
		clear(c.inboxes) // a handle is cheap to make again
	}
	c.inboxes[ref] = in
	return in, nil
}

// maxInboxHandles bounds the cache of read handles.
const maxInboxHandles = 256

// statements are the console's SQL with the table names filled in.
type statements struct {
	inboxes, counts, timeline, objectList, failedCount, fence string
}

// eventColumns are the columns an [inbox.EventInfo] is read from, with its
// scope.
const eventColumns = `scope, event_id, provider, type, coalesce(object_id, ''), api_version, created, status, attempts,
    coalesce(last_error, ''), received_at, processed_at, next_attempt_at`

// filterWhere narrows webhook_events as a [listFilter] says: $1 provider
// (” for every inbox), $2 scope, $3 status, $4 type, $5 object,
// $6 received before (NULL for any time).
const filterWhere = `($1 = '' OR (provider = $1 AND scope = $2)) AND ($3 = '' OR status = $3) AND ($4 = '' OR type = $4)
    AND ($5 = '' OR object_id = $5) AND ($6::timestamptz IS NULL OR received_at < $6)`

func newStatements(schema string) statements {
	table := func(name string) string {
		if schema == "" {
			return name
		}
		return schema + "." + name
	}
	t := table("webhook_events")
	return statements{
		// The distinct (scope, provider) pairs, one index probe each on
		// the primary key (scope, provider, event_id): a skip scan.
		inboxes: `WITH RECURSIVE p AS (
    (SELECT scope, provider FROM ` + t + ` ORDER BY scope, provider LIMIT 1)
    UNION ALL
    SELECT n.scope, n.provider FROM p, LATERAL (
        SELECT scope, provider FROM ` + t + ` WHERE (scope, provider) > (p.scope, p.provider)
        ORDER BY scope, provider LIMIT 1) n
)
SELECT scope, provider FROM p`,
		counts: `SELECT scope, provider, type, status, count(*) FROM ` + t + `
GROUP BY scope, provider, type, status ORDER BY scope, provider, type`,
		// $1 the first minute (Unix seconds / 60).
		timeline: `SELECT (floor(extract(epoch FROM processed_at) / 60))::bigint AS minute, count(*) FROM ` + t + `
WHERE processed_at >= to_timestamp($1::bigint * 60) GROUP BY minute`,
		// $7 limit.
		objectList: `SELECT ` + eventColumns + ` FROM ` + t + `
WHERE ` + filterWhere + `
ORDER BY received_at DESC, event_id LIMIT $7`,
		failedCount: `SELECT scope, provider, count(*) FROM ` + t + `
WHERE status = 'failed' AND ` + filterWhere + ` GROUP BY scope, provider`,
		fence: `SELECT fence FROM ` + table("idempotency_keys") + ` WHERE key_hash = sha256($1::bytea)`,
	}
}

// inboxRefs returns the inboxes that hold events, ordered by scope and
// provider.
func (c *Console) inboxRefs(ctx context.Context) ([]inboxRef, error) {
	rows, err := c.o.Pool.Query(ctx, c.sql.inboxes)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (inboxRef, error) {
		var r inboxRef
		err := row.Scan(&r.Scope, &r.Provider)
		return r, err
	})
}

// typeCount is how many events of one type of one inbox are in each status.
type typeCount struct {
	Inbox                                  inboxRef
	Type                                   string
	Pending, Processing, Failed, Processed int64
}

func (c *Console) typeCounts(ctx context.Context) ([]typeCount, error) {
	rows, err := c.o.Pool.Query(ctx, c.sql.counts)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []typeCount
	for rows.Next() {
		var ref inboxRef
		var typ, status string
		var n int64
		if err := rows.Scan(&ref.Scope, &ref.Provider, &typ, &status, &n); err != nil {
			return nil, err
		}
		if len(out) == 0 || out[len(out)-1].Inbox != ref || out[len(out)-1].Type != typ {
			out = append(out, typeCount{Inbox: ref, Type: typ})
		}
		tc := &out[len(out)-1]
		switch status {
		case inbox.StatusPending:
			tc.Pending = n
		case inbox.StatusProcessing:
			tc.Processing = n
		case inbox.StatusFailed:
			tc.Failed = n
		case inbox.StatusProcessed:
			tc.Processed = n
		}
	}
	return out, rows.Err()
}

// processedPerMinute returns how many events were processed in each of
// the minutes of the last day up to now's, oldest first.
func (c *Console) processedPerMinute(ctx context.Context, now time.Time) ([]int64, error) {
	last := now.Unix() / 60
	first := last - chartMinutes + 1
	rows, err := c.o.Pool.Query(ctx, c.sql.timeline, first)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make([]int64, chartMinutes)
	for rows.Next() {
		var minute, n int64
		if err := rows.Scan(&minute, &n); err != nil {
			return nil, err
		}
		if i := minute - first; i >= 0 && i < chartMinutes {
			out[i] += n
		}
	}
	return out, rows.Err()
}

// listFilter is what the events page filters by.
type listFilter struct {
	Inbox        inboxRef // zero: every inbox
	Status, Type string
	Object       string
	Before       time.Time // zero: any time
}

func (f listFilter) args() []any {
	var before any
	if !f.Before.IsZero() {
		before = f.Before
	}
	return []any{f.Inbox.Provider, f.Inbox.Scope, f.Status, f.Type, f.Object, before}
}

// listedEvent is an event of a list, with the inbox it is in.
type listedEvent struct {
	Inbox inboxRef
	inbox.EventInfo
}

// objectEvents lists the events of f, which names an object, newest
// first: [inbox.Filter] has no object.
func (c *Console) objectEvents(ctx context.Context, f listFilter, limit int) ([]listedEvent, error) {
	rows, err := c.o.Pool.Query(ctx, c.sql.objectList, append(f.args(), limit)...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (listedEvent, error) {
		var e listedEvent
		var created int64
		var processed, next *time.Time
		err := row.Scan(&e.Inbox.Scope, &e.ID, &e.Provider, &e.Type, &e.ObjectID, &e.APIVersion, &created, &e.Status,
			&e.Attempts, &e.LastError, &e.ReceivedAt, &processed, &next)
		e.Inbox.Provider = e.Provider
		e.Created = time.Unix(created, 0).UTC()
		if processed != nil {
			e.ProcessedAt = *processed
		}
		if next != nil {
			e.NextAttemptAt = *next
		}
		return e, err
	})
}

// failedCounts counts the failed events that f selects (its Status
// aside), per inbox.
func (c *Console) failedCounts(ctx context.Context, f listFilter) (map[inboxRef]int64, error) {
	f.Status = ""
	rows, err := c.o.Pool.Query(ctx, c.sql.failedCount, f.args()...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[inboxRef]int64{}
	for rows.Next() {
		var ref inboxRef
		var n int64
		if err := rows.Scan(&ref.Scope, &ref.Provider, &n); err != nil {
			return nil, err
		}
		out[ref] = n
	}
	return out, rows.Err()
}

// fence reads the fence of the record under key from pgstore's table,
// where [idempotency.Record] has none; ok is false when there is no row.
func (c *Console) fence(ctx context.Context, key string) (fence int64, ok bool, err error) {
	err = c.o.Pool.QueryRow(ctx, c.sql.fence, []byte(key)).Scan(&fence)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, nil
	}
	return fence, err == nil, err
}
