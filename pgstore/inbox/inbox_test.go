package inbox_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
)

// TestConstructorsValidate: the constructors refuse what cannot work
// before sending anything (a nil pool, verifier or function, an option
// out of range), and accept every option in range.
func TestConstructorsValidate(t *testing.T) {
	ctx := context.Background()
	fn := func(context.Context, idempotency.WebhookEvent) error { return nil }
	v := stripeVerifier(t, "whsec_x")
	pool := &pgxpool.Pool{} // never used: arguments are checked first
	_, err := inbox.NewWorker(ctx, pool, nil, inbox.WorkerOptions{})
	require.Error(t, err)
	_, err = inbox.NewWorker(ctx, nil, fn, inbox.WorkerOptions{})
	require.Error(t, err)
	for name, o := range map[string]inbox.WorkerOptions{
		"backoff min above max": {BackoffMin: time.Second, BackoffMax: time.Millisecond},
		"negative backoff":      {BackoffMin: -time.Second},
		"short lease":           {Lease: time.Millisecond},
		"sub-ms poll":           {PollInterval: time.Microsecond},
		"too many attempts":     {MaxAttempts: 1001},
		"negative attempts":     {MaxAttempts: -1},
		"negative concurrency":  {Concurrency: -1},
		"upper-case schema":     {Schema: "S"},
	} {
		_, err := inbox.NewWorker(ctx, pool, fn, o)
		require.Error(t, err, name)
	}
	_, err = inbox.NewInbox(ctx, pool, nil, inbox.Options{})
	require.Error(t, err, "nil verifier")
	_, err = inbox.NewInbox(ctx, nil, v, inbox.Options{})
	require.Error(t, err, "nil pool")
	_, err = inbox.NewInbox(ctx, pool, providerless{v}, inbox.Options{})
	require.Error(t, err, "a verifier without a provider name")
	for name, o := range map[string]inbox.Options{
		"negative body limit": {MaxBodyBytes: -1},
		"sub-ms timeout":      {Timeout: time.Microsecond},
		"short retention":     {Retention: time.Minute},
		"quoted schema":       {Schema: `a"b`},
	} {
		_, err := inbox.NewInbox(ctx, pool, v, o)
		require.Error(t, err, name)
	}
	_, err = admin.New(nil, admin.Options{})
	require.Error(t, err)

	env := newInboxEnv(t)
	_, err = inbox.NewWorker(ctx, env.pool, fn, inbox.WorkerOptions{MaxAttempts: 3, Lease: time.Second, PollInterval: time.Millisecond,
		Concurrency: 4, ObjectOrdering: true, BackoffMin: time.Millisecond, BackoffMax: time.Second})
	require.NoError(t, err)
	_, err = inbox.NewWorker(ctx, env.pool, fn, inbox.WorkerOptions{BackoffMax: time.Second})
	require.NoError(t, err, "the other bound's default moves to fit")
	in, err := inbox.NewInbox(ctx, env.pool, v, inbox.Options{MaxBodyBytes: 10, Timeout: time.Second, Retention: 48 * time.Hour})
	require.NoError(t, err)
	_, err = admin.New(in, admin.Options{Redrive: true})
	require.NoError(t, err)
}

// providerless is a verifier that names no provider.
type providerless struct{ idempotency.Verifier }

func (providerless) Provider() string { return "" }

// TestConstructorsFailFast: on tables missing or older than the code, the
// inbox's constructors fail with pgstore.ErrNotMigrated, saying to run
// pgstore.Migrate; a worker whose tables vanish after it started returns
// an error from Run rather than nil.
func TestConstructorsFailFast(t *testing.T) {
	ctx := context.Background()
	fn := func(context.Context, idempotency.WebhookEvent) error { return nil }
	pool := pgtest.Pool(t, pgtest.Config(t))
	_, err := inbox.NewInbox(ctx, pool, stripeVerifier(t, whSecret), inbox.Options{})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	require.ErrorContains(t, err, "run pgstore.Migrate")
	_, err = inbox.NewWorker(ctx, pool, fn, inbox.WorkerOptions{})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	_, err = inbox.NewWorker(ctx, pool, fn, inbox.WorkerOptions{Schema: "no_such_schema_here"})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)

	require.NoError(t, migrate(ctx, pool))
	w, err := inbox.NewWorker(ctx, pool, fn, inbox.WorkerOptions{PollInterval: time.Millisecond})
	require.NoError(t, err)
	exec(t, pool, "DROP TABLE webhook_events")
	err = w.Run(ctx)
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	t.Log(err)
	require.Error(t, (&inbox.Worker{}).Run(ctx), "a Worker not made by NewWorker")
}

