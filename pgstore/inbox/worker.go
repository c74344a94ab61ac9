package inbox

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/lease"
	"github.com/seed70ea8305/idempotency/pgstore/internal/option"
	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

// WorkerOptions configures a [Worker] ([NewWorker]). The zero value is
// the defaults: the tables found through the search_path, the default
// scope, one event at a time, any order, 10 attempts with a backoff from
// 10 s to 1 h, 30 s leases, polling every second, no logging. A value out
// of range makes NewWorker fail.
type WorkerOptions struct {
	// Schema is where pgstore.Migrate created the tables. Default: "",
	// the search_path.
	Schema string

	// Scope is the inboxes' [Options].Scope whose events the worker
	// processes, of every provider. Default: "".
	Scope string

	// MaxAttempts is how often the worker runs the function for an event;
	// when the last attempt fails, the event is failed (a dead letter,
	// its last error kept) until [Inbox.Redrive]. An attempt whose worker
	// died counts too. 1 to 1000. Default: 10.
	MaxAttempts int

	// BackoffMin and BackoffMax bound the pause after the n-th failed
	// attempt of an event: BackoffMin·2^(n-1), at most BackoffMax, of
	// which a random part (up to half) is left out (jitter), so that
	// events failing together do not retry together. 0 < BackoffMin <=
	// BackoffMax. Defaults: 10 s and 1 h; when only one is set, the
	// other's default moves to fit it.
	BackoffMin, BackoffMax time.Duration

	// Lease is how long an attempt holds its event: the worker renews the
	// lease every third of it while the function runs, and the function's
	// context ends, with a cause wrapping [idempotency.ErrLeaseLost],
	// before the lease can lapse unrenewed (it reads the deadline on the
	// monotonic clock, so it tells the truth after a pause of the
	// process too). An event whose worker died is picked up again once
	// its lease lapsed. At least 50 ms. Default: 30 s.
	Lease time.Duration

	// PollInterval is how long an idle worker waits before it looks for
	// due events again. At least 1 ms. Default: 1 s.
	PollInterval time.Duration

	// Concurrency is how many events one [Worker.Run] processes at once,
	// 1 to 1000. Default: 1.
	Concurrency int

	// ObjectOrdering processes the events of one object (the same
	// [Options].ObjectKey, of one provider, in the scope) one at a time,
	// in the order of their created time (then arrival, then event ID),
	// across all workers and processes that use it: an event waits while
	// an earlier event of its object is pending or processing, or while
	// another event of its object is processing. A failed (dead letter)
	// event no longer holds the later ones back. An event that arrives
	// after later events of its object were processed is processed when
	// it arrives; functions that must see the latest state should
	// re-fetch the object. Every worker of the scope should set it.
	// Default: false, events are processed in any order, several of one
	// object at once.
	ObjectOrdering bool

	// Logger receives the worker's failed attempts, dead letters and
	// database errors. Default: nil, silent.
	Logger *slog.Logger
}

// Defaults of [WorkerOptions].
const (
	defaultMaxAttempts = 10
	defaultBackoffMin  = 10 * time.Second
	defaultBackoffMax  = time.Hour
	defaultLease       = 30 * time.Second
	defaultPoll        = time.Second
	maxConcurrency     = 1000
	// advisoryClass is the first key of the per-object advisory locks
	// that ordered claims take ("idew").
	advisoryClass int32 = 0x69646577
)

