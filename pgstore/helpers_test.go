package pgstore_test

import (
	"context"
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

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/overlay"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

func newStore(t testing.TB, pool *pgxpool.Pool, opts ...pgstore.Option) *pgstore.Store {
	t.Helper()
	store, err := pgstore.New(pool, opts...)
	require.NoError(t, err)
	return store
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

// statementCounter is a pgx QueryTracer that records every statement
// sent (one round trip each).
type statementCounter struct {
	mu  sync.Mutex
	sql []string
}

func (c *statementCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	c.mu.Lock()
	c.sql = append(c.sql, data.SQL)
	c.mu.Unlock()
	return ctx
}

func (c *statementCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (c *statementCounter) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.sql
	c.sql = nil
	return out
}

// kinds names each statement by the table and verb it starts with, for
// readable assertions.
func kinds(sql []string) []string {
	out := make([]string, len(sql))
	for i, s := range sql {
		switch {
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
		case strings.HasPrefix(s, "SELECT EXISTS") && strings.Contains(s, "k.fence = $2"):
			out[i] = "holds"
		case s == "begin", s == "commit", s == "rollback":
			out[i] = s
		default:
			out[i] = s
		}
	}
	return out
}

// exec runs sql on pool for a test, failing it on error.
func exec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	_, err := pool.Exec(context.Background(), sql, args...)
	require.NoError(t, err, sql)
}

// count returns the result of a count(*) query.
func count(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), sql, args...).Scan(&n), sql)
	return n
}

// testPool returns a migrated pool in a schema of the test's own, after
// configure changed its configuration.
func testPool(t testing.TB, configure ...func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg := pgtest.Config(t)
	for _, c := range configure {
		c(cfg)
	}
	return pgtest.Pool(t, cfg)
}
