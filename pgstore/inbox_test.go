package pgstore_test

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
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

const whSecret = "whsec_inbox_test"

// inboxEnv is a migrated schema with one pool for the inbox and the
// configuration to open more (one per simulated process).
type inboxEnv struct {
	cfg   *pgxpool.Config
	pool  *pgxpool.Pool
	inbox *pgstore.Inbox
}

func newInboxEnv(t testing.TB, opts ...pgstore.Option) *inboxEnv {
	t.Helper()
	cfg := pgtest.Config(t)
	cfg.MaxConns = 8
	pool := pgtest.Pool(t, cfg)
	inbox, err := pgstore.NewInbox(pool, []string{"whsec_old", whSecret}, opts...)
	require.NoError(t, err)
	return &inboxEnv{cfg: cfg, pool: pool, inbox: inbox}
}

// newPool opens another pool on the same schema, closed when the test
// ends; change may adjust its configuration.
func (e *inboxEnv) newPool(t testing.TB, change ...func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg := e.cfg.Copy()
	for _, c := range change {
		c(cfg)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// runWorker starts w.Run and returns a stop function that cancels it and
// waits for it to return.
func runWorker(t testing.TB, w *pgstore.Worker) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
		})
	}
	t.Cleanup(stop)
	return stop
}

func newWorker(t testing.TB, pool *pgxpool.Pool, fn func(context.Context, stripe.Event) error, opts ...pgstore.Option) *pgstore.Worker {
	t.Helper()
	w, err := pgstore.NewWorker(pool, fn, opts...)
	require.NoError(t, err)
	return w
}

// eventPayload is a Stripe event about object objectID.
func eventPayload(id, typ, objectID string, created int64) []byte {
	body, _ := json.Marshal(map[string]any{
		"id": id, "object": "event", "api_version": stripe.APIVersion, "created": created, "type": typ,
		"livemode": false, "pending_webhooks": 1,
		"data": map[string]any{"object": map[string]any{"id": objectID, "object": "account"}},
	})
	return body
}

func sign(payload []byte, secret string, at time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: at}).Header
}

