package pgstore

import (
	"errors"
	"log/slog"
	"time"

	"github.com/seed70ea8305/idempotency/pgstore/internal/option"
	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

// Options configures a [Store] ([New]). The zero value is the defaults:
// tables found through the search_path, a 500 ms lock timeout, recovery
// points kept 24 h, no logging. A value out of range makes New fail.
type Options struct {
	// Schema is where [Migrate] created the tables (give it the same
	// [MigrateOptions].Schema): the store names them with it, whatever the
	// connections' search_path. A lower-case SQL identifier
	// ([a-z_][a-z0-9_]*, at most 63 bytes). Default: "", the tables are
	// named without a schema and found through the search_path (usually
	// "public").
	Schema string

	// LockTimeout bounds how long each of the store's statements waits
	// for a row lock: a claim racing another transaction's uncommitted
	// insert or update of the same key. The store sets PostgreSQL's
	// lock_timeout for that one statement (set_config, transaction-local,
	// in the statement itself: no extra round trip and nothing left on
	// the connection), to LockTimeout or to the time left before the
	// call's deadline, whichever is shorter. A statement that times out
	// fails with SQLSTATE 55P03, which the middleware answers with 503.
	// At least 1 ms. Default: 500 ms.
	LockTimeout time.Duration

	// RecoveryTTL is how long a recovery point recorded by [Store.Phase]
	// keeps its record after the last phase: while the attempt runs, and
	// suspended after it failed or crashed, until a retry of the same
	// request resumes it. Give it the middleware's [idempotency.Options]
	// TTL (or the webhook handler's). [idempotency.Claim.Checkpoint]
	// passes the middleware's TTL itself. At least 1 s. Default: 24 h,
	// the middleware's default TTL.
	RecoveryTTL time.Duration

	// Logger receives, as warnings, the cleanup passes of
	// [Store.RunCleanup] that failed and the claims' transactions the
	// store had to roll back ([Store.Tx]). Default: nil, silent.
	Logger *slog.Logger
}

// Defaults of [Options].
const (
	defaultLockTimeout = 500 * time.Millisecond
	defaultRecoveryTTL = 24 * time.Hour
)

// settings returns o with the defaults filled in, or why it is invalid.
func (o Options) settings() (Options, error) {
	option.Default(&o.LockTimeout, defaultLockTimeout)
	option.Default(&o.RecoveryTTL, defaultRecoveryTTL)
	return o, errors.Join(
		pg.CheckSchemaName(o.Schema),
		option.AtLeast("pgstore: lock timeout", o.LockTimeout, time.Millisecond),
		option.AtLeast("pgstore: recovery TTL", o.RecoveryTTL, time.Second),
	)
}

// MigrateOptions configures [Migrate]. The zero value migrates the tables
// in the first schema of the search_path.
type MigrateOptions struct {
	// Schema puts the tables in this schema, which must exist; give the
	// store ([Options].Schema) and the inbox the same one. A lower-case
	// SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes). Default: "",
	// the first schema of the search_path (usually "public").
	Schema string
}