// settings returns o with the defaults filled in, or why it is invalid.
func (o WorkerOptions) settings() (WorkerOptions, error) {
	// When only one bound of the backoff is set, the other's default
	// moves to fit it.
	if o.BackoffMin == 0 && o.BackoffMax > 0 {
		o.BackoffMin = min(defaultBackoffMin, o.BackoffMax)
	}
	if o.BackoffMax == 0 && o.BackoffMin > 0 {
		o.BackoffMax = max(defaultBackoffMax, o.BackoffMin)
	}
	option.Default(&o.BackoffMin, defaultBackoffMin)
	option.Default(&o.BackoffMax, defaultBackoffMax)
	option.Default(&o.MaxAttempts, defaultMaxAttempts)
	option.Default(&o.Lease, defaultLease)
	option.Default(&o.PollInterval, defaultPoll)
	option.Default(&o.Concurrency, 1)
	return o, errors.Join(
		pg.CheckSchemaName(o.Schema),
		option.Between("inbox: attempts", o.MaxAttempts, 1, 1000),
		option.Between("inbox: backoff minimum", o.BackoffMin, 1, o.BackoffMax),
		option.AtLeast("inbox: lease", o.Lease, 50*time.Millisecond),
		option.AtLeast("inbox: poll interval", o.PollInterval, time.Millisecond),
		option.Between("inbox: concurrency", o.Concurrency, 1, maxConcurrency),
	)
}

// Worker processes the events that the inboxes of its scope stored, of
// every provider: it claims due events with FOR UPDATE SKIP LOCKED (so
// any number of workers, in any number of processes, share the table),
// runs the function for each, and records the outcome:
//
//   - success: the event is processed, and no worker runs it again;
//   - error or panic: the event is pending again after a backoff with
//     jitter ([WorkerOptions].BackoffMin), or failed (dead letter, its
//     last error kept) after [WorkerOptions].MaxAttempts attempts;
//   - the worker dies or loses the database: the event's lease
//     ([WorkerOptions].Lease) lapses and another worker runs it again.
//
// An event is processed once when its success is recorded; if the worker
// dies, or loses its lease, between the function's return and that
// record, the function runs again for it. Keep its external effects
// idempotent too (for Stripe calls, keys from
// [idempotency.StripeKeyFrom](ev.Provider, ev.ID, operation)).
//
// A Worker is safe for concurrent use; create it with [NewWorker].
type Worker struct {
	pool   *pgxpool.Pool
	fn     func(ctx context.Context, ev idempotency.WebhookEvent) error
	o      WorkerOptions
	sql    workerStatements
	leases *lease.Keeper
}

// NewWorker returns a worker on the tables that pgstore.Migrate created,
// that runs fn for each event. It checks, in one round trip under ctx,
// that the tables are there at the migration this version needs, and
// fails otherwise, as [NewInbox] does.
//
// fn processes one event: the [idempotency.WebhookEvent] its inbox's
// verifier read (Provider, ID, Type, Payload, Object as the inbox's
// [Options].ObjectKey named it, and for Stripe APIVersion and the event
// decoded as far as stripe-go can, whatever its API version), rebuilt
// from what the inbox stored; nothing is verified again. It returns nil
// once the event is handled, including events it chooses to ignore; an
// error or a panic makes the worker try again later. Calls for different events run concurrently (see
// [WorkerOptions].Concurrency and ObjectOrdering). Its ctx ends when the
// worker stops, and when the worker can no longer count on the event's
// lease: its cause then wraps [idempotency.ErrLeaseLost].
func NewWorker(ctx context.Context, pool *pgxpool.Pool, fn func(ctx context.Context, ev idempotency.WebhookEvent) error, opts WorkerOptions) (*Worker, error) {
	if fn == nil {
		return nil, errors.New("inbox: webhook function is nil")
	}
	o, err := opts.settings()
	if err == nil {
		err = pg.Check(ctx, pool, o.Schema)
	}
	if err != nil {
		return nil, err
	}
	return &Worker{
		pool: pool, fn: fn, o: o, sql: newWorkerStatements(o.Schema, o.ObjectOrdering),
		leases: &lease.Keeper{
			Duration:     o.Lease,
			Timeout:      o.Lease / 3,
			Lost:         func(err error) bool { return errors.Is(err, errNotHeld) },
			LostCause:    fmt.Errorf("%w: inbox: another worker holds the event", idempotency.ErrLeaseLost),
			ExpiredCause: fmt.Errorf("%w: inbox: the event's lease could not be renewed in time", idempotency.ErrLeaseLost),
		},
	}, nil
}

// errNotHeld: a renewal found the event no longer held by the attempt.
var errNotHeld = errors.New("inbox: the event is no longer the attempt's")