func TestInboxAnswers(t *testing.T) {
	env := newInboxEnv(t, inbox.Options{MaxBodyBytes: 4096})
	now := time.Now()
	good := eventPayload("evt_1", "account.updated", "acct_1", now.Unix())

	w := deliver(env.in, good, sign(good, whSecret, now))
	require.Equal(t, http.StatusOK, w.Code, w.Body.String())
	require.JSONEq(t, `{"received":true}`, w.Body.String())
	require.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	// The old secret signs too, and a redelivery changes nothing.
	w = deliver(env.in, good, sign(good, "whsec_old", now))
	require.Equal(t, http.StatusOK, w.Code)
	require.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	// Every Stripe API version is accepted (issue 21), and kept.
	otherVersion := bytes.Replace(eventPayload("evt_2", "account.updated", "acct_1", now.Unix()), []byte(stripe.APIVersion), []byte("2020-08-27"), 1)
	w = deliver(env.in, otherVersion, sign(otherVersion, whSecret, now))
	require.Equal(t, http.StatusOK, w.Code, w.Body.String())

	noID := eventPayload("", "account.updated", "acct_1", now.Unix())
	longID := eventPayload(strings.Repeat("e", 256), "account.updated", "acct_1", now.Unix())
	bad := []struct {
		name      string
		payload   []byte
		signature string
		status    int
	}{
		{"unsigned", good, "", 400},
		{"malformed signature header", good, "t=x,v1", 400},
		{"other secret", good, sign(good, "whsec_other", now), 400},
		{"too old", good, sign(good, whSecret, now.Add(-301*time.Second)), 400},
		{"tampered", append([]byte(" "), good...), sign(good, whSecret, now), 400},
		{"not JSON", []byte("{"), sign([]byte("{"), whSecret, now), 400},
		{"no id", noID, sign(noID, whSecret, now), 400},
		{"long id", longID, sign(longID, whSecret, now), 400},
		{"too large", bytes.Repeat([]byte(" "), 4097), "t=1,v1=00", 413},
	}
	for _, c := range bad {
		w := deliver(env.in, c.payload, c.signature)
		requireProblem(t, w, c.status, c.name)
	}
	require.Equal(t, 2, count(t, env.pool, "SELECT count(*) FROM webhook_events"))

	e, err := env.in.Event(context.Background(), "evt_1")
	require.NoError(t, err)
	require.Equal(t, "acct_1", e.ObjectID)
	require.Equal(t, "stripe", e.Provider)
	require.Equal(t, stripe.APIVersion, e.APIVersion)
	require.Equal(t, inbox.StatusPending, e.Status)
	require.Equal(t, now.Unix(), e.Created.Unix())
	require.JSONEq(t, string(good), string(e.Payload))
	e, err = env.in.Event(context.Background(), "evt_2")
	require.NoError(t, err)
	require.Equal(t, "2020-08-27", e.APIVersion)

	// The database down after the inbox was made: 503 with Retry-After,
	// within the timeout, nothing stored.
	var down atomic.Bool
	pool := env.newPool(t, func(c *pgxpool.Config) {
		c.ConnConfig.ConnectTimeout = 200 * time.Millisecond
		c.BeforeConnect = func(context.Context, *pgx.ConnConfig) error {
			if down.Load() {
				return errors.New("the database is down")
			}
			return nil
		}
	})
	inDown, err := inbox.NewInbox(context.Background(), pool, stripeVerifier(t, whSecret), inbox.Options{Timeout: 300 * time.Millisecond})
	require.NoError(t, err)
	down.Store(true)
	pool.Reset()
	fresh := eventPayload("evt_down", "account.updated", "acct_1", now.Unix())
	start := time.Now()
	w = deliver(inDown, fresh, sign(fresh, whSecret, now))
	requireProblem(t, w, http.StatusServiceUnavailable, "database down")
	require.NotEmpty(t, w.Header().Get("Retry-After"))
	require.Less(t, time.Since(start), 2*time.Second)
	require.Equal(t, 2, count(t, env.pool, "SELECT count(*) FROM webhook_events"))
}

