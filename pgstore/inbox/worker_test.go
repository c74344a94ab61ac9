package inbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
	"github.com/seed70ea8305/idempotency/stripefake"
)

// TestWorkerObjectOrdering: 30 objects with 10 events each, delivered in
// a shuffled order, then processed by 3 workers (separate pools) of 4
// goroutines each, with one in four first attempts failing: the events of
// each object are processed one at a time, in created order.
func TestWorkerObjectOrdering(t *testing.T) {
	const objects, perObject = 30, 10
	env := newInboxEnv(t)
	base := time.Now().Unix() - 1000
	type ev struct {
		id, object string
		created    int64
	}
	var all []ev
	for o := range objects {
		for k := range perObject {
			all = append(all, ev{fmt.Sprintf("evt_%d_%d", o, k), fmt.Sprintf("acct_%d", o), base + int64(k)})
		}
	}
	rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	for _, e := range all {
		payload := eventPayload(e.id, "account.updated", e.object, e.created)
		require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	}

	var mu sync.Mutex
	running := map[string]string{} // object: event running now
	done := map[string][]int64{}   // object: created of each success, in order
	attempts := map[string]int{}   // event: attempts
	var violations []string
	fn := func(ctx context.Context, event idempotency.WebhookEvent) error {
		obj := event.Object // the Stripe verifier's: the data object's id
		mu.Lock()
		if other, ok := running[obj]; ok {
			violations = append(violations, fmt.Sprintf("%s runs while %s runs", event.ID, other))
		}
		running[obj] = event.ID
		attempts[event.ID]++
		first := attempts[event.ID] == 1
		mu.Unlock()
		time.Sleep(time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		delete(running, obj)
		if first && rand.IntN(4) == 0 {
			return errors.New("transient")
		}
		done[obj] = append(done[obj], event.Stripe.Created)
		return nil
	}
	start := time.Now()
	for range 3 {
		runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{ObjectOrdering: true}, inbox.WorkerOptions{Concurrency: 4},
			inbox.WorkerOptions{PollInterval: 5 * time.Millisecond}, inbox.WorkerOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond}))
	}
	waitFor(t, 30*time.Second, "every event processed", func() bool { return stats(t, env.in).Processed == objects*perObject })
	t.Logf("%d events of %d objects, 3 workers x 4, ordered: %v", objects*perObject, objects, time.Since(start))

	// Then events arriving while the workers run, each object's in
	// created order, the objects concurrently.
	var wg sync.WaitGroup
	for o := objects; o < 2*objects; o++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range perObject {
				payload := eventPayload(fmt.Sprintf("evt_%d_%d", o, k), "account.updated", fmt.Sprintf("acct_%d", o), base+int64(k))
				if w := deliver(env.in, payload, sign(payload, whSecret, time.Now())); w.Code != http.StatusOK {
					t.Errorf("delivery: %d", w.Code)
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, 30*time.Second, "every event processed", func() bool { return stats(t, env.in).Processed == 2*objects*perObject })
	mu.Lock()
	defer mu.Unlock()
	require.Empty(t, violations)
	require.Len(t, done, 2*objects)
	for obj, created := range done {
		require.Len(t, created, perObject, obj)
		require.True(t, sort.SliceIsSorted(created, func(i, j int) bool { return created[i] < created[j] }), "%s: %v", obj, created)
	}
}

