package pg

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Required is the migration this version of pgstore's code needs: the
// last file of its migrations (a test holds it to that). Every
// constructor checks that the database has it.
const Required = "0006_inbox_indexes"

// MigrationsTable records the migrations applied, one row per file.
const MigrationsTable = "idempotency_schema_migrations"

// ErrNotMigrated: the schema lacks pgstore's tables, or holds them at an
// older migration than the code needs.
var ErrNotMigrated = errors.New("pgstore: schema not migrated")

var schemaName = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// CheckSchemaName refuses a schema name that is not a lower-case SQL
// identifier of at most 63 bytes; "" (no schema) is valid.
func CheckSchemaName(schema string) error {
	if schema != "" && !schemaName.MatchString(schema) {
		return fmt.Errorf("pgstore: schema %q is not a lower-case identifier of at most 63 bytes", schema)
	}
	return nil
}

// Table returns a table's name as SQL, qualified by schema if set.
func Table(schema, table string) string {
	if schema == "" {
		return pgx.Identifier{table}.Sanitize()
	}
	return pgx.Identifier{schema, table}.Sanitize()
}

// Check makes sure, in one round trip (two when it fails), that pool is
// there and that schema (the search_path when empty) holds pgstore's
// tables at migration [Required] or later. The error wraps
// [ErrNotMigrated] and says what it found and what to do, or says why
// the database could not be asked.
func Check(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	if pool == nil {
		return errors.New("pgstore: pool is nil")
	}
	where := "the search_path"
	if schema != "" {
		where = fmt.Sprintf("schema %q", schema)
	}
	var found *string
	// The simple protocol sends the statement in one round trip (the
	// extended one prepares it first).
	err := pool.QueryRow(ctx, "SELECT max(version) FROM "+Table(schema, MigrationsTable), pgx.QueryExecModeSimpleProtocol).Scan(&found)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "42P01": // undefined_table
		if schema != "" && !schemaExists(ctx, pool, schema) {
			return fmt.Errorf("%w: %s does not exist: create it, then run pgstore.Migrate", ErrNotMigrated, where)
		}
		return fmt.Errorf("%w: no pgstore tables in %s (no %s table): run pgstore.Migrate", ErrNotMigrated, where, MigrationsTable)
	case err != nil:
		return fmt.Errorf("pgstore: checking the tables in %s: %w", where, err)
	case found == nil:
		return fmt.Errorf("%w: no migration recorded in %s: run pgstore.Migrate", ErrNotMigrated, where)
	case *found < Required:
		return fmt.Errorf("%w: the tables in %s are at migration %s, this version of pgstore needs %s: run pgstore.Migrate",
			ErrNotMigrated, where, *found, Required)
	}
	return nil
}

// schemaExists reports whether schema exists, for an error message only:
// true when it cannot tell.
func schemaExists(ctx context.Context, pool *pgxpool.Pool, schema string) bool {
	exists := true
	_ = pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema).Scan(&exists)
	return exists
}

// Permanent reports whether err says the setup is wrong, not that the
// database failed for a moment: a table, column or schema missing, a
// privilege not granted, a database or a login that does not exist.
// Retrying such a statement changes nothing until someone acts.
func Permanent(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	return strings.HasPrefix(pgErr.Code, "42") || // syntax error or access rule violation
		pgErr.Code == "3F000" || // invalid_schema_name
		pgErr.Code == "3D000" || // invalid_catalog_name: no such database
		strings.HasPrefix(pgErr.Code, "28") // invalid authorization
}

// Missing reports whether err says a table, column or schema does not
// exist: a schema older than the code.
func Missing(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "42703" || pgErr.Code == "3F000")
}