// requireProblem checks an error answer: its status, as problem+json.
func requireProblem(t *testing.T, w *httptest.ResponseRecorder, status int, what string) {
	t.Helper()
	require.Equal(t, status, w.Code, "%s: %s", what, w.Body.String())
	require.Equal(t, "application/problem+json", w.Header().Get("Content-Type"), what)
	var p struct {
		Title  string
		Status int
	}
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &p), what)
	require.Equal(t, status, p.Status, what)
	require.NotEmpty(t, p.Title, what)
}

// TestInboxExactlyOnce delivers each of 300 events three times at once
// while three workers (separate pools, as separate processes) run: the
// function succeeds exactly once per event. Every fifth event fails its
// first attempt, so retries run too.
func TestInboxExactlyOnce(t *testing.T) {
	const events, copies = 300, 3
	env := newInboxEnv(t)
	var mu sync.Mutex
	calls := map[string]int{}
	successes := map[string]int{}
	fn := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		mu.Lock()
		defer mu.Unlock()
		calls[ev.ID]++
		var n int
		fmt.Sscanf(ev.ID, "evt_%d", &n)
		if n%5 == 0 && calls[ev.ID] == 1 {
			return errors.New("transient")
		}
		successes[ev.ID]++
		return nil
	}
	for range 3 {
		runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{Concurrency: 2}, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond},
			inbox.WorkerOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond}, inbox.WorkerOptions{Lease: 2 * time.Second}))
	}
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var bad atomic.Int32
	for i := range events {
		payload := eventPayload(fmt.Sprintf("evt_%d", i), "account.updated", fmt.Sprintf("acct_%d", i%17), time.Now().Unix())
		for range copies {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				if w := deliver(env.in, payload, sign(payload, whSecret, time.Now())); w.Code != http.StatusOK {
					bad.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	require.Zero(t, bad.Load())
	waitFor(t, 20*time.Second, "every event processed", func() bool { return stats(t, env.in).Processed == events })
	t.Logf("%d events x %d deliveries, 3 workers x 2: all processed in %v", events, copies, time.Since(start))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, successes, events)
	for id, n := range successes {
		require.Equal(t, 1, n, id)
	}
	s := stats(t, env.in)
	require.Zero(t, s.Pending+s.Processing+s.Failed)
}

// TestWorkerLeaseLapses: a worker loses its database while the function
// runs (its connections are terminated and no new one can be made). Its
// function's context is cancelled before the lease lapses, and another
// worker processes the event once, after the lease.
func TestWorkerLeaseLapses(t *testing.T) {
	const lease = 600 * time.Millisecond
	env := newInboxEnv(t)
	appA := pgtest.Schema(env.cfg) + "_a"
	var partitioned atomic.Bool
	poolA := env.newPool(t, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["application_name"] = appA
		c.BeforeConnect = func(context.Context, *pgx.ConnConfig) error {
			if partitioned.Load() {
				return errors.New("partitioned")
			}
			return nil
		}
	})
	started := make(chan struct{})
	var aCancelled atomic.Value
	var aCause atomic.Value
	fnA := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		close(started)
		<-ctx.Done()
		aCancelled.Store(time.Now())
		aCause.Store(context.Cause(ctx))
		return ctx.Err()
	}
	var bCalls atomic.Int32
	fnB := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		bCalls.Add(1)
		return nil
	}
	opts := []inbox.WorkerOptions{{Lease: lease}, {PollInterval: 10 * time.Millisecond}}
	stopA := runWorker(t, newWorker(t, poolA, fnA, opts...))
	payload := eventPayload("evt_lease", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	<-started
	claimedAt := time.Now()
	partitioned.Store(true)
	exec(t, env.pool, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", appA)
	runWorker(t, newWorker(t, env.newPool(t), fnB, opts...))

	waitFor(t, 5*time.Second, "event processed by worker B", func() bool { return stats(t, env.in).Processed == 1 })
	cancelledAt, _ := aCancelled.Load().(time.Time)
	require.False(t, cancelledAt.IsZero(), "worker A's function was not cancelled")
	require.Less(t, cancelledAt.Sub(claimedAt), lease, "A's function must end before its lease lapses")
	cause, _ := aCause.Load().(error)
	require.ErrorIs(t, cause, idempotency.ErrLeaseLost, "A's context says why it ended")
	e, err := env.in.Event(context.Background(), "evt_lease")
	require.NoError(t, err)
	require.GreaterOrEqual(t, e.ProcessedAt.Sub(claimedAt), lease-50*time.Millisecond, "B must wait for the lease")
	require.Equal(t, 2, e.Attempts)
	require.EqualValues(t, 1, bCalls.Load())
	partitioned.Store(false)
	stopA()
	time.Sleep(50 * time.Millisecond)
	require.EqualValues(t, 1, bCalls.Load())
	t.Logf("A cancelled %v after the claim; B processed %v after it (lease %v)", cancelledAt.Sub(claimedAt).Round(time.Millisecond), e.ProcessedAt.Sub(claimedAt).Round(time.Millisecond), lease)
}

// TestWorkerStopReleases: a worker stopped (its context cancelled) while
// the function runs puts the event back at once, not counted; another
// worker processes it once.
func TestWorkerStopReleases(t *testing.T) {
	env := newInboxEnv(t)
	started := make(chan struct{})
	fnA := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}
	var bCalls atomic.Int32
	fnB := func(ctx context.Context, ev idempotency.WebhookEvent) error { bCalls.Add(1); return nil }
	opts := []inbox.WorkerOptions{{Lease: time.Minute}, {PollInterval: 10 * time.Millisecond}}
	stopA := runWorker(t, newWorker(t, env.newPool(t), fnA, opts...))
	payload := eventPayload("evt_stop", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	<-started
	stopA()
	e, err := env.in.Event(context.Background(), "evt_stop")
	require.NoError(t, err)
	require.Equal(t, inbox.StatusPending, e.Status)
	require.Zero(t, e.Attempts)
	require.Contains(t, e.LastError, "worker stopped")
	runWorker(t, newWorker(t, env.newPool(t), fnB, opts...))
	waitFor(t, 5*time.Second, "event processed by worker B", func() bool { return stats(t, env.in).Processed == 1 })
	require.EqualValues(t, 1, bCalls.Load())
}

// TestWorkerDeadLetterAndRedrive: a function that always fails leaves the
// event failed after the maximum attempts, with its last error; a redrive
// through the admin handler (enabled) processes it.
func TestWorkerDeadLetterAndRedrive(t *testing.T) {
	env := newInboxEnv(t)
	var fail atomic.Bool
	fail.Store(true)
	var calls atomic.Int32
	times := map[string][]time.Time{}
	var mu sync.Mutex
	fn := func(ctx context.Context, ev idempotency.WebhookEvent) error {
		calls.Add(1)
		mu.Lock()
		times[ev.ID] = append(times[ev.ID], time.Now())
		mu.Unlock()
		if ev.Type == "account.updated" && fail.Load() {
			return fmt.Errorf("attempt %d: downstream refused", calls.Load())
		}
		if ev.Type == "panic.test" && fail.Load() {
			panic("boom")
		}
		return nil
	}
	runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{MaxAttempts: 4}, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond},
		inbox.WorkerOptions{BackoffMin: 40 * time.Millisecond, BackoffMax: 100 * time.Millisecond}))
	for _, ev := range []struct{ id, typ string }{{"evt_dead", "account.updated"}, {"evt_panic", "panic.test"}} {
		payload := eventPayload(ev.id, ev.typ, "acct_1", time.Now().Unix())
		require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	}
	waitFor(t, 5*time.Second, "both events failed", func() bool { return stats(t, env.in).Failed == 2 })
	ctx := context.Background()
	e, err := env.in.Event(ctx, "evt_dead")
	require.NoError(t, err)
	require.Equal(t, inbox.StatusFailed, e.Status)
	require.Equal(t, 4, e.Attempts)
	require.Contains(t, e.LastError, "downstream refused")
	p, err := env.in.Event(ctx, "evt_panic")
	require.NoError(t, err)
	require.Equal(t, "panic: boom", p.LastError)
	// Backoff 40 ms doubling, at most 100 ms, less up to half (jitter).
	mu.Lock()
	var gaps []time.Duration
	for i, at := range times["evt_dead"][1:] {
		gap := at.Sub(times["evt_dead"][i])
		gaps = append(gaps, gap.Round(time.Millisecond))
		require.GreaterOrEqual(t, gap, min(40*time.Millisecond<<i, 100*time.Millisecond)/2, "gap %d", i+1)
	}
	mu.Unlock()
	t.Logf("gaps between the attempts of one event: %v", gaps)
	require.EqualValues(t, 8, calls.Load())
	s := stats(t, env.in)
	require.EqualValues(t, 2, s.Failed)
	require.Zero(t, s.Pending)

	// Read-only by default.
	ro, err := admin.New(env.in, admin.Options{})
	require.NoError(t, err)
	w := serveAdmin(ro, http.MethodPost, "/events/evt_dead/redrive")
	require.Equal(t, http.StatusForbidden, w.Code)
	w = serveAdmin(ro, http.MethodGet, "/events?status=failed&type=account.updated")
	require.Equal(t, http.StatusOK, w.Code)
	var list struct{ Events []inbox.EventInfo }
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &list))
	require.Len(t, list.Events, 1)
	require.Equal(t, "evt_dead", list.Events[0].ID)
	require.Empty(t, list.Events[0].Payload)

	fail.Store(false)
	rw, err := admin.New(env.in, admin.Options{Redrive: true})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, serveAdmin(rw, http.MethodPost, "/events/evt_dead/redrive").Code)
	require.Equal(t, http.StatusConflict, serveAdmin(rw, http.MethodPost, "/events/evt_dead/redrive").Code) // pending now
	require.Equal(t, http.StatusNotFound, serveAdmin(rw, http.MethodPost, "/events/evt_nope/redrive").Code)
	w = serveAdmin(rw, http.MethodPost, "/redrive?type=panic.test")
	require.Equal(t, http.StatusOK, w.Code)
	require.JSONEq(t, `{"redriven":1}`, w.Body.String())
	waitFor(t, 5*time.Second, "both events processed", func() bool { return stats(t, env.in).Processed == 2 })
	e, err = env.in.Event(ctx, "evt_dead")
	require.NoError(t, err)
	require.Equal(t, 1, e.Attempts)
	require.EqualValues(t, 10, calls.Load())
	require.ErrorIs(t, env.in.Redrive(ctx, "evt_dead"), inbox.ErrNotFailed)
	require.ErrorIs(t, env.in.Redrive(ctx, "evt_nope"), inbox.ErrEventNotFound)
}