// TestInboxAdmin: listing, paging, one event, stats, and cleanup.
func TestInboxAdmin(t *testing.T) {
	env := newInboxEnv(t)
	ctx := context.Background()
	for i := range 5 {
		typ := "account.updated"
		if i%2 == 1 {
			typ = "transfer.created"
		}
		payload := eventPayload(fmt.Sprintf("evt_%d", i), typ, "acct_1", time.Now().Unix())
		require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	}
	list, err := env.in.List(ctx, inbox.Filter{Type: "transfer.created"})
	require.NoError(t, err)
	require.Len(t, list, 2)
	page1, err := env.in.List(ctx, inbox.Filter{Limit: 3})
	require.NoError(t, err)
	require.Len(t, page1, 3)
	page2, err := env.in.List(ctx, inbox.Filter{Limit: 3, Before: page1[2].ReceivedAt})
	require.NoError(t, err)
	require.Len(t, page2, 2)
	_, err = env.in.List(ctx, inbox.Filter{Status: "nope"})
	require.Error(t, err)
	_, err = env.in.Event(ctx, "evt_nope")
	require.ErrorIs(t, err, inbox.ErrEventNotFound)

	time.Sleep(20 * time.Millisecond)
	s := stats(t, env.in)
	require.EqualValues(t, 5, s.Pending)
	require.GreaterOrEqual(t, s.OldestPending, 20*time.Millisecond)

	h, err := admin.New(env.in, admin.Options{})
	require.NoError(t, err)
	w := serveAdmin(h, http.MethodGet, "/stats")
	require.Equal(t, http.StatusOK, w.Code)
	var got map[string]any
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &got))
	require.EqualValues(t, 5, got["pending"])
	w = serveAdmin(h, http.MethodGet, "/events/evt_1")
	require.Equal(t, http.StatusOK, w.Code)
	var one inbox.EventInfo
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &one))
	require.Equal(t, "transfer.created", one.Type)
	require.NotEmpty(t, one.Payload)
	require.Equal(t, http.StatusNotFound, serveAdmin(h, http.MethodGet, "/events/evt_nope").Code)
	require.Equal(t, http.StatusBadRequest, serveAdmin(h, http.MethodGet, "/events?limit=0").Code)
	require.Equal(t, http.StatusBadRequest, serveAdmin(h, http.MethodGet, "/events?status=x").Code)

	// Cleanup deletes processed events past their expiry only.
	runWorker(t, newWorker(t, env.newPool(t), func(context.Context, idempotency.WebhookEvent) error { return nil }, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond}))
	waitFor(t, 5*time.Second, "processed", func() bool { return stats(t, env.in).Processed == 5 })
	exec(t, env.pool, "UPDATE webhook_events SET expires_at = now() - interval '1 second' WHERE event_id IN ('evt_0', 'evt_1', 'evt_2')")
	n, err := env.in.DeleteExpired(ctx, 2)
	require.NoError(t, err)
	require.Equal(t, 3, n)
	require.EqualValues(t, 2, stats(t, env.in).Processed)
}

// TestBackfill feeds the events stripefake lists as undelivered into the
// inbox, idempotently, and the worker processes each once, including one
// that was also delivered.
func TestBackfill(t *testing.T) {
	env := newInboxEnv(t)
	ctx := context.Background()
	fake, srv := stripefake.NewServer()
	defer srv.Close()
	sc := stripefake.NewClient(srv.URL, stripefake.TestAPIKey)
	var events []stripefake.Event
	for range 7 {
		a, err := sc.Accounts.New(&stripe.AccountParams{Type: stripe.String("express")})
		require.NoError(t, err)
		ev, err := fake.UpdateAccount(a.ID, func(a *stripefake.Account) { a.ChargesEnabled = true })
		require.NoError(t, err)
		events = append(events, ev)
	}
	// Stripe delivered the first two; the third reached us but Stripe
	// counts it as failed (our answer was lost).
	for _, ev := range events[:3] {
		payload := ev.Payload()
		require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	}
	require.True(t, fake.SetDelivered(events[0].ID, true))
	require.True(t, fake.SetDelivered(events[1].ID, true))

	res, err := env.in.Backfill(ctx, sc, time.Time{})
	require.NoError(t, err)
	require.Equal(t, inbox.BackfillResult{Listed: 5, Stored: 4}, res)
	res, err = env.in.Backfill(ctx, sc, time.Now().Add(-time.Hour))
	require.NoError(t, err)
	require.Equal(t, inbox.BackfillResult{Listed: 5}, res)
	res, err = env.in.Backfill(ctx, sc, time.Now().Add(time.Hour))
	require.NoError(t, err)
	require.Zero(t, res.Listed)

	var mu sync.Mutex
	seen := map[string]int{}
	runWorker(t, newWorker(t, env.newPool(t), func(ctx context.Context, ev idempotency.WebhookEvent) error {
		mu.Lock()
		defer mu.Unlock()
		if ev.Type != "account.updated" || ev.Stripe.Data.Object["charges_enabled"] != true {
			return fmt.Errorf("unexpected event %s %v", ev.Type, ev.Stripe.Data.Object)
		}
		seen[ev.ID]++
		return nil
	}, inbox.WorkerOptions{PollInterval: 5 * time.Millisecond}, inbox.WorkerOptions{Concurrency: 3}))
	waitFor(t, 5*time.Second, "every event processed", func() bool { return stats(t, env.in).Processed == 7 })
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, seen, 7)
	for id, n := range seen {
		require.Equal(t, 1, n, id)
	}

	// A Stripe that fails: the error is returned, nothing is stored.
	fake.Fail(stripefake.Failure{Method: "GET", Path: "/v1/events", Status: 500, Times: 10})
	_, err = env.in.Backfill(ctx, sc, time.Time{})
	require.Error(t, err)
}

