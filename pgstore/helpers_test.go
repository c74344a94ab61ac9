package pgstore_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/overlay"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

func newStore(t testing.TB, pool *pgxpool.Pool, opts ...pgstore.Options) *pgstore.Store {
	t.Helper()
	store, err := pgstore.New(context.Background(), pool, overlay.Merge(opts...))
	require.NoError(t, err)
	return store
}

// migrate creates pgstore's tables: a setup for pgtest.Pool.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
}

// freshStore returns a store in a fresh schema of its own, or skips the
// test when pgtest.URLEnv is unset.
func freshStore(t testing.TB) *pgstore.Store {
	t.Helper()
	return newStore(t, pgtest.Pool(t, pgtest.Config(t), migrate))
}

func newMiddleware(t testing.TB, store idempotency.Store, opts ...idempotency.Options) *idempotency.Middleware {
	t.Helper()
	m, err := idempotency.New(store, overlay.Merge(opts...))
	require.NoError(t, err)
	return m
}

func post(key, body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Idempotency-Key", key)
	return r
}

func serve(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func timedServe(h http.Handler, r *http.Request) (*httptest.ResponseRecorder, time.Duration) {
	start := time.Now()
	w := serve(h, r)
	return w, time.Since(start)
}

// counted is a handler that counts its executions and answers 201 with
// the execution's number, after hold returns (if set).
type counted struct {
	calls atomic.Int32
	hold  func()
}

func (c *counted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := c.calls.Add(1)
	if c.hold != nil {
		c.hold()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"execution":%d}`, n)
}

// statementCounter records every statement sent (one round trip each).
type statementCounter = pgtest.Statements

// kinds names each statement by the table and verb it starts with, for
// readable assertions.
func kinds(sql []string) []string {
	out := make([]string, len(sql))
	for i, s := range sql {
		switch {
		case strings.Contains(s, "INSERT INTO") && strings.Contains(s, "claimed AS") && strings.Contains(s, "DO UPDATE"):
			out[i] = "takeover"
		case strings.Contains(s, "INSERT INTO") && strings.Contains(s, "claimed AS"):
			out[i] = "acquire"
		case strings.Contains(s, "SET status = 'completed'"):
			out[i] = "complete"
		case strings.Contains(s, "counted AS"):
			out[i] = "fail"
		case strings.Contains(s, "released AS"):
			out[i] = "release"
		case strings.Contains(s, "SET lease_expires_at"):
			out[i] = "extend"
		case strings.Contains(s, "SET recovery_point"):
			out[i] = "checkpoint"
		case strings.HasPrefix(s, "BEGIN; EXECUTE pgstore_holds_"):
			out[i] = "begin+holds"
		case s == "begin", s == "commit", s == "rollback":
			out[i] = s
		default:
			out[i] = s
		}
	}
	return out
}

// exec runs a statement for a test; count returns a count(*).
var (
	exec  = pgtest.Exec
	count = pgtest.Count
)

// testPool returns a migrated pool in a schema of the test's own, after
// configure changed its configuration.
func testPool(t testing.TB, configure ...func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg := pgtest.Config(t)
	for _, c := range configure {
		c(cfg)
	}
	return pgtest.Pool(t, cfg, migrate)
}