type workerStatements struct {
	claim, extend, complete, fail, release, deadLetter string
}

// Every statement after the claim names its event by $1 scope, $2
// provider, $3 event ID and $4 the attempt's token.
func newWorkerStatements(schema string, ordered bool) workerStatements {
	t := pg.Table(schema, "webhook_events")
	const held = `WHERE scope = $1 AND provider = $2 AND event_id = $3 AND lease_token = $4 AND status = 'processing'`
	order := ""
	if ordered {
		// The advisory lock, held until the claim commits, keeps two
		// overlapping claims from taking events of one object; a claim
		// that starts after another committed sees its processing event.
		order = `
    AND (e.object_id IS NULL OR (NOT EXISTS (
        SELECT 1 FROM ` + t + ` p
        WHERE p.scope = e.scope AND p.provider = e.provider AND p.object_id = e.object_id
          AND p.status IN ('pending', 'processing')
          AND ((p.created, p.received_at, p.event_id) < (e.created, e.received_at, e.event_id)
               OR (p.status = 'processing' AND p.next_attempt_at > clock_timestamp())))
      AND pg_try_advisory_xact_lock(` + fmt.Sprint(advisoryClass) + `, hashtext(e.provider || ':' || e.object_id))))`
	}
	return workerStatements{
		// $1 scope, $2 how many, $3 token, $4 lease in ms.
		claim: `WITH due AS (
    SELECT e.ctid, e.provider, e.event_id FROM ` + t + ` e
    WHERE e.scope = $1 AND e.status IN ('pending', 'processing') AND e.next_attempt_at <= clock_timestamp()` + order + `
    ORDER BY e.next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE ` + t + ` e SET status = 'processing', attempts = e.attempts + 1, lease_token = $3,
    next_attempt_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
FROM due WHERE e.ctid = due.ctid AND e.scope = $1 AND e.provider = due.provider AND e.event_id = due.event_id
RETURNING e.provider, e.event_id, e.type, coalesce(e.object_id, ''), e.api_version, e.created, e.payload, e.attempts`,
		// $5 lease in ms.
		extend: `UPDATE ` + t + ` SET next_attempt_at = clock_timestamp() + $5::bigint * interval '1 millisecond' ` + held,
		complete: `UPDATE ` + t + ` SET status = 'processed', processed_at = clock_timestamp(), lease_token = NULL, next_attempt_at = NULL
` + held,
		// $5 max attempts, $6 error, $7 backoff in ms.
		fail: `UPDATE ` + t + ` SET
    status = CASE WHEN attempts >= $5 THEN 'failed' ELSE 'pending' END,
    next_attempt_at = CASE WHEN attempts >= $5 THEN NULL ELSE clock_timestamp() + $7::bigint * interval '1 millisecond' END,
    last_error = $6, lease_token = NULL
` + held + `
RETURNING status`,
		// $5 error: the attempt was cut short by the worker's stop, so it
		// does not count.
		release: `UPDATE ` + t + ` SET status = 'pending', attempts = greatest(attempts - 1, 0),
    next_attempt_at = clock_timestamp(), last_error = $5, lease_token = NULL
` + held,
		// $5 error.
		deadLetter: `UPDATE ` + t + ` SET status = 'failed', next_attempt_at = NULL, last_error = $5, lease_token = NULL
` + held,
	}
}

// attempt is one claimed event, and the lease on it.
type attempt struct {
	w        *Worker
	provider string
	id       string
	token    string
	typ      string
	object   string
	version  string
	created  int64
	payload  []byte
	number   int // 1 for the first attempt
	sent     time.Time
	lease    lease.Lease
}

// key is the arguments $1 to $4 that name the attempt's event.
func (a *attempt) key(more ...any) []any {
	return append([]any{a.w.o.Scope, a.provider, a.id, a.token}, more...)
}