// roundTrips is a pgx tracer that records the statements of every round
// trip: one statement sent alone, or the statements of a batch (one
// pipeline).
type roundTrips struct {
	mu    sync.Mutex
	trips [][]string
}

func (r *roundTrips) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	r.mu.Lock()
	r.trips = append(r.trips, []string{data.SQL})
	r.mu.Unlock()
	return ctx
}

func (r *roundTrips) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchStartData) context.Context {
	var sql []string
	for _, q := range data.Batch.QueuedQueries {
		sql = append(sql, q.SQL)
	}
	r.mu.Lock()
	r.trips = append(r.trips, sql)
	r.mu.Unlock()
	return ctx
}

func (r *roundTrips) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

func (r *roundTrips) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// take returns the round trips recorded since the last take.
func (r *roundTrips) take() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.trips
	r.trips = nil
	return out
}

// TestWorkerOneRoundTripPerEvent: a busy worker records each success in
// the round trip that claims the next event, so n events due at its start
// take n+1 round trips (the first claim, then a completion and a claim
// each), not a claim and a completion apart (2n).
func TestWorkerOneRoundTripPerEvent(t *testing.T) {
	const n = 20
	env := newInboxEnv(t)
	for i := range n {
		payload := eventPayload(fmt.Sprintf("evt_%d", i), "account.updated", fmt.Sprintf("acct_%d", i), time.Now().Unix())
		require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	}
	trips := &roundTrips{}
	w := newWorker(t, env.newPool(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = trips }),
		func(context.Context, idempotency.WebhookEvent) error { return nil },
		inbox.WorkerOptions{PollInterval: time.Hour}) // no idle polls: only the claims of a busy worker
	trips.take() // NewWorker's check of the tables
	stop := runWorker(t, w)
	waitFor(t, 20*time.Second, "every event processed", func() bool { return stats(t, env.in).Processed == n })
	stop()
	claim, complete := inbox.WorkerStatements()
	got := trips.take()
	require.Equal(t, n+1, len(got), "round trips")
	require.Equal(t, []string{claim}, got[0])
	for _, trip := range got[1:] {
		require.Equal(t, []string{complete, claim}, trip)
	}
}

// TestWorkerCompletionOutlivesItsClaim: a success is recorded with the
// next claim, in one transaction; when that claim fails (here: a column
// it reads was dropped while the function ran), the completion is sent
// again on its own, and Run returns the claim's error.
func TestWorkerCompletionOutlivesItsClaim(t *testing.T) {
	env := newInboxEnv(t)
	payload := eventPayload("evt_a", "account.updated", "acct_1", time.Now().Unix())
	require.Equal(t, http.StatusOK, deliver(env.in, payload, sign(payload, whSecret, time.Now())).Code)
	started, release := make(chan struct{}), make(chan struct{})
	w := newWorker(t, env.newPool(t), func(context.Context, idempotency.WebhookEvent) error {
		close(started)
		<-release
		return nil
	}, inbox.WorkerOptions{PollInterval: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	<-started
	exec(t, env.pool, "ALTER TABLE webhook_events DROP COLUMN api_version")
	close(release)
	require.ErrorIs(t, <-done, pgstore.ErrNotMigrated)
	require.Equal(t, 1, count(t, env.pool, "SELECT count(*) FROM webhook_events WHERE event_id = 'evt_a' AND status = 'processed'"))
}
