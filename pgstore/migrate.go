package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// Migrations returns the SQL files that create and update the tables of
// the store and of the webhook inbox, for teams that apply migrations with
// a tool of their own: apply them in name order, each once. Each file
// holds plain SQL with unqualified names, so the objects land in the first
// schema of the search_path. From 0004 on, each file records itself (and
// 0004 its predecessors) in idempotency_schema_migrations, which [New] and
// the inbox's constructors read to check that the tables are recent
// enough.
func Migrations() fs.FS {
	sub, _ := fs.Sub(migrationFiles, "migrations") // a valid directory name: no error
	return sub
}

// migrationLock is the key of the transaction-scoped advisory lock that
// serializes concurrent calls of Migrate ("idempot\x00").
const migrationLock int64 = 0x6964656d706f7400

// Migrate creates or updates the tables of the store and of the webhook
// inbox: it applies, in one transaction, every file of [Migrations] that
// the database has not seen, and records each in the table
// idempotency_schema_migrations. It is idempotent, and safe to call from
// several processes at once: they queue on a transaction-scoped advisory
// lock, which nothing on the request path takes. The tables go into
// opts.Schema, which must exist, or the first schema of the search_path.
// Call it at deploy or start-up, never per request.
func Migrate(ctx context.Context, pool *pgxpool.Pool, opts MigrateOptions) error {
	if pool == nil {
		return errors.New("pgstore: pool is nil")
	}
	if err := pg.CheckSchemaName(opts.Schema); err != nil {
		return err
	}
	schema := opts.Schema
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", migrationLock); err != nil {
			return err
		}
		if schema != "" {
			var exists bool
			if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema).Scan(&exists); err != nil {
				return err
			}
			if !exists {
				return fmt.Errorf("schema %q does not exist", schema)
			}
			if _, err := tx.Exec(ctx, "SET LOCAL search_path TO "+pgx.Identifier{schema}.Sanitize()); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+pg.MigrationsTable+` (
    version    text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)`); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, "SELECT version FROM "+pg.MigrationsTable)
		if err != nil {
			return err
		}
		applied, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		for _, name := range names {
			version := strings.TrimSuffix(path.Base(name), ".sql")
			if slices.Contains(applied, version) {
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
			// From 0004 on the file records itself too.
			if _, err := tx.Exec(ctx, "INSERT INTO "+pg.MigrationsTable+" (version) VALUES ($1) ON CONFLICT DO NOTHING", version); err != nil {
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