// Renew implements lease.Renewer: it extends the event's lease, or
// reports that the attempt no longer holds it.
func (a *attempt) Renew(ctx context.Context) error {
	tag, err := a.w.pool.Exec(ctx, a.w.sql.extend, a.key(a.w.o.Lease.Milliseconds())...)
	switch {
	case err != nil:
		return err
	case tag.RowsAffected() != 1:
		return errNotHeld
	}
	return nil
}

// Run processes due events until ctx ends, then lets the running
// functions finish (their contexts are cancelled with ctx: an attempt cut
// short that way puts its event back, not counted as an attempt), and
// returns nil. A database that fails for a while is logged
// ([WorkerOptions].Logger) and tried again after the poll interval; a
// setup that cannot work (the tables or a column gone, a privilege
// missing: retrying changes nothing until someone acts) makes Run return
// an error at once, once the running functions finished, wrapping
// pgstore.ErrNotMigrated where the tables are missing or old. Run may be
// called several times at once, in one process or many.
//
// The successes of the functions that returned meanwhile are recorded in
// the round trip that claims the next events, so a busy worker sends one
// round trip per event.
func (w *Worker) Run(ctx context.Context) error {
	if w == nil || w.pool == nil {
		return errors.New("inbox: worker not made by NewWorker")
	}
	// finished receives each attempt whose goroutine ended: the attempt
	// when its function succeeded and its completion is still to be
	// sent, nil when its outcome is recorded.
	finished := make(chan *attempt, w.o.Concurrency)
	running := 0
	var succeeded []*attempt
	timer := time.NewTimer(w.o.PollInterval) // Go 1.23 timers: Reset drops a stale tick
	defer timer.Stop()
	for {
		free := w.o.Concurrency - running
		if ctx.Err() != nil {
			free = 0
		}
		var events []*attempt
		var err error
		if free > 0 || len(succeeded) > 0 {
			events, err = w.send(ctx, succeeded, free)
			succeeded = succeeded[:0]
		}
		for _, a := range events {
			running++
			go func() {
				if !w.process(ctx, a) {
					a = nil
				}
				finished <- a
			}()
		}
		switch {
		case err != nil && pg.Missing(err):
			return w.drain(ctx, finished, running, fmt.Errorf("%w: %w: run pgstore.Migrate", pg.ErrNotMigrated, err))
		case err != nil && pg.Permanent(err):
			return w.drain(ctx, finished, running, err)
		case err != nil && ctx.Err() == nil:
			w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker could not claim events", nil, err)
		case ctx.Err() != nil:
			return w.drain(ctx, finished, running, nil)
		}
		if free == 0 || len(events) < free {
			timer.Reset(w.o.PollInterval)
		}
		select {
		case <-ctx.Done():
		case a := <-finished:
			succeeded = collect(succeeded, a, finished, &running)
		case <-timer.C:
		}
	}
}

// collect counts a, which just finished, and every attempt that has
// finished by now off running, and appends the successes among them to
// succeeded: their completions share one round trip.
func collect(succeeded []*attempt, a *attempt, finished <-chan *attempt, running *int) []*attempt {
	for {
		*running--
		if a != nil {
			succeeded = append(succeeded, a)
		}
		if *running == 0 {
			return succeeded
		}
		select {
		case a = <-finished:
		default:
			return succeeded
		}
	}
}

// drain waits for the running attempts, recording the successes among
// them, and returns err.
func (w *Worker) drain(ctx context.Context, finished <-chan *attempt, running int, err error) error {
	for running > 0 {
		succeeded := collect(nil, <-finished, finished, &running)
		if len(succeeded) > 0 {
			_, _ = w.send(ctx, succeeded, 0)
		}
	}
	return err
}

