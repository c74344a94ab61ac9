// Package pgstore is an [idempotency.Store] in PostgreSQL (12 or later),
// on pgx v5's connection pool. It lives in a package of its own so that
// programs on the memory or Redis store never link a PostgreSQL driver.
//
// Create the tables once, at deploy or at start-up ([Migrate] is
// idempotent and safe to call from several processes at once), then hand
// the store to the middleware or the webhook helper:
//
//	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
//	if err != nil {
//		return err
//	}
//	defer pool.Close()
//	if err := pgstore.Migrate(ctx, pool); err != nil {
//		return err
//	}
//	store, err := pgstore.New(pool)
//	if err != nil {
//		return err
//	}
//	go store.RunCleanup(ctx, time.Minute, 1000) // delete expired records
//	m, err := idempotency.New(store)
//	if err != nil {
//		return err
//	}
//	http.Handle("POST /venues", m.Handler(createVenue))
//
// Teams with a migration tool of their own apply the SQL files of
// [Migrations] instead of calling Migrate.
//
// # Tables
//
// idempotency_keys holds one row per record key: the claim while the work
// runs (status in_flight, the owner's token, the lease's end), then the
// stored response (status completed). idempotency_failures counts the
// failed attempts of [idempotency.FailureRecorder]. webhook_events is the
// webhook inbox's ([Inbox], [Worker]; migration 0002 completes it). Keys are
// opaque bytes (bytea); the primary key is their SHA-256, so keys of any
// length fit.
//
// # Protocol
//
// Every call is one statement, one round trip, in its own implicit
// transaction; nothing on the request path takes a table or advisory lock.
// [Store.Acquire] is one INSERT … ON CONFLICT DO UPDATE that claims a free
// key, or a key whose row expired, and otherwise returns the live row. The
// later writes ([Store.Extend], [Store.Complete], [Store.Release],
// [Store.Fail]) change the row only WHERE the caller's token owns it, in
// flight, with its lease unexpired, and return [idempotency.ErrLeaseLost]
// when no row matched. A first request through the middleware thus costs
// two statements (claim, then complete); a replay, a 409 or a 422 one.
// Leases and expiry use the database's clock (clock_timestamp()), never
// the client's.
//
// Fences come from one sequence for every key (idempotency_fence): it only
// grows, so every new owner of a key gets a greater fence than the owners
// before it.
//
// # Deadlines and failures
//
// pgx honours each call's context: when the deadline passes, the statement
// is abandoned and its connection closed, so a call returns by its
// deadline, also when the server or the network stalls. A claim whose
// statement reaches the server only after the deadline (by the server's
// clock) is refused by the statement itself, so it cannot land after the
// middleware answered 503. Each statement waits at most [WithLockTimeout]
// for a row lock. A statement whose connection broke (the server
// terminated the backend, a reset) is sent again on another connection,
// up to three more times within the deadline: every statement is safe to
// repeat (a repeated claim finds the caller's own claim and counts as
// acquired; a repeated completion or failure finds its own outcome).
//
// Every error other than [idempotency.ErrLeaseLost] — a lock timeout
// (SQLSTATE 55P03), a statement_timeout or cancellation (57014), a pool
// that had no free connection before the deadline, a connection that could
// not be made — is a store failure, which the middleware wraps in
// [idempotency.ErrStoreUnavailable] and answers with 503 and Retry-After
// (or runs the handler unprotected under [idempotency.WithFailOpen]).
//
// A Store is safe for concurrent use, also from several processes sharing
// one database; create it with [New].
//
// # Webhook inbox
//
// [Inbox] is the other way to receive Stripe webhooks: it verifies a
// delivery as the root's WebhookHandler does, stores the event in
// webhook_events in one statement and answers 200 at once; [Worker]s then
// process the stored events, with retries, a dead-letter state, leases
// and optional per-object ordering. [Inbox.Backfill] feeds the events
// Stripe failed to deliver, and the operator functions ([Inbox.List],
// [Inbox.Event], [Inbox.Redrive], [Inbox.Stats], [Inbox.AdminHandler])
// show and redrive them:
//
//	inbox, err := pgstore.NewInbox(pool, []string{os.Getenv("STRIPE_WEBHOOK_SECRET")})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /stripe/webhook", inbox)
//	worker, err := pgstore.NewWorker(pool, func(ctx context.Context, ev stripe.Event) error {
//		return handle(ctx, ev)
//	}, pgstore.WithConcurrency(4))
//	if err != nil {
//		return err
//	}
//	go worker.Run(ctx) // until ctx ends
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
)

