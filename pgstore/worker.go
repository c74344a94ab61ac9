package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stripe/stripe-go/v76"
)

// Worker defaults.
const (
	// DefaultMaxAttempts is how often a worker runs the function for an
	// event before the event is failed (dead letter), unless
	// [WithMaxAttempts] says otherwise.
	DefaultMaxAttempts = 10
	// DefaultBackoffMin and DefaultBackoffMax bound the pause before an
	// event's next attempt unless [WithBackoff] says otherwise.
	DefaultBackoffMin = 10 * time.Second
	DefaultBackoffMax = time.Hour
	// DefaultWorkerLease is how long an attempt holds its event without
	// renewing, unless [WithWorkerLease] says otherwise.
	DefaultWorkerLease = 30 * time.Second
	// DefaultPollInterval is how often an idle worker looks for due
	// events, unless [WithPollInterval] says otherwise.
	DefaultPollInterval = time.Second
	// maxConcurrency bounds [WithConcurrency].
	maxConcurrency = 1000
	// advisoryClass is the first key of the per-object advisory locks
	// that ordered claims take ("idew").
	advisoryClass int32 = 0x69646577
)

type workerConfig struct {
	maxAttempts            int
	backoffMin, backoffMax time.Duration
	lease, poll            time.Duration
	concurrency            int
	ordered                bool
}

func defaultWorkerConfig() workerConfig {
	return workerConfig{
		maxAttempts: DefaultMaxAttempts, backoffMin: DefaultBackoffMin, backoffMax: DefaultBackoffMax,
		lease: DefaultWorkerLease, poll: DefaultPollInterval, concurrency: 1,
	}
}

// WithMaxAttempts sets how often the worker runs the function for an
// event; when the last attempt fails, the event is failed (a dead letter,
// its last error kept) until [Inbox.Redrive]. An attempt whose worker died
// counts too. 1 to 1000. NewWorker. Default: [DefaultMaxAttempts] (10).
func WithMaxAttempts(n int) Option {
	return Option{name: "WithMaxAttempts", use: forWorker, apply: func(c *config) error {
		if n < 1 || n > 1000 {
			return fmt.Errorf("%d attempts is not between 1 and 1000", n)
		}
		c.worker.maxAttempts = n
		return nil
	}}
}

// WithBackoff sets the pause after the n-th failed attempt of an event:
// min·2^(n-1), at most max, of which a random part (up to half) is left
// out (jitter), so that events failing together do not retry together.
// 0 < min <= max. NewWorker. Default: [DefaultBackoffMin] (10 s) and
// [DefaultBackoffMax] (1 h).
func WithBackoff(min, max time.Duration) Option {
	return Option{name: "WithBackoff", use: forWorker, apply: func(c *config) error {
		if min <= 0 || max < min {
			return fmt.Errorf("backoff %v..%v is not 0 < min <= max", min, max)
		}
		c.worker.backoffMin, c.worker.backoffMax = min, max
		return nil
	}}
}

// WithWorkerLease sets how long an attempt holds its event: the worker
// renews the lease every third of it while the function runs, and cancels
// the function's context when it can no longer renew in time. An event
// whose worker died is picked up again once its lease lapsed. At least
// 50 ms. NewWorker. Default: [DefaultWorkerLease] (30 s).
func WithWorkerLease(d time.Duration) Option {
	return Option{name: "WithWorkerLease", use: forWorker, apply: func(c *config) error {
		if d < 50*time.Millisecond {
			return fmt.Errorf("lease %v is shorter than 50ms", d)
		}
		c.worker.lease = d
		return nil
	}}
}

// WithPollInterval sets how long an idle worker waits before it looks for
// due events again. At least 1 ms. NewWorker. Default:
// [DefaultPollInterval] (1 s).
func WithPollInterval(d time.Duration) Option {
	return Option{name: "WithPollInterval", use: forWorker, apply: func(c *config) error {
		if d < time.Millisecond {
			return fmt.Errorf("poll interval %v is shorter than 1ms", d)
		}
		c.worker.poll = d
		return nil
	}}
}

// WithConcurrency sets how many events one [Worker.Run] processes at once
// (1 to 1000). NewWorker. Default: 1.
func WithConcurrency(n int) Option {
	return Option{name: "WithConcurrency", use: forWorker, apply: func(c *config) error {
		if n < 1 || n > maxConcurrency {
			return fmt.Errorf("concurrency %d is not between 1 and %d", n, maxConcurrency)
		}
		c.worker.concurrency = n
		return nil
	}}
}

