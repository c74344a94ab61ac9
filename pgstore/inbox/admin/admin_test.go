package admin_test

import (
	"context"
	"encoding/json"
	"errors"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
	"github.com/seed70ea8305/idempotency/pgstore/internal/doctest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestDocSnippets: the package documentation's code compiles, here.
func TestDocSnippets(t *testing.T) { doctest.Check(t, ".") }

// An operator API behind the application's own authentication. (It needs
// a database, so it does not run as a test.)
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	v, err := idempotency.NewStripeVerifier([]string{os.Getenv("STRIPE_WEBHOOK_SECRET")}, 0)
	if err != nil {
		log.Fatal(err)
	}
	in, err := inbox.NewInbox(ctx, pool, v, inbox.Options{})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	if err := mount(mux, in); err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// mount is the package documentation's snippet.
func mount(mux *http.ServeMux, in *inbox.Inbox) error {
	h, err := admin.New(in, admin.Options{}) // read-only; Redrive: true enables the POST routes
	if err != nil {
		return err
	}
	mux.Handle("/ops/webhooks/", http.StripPrefix("/ops/webhooks", requireOperator(h)))
	return nil
}

// requireOperator stands for the application's own authentication.
func requireOperator(h http.Handler) http.Handler { return h }

// problem is an error answer as the API writes it.
type problem struct {
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

func serve(h http.Handler, method, target string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, target, nil))
	return w
}

// requireProblem checks an error answer: its status, as problem+json with
// a title and a detail, uncacheable.
func requireProblem(t *testing.T, w *httptest.ResponseRecorder, status int) problem {
	t.Helper()
	require.Equal(t, status, w.Code, w.Body.String())
	require.Equal(t, "application/problem+json", w.Header().Get("Content-Type"))
	require.Equal(t, "no-store", w.Header().Get("Cache-Control"))
	var p problem
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &p))
	require.Equal(t, status, p.Status)
	require.NotEmpty(t, p.Title)
	require.NotEmpty(t, p.Detail)
	return p
}

// TestErrors: every error is a problem+json answer with fixed text: bad
// parameters 400, an unknown event 404, a redrive of a read-only API 403,
// of an event that is not failed 409, a database down 503 with
// Retry-After.
func TestErrors(t *testing.T) {
	ctx := context.Background()
	cfg := pgtest.Config(t)
	var down atomic.Bool
	cfg.ConnConfig.ConnectTimeout = 200 * time.Millisecond
	cfg.BeforeConnect = func(context.Context, *pgx.ConnConfig) error {
		if down.Load() {
			return errors.New("the database is down")
		}
		return nil
	}
	pool := pgtest.Pool(t, cfg, func(ctx context.Context, pool *pgxpool.Pool) error {
		return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
	})
	v, err := idempotency.NewGitHubVerifier([]string{"secret"})
	require.NoError(t, err)
	in, err := inbox.NewInbox(ctx, pool, v, inbox.Options{})
	require.NoError(t, err)
	ro, err := admin.New(in, admin.Options{})
	require.NoError(t, err)
	rw, err := admin.New(in, admin.Options{Redrive: true})
	require.NoError(t, err)
	pgtest.Exec(t, pool, `INSERT INTO webhook_events (provider, event_id, type, expires_at, status)
		VALUES ('github', 'd_1', 'push', now() + interval '1 day', 'processed')`)

	w := serve(ro, http.MethodGet, "/events")
	require.Equal(t, http.StatusOK, w.Code)
	var list struct{ Events []inbox.EventInfo }
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &list))
	require.Len(t, list.Events, 1)
	assert.Equal(t, "github", list.Events[0].Provider)

	for _, target := range []string{"/events?limit=0", "/events?limit=x", "/events?limit=1001", "/events?before=yesterday", "/events?status=x"} {
		requireProblem(t, serve(ro, http.MethodGet, target), http.StatusBadRequest)
	}
	requireProblem(t, serve(ro, http.MethodGet, "/events/d_nope"), http.StatusNotFound)
	requireProblem(t, serve(ro, http.MethodPost, "/events/d_1/redrive"), http.StatusForbidden)
	requireProblem(t, serve(ro, http.MethodPost, "/redrive"), http.StatusForbidden)
	requireProblem(t, serve(rw, http.MethodPost, "/events/d_nope/redrive"), http.StatusNotFound)
	requireProblem(t, serve(rw, http.MethodPost, "/events/d_1/redrive"), http.StatusConflict)

	down.Store(true)
	pool.Reset()
	for _, c := range []struct{ method, target string }{
		{http.MethodGet, "/events"}, {http.MethodGet, "/events/d_1"}, {http.MethodGet, "/stats"},
		{http.MethodPost, "/events/d_1/redrive"}, {http.MethodPost, "/redrive"},
	} {
		w := serve(rw, c.method, c.target)
		p := requireProblem(t, w, http.StatusServiceUnavailable)
		assert.Equal(t, "1", w.Header().Get("Retry-After"), c.target)
		assert.NotContains(t, p.Detail, "down", "fixed text, not the error's")
	}
}
