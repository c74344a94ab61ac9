package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// Migrations returns the SQL files that create and update the store's
// tables, for teams that apply migrations with a tool of their own: apply
// them in name order, each once. Each file holds plain SQL with
// unqualified names, so the objects land in the first schema of the
// search_path.
func Migrations() fs.FS {
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		panic(err) // the directory is embedded at build time
	}
	return sub
}

// migrationLock is the key of the transaction-scoped advisory lock that
// serializes concurrent calls of Migrate ("idempot\x00").
const migrationLock int64 = 0x6964656d706f7400

// Migrate creates or updates the store's tables: it applies, in one
// transaction, every file of [Migrations] that the database has not seen,
// and records each in the table idempotency_schema_migrations. It is
// idempotent, and safe to call from several processes at once: they queue
// on a transaction-scoped advisory lock, which nothing on the request path
// takes. Of the options only [WithSchema] applies: the tables go into that
// schema, which must exist. Call it at deploy or start-up, never per
// request.
func Migrate(ctx context.Context, pool *pgxpool.Pool, opts ...Option) error {
	if pool == nil {
		return errors.New("pgstore: pool is nil")
	}
	c, err := newConfig(opts)
	if err != nil {
		return err
	}
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", migrationLock); err != nil {
			return err
		}
		if c.schema != "" {
			var exists bool
			if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", c.schema).Scan(&exists); err != nil {
				return err
			}
			if !exists {
				return fmt.Errorf("schema %q does not exist", c.schema)
			}
			if _, err := tx.Exec(ctx, "SET LOCAL search_path TO "+pgx.Identifier{c.schema}.Sanitize()); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS idempotency_schema_migrations (
    version    text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)`); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, "SELECT version FROM idempotency_schema_migrations")
		if err != nil {
			return err
		}
		applied, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		for _, name := range names {
			version := strings.TrimSuffix(path.Base(name), ".sql")
			if contains(applied, version) {
				continue
			}
			body, err := migrationFiles.ReadFile(name)
			if err != nil {
				return err
			}
			// Without arguments pgx sends the file as one simple query,
			// which may hold several statements.
			if _, err := tx.Exec(ctx, string(body)); err != nil {
				return fmt.Errorf("%s: %w", version, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO idempotency_schema_migrations (version) VALUES ($1)", version); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
