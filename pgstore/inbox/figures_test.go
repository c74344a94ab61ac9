package inbox_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// figuresEnv runs the measurements below only when set.
const figuresEnv = "PGSTORE_INBOX_FIGURES"

func skipFigures(t *testing.T) {
	if os.Getenv(figuresEnv) == "" {
		t.Skipf("%s not set: skipping the inbox measurements", figuresEnv)
	}
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// TestFiguresAckLatency measures how long a delivery takes to be
// answered: the inbox (verify, one INSERT) of each provider, against the
// root's synchronous WebhookHandler on a pgstore.Store on the same
// database (verify, claim, run the function, complete), with a function
// that does nothing and one that takes 20 ms. The kinds of delivery
// alternate.
func TestFiguresAckLatency(t *testing.T) {
	skipFigures(t)
	const n = 1000
	env := newInboxEnv(t)
	store, err := pgstore.New(context.Background(), env.pool, pgstore.Options{})
	require.NoError(t, err)
	verifier := stripeVerifier(t, whSecret)
	syncNoop, err := idempotency.NewWebhookHandler(store, verifier, func(context.Context, idempotency.WebhookEvent) error { return nil }, idempotency.WebhookOptions{})
	require.NoError(t, err)
	sync20, err := idempotency.NewWebhookHandler(store, verifier, func(context.Context, idempotency.WebhookEvent) error {
		time.Sleep(20 * time.Millisecond)
		return nil
	}, idempotency.WebhookOptions{})
	require.NoError(t, err)
	swIn, ghIn := env.newInbox(t, swVerifier(t)), env.newInbox(t, ghVerifier(t))
	stripeDelivery := func(h http.Handler) func(id string) *httptest.ResponseRecorder {
		return func(id string) *httptest.ResponseRecorder {
			payload := eventPayload(id, "account.updated", "acct_1", time.Now().Unix())
			return deliver(h, payload, sign(payload, whSecret, time.Now()))
		}
	}
	handlers := []struct {
		name string
		send func(id string) *httptest.ResponseRecorder
		n    int
	}{
		{"inbox, Stripe", stripeDelivery(env.in), n},
		{"inbox, Standard Webhooks", func(id string) *httptest.ResponseRecorder {
			payload := []byte(`{"type":"invoice.paid","data":{"id":"` + id + `"}}`)
			return deliverWith(swIn, payload, swHeader(swKey, id, time.Now(), payload))
		}, n},
		{"inbox, GitHub", func(id string) *httptest.ResponseRecorder {
			payload := []byte(`{"action":"opened","id":"` + id + `"}`)
			return deliverWith(ghIn, payload, ghHeader(ghSecret, id, "issues", payload))
		}, n},
		{"sync, no-op function", stripeDelivery(syncNoop), n},
		{"sync, 20 ms function", stripeDelivery(sync20), n / 5},
	}
	lat := make([][]time.Duration, len(handlers))
	for i := range n {
		for j, h := range handlers {
			if i >= h.n {
				continue
			}
			start := time.Now()
			w := h.send(fmt.Sprintf("evt_%d_%d", j, i))
			lat[j] = append(lat[j], time.Since(start))
			require.Equal(t, http.StatusOK, w.Code)
		}
	}
	for j, h := range handlers {
		t.Logf("%-26s n=%4d p50 %8v p99 %8v", h.name, len(lat[j]), percentile(lat[j], 0.5).Round(time.Microsecond), percentile(lat[j], 0.99).Round(time.Microsecond))
	}
}

// TestFiguresThroughput measures events processed per second by 1, 2
// and 4 workers (each its own pool and Run, concurrency 1), for a
// function that does nothing and one that sleeps 5 ms.
func TestFiguresThroughput(t *testing.T) {
	skipFigures(t)
	const n = 2000
	for _, work := range []time.Duration{0, 5 * time.Millisecond} {
		for _, workers := range []int{1, 2, 4} {
			t.Run(fmt.Sprintf("work=%v/workers=%d", work, workers), func(t *testing.T) {
				events := n
				if work > 0 {
					events = 200 * workers
				}
				env := newInboxEnv(t)
				fill(t, env, events)
				fn := func(context.Context, idempotency.WebhookEvent) error {
					if work > 0 {
						time.Sleep(work)
					}
					return nil
				}
				start := time.Now()
				for range workers {
					runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{PollInterval: time.Millisecond}))
				}
				waitFor(t, time.Minute, "all processed", func() bool { return stats(t, env.in).Processed == int64(events) })
				d := time.Since(start)
				t.Logf("work %v, %d workers: %d events in %v: %.0f events/s", work, workers, events, d.Round(time.Millisecond), float64(events)/d.Seconds())
			})
		}
	}
}