// WithObjectOrdering processes the events of one Stripe object (the same
// data.object.id) one at a time, in the order of their created time (ties
// by event id), across all workers and processes that use it: an event
// waits while an earlier event of its object is pending or processing, or
// while another event of its object is processing. A failed (dead letter)
// event no longer holds the later ones back. An event that arrives after
// later events of its object were processed is processed when it arrives;
// functions that must see the latest state should re-fetch the object.
// Every worker on the table should use it. NewWorker. Default: off, events
// are processed in any order, several of one object at once.
func WithObjectOrdering() Option {
	return Option{name: "WithObjectOrdering", use: forWorker, apply: func(c *config) error {
		c.worker.ordered = true
		return nil
	}}
}

// Worker processes the events an [Inbox] stored: it claims due events
// with FOR UPDATE SKIP LOCKED (so any number of workers, in any number of
// processes, share the table), runs the function for each, and records
// the outcome:
//
//   - success: the event is processed, and no worker runs it again;
//   - error or panic: the event is pending again after a backoff with
//     jitter ([WithBackoff]), or failed (dead letter, its last error kept)
//     after [WithMaxAttempts] attempts;
//   - the worker dies or loses the database: the event's lease
//     ([WithWorkerLease]) lapses and another worker runs it again.
//
// An event is processed once when its success is recorded; if the worker
// dies, or loses its lease, between the function's return and that
// record, the function runs again for it. Keep its external effects
// idempotent too (for Stripe calls, idempotency keys derived from the
// event id).
//
// A Worker is safe for concurrent use; create it with [NewWorker].
type Worker struct {
	pool   *pgxpool.Pool
	fn     func(ctx context.Context, event stripe.Event) error
	c      workerConfig
	logger *slog.Logger
	sql    workerStatements
}

// NewWorker returns a worker on the tables that [Migrate] created (with
// the same [WithSchema], if any) that runs fn for each event.
//
// fn processes one event. It returns nil once the event is handled,
// including events it chooses to ignore; an error or a panic makes the
// worker try again later. Calls for different events run concurrently
// (see [WithConcurrency], [WithObjectOrdering]). Its ctx ends when the
// worker stops or loses the event's lease.
//
// It takes [WithSchema], [WithLogger] and the worker options. It sends
// nothing to the database.
func NewWorker(pool *pgxpool.Pool, fn func(ctx context.Context, event stripe.Event) error, opts ...Option) (*Worker, error) {
	switch {
	case pool == nil:
		return nil, errors.New("pgstore: pool is nil")
	case fn == nil:
		return nil, errors.New("pgstore: webhook function is nil")
	}
	c, err := newConfigFor(forWorker, opts)
	if err != nil {
		return nil, err
	}
	return &Worker{pool: pool, fn: fn, c: c.worker, logger: c.logger, sql: newWorkerStatements(c.schema, c.worker.ordered)}, nil
}

type workerStatements struct {
	claim, extend, complete, fail, release, deadLetter string
}