// send records the successes of succeeded (owner-checked, each with its
// own statement) and claims up to n due events, in one round trip: the
// statements go in one pipeline, and PostgreSQL runs them in one
// transaction, so that the claim sees the events just completed (an
// ordered claim can take an object's next event). It returns the claimed
// events, or the claim's error. A completion is recorded, or logged as
// not recorded, whatever happened to the claim: when the round trip fails,
// the completions are sent again on their own.
//
// The round trip is not abandoned when ctx ends (within one lease): an
// abandoned claim might have committed, and its events would wait for
// their leases to lapse; and an outcome is recorded also when the worker
// stops.
func (w *Worker) send(ctx context.Context, succeeded []*attempt, n int) ([]*attempt, error) {
	// The successes' leases were kept until now (see process); End is
	// idempotent, so the resend below may end them first.
	defer func() {
		for _, a := range succeeded {
			a.lease.End()
		}
	}()
	rec, cancel := w.recording(ctx)
	defer cancel()
	token := ""
	if n > 0 {
		token = rand.Text()
	}
	completed := make([]int64, len(succeeded))
	var out []*attempt
	err := pg.Resend(rec, w.pool, func() error {
		b := &pgx.Batch{}
		for _, a := range succeeded {
			b.Queue(w.sql.complete, a.key()...)
		}
		if n > 0 {
			b.Queue(w.sql.claim, w.o.Scope, n, token, w.o.Lease.Milliseconds())
		}
		return pg.WithConn(rec, w.pool, func(ctx context.Context, conn *pgx.Conn) error {
			sent := time.Now()
			br := conn.SendBatch(ctx, b)
			err := func() error {
				for i := range succeeded {
					tag, err := br.Exec()
					if err != nil {
						return err
					}
					completed[i] = tag.RowsAffected()
				}
				if n == 0 {
					return nil
				}
				rows, _ := br.Query() // CollectRows returns its error
				var err error
				out, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (*attempt, error) {
					a := &attempt{w: w, token: token, sent: sent}
					err := row.Scan(&a.provider, &a.id, &a.typ, &a.object, &a.version, &a.created, &a.payload, &a.number)
					return a, err
				})
				return err
			}()
			// Close reads the end of the transaction: it committed when
			// Close returns no error.
			if closeErr := br.Close(); err == nil {
				err = closeErr
			}
			if err != nil {
				out = nil
			}
			return err
		})
	})
	switch {
	case err == nil:
		for i, a := range succeeded {
			if completed[i] == 0 {
				w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker lost an event's lease before recording its outcome (complete)", a, nil)
			}
		}
		return out, nil
	case len(succeeded) > 0 && n > 0:
		// The completions were rolled back with the claim, or failed
		// themselves: send them again, on their own.
		_, _ = w.send(ctx, succeeded, 0)
	default:
		for _, a := range succeeded {
			w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker could not record an event's outcome (complete)", a, err)
		}
	}
	if n == 0 {
		return nil, nil
	}
	return nil, fmt.Errorf("inbox: worker: claim: %w", err)
}

// process runs one attempt of one claimed event and records its outcome,
// but for a success: it reports a success, whose completion the caller
// sends (and whose lease the caller ends, see send).
func (w *Worker) process(ctx context.Context, a *attempt) (succeeded bool) {
	ev, err := a.event()
	if err != nil {
		w.record(ctx, "dead letter", w.sql.deadLetter, a, err.Error())
		return false
	}
	if ctx.Err() != nil { // stopped while claiming
		w.record(ctx, "release", w.sql.release, a, "worker stopped before the attempt")
		return false
	}
	if a.number > w.o.MaxAttempts { // the last attempt's worker died
		w.record(ctx, "dead letter", w.sql.deadLetter, a,
			fmt.Sprintf("attempt %d of %d: the worker lost the event's lease", a.number-1, w.o.MaxAttempts))
		return false
	}
	fnCtx := w.leases.Start(&a.lease, ctx, context.WithoutCancel(ctx), a.sent, a)
	err = w.call(fnCtx, ev)
	// Cause asks the work context, which reads the lease's deadline on
	// the monotonic clock: a lease that lapsed while the function ran
	// counts, timer or not.
	leaseLost := errors.Is(context.Cause(fnCtx), idempotency.ErrLeaseLost)
	if err == nil {
		// Run records the completion (owner-checked: unless another
		// attempt holds the event) with its next round trip, and ends
		// the lease then: until then it is renewed, so the wait for that
		// round trip cannot let it lapse.
		return true
	}
	a.lease.End()
	switch {
	case leaseLost:
		// Another worker may hold the event by now; its lease lapses
		// otherwise, and the attempt counts.
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker lost an event's lease while its function ran", a, err)
	case ctx.Err() != nil:
		w.record(ctx, "release", w.sql.release, a, "worker stopped: "+err.Error())
	default:
		w.fail(ctx, a, err)
	}
	return false
}