// fill stores n events through the inbox, 8 at a time.
func fill(t *testing.T, env *inboxEnv, n int) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			payload := eventPayload(fmt.Sprintf("evt_%d", i), "account.updated", fmt.Sprintf("acct_%d", i), time.Now().Unix())
			_, err := env.in.Receive(context.Background(), http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}, payload)
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
}

// TestFiguresAckFloor measures a Stripe delivery's acknowledgement by the
// inbox (Receive: verify, one INSERT) against two floors, all three in
// every iteration: the same verification, then one raw INSERT … ON
// CONFLICT DO NOTHING of the same row into a table of the same columns
// with its primary key alone, and into one with the two indexes any inbox
// needs, its primary key (a redelivery changes nothing) and the index of
// due events (a worker finds the next one). It reports the means and the
// ratios.
func TestFiguresAckFloor(t *testing.T) {
	skipFigures(t)
	const n = 2000
	env := newInboxEnv(t)
	ctx := context.Background()
	v := stripeVerifier(t, whSecret)
	in := env.newInbox(t, v)
	for _, table := range []string{"floor_pk", "floor_due"} {
		exec(t, env.pool, `CREATE TABLE `+table+` (LIKE webhook_events INCLUDING DEFAULTS, PRIMARY KEY (scope, provider, event_id))`)
	}
	exec(t, env.pool, `CREATE INDEX ON floor_due (scope, next_attempt_at) WHERE status IN ('pending', 'processing')`)
	floor := func(table string, header http.Header, payload []byte) error {
		ev, err := v.Verify(header, payload, time.Now())
		if err != nil {
			return err
		}
		_, err = env.pool.Exec(ctx, `INSERT INTO `+table+` (scope, provider, event_id, type, object_id, api_version, created, payload,
    received_at, next_attempt_at, expires_at)
VALUES ('', $1, $2, $3, $4, $5, $6, $7, now(), now(), now() + interval '45 days')
ON CONFLICT (scope, provider, event_id) DO NOTHING`, v.Provider(), ev.ID, ev.Type, ev.Object, ev.APIVersion, ev.Stripe.Created, payload)
		return err
	}
	var inboxT, pkT, dueT time.Duration
	for i := range n + 20 {
		id := fmt.Sprintf("evt_%d", i)
		payload := eventPayload(id, "account.updated", "acct_"+id, time.Now().Unix())
		header := http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}
		start := time.Now()
		stored, err := in.Receive(ctx, header, payload)
		d := time.Since(start)
		require.NoError(t, err)
		require.True(t, stored)
		start = time.Now()
		require.NoError(t, floor("floor_pk", header, payload))
		pk := time.Since(start)
		start = time.Now()
		require.NoError(t, floor("floor_due", header, payload))
		due := time.Since(start)
		if i >= 20 { // statements prepared, pool warm
			inboxT, pkT, dueT = inboxT+d, pkT+pk, dueT+due
		}
	}
	t.Logf("acknowledgement: inbox %v; floor, primary key alone %v (inbox %.2f × it); floor, primary key and due index %v (inbox %.2f × it)",
		(inboxT / n).Round(time.Microsecond), (pkT / n).Round(time.Microsecond), float64(inboxT)/float64(pkT),
		(dueT / n).Round(time.Microsecond), float64(inboxT)/float64(dueT))
}