// TestWorkerCrashLoop: an event whose last allowed attempt died with its
// worker (its lease lapsed) is failed when next claimed, without running
// the function again.
func TestWorkerCrashLoop(t *testing.T) {
	env := newInboxEnv(t)
	payload := eventPayload("evt_crash", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	exec(t, env.pool, `UPDATE webhook_events SET status = 'processing', attempts = 3, lease_token = 'dead',
    next_attempt_at = now() - interval '1 second' WHERE event_id = 'evt_crash'`)
	var calls atomic.Int32
	runWorker(t, newWorker(t, env.newPool(t), func(context.Context, idempotency.WebhookEvent) error { calls.Add(1); return nil },
		inbox.WorkerOptions{MaxAttempts: 3}, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond}))
	waitFor(t, 5*time.Second, "event failed", func() bool { return stats(t, env.in).Failed == 1 })
	e, err := env.in.Event(context.Background(), "evt_crash")
	require.NoError(t, err)
	require.Contains(t, e.LastError, "lost the event's lease")
	require.Zero(t, calls.Load())
}

// TestInboxBoundsAStalledStatement: a delivery whose statement waits (a
// lock on the table) ends at the inbox's timeout, or when its caller's
// context ends, with an error that says which (503 either way); the
// inbox's connections work again once the table is free.
func TestInboxBoundsAStalledStatement(t *testing.T) {
	env := newInboxEnv(t)
	app := pgtest.Schema(env.cfg) + "_stalled"
	pool := env.newPool(t, func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["application_name"] = app })
	quick, err := inbox.NewInbox(context.Background(), pool, stripeVerifier(t, whSecret), inbox.Options{Timeout: 200 * time.Millisecond})
	require.NoError(t, err)
	patient, err := inbox.NewInbox(context.Background(), pool, stripeVerifier(t, whSecret), inbox.Options{Timeout: time.Minute})
	require.NoError(t, err)
	receive := func(ctx context.Context, in *inbox.Inbox, id string) (bool, error) {
		payload := eventPayload(id, "account.updated", "acct_1", time.Now().Unix())
		return in.Receive(ctx, http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}, payload)
	}
	tx, err := env.pool.Begin(context.Background())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	_, err = tx.Exec(context.Background(), "LOCK TABLE webhook_events IN SHARE MODE")
	require.NoError(t, err)

	_, err = receive(context.Background(), quick, "evt_timeout")
	require.ErrorIs(t, err, idempotency.ErrStoreUnavailable)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Equal(t, http.StatusServiceUnavailable, idempotency.StatusCode(err))

	// Cancelled once its statement waits for the lock.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		defer cancel()
		for ctx.Err() == nil {
			var waiting int
			err := env.pool.QueryRow(context.Background(),
				"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'", app).Scan(&waiting)
			if err != nil {
				t.Error(err)
				return
			}
			if waiting == 1 {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	_, err = receive(ctx, patient, "evt_cancelled")
	require.ErrorIs(t, err, idempotency.ErrStoreUnavailable)
	require.ErrorIs(t, err, context.Canceled)

	require.NoError(t, tx.Rollback(context.Background()))
	for i := range 3 { // more than one connection of the pool
		stored, err := receive(context.Background(), quick, fmt.Sprintf("evt_after_%d", i))
		require.NoError(t, err)
		require.True(t, stored)
	}
}

// TestInboxOneRoundTrip pins the acknowledgement's cost: one statement
// per delivery, new or repeated, and none for a rejected one.
func TestInboxOneRoundTrip(t *testing.T) {
	tracer := &pgtest.Statements{}
	cfg := pgtest.Config(t)
	cfg.ConnConfig.Tracer = tracer
	pool := pgtest.Pool(t, cfg, migrate)
	in, err := inbox.NewInbox(context.Background(), pool, stripeVerifier(t, whSecret), inbox.Options{})
	require.NoError(t, err)
	tracer.Take()
	payload := eventPayload("evt_rt", "account.updated", "acct_1", time.Now().Unix())
	for range 2 {
		require.Equal(t, http.StatusOK, deliver(in, payload, sign(payload, whSecret, time.Now())).Code)
		sql := tracer.Take()
		require.Len(t, sql, 1)
		require.Contains(t, sql[0], "ON CONFLICT (scope, provider, event_id) DO NOTHING")
	}
	require.Equal(t, http.StatusBadRequest, deliver(in, payload, sign(payload, "whsec_other", time.Now())).Code)
	require.Empty(t, tracer.Take())
}

// TestWorkerLongFunctionKeepsItsLease: a function that runs for several
// leases keeps its event (the worker renews the lease, and the function's
// context stays live), and its success is recorded once it returns: the
// event is processed once, in one attempt.
func TestWorkerLongFunctionKeepsItsLease(t *testing.T) {
	const lease = time.Second // a renewal may come late on a loaded machine
	env := newInboxEnv(t)
	payload := eventPayload("evt_long", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	started, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	var ctxErr atomic.Value
	runWorker(t, newWorker(t, env.newPool(t), func(ctx context.Context, ev idempotency.WebhookEvent) error {
		if calls.Add(1) == 1 {
			close(started)
		}
		<-release
		if err := context.Cause(ctx); err != nil {
			ctxErr.Store(err)
		}
		return nil
	}, inbox.WorkerOptions{Lease: lease, PollInterval: 5 * time.Millisecond}))
	<-started
	first, err := env.in.Event(context.Background(), "evt_long")
	require.NoError(t, err)
	waitFor(t, 20*time.Second, "the lease renewed past two leases", func() bool {
		e, err := env.in.Event(context.Background(), "evt_long")
		require.NoError(t, err)
		return e.NextAttemptAt.Sub(first.NextAttemptAt) >= 2*lease
	})
	close(release)
	waitFor(t, 5*time.Second, "processed", func() bool { return stats(t, env.in).Processed == 1 })
	e, err := env.in.Event(context.Background(), "evt_long")
	require.NoError(t, err)
	require.Equal(t, 1, e.Attempts)
	require.EqualValues(t, 1, calls.Load())
	require.Nil(t, ctxErr.Load(), "the function's context stayed live")
}
