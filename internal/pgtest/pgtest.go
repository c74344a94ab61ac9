// Package pgtest gives tests a PostgreSQL to talk to: the server named by
// an environment variable, each test in a schema of its own that is dropped
// when the test ends.
//
// It is a module of its own, needing pgx alone, so that the root module
// requires no PostgreSQL driver while pgstore's tests, the linearizability
// checks and the examples share it. It knows nothing of pgstore: a test
// that wants pgstore's tables passes a setup function to [Pool] that
// migrates.
package pgtest

import (
	"context"
	"crypto/rand"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// URLEnv holds a postgres:// URL of a database the tests may create and
// drop schemas in. .ci/run sets it.
const URLEnv = "IDEMPOTENCY_TEST_DATABASE_URL"

// setupTimeout bounds creating and dropping a test's schema, and a pool's
// setup.
const setupTimeout = 10 * time.Second

// Config returns a pool configuration for the database named by URLEnv
// whose connections work in a new schema (search_path), which is dropped
// with everything in it when the test ends. The pool has at most 4
// connections, so that many tests in a row stay well below the server's
// max_connections. It skips the test when the variable is unset and fails
// it when the server does not answer.
func Config(t testing.TB) *pgxpool.Config {
	t.Helper()
	url := os.Getenv(URLEnv)
	if url == "" {
		t.Skipf("%s not set: skipping the test against a real PostgreSQL", URLEnv)
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatalf("%s=%q: %v", URLEnv, url, err)
	}
	schema := "idemtest_" + strings.ToLower(rand.Text()[:12])
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	admin, err := pgx.ConnectConfig(ctx, cfg.ConnConfig.Copy())
	if err != nil {
		t.Fatalf("PostgreSQL named by %s does not answer: %v", URLEnv, err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("create schema %s: %v", schema, err)
	}
	dropCfg := cfg.ConnConfig.Copy()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
		defer cancel()
		conn, err := pgx.ConnectConfig(ctx, dropCfg)
		if err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
		}
	})
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	cfg.ConnConfig.RuntimeParams["application_name"] = schema
	cfg.MaxConns = 4
	return cfg
}

// Schema returns the schema that cfg, from [Config], works in.
func Schema(cfg *pgxpool.Config) string {
	return cfg.ConnConfig.RuntimeParams["search_path"]
}

// Pool opens a pool with cfg (from [Config], possibly changed), runs each
// setup on it (pgstore's migration, say), and closes the pool when the
// test ends. Cleanups run last-in first-out, so the pool is closed before
// its schema is dropped.
func Pool(t testing.TB, cfg *pgxpool.Config, setup ...func(context.Context, *pgxpool.Pool) error) *pgxpool.Pool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	t.Cleanup(pool.Close)
	for _, s := range setup {
		if err := s(ctx, pool); err != nil {
			t.Fatalf("pool setup: %v", err)
		}
	}
	return pool
}

// Exec runs sql on pool for a test, failing it on error.
func Exec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// Count returns the number a query such as SELECT count(*) returns.
func Count(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// Statements is a pgx QueryTracer (set it as a connection config's
// Tracer) that records the text of every statement sent: one round trip
// each, as pgx sends them with the default exec mode once prepared.
type Statements struct {
	mu  sync.Mutex
	sql []string
}

// TraceQueryStart records the statement.
func (s *Statements) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	s.mu.Lock()
	s.sql = append(s.sql, data.SQL)
	s.mu.Unlock()
	return ctx
}

// TraceQueryEnd does nothing.
func (s *Statements) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// Take returns the statements recorded since the last Take.
func (s *Statements) Take() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.sql
	s.sql = nil
	return out
}