// Store is an [idempotency.Store] and [idempotency.FailureRecorder] in
// PostgreSQL. See the package documentation for the protocol and how it
// fails. It is safe for concurrent use; the zero value is not usable,
// create one with [New].
type Store struct {
	pool        *pgxpool.Pool
	lockTimeout time.Duration
	logger      *slog.Logger
	sql         statements
}

var (
	_ idempotency.Store           = (*Store)(nil)
	_ idempotency.FailureRecorder = (*Store)(nil)
)

// New returns a Store on the tables that [Migrate] created (with the same
// [WithSchema], if any). It sends nothing to the database.
func New(pool *pgxpool.Pool, opts ...Option) (*Store, error) {
	if pool == nil {
		return nil, errors.New("pgstore: pool is nil")
	}
	c, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return &Store{pool: pool, lockTimeout: c.lockTimeout, logger: c.logger, sql: newStatements(c.schema)}, nil
}

// statements are the store's SQL, with its table names filled in.
type statements struct {
	acquire, extend, complete, release, fail, failures string
	deleteKeys, deleteFailures                         string
}

// Parameters shared by the statements: $1 is always the record key. The
// lock timeout is a text parameter in milliseconds.
func newStatements(schema string) statements {
	keys, failures, fence := name(schema, "idempotency_keys"), name(schema, "idempotency_failures"), name(schema, "idempotency_fence")
	// sql fills in the table names: %[1]s the keys, %[2]s the failures,
	// %[3]s the fence sequence (as a regclass literal).
	sql := func(format string) string {
		return strings.TrimSpace(fmt.Sprintf(format, keys, failures, "'"+fence+"'"))
	}
	return statements{
		// $1 key, $2 token, $3 fingerprint, $4 created, $5 lease (µs),
		// $6 not-after (NULL: none), $7 lock timeout. Returns one row:
		// the new fence (claimed), whether the server's clock is past
		// not-after, and the live row already there (if not claimed).
		// A live row (as of the statement's snapshot) is returned without
		// touching it: a replay, a 409 or a 422 locks nothing and writes
		// nothing. Otherwise the INSERT claims the key, or takes over a
		// row that expired; a live row it finds that the snapshot could
		// not see (committed by a concurrent claim meanwhile) leaves every
		// column NULL, and Acquire sends the statement again.
		acquire: sql(`
WITH clock AS MATERIALIZED (
    SELECT t.now,
           ($6::timestamptz IS NOT NULL AND t.now > $6::timestamptz) AS too_late,
           set_config('lock_timeout', $7::text, true) AS lock_timeout
    FROM (SELECT clock_timestamp() AS now) AS t
), live AS MATERIALIZED (
    SELECT e.status, e.token, e.fence, e.fingerprint, e.created_at,
           e.response_status, e.response_headers, e.response_body, e.body_omitted,
           (extract(epoch FROM e.lease_expires_at - clock.now) * 1000000)::bigint AS lease_left
    FROM %[1]s AS e, clock
    WHERE e.key_hash = sha256($1::bytea) AND e.expires_at > clock.now
), claimed AS (
    INSERT INTO %[1]s AS k (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at)
    SELECT $1::bytea, $2::bytea, $3::bytea, nextval(%[3]s), 'in_flight',
           clock.now + $5::bigint * interval '1 microsecond',
           clock.now + $5::bigint * interval '1 microsecond',
           $4::timestamptz
    FROM clock
    WHERE NOT clock.too_late AND NOT EXISTS (SELECT 1 FROM live)
    ON CONFLICT (key_hash) DO UPDATE SET
        token = excluded.token, fingerprint = excluded.fingerprint, fence = nextval(%[3]s),
        status = 'in_flight', lease_expires_at = excluded.lease_expires_at,
        expires_at = excluded.expires_at, created_at = excluded.created_at, completed_at = NULL,
        response_status = NULL, response_headers = NULL, response_body = NULL, body_omitted = false
    WHERE k.expires_at <= clock_timestamp()
      AND ($6::timestamptz IS NULL OR clock_timestamp() <= $6::timestamptz)
    RETURNING k.fence
)
SELECT c.fence, clock.too_late, e.status, e.token, e.fence, e.fingerprint, e.created_at,
       e.response_status, e.response_headers, e.response_body, e.body_omitted, e.lease_left
FROM clock
LEFT JOIN claimed AS c ON true
LEFT JOIN live AS e ON c.fence IS NULL`),

		// $1 key, $2 token, $3 lease (µs), $4 lock timeout.
		extend: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $4::text, true) AS lock_timeout
)
UPDATE %[1]s AS k
SET lease_expires_at = cfg.now + $3::bigint * interval '1 microsecond',
    expires_at = cfg.now + $3::bigint * interval '1 microsecond'