func newWorkerStatements(schema string, ordered bool) workerStatements {
	t := name(schema, "webhook_events")
	order := ""
	if ordered {
		// The advisory lock, held until the claim commits, keeps two
		// overlapping claims from taking events of one object; a claim
		// that starts after another committed sees its processing event.
		order = `
    AND (e.object_id IS NULL OR (NOT EXISTS (
        SELECT 1 FROM ` + t + ` p
        WHERE p.object_id = e.object_id AND p.status IN ('pending', 'processing')
          AND ((p.created, p.event_id) < (e.created, e.event_id)
               OR (p.status = 'processing' AND p.next_attempt_at > clock_timestamp())))
      AND pg_try_advisory_xact_lock(` + fmt.Sprint(advisoryClass) + `, hashtext(e.object_id))))`
	}
	return workerStatements{
		// $1 how many, $2 token, $3 lease in ms.
		claim: `WITH due AS (
    SELECT e.event_id FROM ` + t + ` e
    WHERE e.status IN ('pending', 'processing') AND e.next_attempt_at <= clock_timestamp()` + order + `
    ORDER BY e.next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE ` + t + ` e SET status = 'processing', attempts = e.attempts + 1, lease_token = $2,
    next_attempt_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
FROM due WHERE e.event_id = due.event_id
RETURNING e.event_id, e.payload, e.attempts`,
		// $1 id, $2 token; then as noted.
		extend: `UPDATE ` + t + ` SET next_attempt_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'`,
		complete: `UPDATE ` + t + ` SET status = 'processed', processed_at = clock_timestamp(), lease_token = NULL, next_attempt_at = NULL
WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'`,
		// $3 max attempts, $4 error, $5 backoff in ms.
		fail: `UPDATE ` + t + ` SET
    status = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END,
    next_attempt_at = CASE WHEN attempts >= $3 THEN NULL ELSE clock_timestamp() + $5::bigint * interval '1 millisecond' END,
    last_error = $4, lease_token = NULL
WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'
RETURNING status`,
		// $3 error: the attempt was cut short by the worker's stop, so it
		// does not count.
		release: `UPDATE ` + t + ` SET status = 'pending', attempts = greatest(attempts - 1, 0),
    next_attempt_at = clock_timestamp(), last_error = $3, lease_token = NULL
WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'`,
		// $3 error.
		deadLetter: `UPDATE ` + t + ` SET status = 'failed', next_attempt_at = NULL, last_error = $3, lease_token = NULL
WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'`,
	}
}

// claimed is one event a claim returned.
type claimed struct {
	id, token string
	payload   []byte
	attempt   int
}

// Run processes due events until ctx ends, then lets the running
// functions finish (their contexts are cancelled with ctx: an attempt cut
// short that way puts its event back, not counted as an attempt), and
// returns nil. Database errors are logged ([WithLogger]) and retried
// after the poll interval. Run may be called several times at once, in
// one process or many.
func (w *Worker) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	done := make(chan struct{}, w.c.concurrency)
	running := 0
	timer := time.NewTimer(w.c.poll) // Go 1.23 timers: Reset drops a stale tick
	defer timer.Stop()
	for {
		busy := false
		if free := w.c.concurrency - running; free > 0 {
			events, err := w.claim(ctx, free)
			if err != nil && ctx.Err() == nil {
				w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker could not claim events", "", err)
			}
			for _, ev := range events {
				running++
				wg.Add(1)
				go func() {
					defer wg.Done()
					w.process(ctx, ev)
					done <- struct{}{}
				}()
			}
			busy = len(events) == free
		}
		if !busy {
			timer.Reset(w.c.poll)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-done:
			running--
		case <-timer.C:
		}
	}
}

// claim takes up to n due events. The statement is not abandoned when ctx
// ends (within one lease): an abandoned claim might have committed, and
// its events would wait for their leases to lapse.
func (w *Worker) claim(ctx context.Context, n int) ([]claimed, error) {
	if ctx.Err() != nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.c.lease)
	defer cancel()
	token := rand.Text()
	var out []claimed
	err := resend(ctx, w.pool, func() error {
		rows, err := w.pool.Query(ctx, w.sql.claim, n, token, w.c.lease.Milliseconds())
		if err != nil {
			return err
		}
		out, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (claimed, error) {
			c := claimed{token: token}
			err := row.Scan(&c.id, &c.payload, &c.attempt)
			return c, err
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: worker: claim: %w", err)
	}
	return out, nil
}

// errLeaseLost is the cause of a function's context when the worker could
// not renew the event's lease in time.
var errLeaseLost = errors.New("pgstore: worker lost the event's lease")

// process runs one attempt of one claimed event and records its outcome.
func (w *Worker) process(ctx context.Context, c claimed) {
	// Outcomes are recorded also after ctx ended, within one lease.
	rec, cancelRec := context.WithTimeout(context.WithoutCancel(ctx), w.c.lease)
	defer cancelRec()
	var event stripe.Event
	if err := json.Unmarshal(c.payload, &event); err != nil || event.ID != c.id {
		w.record(rec, "dead letter", w.sql.deadLetter, c, "payload is not the event "+c.id)
		return
	}
	if ctx.Err() != nil { // stopped while claiming
		w.record(rec, "release", w.sql.release, c, "worker stopped before the attempt")
		return
	}
	if c.attempt > w.c.maxAttempts { // the last attempt's worker died
		w.record(rec, "dead letter", w.sql.deadLetter, c, fmt.Sprintf("attempt %d of %d: the worker lost the event's lease", c.attempt-1, w.c.maxAttempts))
		return
	}
	fnCtx, cancel := context.WithCancelCause(ctx)
	stopRenew := w.renew(fnCtx, cancel, c)
	err := w.call(fnCtx, event)
	cancel(nil)
	stopRenew()
	leaseLost := errors.Is(context.Cause(fnCtx), errLeaseLost)
	switch {
	case err == nil:
		w.record(rec, "complete", w.sql.complete, c)
	case leaseLost:
		// Another worker may hold the event by now; its lease lapses
		// otherwise, and the attempt counts.
		w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker lost an event's lease while its function ran", c.id, err)
	case ctx.Err() != nil:
		w.record(rec, "release", w.sql.release, c, "worker stopped: "+err.Error())
	default:
		backoff := w.backoff(c.attempt)
		var status string
		e := resend(rec, w.pool, func() error {
			return w.pool.QueryRow(rec, w.sql.fail, c.id, c.token, w.c.maxAttempts, err.Error(), backoff.Milliseconds()).Scan(&status)
		})
		switch {
		case errors.Is(e, pgx.ErrNoRows):
			w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker lost an event's lease before recording its failure", c.id, err)
		case e != nil:
			w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker could not record a failed attempt", c.id, e)
		case status == "failed":
			w.log(ctx, slog.LevelError, "idempotency: pgstore: webhook event failed its last attempt (dead letter)", c.id, err)
		default:
			w.log(ctx, slog.LevelWarn, "idempotency: pgstore: webhook function failed; the event will be retried", c.id, err)
		}
	}
}

// call runs the function, turning a panic into an error.
func (w *Worker) call(ctx context.Context, event stripe.Event) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return w.fn(ctx, event)
}