// fail records a failed attempt: a retry after a backoff, or a dead
// letter after the last attempt.
func (w *Worker) fail(ctx context.Context, a *attempt, failure error) {
	rec, cancel := w.recording(ctx)
	defer cancel()
	backoff := w.backoff(a.number)
	var status string
	err := pg.Resend(rec, w.pool, func() error {
		return w.pool.QueryRow(rec, w.sql.fail, a.key(w.o.MaxAttempts, failure.Error(), backoff.Milliseconds())...).Scan(&status)
	})
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker lost an event's lease before recording its failure", a, failure)
	case err != nil:
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker could not record a failed attempt", a, err)
	case status == StatusFailed:
		w.log(ctx, slog.LevelError, "idempotency: inbox: webhook event failed its last attempt (dead letter)", a, failure)
	default:
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: webhook function failed; the event will be retried", a, failure)
	}
}

// event is the attempt's event as the function gets it: what the
// verifier read at receipt, from the columns stored then, and for Stripe
// the event decoded from the stored payload. A stored payload that is not
// the event it names is an error: the event is a dead letter.
func (a *attempt) event() (idempotency.WebhookEvent, error) {
	ev := idempotency.WebhookEvent{
		Provider: a.provider, ID: a.id, Type: a.typ, Object: a.object, APIVersion: a.version, Payload: a.payload,
	}
	if !json.Valid(a.payload) {
		return ev, fmt.Errorf("the stored payload of %s is not JSON", a.id)
	}
	if a.provider != providerStripe {
		return ev, nil
	}
	se, err := decodeStripe(a.payload, a.id)
	if err != nil {
		return ev, err
	}
	ev.Stripe = se
	if ev.APIVersion == "" { // stored before migration 0004
		ev.APIVersion = se.APIVersion
	}
	return ev, nil
}

// call runs the function, turning a panic into an error.
func (w *Worker) call(ctx context.Context, ev idempotency.WebhookEvent) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return w.fn(ctx, ev)
}

// recording is the context of a write of an event's outcome: ctx's
// values, bounded by one lease from now, and not cancelled with ctx, so
// that an outcome is recorded also when the worker stops.
func (w *Worker) recording(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), w.o.Lease)
}

// record runs an owner-checked write of an event's outcome.
func (w *Worker) record(ctx context.Context, op, stmt string, a *attempt, args ...any) {
	rec, cancel := w.recording(ctx)
	defer cancel()
	var n int64
	err := pg.Resend(rec, w.pool, func() error {
		tag, err := w.pool.Exec(rec, stmt, a.key(args...)...)
		n = tag.RowsAffected()
		return err
	})
	switch {
	case err != nil:
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker could not record an event's outcome ("+op+")", a, err)
	case n == 0:
		w.log(ctx, slog.LevelWarn, "idempotency: inbox: worker lost an event's lease before recording its outcome ("+op+")", a, nil)
	}
}

// backoff is the pause after the attempt-th failed attempt, with jitter.
func (w *Worker) backoff(attempt int) time.Duration {
	d := w.o.BackoffMin
	for i := 1; i < attempt && d < w.o.BackoffMax; i++ {
		d *= 2
	}
	d = min(d, w.o.BackoffMax)
	return d - time.Duration(mrand.Int64N(int64(d/2)+1))
}

func (w *Worker) log(ctx context.Context, level slog.Level, msg string, a *attempt, err error) {
	if w.o.Logger == nil {
		return
	}
	attrs := []slog.Attr{}
	if a != nil {
		attrs = append(attrs, slog.String("provider", a.provider), slog.String("event_id", a.id))
	}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	w.o.Logger.LogAttrs(ctx, level, msg, attrs...)
}