FROM cfg
WHERE k.key_hash = sha256($1::bytea) AND k.token = $2::bytea
  AND k.status = 'in_flight' AND k.lease_expires_at > clock_timestamp()`),

		// $1 key, $2 token, $3 TTL (µs), $4 fingerprint, $5 created,
		// $6 status, $7 header, $8 body, $9 body omitted, $10 lock
		// timeout. Returns whether the record is now completed by $2.
		complete: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $10::text, true) AS lock_timeout
), done AS (
    UPDATE %[1]s AS k
    SET status = 'completed', lease_expires_at = NULL,
        expires_at = cfg.now + $3::bigint * interval '1 microsecond', completed_at = cfg.now,
        fingerprint = $4::bytea, created_at = $5::timestamptz, response_status = $6::integer,
        response_headers = $7::bytea, response_body = $8::bytea, body_omitted = $9::boolean
    FROM cfg
    WHERE k.key_hash = sha256($1::bytea) AND k.token = $2::bytea
      AND k.status = 'in_flight' AND k.lease_expires_at > clock_timestamp()
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM done) OR EXISTS (
    SELECT 1 FROM %[1]s AS k, cfg
    WHERE k.key_hash = sha256($1::bytea) AND k.token = $2::bytea
      AND k.status = 'completed' AND k.expires_at > cfg.now)`),

		// $1 key, $2 token, $3 lock timeout.
		release: sql(`
WITH cfg AS MATERIALIZED (
    SELECT set_config('lock_timeout', $3::text, true) AS lock_timeout
)
DELETE FROM %[1]s AS k USING cfg
WHERE k.key_hash = sha256($1::bytea) AND k.token = $2::bytea
  AND k.status = 'in_flight' AND k.lease_expires_at > clock_timestamp()`),

		// $1 key, $2 token, $3 reason, $4 TTL (µs), $5 lock timeout.
		// Returns the attempts counted, or no row when $2 owned nothing
		// and did not fail the key last.
		fail: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $5::text, true) AS lock_timeout
), released AS (
    DELETE FROM %[1]s AS k USING cfg
    WHERE k.key_hash = sha256($1::bytea) AND k.token = $2::bytea
      AND k.status = 'in_flight' AND k.lease_expires_at > clock_timestamp()
    RETURNING k.key
), counted AS (
    INSERT INTO %[2]s AS f (key, attempts, last_reason, last_token, failed_at, expires_at)
    SELECT r.key, 1, $3::text, $2::bytea, cfg.now, cfg.now + $4::bigint * interval '1 microsecond'
    FROM released AS r, cfg
    ON CONFLICT (key_hash) DO UPDATE SET
        attempts = CASE WHEN f.expires_at <= excluded.failed_at THEN 1 ELSE f.attempts + 1 END,
        last_reason = excluded.last_reason, last_token = excluded.last_token,
        failed_at = excluded.failed_at, expires_at = excluded.expires_at
    RETURNING f.attempts
)
SELECT attempts FROM counted
UNION ALL
SELECT f.attempts FROM %[2]s AS f, cfg
WHERE NOT EXISTS (SELECT 1 FROM counted)
  AND f.key_hash = sha256($1::bytea) AND f.last_token = $2::bytea AND f.expires_at > cfg.now`),

		// $1 key.
		failures: sql(`
SELECT attempts, last_reason FROM %[2]s
WHERE key_hash = sha256($1::bytea) AND expires_at > clock_timestamp()`),

		// $1 batch size. Rows past their expiry: completed records past
		// their TTL and claims whose lease lapsed, never a live claim.
		// Rows another transaction holds locked (a claim taking the key
		// over) are skipped.
		deleteKeys: sql(`