// TestFiguresWorkerFloor measures one worker (concurrency 1, a function
// that does nothing) against a raw loop of the worker's own statements
// (claim one due event, complete it) on the same table, in alternating
// rounds over events of two scopes. The loop sends the two statements
// apart; the worker sends each completion with its next claim, in one
// round trip. The worker's round ends when its last completion is
// committed (seen by a tracer on its pool). It reports events per second
// of both and the ratio.
func TestFiguresWorkerFloor(t *testing.T) {
	skipFigures(t)
	const rounds, m = 10, 100
	env := newInboxEnv(t)
	ctx := context.Background()
	raw := env.newInbox(t, stripeVerifier(t, whSecret), inbox.Options{Scope: "raw"})
	claim, complete := inbox.WorkerStatements()
	completions := &completionCounter{sql: complete, done: make(chan struct{}, 1)}
	workerPool := env.newPool(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = completions })
	w := newWorker(t, workerPool, func(context.Context, idempotency.WebhookEvent) error { return nil },
		inbox.WorkerOptions{Scope: "worker", PollInterval: time.Millisecond})
	worker := env.newInbox(t, stripeVerifier(t, whSecret), inbox.Options{Scope: "worker"})
	var rawT, workerT time.Duration
	for r := range rounds {
		for _, in := range []*inbox.Inbox{raw, worker} {
			for i := range m {
				payload := eventPayload(fmt.Sprintf("evt_%d_%d", r, i), "account.updated", fmt.Sprintf("acct_%d", i), time.Now().Unix())
				_, err := in.Receive(ctx, http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}, payload)
				require.NoError(t, err)
			}
		}
		start := time.Now()
		for done := 0; done < m; {
			var provider, id string
			err := env.pool.QueryRow(ctx, claim, "raw", 1, "tok", 30000).Scan(&provider, &id, nil, nil, nil, nil, nil, nil)
			require.NoError(t, err)
			tag, err := env.pool.Exec(ctx, complete, "raw", provider, id, "tok")
			require.NoError(t, err)
			require.Equal(t, int64(1), tag.RowsAffected())
			done++
		}
		rawT += time.Since(start)

		completions.reset(m)
		start = time.Now()
		stop := runWorker(t, w)
		select {
		case <-completions.done:
		case <-time.After(time.Minute):
			t.Fatal("the worker did not complete its events within a minute")
		}
		workerT += time.Since(start)
		stop()
	}
	rawRate, workerRate := float64(rounds*m)/rawT.Seconds(), float64(rounds*m)/workerT.Seconds()
	t.Logf("one worker %.0f events/s, raw claim-and-complete loop %.0f events/s: %.2f × the loop", workerRate, rawRate, workerRate/rawRate)
	require.Equal(t, int64(rounds*m), stats(t, worker).Processed)
	require.Equal(t, int64(rounds*m), stats(t, raw).Processed)
}

// completionCounter is a pgx tracer that signals done once want
// statements sql ended without an error: sent alone, or in a batch (a
// pipeline, one transaction), where they count once the batch ended
// without an error, committed.
type completionCounter struct {
	sql  string
	done chan struct{}
	mu   sync.Mutex
	want int
}

func (c *completionCounter) reset(want int) {
	c.mu.Lock()
	c.want = want
	c.mu.Unlock()
}

// ended counts n statements that ended.
func (c *completionCounter) ended(n int) {
	if n == 0 {
		return
	}
	c.mu.Lock()
	c.want -= n
	last := c.want == 0
	c.mu.Unlock()
	if last {
		c.done <- struct{}{}
	}
}

func (c *completionCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if data.SQL == c.sql {
		return context.WithValue(ctx, c, new(int))
	}
	return ctx
}

func (c *completionCounter) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	if ctx.Value(c) != nil && data.Err == nil {
		c.ended(1)
	}
}

func (c *completionCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return context.WithValue(ctx, c, new(int))
}

func (c *completionCounter) TraceBatchQuery(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchQueryData) {
	if n, _ := ctx.Value(c).(*int); n != nil && data.SQL == c.sql && data.Err == nil {
		*n++
	}
}

func (c *completionCounter) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchEndData) {
	if n, _ := ctx.Value(c).(*int); n != nil && data.Err == nil {
		c.ended(*n)
	}
}
