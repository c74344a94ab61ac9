package inbox_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/overlay"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

const whSecret = "whsec_inbox_test"

// exec runs a statement for a test; count returns a count(*).
var (
	exec  = pgtest.Exec
	count = pgtest.Count
)

// migrate creates pgstore's tables: a setup for pgtest.Pool.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
}

// inboxEnv is a migrated schema with one pool for the inbox and the
// configuration to open more (one per simulated process).
type inboxEnv struct {
	cfg  *pgxpool.Config
	pool *pgxpool.Pool
	in   *inbox.Inbox // Stripe's, with secrets whsec_old and whSecret
}

func newInboxEnv(t testing.TB, opts ...inbox.Options) *inboxEnv {
	t.Helper()
	cfg := pgtest.Config(t)
	cfg.MaxConns = 8
	env := &inboxEnv{cfg: cfg, pool: pgtest.Pool(t, cfg, migrate)}
	env.in = env.newInbox(t, stripeVerifier(t, "whsec_old", whSecret), opts...)
	return env
}

// newInbox returns another inbox on the environment's tables.
func (e *inboxEnv) newInbox(t testing.TB, v idempotency.Verifier, opts ...inbox.Options) *inbox.Inbox {
	t.Helper()
	in, err := inbox.NewInbox(context.Background(), e.pool, v, overlay.Merge(opts...))
	require.NoError(t, err)
	return in
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

func stripeVerifier(t testing.TB, secrets ...string) idempotency.Verifier {
	t.Helper()
	v, err := idempotency.NewStripeVerifier(secrets, 0)
	require.NoError(t, err)
	return v
}

// runWorker starts w.Run and returns a stop function that cancels it and
// waits for it to return.
func runWorker(t testing.TB, w *inbox.Worker) (stop func()) {
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

func newWorker(t testing.TB, pool *pgxpool.Pool, fn func(context.Context, idempotency.WebhookEvent) error, opts ...inbox.WorkerOptions) *inbox.Worker {
	t.Helper()
	w, err := inbox.NewWorker(context.Background(), pool, fn, overlay.Merge(opts...))
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

// deliver sends a Stripe delivery, signed with signature (none when "").
func deliver(h http.Handler, payload []byte, signature string) *httptest.ResponseRecorder {
	header := http.Header{}
	if signature != "" {
		header.Set("Stripe-Signature", signature)
	}
	return deliverWith(h, payload, header)
}

// deliverWith sends a delivery with the given header.
func deliverWith(h http.Handler, payload []byte, header http.Header) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/webhook", bytes.NewReader(payload))
	r.Header.Set("Content-Type", "application/json")
	for name, values := range header {
		r.Header[name] = values
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// waitFor polls cond every 10 ms until it holds, failing the test when d
// passed first.
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

func stats(t testing.TB, in *inbox.Inbox) inbox.Stats {
	t.Helper()
	s, err := in.Stats(context.Background())
	require.NoError(t, err)
	return s
}

func serveAdmin(h http.Handler, method, target string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, target, nil))
	return w
}