DELETE FROM %[1]s AS k
WHERE k.ctid = ANY (ARRAY(
        SELECT d.ctid FROM %[1]s AS d
        WHERE d.expires_at <= clock_timestamp()
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND k.expires_at <= clock_timestamp()`),

		deleteFailures: sql(`
DELETE FROM %[2]s AS f
WHERE f.ctid = ANY (ARRAY(
        SELECT d.ctid FROM %[2]s AS d
        WHERE d.expires_at <= clock_timestamp()
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND f.expires_at <= clock_timestamp()`),
	}
}

// name returns a table's name as SQL, qualified by schema if set.
func name(schema, table string) string {
	if schema == "" {
		return pgx.Identifier{table}.Sanitize()
	}
	return pgx.Identifier{schema, table}.Sanitize()
}

var errTooLate = errors.New("pgstore: acquire: the server ran the claim after its deadline, and refused it")

// errRaced: the claim lost a race with a claim of the same key that
// committed while the statement ran, too late for the statement's
// snapshot to show its row. Acquire sends the statement again.
var errRaced = errors.New("pgstore: acquire: raced with a concurrent claim of the same key")

// maxAcquireRaces bounds how often Acquire repeats its statement after
// losing a race (each repeat sees every claim committed before it).
const maxAcquireRaces = 3

// Acquire implements [idempotency.Store] in one statement. It refuses to
// claim when the server's clock is past ctx's deadline. It repeats the
// statement only when its connection broke, or when it lost a race with
// a concurrent claim of the same key whose row its snapshot could not see.
func (s *Store) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	switch {
	case claim.Token == "":
		return 0, nil, errors.New("pgstore: claim without an owner token")
	case claim.Response != nil:
		return 0, nil, errors.New("pgstore: claim must be in flight (Response nil)")
	case lease <= 0:
		return 0, nil, fmt.Errorf("pgstore: lease %v is not positive", lease)
	}
	if err := ctx.Err(); err != nil {
		return 0, nil, fmt.Errorf("pgstore: acquire: %w", err)
	}
	var notAfter *time.Time
	if deadline, ok := ctx.Deadline(); ok {
		notAfter = &deadline
	}
	var (
		fence    uint64
		existing *idempotency.Record
		err      error
	)
	for range maxAcquireRaces {
		err = s.retry(ctx, func() error {
			var err error
			fence, existing, err = s.acquireOnce(ctx, key, &claim, lease, notAfter)
			return err
		})
		if !errors.Is(err, errRaced) {
			break
		}
	}
	if err != nil {
		if errors.Is(err, errTooLate) || errors.Is(err, errRaced) {
			return 0, nil, err
		}
		return 0, nil, fmt.Errorf("pgstore: acquire: %w", err)
	}
	return fence, existing, nil
}

func (s *Store) acquireOnce(ctx context.Context, key string, claim *idempotency.Record, lease time.Duration, notAfter *time.Time) (uint64, *idempotency.Record, error) {
	var (
		fence, rowFence      *int64
		tooLate              bool
		status               *string
		token, fingerprint   []byte
		created              *time.Time
		respStatus           *int32
		respHeader, respBody []byte
		bodyOmitted          *bool
		leaseLeft            *int64
	)
	err := s.pool.QueryRow(ctx, s.sql.acquire,
		[]byte(key), []byte(claim.Token), []byte(claim.Fingerprint), claim.CreatedAt,
		lease.Microseconds(), notAfter, s.lockTimeoutParam(ctx),
	).Scan(&fence, &tooLate, &status, &token, &rowFence, &fingerprint, &created,
		&respStatus, &respHeader, &respBody, &bodyOmitted, &leaseLeft)
	switch {
	case err != nil:
		return 0, nil, err
	case fence != nil:
		return uint64(*fence), nil, nil
	case status == nil && tooLate:
		return 0, nil, errTooLate
	case status == nil:
		return 0, nil, errRaced
	}
	rec := &idempotency.Record{Fingerprint: string(fingerprint)}
	if created != nil {
		rec.CreatedAt = *created
	}
	if *status == statusInFlight {
		if string(token) == claim.Token && rowFence != nil {
			// Our own claim: this statement was sent again after the
			// first one's reply was lost.
			return uint64(*rowFence), nil, nil
		}
		rec.Token = string(token)
		if leaseLeft != nil {
			// By the database's clock.
			rec.LeaseLeft = max(time.Duration(*leaseLeft)*time.Microsecond, 0)
		}
		return 0, rec, nil
	}
	header, err := decodeHeader(respHeader)
	if err != nil {
		return 0, nil, err
	}
	resp := &idempotency.Response{Header: header, Body: respBody}
	if respStatus != nil {
		resp.StatusCode = int(*respStatus)
	}
	if bodyOmitted != nil {
		resp.BodyOmitted = *bodyOmitted
	}
	rec.Response = resp
	return 0, rec, nil
}

const statusInFlight = "in_flight"

// Extend implements [idempotency.Store] in one statement.
func (s *Store) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("pgstore: lease %v is not positive", lease)
	}
	return s.owned(ctx, "extend", token, func() (bool, error) {
		tag, err := s.pool.Exec(ctx, s.sql.extend, []byte(key), []byte(token), lease.Microseconds(), s.lockTimeoutParam(ctx))
		return tag.RowsAffected() == 1, err
	})
}

// Complete implements [idempotency.Store] in one statement. The store
// keeps the token that completed the record, so that the same call
// repeated succeeds and changes nothing.
func (s *Store) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	switch {
	case rec == nil || rec.Response == nil:
		return errors.New("pgstore: completion without a response")
	case ttl <= 0:
		return fmt.Errorf("pgstore: record TTL %v is not positive", ttl)
	}
	resp := rec.Response
	header := encodeHeader(resp.Header)
	return s.owned(ctx, "complete", token, func() (bool, error) {
		var done bool
		err := s.pool.QueryRow(ctx, s.sql.complete, []byte(key), []byte(token), ttl.Microseconds(),
			[]byte(rec.Fingerprint), rec.CreatedAt, int32(resp.StatusCode), header, resp.Body, resp.BodyOmitted,
			s.lockTimeoutParam(ctx)).Scan(&done)
		return done, err
	})
}

// Release implements [idempotency.Store] in one statement.
func (s *Store) Release(ctx context.Context, key, token string) error {
	return s.owned(ctx, "release", token, func() (bool, error) {
		tag, err := s.pool.Exec(ctx, s.sql.release, []byte(key), []byte(token), s.lockTimeoutParam(ctx))
		return tag.RowsAffected() == 1, err
	})
}

// Fail implements [idempotency.FailureRecorder] in one statement: it
// deletes the claim and counts the failure together. The reason is kept
// as text: invalid UTF-8 and NUL bytes become U+FFFD. Repeated by the same
// token after it succeeded, it returns the same count again.
func (s *Store) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("pgstore: failure TTL %v is not positive", ttl)
	}
	reason = strings.ToValidUTF8(strings.ReplaceAll(reason, "\x00", "\uFFFD"), "\uFFFD")
	var attempts int32
	err := s.owned(ctx, "fail", token, func() (bool, error) {
		err := s.pool.QueryRow(ctx, s.sql.fail, []byte(key), []byte(token), reason, ttl.Microseconds(),
			s.lockTimeoutParam(ctx)).Scan(&attempts)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return 0, err
	}
	return int(attempts), nil
}

// Failures implements [idempotency.FailureRecorder].
func (s *Store) Failures(ctx context.Context, key string) (int, string, error) {
	var (
		attempts int32
		reason   string
	)
	err := s.retry(ctx, func() error {
		return s.pool.QueryRow(ctx, s.sql.failures, []byte(key)).Scan(&attempts, &reason)
	})
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return 0, "", nil
	case err != nil:
		return 0, "", fmt.Errorf("pgstore: failures: %w", err)
	}
	return int(attempts), reason, nil
}

// owned runs an owner-checked write, which reports whether it matched a
// row, and turns no match into ErrLeaseLost.
func (s *Store) owned(ctx context.Context, op, token string, write func() (matched bool, err error)) error {
	if token == "" {
		return idempotency.ErrLeaseLost
	}
	var matched bool
	err := s.retry(ctx, func() error {
		var err error
		matched, err = write()
		return err
	})
	switch {
	case err != nil:
		return fmt.Errorf("pgstore: %s: %w", op, err)
	case !matched:
		return idempotency.ErrLeaseLost
	}
	return nil
}

// maxResends bounds how often a statement is sent again after its
// connection broke: a pool may hold several connections that a restart or
// pg_terminate_backend closed, each found broken only when used.
const maxResends = 3

// retry runs op, and again, on another connection, while it failed because
// its connection broke and ctx has time left. Every statement of the store
// is safe to repeat.
func (s *Store) retry(ctx context.Context, op func() error) error {
	for resends := 0; ; resends++ {
		err := op()
		if err == nil || resends == maxResends || ctx.Err() != nil || !brokenConnection(err) {
			return err
		}
	}
}

// brokenConnection reports whether err says the connection failed rather
// than the statement: the statement may or may not have run.
func brokenConnection(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// FATAL: the server ends the session (57P01 after
		// pg_terminate_backend or a fast shutdown); class 08: connection
		// exceptions.
		return pgErr.Severity == "FATAL" || strings.HasPrefix(pgErr.Code, "08")
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) {
		return false
	}
	var netErr net.Error
	return pgconn.SafeToRetry(err) || errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// lockTimeoutParam is the lock_timeout for a statement run under ctx, in
// milliseconds: the store's, or the time left before ctx's deadline if
// shorter, and at least 1 ms (0 would mean no limit).
func (s *Store) lockTimeoutParam(ctx context.Context) string {
	d := s.lockTimeout
	if deadline, ok := ctx.Deadline(); ok {
		d = min(d, time.Until(deadline))
	}
	return strconv.FormatInt(max(d.Milliseconds(), 1), 10)
}
