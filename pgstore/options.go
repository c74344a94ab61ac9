package pgstore

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"
)

// Option configures a [Store] ([New]) or a migration ([Migrate]). An
// invalid option makes New or Migrate fail. The zero Option is invalid.
type Option struct {
	name  string
	use   uses // the constructors that take it
	apply func(*config) error
}

// uses is a set of the constructors an [Option] applies to.
type uses uint8

const (
	forStore  uses = 1 << iota // New, Migrate
	forInbox                   // NewInbox
	forWorker                  // NewWorker
	forAdmin                   // (*Inbox).AdminHandler
	forAll    = forStore | forInbox | forWorker | forAdmin
)

// config is what the options set.
type config struct {
	schema       string
	lockTimeout  time.Duration
	recoveryTTL  time.Duration
	logger       *slog.Logger
	inbox        inboxConfig
	worker       workerConfig
	adminRedrive bool
}

// Defaults.
const (
	// DefaultLockTimeout is the longest a statement waits for a row lock
	// unless [WithLockTimeout] says otherwise.
	DefaultLockTimeout = 500 * time.Millisecond

	// DefaultRecoveryTTL is how long a recovery point recorded by
	// [Store.Phase] keeps its record unless [WithRecoveryTTL] says
	// otherwise: the middleware's default TTL.
	DefaultRecoveryTTL = 24 * time.Hour
)

func newConfig(opts []Option) (*config, error) {
	return newConfigFor(forStore, opts)
}

// newConfigFor applies opts for the constructor use, refusing the options
// that do not apply to it.
func newConfigFor(use uses, opts []Option) (*config, error) {
	c := &config{lockTimeout: DefaultLockTimeout, recoveryTTL: DefaultRecoveryTTL, inbox: defaultInboxConfig(), worker: defaultWorkerConfig()}
	for _, opt := range opts {
		if opt.apply == nil {
			return nil, errors.New("pgstore: zero Option")
		}
		if opt.use&use == 0 {
			return nil, fmt.Errorf("pgstore: %s does not apply here", opt.name)
		}
		if err := opt.apply(c); err != nil {
			return nil, fmt.Errorf("pgstore: %s: %w", opt.name, err)
		}
	}
	return c, nil
}

var schemaName = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// WithSchema puts the tables in schema, which must exist: [Migrate]
// creates them there, and the [Store] names them with the schema, whatever
// the connections' search_path. The name must be a lower-case SQL
// identifier ([a-z_][a-z0-9_]*, at most 63 bytes). Default: none, the
// tables are named without a schema and found through the search_path
// (usually "public").
func WithSchema(schema string) Option {
	return Option{name: "WithSchema", use: forAll, apply: func(c *config) error {
		if !schemaName.MatchString(schema) {
			return fmt.Errorf("schema %q is not a lower-case identifier of at most 63 bytes", schema)
		}
		c.schema = schema
		return nil
	}}
}

// WithLockTimeout bounds how long each of the store's statements waits for
// a row lock: a claim racing another transaction's uncommitted insert or
// update of the same key. The store sets PostgreSQL's lock_timeout for
// that one statement (set_config, transaction-local, in the statement
// itself: no extra round trip and nothing left on the connection), to d or
// to the time left before the call's deadline, whichever is shorter. A
// statement that times out fails with SQLSTATE 55P03, which the middleware
// answers with 503. At least 1 ms. Default: [DefaultLockTimeout] (500 ms).
func WithLockTimeout(d time.Duration) Option {
	return Option{name: "WithLockTimeout", use: forStore, apply: func(c *config) error {
		if d < time.Millisecond {
			return fmt.Errorf("lock timeout %v is shorter than 1ms", d)
		}
		c.lockTimeout = d
		return nil
	}}
}

// WithRecoveryTTL sets how long a recovery point recorded by [Store.Phase]
// keeps its record after the last phase: while the attempt runs, and
// suspended after it failed or crashed, until a retry of the same request
// resumes it. Give it the middleware's [idempotency.WithTTL] (or the
// webhook helper's). [idempotency.Claim.Checkpoint] passes the
// middleware's TTL itself. At least 1 s. Default: [DefaultRecoveryTTL]
// (24 h).
func WithRecoveryTTL(d time.Duration) Option {
	return Option{name: "WithRecoveryTTL", use: forStore, apply: func(c *config) error {
		if d < time.Second {
			return fmt.Errorf("recovery TTL %v is shorter than 1s", d)
		}
		c.recoveryTTL = d
		return nil
	}}
}

// WithLogger logs, as warnings, the cleanup passes of [Store.RunCleanup]
// that failed and, given to [NewWorker], the worker's failed attempts and
// database errors. Default: nil, silent.
func WithLogger(l *slog.Logger) Option {
	return Option{name: "WithLogger", use: forStore | forWorker, apply: func(c *config) error {
		c.logger = l
		return nil
	}}
}