func deliver(h http.Handler, payload []byte, signature string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/stripe/webhook", bytes.NewReader(payload))
	r.Header.Set("Content-Type", "application/json")
	if signature != "" {
		r.Header.Set("Stripe-Signature", signature)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// waitFor polls cond every 10 ms until it holds or d passed.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func stats(t testing.TB, in *pgstore.Inbox) pgstore.Stats {
	t.Helper()
	s, err := in.Stats(context.Background())
	require.NoError(t, err)
	return s
}

// TestOptionsApply needs no database: options apply only where
// documented, and constructors check their arguments.
func TestOptionsApply(t *testing.T) {
	fn := func(context.Context, stripe.Event) error { return nil }
	pool := &pgxpool.Pool{} // never used: the constructors send nothing
	_, err := pgstore.NewWorker(pool, fn, pgstore.WithLockTimeout(time.Second))
	require.ErrorContains(t, err, "WithLockTimeout does not apply")
	_, err = pgstore.NewWorker(pool, nil)
	require.Error(t, err)
	_, err = pgstore.NewWorker(pool, fn, pgstore.WithBackoff(time.Second, time.Millisecond))
	require.Error(t, err)
	_, err = pgstore.NewWorker(pool, fn, pgstore.WithSchema("s"), pgstore.WithLogger(nil), pgstore.WithMaxAttempts(3),
		pgstore.WithWorkerLease(time.Second), pgstore.WithPollInterval(time.Millisecond), pgstore.WithConcurrency(4),
		pgstore.WithObjectOrdering(), pgstore.WithBackoff(time.Millisecond, time.Second))
	require.NoError(t, err)
	_, err = pgstore.NewInbox(pool, nil)
	require.Error(t, err)
	_, err = pgstore.NewInbox(pool, []string{""})
	require.Error(t, err)
	_, err = pgstore.NewInbox(pool, []string{"whsec_x"}, pgstore.WithMaxAttempts(3))
	require.ErrorContains(t, err, "does not apply")
	_, err = pgstore.New(pool, pgstore.WithInboxTimeout(time.Second))
	require.ErrorContains(t, err, "does not apply")
	in, err := pgstore.NewInbox(pool, []string{"whsec_x"}, pgstore.WithInboxMaxBodyBytes(10), pgstore.WithInboxTimeout(time.Second),
		pgstore.WithInboxRetention(48*time.Hour), pgstore.WithInboxIgnoreAPIVersion())
	require.NoError(t, err)
	_, err = in.AdminHandler(pgstore.WithAdminRedrive())
	require.NoError(t, err)
	_, err = in.AdminHandler(pgstore.WithMaxAttempts(1))
	require.Error(t, err)
}

func TestInboxAnswers(t *testing.T) {
	env := newInboxEnv(t, pgstore.WithInboxMaxBodyBytes(4096))
	now := time.Now()
	good := eventPayload("evt_1", "account.updated", "acct_1", now.Unix())

	w := deliver(env.inbox, good, sign(good, whSecret, now))
	require.Equal(t, http.StatusOK, w.Code, w.Body.String())
	require.JSONEq(t, `{"received":true}`, w.Body.String())
	require.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	// The old secret signs too, and a redelivery changes nothing.
	w = deliver(env.inbox, good, sign(good, "whsec_old", now))
	require.Equal(t, http.StatusOK, w.Code)
	require.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))

	otherVersion := bytes.Replace(eventPayload("evt_2", "account.updated", "acct_1", now.Unix()), []byte(stripe.APIVersion), []byte("2020-08-27"), 1)
	noID := eventPayload("", "account.updated", "acct_1", now.Unix())
	longID := eventPayload(strings.Repeat("e", 256), "account.updated", "acct_1", now.Unix())
	bad := []struct {
		name      string
		payload   []byte
		signature string
		status    int
	}{
		{"unsigned", good, "", 400},
		{"other secret", good, sign(good, "whsec_other", now), 400},
		{"too old", good, sign(good, whSecret, now.Add(-301*time.Second)), 400},
		{"tampered", append([]byte(" "), good...), sign(good, whSecret, now), 400},
		{"not JSON", []byte("{"), sign([]byte("{"), whSecret, now), 400},
		{"no id", noID, sign(noID, whSecret, now), 400},
		{"long id", longID, sign(longID, whSecret, now), 400},
		{"other API version", otherVersion, sign(otherVersion, whSecret, now), 400},
		{"too large", bytes.Repeat([]byte(" "), 4097), "t=1,v1=00", 413},
	}
	for _, c := range bad {
		w := deliver(env.inbox, c.payload, c.signature)
		require.Equal(t, c.status, w.Code, c.name)
		require.Equal(t, "application/problem+json", w.Header().Get("Content-Type"), c.name)
	}
	require.Equal(t, 1, count(t, env.pool, "SELECT count(*) FROM webhook_events"))

	e, err := env.inbox.Event(context.Background(), "evt_1")
	require.NoError(t, err)
	require.Equal(t, "acct_1", e.ObjectID)
	require.Equal(t, pgstore.StatusPending, e.Status)
	require.Equal(t, now.Unix(), e.Created.Unix())
	require.JSONEq(t, string(good), string(e.Payload))

	// The database down: 503 with Retry-After, within the timeout.
	down := env.newPool(t, func(c *pgxpool.Config) { c.ConnConfig.Port = 1; c.ConnConfig.ConnectTimeout = 200 * time.Millisecond })
	inDown, err := pgstore.NewInbox(down, []string{whSecret}, pgstore.WithInboxTimeout(300*time.Millisecond))
	require.NoError(t, err)
	start := time.Now()
	w = deliver(inDown, good, sign(good, whSecret, now))
	require.Equal(t, http.StatusServiceUnavailable, w.Code)
	require.NotEmpty(t, w.Header().Get("Retry-After"))
	require.Less(t, time.Since(start), 2*time.Second)
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
	fn := func(ctx context.Context, ev stripe.Event) error {
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
		runWorker(t, newWorker(t, env.newPool(t), fn, pgstore.WithConcurrency(2), pgstore.WithPollInterval(5*time.Millisecond),
			pgstore.WithBackoff(5*time.Millisecond, 20*time.Millisecond), pgstore.WithWorkerLease(2*time.Second)))
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
				if w := deliver(env.inbox, payload, sign(payload, whSecret, time.Now())); w.Code != http.StatusOK {
					bad.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	require.Zero(t, bad.Load())
	waitFor(t, 20*time.Second, "every event processed", func() bool { return stats(t, env.inbox).Processed == events })
	t.Logf("%d events x %d deliveries, 3 workers x 2: all processed in %v", events, copies, time.Since(start))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, successes, events)
	for id, n := range successes {
		require.Equal(t, 1, n, id)
	}
	s := stats(t, env.inbox)
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
	fnA := func(ctx context.Context, ev stripe.Event) error {
		close(started)
		<-ctx.Done()
		aCancelled.Store(time.Now())
		return ctx.Err()
	}
	var bCalls atomic.Int32
	fnB := func(ctx context.Context, ev stripe.Event) error {
		bCalls.Add(1)
		return nil
	}
	opts := []pgstore.Option{pgstore.WithWorkerLease(lease), pgstore.WithPollInterval(10 * time.Millisecond)}
	stopA := runWorker(t, newWorker(t, poolA, fnA, opts...))
	payload := eventPayload("evt_lease", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.inbox, payload, sign(payload, whSecret, time.Now())).Code)
	<-started
	claimedAt := time.Now()
	partitioned.Store(true)
	exec(t, env.pool, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", appA)
	runWorker(t, newWorker(t, env.newPool(t), fnB, opts...))

	waitFor(t, 5*time.Second, "event processed by worker B", func() bool { return stats(t, env.inbox).Processed == 1 })
	cancelledAt, _ := aCancelled.Load().(time.Time)
	require.False(t, cancelledAt.IsZero(), "worker A's function was not cancelled")
	require.Less(t, cancelledAt.Sub(claimedAt), lease, "A's function must end before its lease lapses")
	e, err := env.inbox.Event(context.Background(), "evt_lease")
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
	fnA := func(ctx context.Context, ev stripe.Event) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}
	var bCalls atomic.Int32
	fnB := func(ctx context.Context, ev stripe.Event) error { bCalls.Add(1); return nil }
	opts := []pgstore.Option{pgstore.WithWorkerLease(time.Minute), pgstore.WithPollInterval(10 * time.Millisecond)}
	stopA := runWorker(t, newWorker(t, env.newPool(t), fnA, opts...))
	payload := eventPayload("evt_stop", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.inbox, payload, sign(payload, whSecret, time.Now())).Code)
	<-started
	stopA()
	e, err := env.inbox.Event(context.Background(), "evt_stop")
	require.NoError(t, err)
	require.Equal(t, pgstore.StatusPending, e.Status)
	require.Zero(t, e.Attempts)
	require.Contains(t, e.LastError, "worker stopped")
	runWorker(t, newWorker(t, env.newPool(t), fnB, opts...))
	waitFor(t, 5*time.Second, "event processed by worker B", func() bool { return stats(t, env.inbox).Processed == 1 })
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
	fn := func(ctx context.Context, ev stripe.Event) error {
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
	runWorker(t, newWorker(t, env.newPool(t), fn, pgstore.WithMaxAttempts(4), pgstore.WithPollInterval(5*time.Millisecond),
		pgstore.WithBackoff(40*time.Millisecond, 100*time.Millisecond)))
	for _, ev := range []struct{ id, typ string }{{"evt_dead", "account.updated"}, {"evt_panic", "panic.test"}} {
		payload := eventPayload(ev.id, ev.typ, "acct_1", time.Now().Unix())
		require.Equal(t, http.StatusOK, deliver(env.inbox, payload, sign(payload, whSecret, time.Now())).Code)
	}
	waitFor(t, 5*time.Second, "both events failed", func() bool { return stats(t, env.inbox).Failed == 2 })
	ctx := context.Background()
	e, err := env.inbox.Event(ctx, "evt_dead")
	require.NoError(t, err)
	require.Equal(t, pgstore.StatusFailed, e.Status)
	require.Equal(t, 4, e.Attempts)
	require.Contains(t, e.LastError, "downstream refused")
	p, err := env.inbox.Event(ctx, "evt_panic")
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
	s := stats(t, env.inbox)
	require.EqualValues(t, 2, s.Failed)
	require.Zero(t, s.Pending)

	// Read-only by default.
	ro, err := env.inbox.AdminHandler()
	require.NoError(t, err)
	w := serveAdmin(ro, http.MethodPost, "/events/evt_dead/redrive")
	require.Equal(t, http.StatusForbidden, w.Code)
	w = serveAdmin(ro, http.MethodGet, "/events?status=failed&type=account.updated")
	require.Equal(t, http.StatusOK, w.Code)
	var list struct{ Events []pgstore.EventInfo }
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &list))
	require.Len(t, list.Events, 1)
	require.Equal(t, "evt_dead", list.Events[0].ID)
	require.Empty(t, list.Events[0].Payload)

	fail.Store(false)
	rw, err := env.inbox.AdminHandler(pgstore.WithAdminRedrive())
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, serveAdmin(rw, http.MethodPost, "/events/evt_dead/redrive").Code)
	require.Equal(t, http.StatusConflict, serveAdmin(rw, http.MethodPost, "/events/evt_dead/redrive").Code) // pending now
	require.Equal(t, http.StatusNotFound, serveAdmin(rw, http.MethodPost, "/events/evt_nope/redrive").Code)
	w = serveAdmin(rw, http.MethodPost, "/redrive?type=panic.test")
	require.Equal(t, http.StatusOK, w.Code)
	require.JSONEq(t, `{"redriven":1}`, w.Body.String())
	waitFor(t, 5*time.Second, "both events processed", func() bool { return stats(t, env.inbox).Processed == 2 })
	e, err = env.inbox.Event(ctx, "evt_dead")
	require.NoError(t, err)
	require.Equal(t, 1, e.Attempts)
	require.EqualValues(t, 10, calls.Load())
	require.ErrorIs(t, env.inbox.Redrive(ctx, "evt_dead"), pgstore.ErrNotFailed)
	require.ErrorIs(t, env.inbox.Redrive(ctx, "evt_nope"), pgstore.ErrEventNotFound)
}

