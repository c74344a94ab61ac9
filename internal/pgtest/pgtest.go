// Package pgtest gives tests a PostgreSQL to talk to: the server named by
// an environment variable, each test in a schema of its own that is dropped
// when the test ends.
package pgtest

import (
	"context"
	"crypto/rand"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency/pgstore"
)

// URLEnv holds a postgres:// URL of a database the tests may create and
// drop schemas in. .ci/run sets it.
const URLEnv = "IDEMPOTENCY_TEST_DATABASE_URL"

// setupTimeout bounds creating and dropping a test's schema.
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

// Pool opens a pool with cfg (from [Config], possibly changed), applies
// pgstore's migrations, and closes the pool when the test ends. Cleanups
// run last-in first-out, so the pool is closed before its schema is
// dropped.
func Pool(t testing.TB, cfg *pgxpool.Config) *pgxpool.Pool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	t.Cleanup(pool.Close)
	if err := pgstore.Migrate(ctx, pool); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return pool
}

// Store returns a store in a fresh schema of its own, or skips the test
// when URLEnv is unset.
func Store(t testing.TB, opts ...pgstore.Option) *pgstore.Store {
	t.Helper()
	store, err := pgstore.New(Pool(t, Config(t)), opts...)
	if err != nil {
		t.Fatalf("pgstore.New: %v", err)
	}
	return store
}