// record runs an owner-checked write of an event's outcome.
func (w *Worker) record(ctx context.Context, op, stmt string, c claimed, args ...any) {
	var n int64
	err := resend(ctx, w.pool, func() error {
		tag, err := w.pool.Exec(ctx, stmt, append([]any{c.id, c.token}, args...)...)
		n = tag.RowsAffected()
		return err
	})
	switch {
	case err != nil:
		w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker could not record an event's outcome ("+op+")", c.id, err)
	case n == 0:
		w.log(ctx, slog.LevelWarn, "idempotency: pgstore: worker lost an event's lease before recording its outcome ("+op+")", c.id, nil)
	}
}

// renew extends the event's lease every third of it until stopped, and
// cancels the function's context when the lease is lost or can no longer
// be renewed before it lapses. The returned func stops it and waits.
func (w *Worker) renew(ctx context.Context, cancel context.CancelCauseFunc, c claimed) (stop func()) {
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		every := w.c.lease / 3
		ticker := time.NewTicker(every)
		defer ticker.Stop()
		renewed := time.Now() // the claim was sent before this
		for {
			select {
			case <-quit:
				return
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
			sent := time.Now()
			callCtx, cancelCall := context.WithTimeout(context.WithoutCancel(ctx), every)
			tag, err := w.pool.Exec(callCtx, w.sql.extend, c.id, c.token, w.c.lease.Milliseconds())
			cancelCall()
			switch {
			case err == nil && tag.RowsAffected() == 1:
				renewed = sent
			case err == nil:
				cancel(errLeaseLost)
				return
			case time.Since(renewed)+every >= w.c.lease:
				cancel(fmt.Errorf("%w: %w", errLeaseLost, err))
				return
			}
		}
	}()
	return func() {
		close(quit)
		wg.Wait()
	}
}

// backoff is the pause after the attempt-th failed attempt, with jitter.
func (w *Worker) backoff(attempt int) time.Duration {
	d := w.c.backoffMin
	for i := 1; i < attempt && d < w.c.backoffMax; i++ {
		d *= 2
	}
	d = min(d, w.c.backoffMax)
	return d - time.Duration(mrand.Int64N(int64(d/2)+1))
}

func (w *Worker) log(ctx context.Context, level slog.Level, msg, eventID string, err error) {
	if w.logger == nil {
		return
	}
	attrs := []slog.Attr{}
	if eventID != "" {
		attrs = append(attrs, slog.String("event_id", eventID))
	}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	w.logger.LogAttrs(ctx, level, msg, attrs...)
}