// TestWorkerCrashLoop: an event whose last allowed attempt died with its
// worker (its lease lapsed) is failed when next claimed, without running
// the function again.
func TestWorkerCrashLoop(t *testing.T) {
	env := newInboxEnv(t)
	payload := eventPayload("evt_crash", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.inbox, payload, sign(payload, whSecret, time.Now())).Code)
	exec(t, env.pool, `UPDATE webhook_events SET status = 'processing', attempts = 3, lease_token = 'dead',
    next_attempt_at = now() - interval '1 second' WHERE event_id = 'evt_crash'`)
	var calls atomic.Int32
	runWorker(t, newWorker(t, env.newPool(t), func(context.Context, stripe.Event) error { calls.Add(1); return nil },
		pgstore.WithMaxAttempts(3), pgstore.WithPollInterval(5*time.Millisecond)))
	waitFor(t, 5*time.Second, "event failed", func() bool { return stats(t, env.inbox).Failed == 1 })
	e, err := env.inbox.Event(context.Background(), "evt_crash")
	require.NoError(t, err)
	require.Contains(t, e.LastError, "lost the event's lease")
	require.Zero(t, calls.Load())
}

func serveAdmin(h http.Handler, method, target string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, target, nil))
	return w
}

// TestInboxOneRoundTrip pins the acknowledgement's cost: one statement
// per delivery, new or repeated, and none for a rejected one.
func TestInboxOneRoundTrip(t *testing.T) {
	tracer := &statementCounter{}
	pool := testPool(t, func(c *pgxpool.Config) { c.ConnConfig.Tracer = tracer })
	inbox, err := pgstore.NewInbox(pool, []string{whSecret})
	require.NoError(t, err)
	tracer.take()
	payload := eventPayload("evt_rt", "account.updated", "acct_1", time.Now().Unix())
	for range 2 {
		require.Equal(t, http.StatusOK, deliver(inbox, payload, sign(payload, whSecret, time.Now())).Code)
		sql := tracer.take()
		require.Len(t, sql, 1)
		require.Contains(t, sql[0], "ON CONFLICT (event_id) DO NOTHING")
	}
	require.Equal(t, http.StatusBadRequest, deliver(inbox, payload, sign(payload, "whsec_other", time.Now())).Code)
	require.Empty(t, tracer.take())
}
