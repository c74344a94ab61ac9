package pgstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

// Store is an [idempotency.Store] and [idempotency.FailureRecorder] in
// PostgreSQL, also an [idempotency.Checkpointer] and
// [idempotency.Inspector]. See the package documentation for the protocol
// and how it fails. It is safe for concurrent use; the zero value is not
// usable, create one with [New].
type Store struct {
	pool        *pgxpool.Pool
	lockTimeout time.Duration
	recoveryTTL time.Duration
	orphanGrace time.Duration
	logger      *slog.Logger
	sql         statements

	txMu sync.Mutex
	txs  map[uint64]*claimTx // the claims' open transactions, by fence ([Store.Tx])
}

var (
	_ idempotency.Store           = (*Store)(nil)
	_ idempotency.FailureRecorder = (*Store)(nil)
	_ idempotency.Checkpointer    = (*Store)(nil)
	_ idempotency.Inspector       = (*Store)(nil)
)

// ErrNotMigrated: the tables are missing, or at an older migration than
// this version of pgstore needs. [New] and the inbox's constructors fail
// with an error wrapping it that says what they found; run [Migrate] (or
// apply the files of [Migrations]).
var ErrNotMigrated = pg.ErrNotMigrated

// New returns a Store on the tables that [Migrate] created (in
// opts.Schema, if set). It checks, in one round trip under ctx, that they
// are there at the migration this version needs, and fails otherwise:
// with an error wrapping [ErrNotMigrated] when they are missing or older
// (it says which migration it found), or with the database's error when
// it could not ask. A nil pool or an invalid option fails before anything
// is sent.
func New(ctx context.Context, pool *pgxpool.Pool, opts Options) (*Store, error) {
	o, err := opts.settings()
	if err == nil {
		err = pg.Check(ctx, pool, o.Schema)
	}
	if err != nil {
		return nil, err
	}
	return &Store{
		pool: pool, lockTimeout: o.LockTimeout, recoveryTTL: o.RecoveryTTL, orphanGrace: orphanGrace,
		logger: o.Logger, sql: newStatements(o.Schema), txs: make(map[uint64]*claimTx),
	}, nil
}

// statements are the store's SQL, with its table names filled in.
type statements struct {
	claim, acquire, extend, complete, release, fail, failures string
	releaseByFence, checkpoint, checkpointByFence             string
	get, remove                                               string
	holds, holdsName                                          string
	deleteKeys, deleteFailures                                string
}

// Parameters shared by the statements: $1 is always the record key. The
// lock timeout is a text parameter in milliseconds.
//
// A row with a recovery point whose lease lapsed (or was ended by Release
// or Fail) is suspended until its expires_at: see migration 0003.
func newStatements(schema string) statements {
	keys, failures, fence := pg.Table(schema, "idempotency_keys"), pg.Table(schema, "idempotency_failures"), pg.Table(schema, "idempotency_fence")
	// sql fills in the table names: %[1]s the keys, %[2]s the failures,
	// %[3]s the fence sequence (as a regclass literal).
	sql := func(format string) string {
		return strings.TrimSpace(fmt.Sprintf(format, keys, failures, "'"+fence+"'"))
	}
	// locked is the key's row, cur, locked before anything looks at its
	// lease: every owner-checked write (Extend, Complete, Checkpoint,
	// Release, Fail) starts with it, after a cfg that sets the lock
	// timeout, and checks the lease (against clock_timestamp()) on cur,
	// so that the check runs once the row is locked, on the row as the
	// last writer committed it (READ COMMITTED reads the newest version of
	// a row it waited to lock). An UPDATE alone checks its WHERE before it
	// waits for the row: when the transaction it waited for only locked
	// the row (a Get, another token's Release, a claim that found the row
	// live) the UPDATE goes on with a check made before the wait, and a
	// renewal that checked a lease just before it ran out would land after
	// a reader had seen the lease run out.
	const locked = `cur AS MATERIALIZED (
    SELECT k.key_hash, k.key, k.token, k.fence, k.status, k.lease_expires_at, k.expires_at
    FROM %[1]s AS k, cfg
    WHERE k.key_hash = sha256($1::bytea)
    FOR NO KEY UPDATE OF k
)`
	// setPoint records a recovery point on the row an owner holds, and
	// keeps the row at least $5 from now: the owner is $2, a token
	// (checkpoint) or a fence (checkpointByFence).
	// $1 key, $2 owner, $3 point, $4 data, $5 TTL (µs), $6 lock timeout.
	setPoint := func(owner string) string {
		return sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $6::text, true) AS lock_timeout
), ` + locked + `
UPDATE %[1]s AS k
SET recovery_point = $3::text, recovery_data = $4::bytea,
    expires_at = greatest(k.lease_expires_at, cfg.now + $5::bigint * interval '1 microsecond')
FROM cfg, cur
WHERE k.key_hash = cur.key_hash AND cur.` + owner + `
  AND cur.status = 'in_flight' AND cur.lease_expires_at > clock_timestamp()`)
	}
	// freed frees the row that $2 owns, as Release and Fail do, in place:
	// its lease ends now, and so does the row when it holds no recovery
	// point; a row with one is suspended (it stays until its expires_at).
	// It never deletes the row, and the row keeps its token and fence: the
	// next claim of the key then finds it and takes it over through ON
	// CONFLICT DO UPDATE, whose nextval() runs once the row is locked, so
	// its fence is greater than every fence the key had. A claim that
	// inserts a new row takes its fence before it waits for a conflicting
	// one; had a release deleted the row, a claim that waited for that
	// DELETE to commit would land with a fence older than those handed out
	// meanwhile. [Store.DeleteExpired] deletes a row only cleanupGrace
	// after it stopped counting.
	//
	// cur is the key's row, locked first (see locked), so held tells who
	// holds the key now, not as the statement's snapshot saw it: a Release
	// re-sent while the first one commits finds the key free, not its own
	// claim gone. Follows a cfg with now. $1 key, $2 owner (a token, or a
	// fence for releaseByFence); released holds the freed row's key.
	freed := func(owner string) string {
		return locked + `, released AS (
    UPDATE %[1]s AS k
    SET lease_expires_at = cfg.now,
        expires_at = CASE WHEN k.recovery_point IS NULL THEN cfg.now ELSE k.expires_at END
    FROM cur, cfg
    WHERE k.key_hash = cur.key_hash AND cur.` + owner + `
      AND cur.status = 'in_flight' AND cur.lease_expires_at > clock_timestamp()
    RETURNING k.key
)`
	}
	// held: someone other than $2 holds the key's row cur (locked by
	// freed): a completed record, or another owner's claim in flight. A
	// key that nothing holds (no row, an expired one, a suspended one, the
	// caller's own lapsed claim) is not held: releasing it is done.
	held := func(owner string) string {
		return `EXISTS (SELECT 1 FROM cur WHERE cur.expires_at > clock_timestamp()
    AND (cur.status = 'completed' OR (cur.lease_expires_at > clock_timestamp() AND NOT cur.` + owner + `)))`
	}
	const byToken, byFence = "token = $2::bytea", "fence = $2::bigint"
	// release: $1 key, $2 owner, $3 lock timeout. Returns the rows freed
	// and whether someone else holds the key.
	release := func(owner string) string {
		return sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $3::text, true) AS lock_timeout
), ` + strings.TrimSpace(freed(owner)) + `
SELECT (SELECT count(*) FROM released), ` + held(owner))
	}
	// resumable: the conflicting row k is suspended, for the same request,
	// at the statement's start (one instant for WHERE and SET alike).
	const resumable = `(k.status = 'in_flight' AND k.recovery_point IS NOT NULL
         AND k.fingerprint = excluded.fingerprint
         AND k.lease_expires_at <= (SELECT now FROM clock) AND k.expires_at > (SELECT now FROM clock))`
	st := statements{
		// $1 key, $2 fence. Fails, with notHoldingCode, unless the claim
		// with fence $2 holds the key, in flight, its lease unexpired
		// (see Store.beginHolding). Locks nothing.
		holds: sql(`
SELECT (SELECT 'pgstore: the claim no longer holds its key'::text WHERE NOT EXISTS (
    SELECT 1 FROM %[1]s AS k
    WHERE k.key_hash = sha256($1::bytea) AND k.fence = $2::bigint
      AND k.status = 'in_flight' AND k.lease_expires_at > clock_timestamp()))::integer`),

		// claim is Acquire's first statement, the one that almost every
		// call needs alone: it inserts a key that has no row (ON CONFLICT
		// DO NOTHING), and otherwise returns the row it found, live or
		// not, touching nothing. Only a row it cannot take as it is (one
		// that expired, or a suspended one of the same request) needs
		// acquire, below, which takes rows over; a replay, a 409 or a 422
		// costs a read and a first request an insert, with no ON CONFLICT
		// DO UPDATE to set up. Parameters as for acquire. Returns one row:
		// the new fence, whether the server's clock is past not-after,
		// and the row already there (if not claimed), with whether it is
		// live.
		// A row it does not find but that a concurrent claim committed
		// meanwhile leaves every column NULL, as for acquire.
		claim: sql(`
WITH clock AS MATERIALIZED (
    SELECT t.now,
           ($6::timestamptz IS NOT NULL AND t.now > $6::timestamptz) AS too_late,
           set_config('lock_timeout', $7::text, true) AS lock_timeout
    FROM (SELECT clock_timestamp() AS now) AS t
), found AS MATERIALIZED (
    SELECT e.status, e.token, e.fence, e.fingerprint, e.created_at,
           e.response_status, e.response_headers, e.response_body, e.body_omitted,
           e.recovery_point, e.recovery_data,
           (e.status = 'in_flight' AND e.lease_expires_at <= clock.now) AS suspended,
           (extract(epoch FROM e.lease_expires_at - clock.now) * 1000000)::bigint AS lease_left,
           e.expires_at > clock.now AS live
    FROM %[1]s AS e, clock
    WHERE e.key_hash = sha256($1::bytea)
), claimed AS (
    INSERT INTO %[1]s AS k (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at)
    SELECT $1::bytea, $2::bytea, $3::bytea, nextval(%[3]s), 'in_flight',
           clock.now + $5::bigint * interval '1 microsecond',
           clock.now + $5::bigint * interval '1 microsecond',
           $4::timestamptz
    FROM clock
    WHERE NOT clock.too_late AND NOT EXISTS (SELECT 1 FROM found)
    ON CONFLICT (key_hash) DO NOTHING
    RETURNING k.fence
)
SELECT c.fence, clock.too_late,
       e.status, e.token, e.fence, e.fingerprint, e.created_at,
       e.response_status, e.response_headers, e.response_body, e.body_omitted,
       e.suspended, e.recovery_point, e.recovery_data, e.lease_left, e.live
FROM clock
LEFT JOIN claimed AS c ON true
LEFT JOIN found AS e ON c.fence IS NULL`),

		// acquire is Acquire's statement for a key whose row claim could
		// not take as it is.
		// $1 key, $2 token, $3 fingerprint, $4 created, $5 lease (µs),
		// $6 not-after (NULL: none), $7 lock timeout. Returns one row:
		// the new fence and the recovery point it resumes from (claimed),
		// whether the server's clock is past not-after, and the live row
		// already there (if not claimed).
		// A live row (as of the statement's snapshot) is returned without
		// touching it: a replay, a 409 or a 422 locks nothing and writes
		// nothing. Otherwise the INSERT claims the key, takes over a row
		// that expired (dropping whatever it held), or takes over a
		// suspended row of the same request (keeping its recovery point).
		// A live row it finds that the snapshot could not see (committed
		// by a concurrent claim meanwhile) leaves every column NULL, and
		// Acquire sends the statement again.
		acquire: sql(`
WITH clock AS MATERIALIZED (
    SELECT t.now,
           ($6::timestamptz IS NOT NULL AND t.now > $6::timestamptz) AS too_late,
           set_config('lock_timeout', $7::text, true) AS lock_timeout
    FROM (SELECT clock_timestamp() AS now) AS t
), live AS MATERIALIZED (
    SELECT e.status, e.token, e.fence, e.fingerprint, e.created_at,
           e.response_status, e.response_headers, e.response_body, e.body_omitted,
           e.recovery_point, e.recovery_data,
           (e.status = 'in_flight' AND e.lease_expires_at <= clock.now) AS suspended,
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
    WHERE NOT clock.too_late
      AND NOT EXISTS (SELECT 1 FROM live WHERE NOT (live.suspended AND live.fingerprint = $3::bytea))
    ON CONFLICT (key_hash) DO UPDATE SET
        token = excluded.token, fingerprint = excluded.fingerprint, fence = nextval(%[3]s),
        status = 'in_flight', lease_expires_at = excluded.lease_expires_at,
        expires_at = CASE WHEN ` + resumable + ` THEN greatest(k.expires_at, excluded.expires_at)
                          ELSE excluded.expires_at END,
        created_at = excluded.created_at, completed_at = NULL,
        response_status = NULL, response_headers = NULL, response_body = NULL, body_omitted = false,
        recovery_point = CASE WHEN ` + resumable + ` THEN k.recovery_point END,
        recovery_data = CASE WHEN ` + resumable + ` THEN k.recovery_data END
    WHERE (k.expires_at <= clock_timestamp() OR ` + resumable + `)
      AND ($6::timestamptz IS NULL OR clock_timestamp() <= $6::timestamptz)
    RETURNING k.fence, k.recovery_point, k.recovery_data
)
SELECT c.fence, c.recovery_point, c.recovery_data, clock.too_late,
       e.status, e.token, e.fence, e.fingerprint, e.created_at,
       e.response_status, e.response_headers, e.response_body, e.body_omitted,
       e.suspended, e.recovery_point, e.recovery_data, e.lease_left
FROM clock
LEFT JOIN claimed AS c ON true
LEFT JOIN live AS e ON c.fence IS NULL`),

		// $1 key, $2 token, $3 lease (µs), $4 lock timeout. A row with a
		// recovery point keeps its expiry if that is later.
		extend: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $4::text, true) AS lock_timeout
), ` + locked + `
UPDATE %[1]s AS k
SET lease_expires_at = cfg.now + $3::bigint * interval '1 microsecond',
    expires_at = CASE WHEN k.recovery_point IS NULL THEN cfg.now + $3::bigint * interval '1 microsecond'
                      ELSE greatest(k.expires_at, cfg.now + $3::bigint * interval '1 microsecond') END
FROM cfg, cur
WHERE k.key_hash = cur.key_hash AND cur.token = $2::bytea
  AND cur.status = 'in_flight' AND cur.lease_expires_at > clock_timestamp()`),

		// $1 key, $2 token, $3 TTL (µs), $4 fingerprint, $5 created,
		// $6 status, $7 header, $8 body, $9 body omitted, $10 lock
		// timeout. Returns whether the record is now completed by $2.
		// The recovery point goes with the in-flight state.
		// The row completed by $2 already (the same call repeated) matches
		// too, and keeps every column: the check is in the UPDATE's WHERE,
		// on the row locked first (see locked), so it sees a first
		// completion that it waited for. A check of its own, beside the
		// UPDATE, would read the statement's snapshot, taken before that
		// completion had committed, and refuse its repeat.
		complete: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $10::text, true) AS lock_timeout
), ` + locked + `, done AS (
    UPDATE %[1]s AS k
    SET status = 'completed', lease_expires_at = NULL, recovery_point = NULL, recovery_data = NULL,
        expires_at       = CASE WHEN k.status = 'completed' THEN k.expires_at
                                ELSE cfg.now + $3::bigint * interval '1 microsecond' END,
        completed_at     = CASE WHEN k.status = 'completed' THEN k.completed_at ELSE cfg.now END,
        fingerprint      = CASE WHEN k.status = 'completed' THEN k.fingerprint ELSE $4::bytea END,
        created_at       = CASE WHEN k.status = 'completed' THEN k.created_at ELSE $5::timestamptz END,
        response_status  = CASE WHEN k.status = 'completed' THEN k.response_status ELSE $6::integer END,
        response_headers = CASE WHEN k.status = 'completed' THEN k.response_headers ELSE $7::bytea END,
        response_body    = CASE WHEN k.status = 'completed' THEN k.response_body ELSE $8::bytea END,
        body_omitted     = CASE WHEN k.status = 'completed' THEN k.body_omitted ELSE $9::boolean END
    FROM cfg, cur
    WHERE k.key_hash = cur.key_hash AND cur.token = $2::bytea
      AND CASE cur.status WHEN 'in_flight' THEN cur.lease_expires_at > clock_timestamp()
                          WHEN 'completed' THEN cur.expires_at > clock_timestamp() END
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM done)`),

		release:        release(byToken),
		releaseByFence: release(byFence),

		// $1 key, $2 token, $3 reason, $4 TTL (µs), $5 lock timeout.
		// Returns one row: the attempts counted (NULL when $2 owned
		// nothing), the attempts when $2 failed the key last (the same
		// call repeated), and whether the key's row is $2's claim, which
		// the repeat of a Fail still committing finds (see Fail).
		fail: sql(`
WITH cfg AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('lock_timeout', $5::text, true) AS lock_timeout
), ` + strings.TrimSpace(freed(byToken)) + `, counted AS (
    INSERT INTO %[2]s AS f (key, attempts, last_reason, last_token, failed_at, expires_at)
    SELECT r.key, 1, $3::text, $2::bytea, cfg.now, cfg.now + $4::bigint * interval '1 microsecond'
    FROM released AS r, cfg
    ON CONFLICT (key_hash) DO UPDATE SET
        attempts = CASE WHEN f.expires_at <= excluded.failed_at THEN 1 ELSE f.attempts + 1 END,
        last_reason = excluded.last_reason, last_token = excluded.last_token,
        failed_at = excluded.failed_at, expires_at = excluded.expires_at
    RETURNING f.attempts
)
SELECT (SELECT attempts FROM counted),
       (SELECT f.attempts FROM %[2]s AS f, cfg
        WHERE f.key_hash = sha256($1::bytea) AND f.last_token = $2::bytea AND f.expires_at > cfg.now),
       EXISTS (SELECT 1 FROM cur WHERE cur.token = $2::bytea AND cur.status = 'in_flight')`),

		// $1 key.
		failures: sql(`
SELECT attempts, last_reason FROM %[2]s
WHERE key_hash = sha256($1::bytea) AND expires_at > clock_timestamp()`),

		checkpoint:        setPoint(byToken),
		checkpointByFence: setPoint(byFence),

		// $1 key, $2 lock timeout. The live row, if any. It locks the row
		// (FOR SHARE) before it looks at its expiry, so that it waits for
		// a write in progress (a renewal, a completion, a release) and
		// then reads the row as that write committed it: from the
		// statement's snapshot alone, a renewal that checked the lease
		// before it ran out and commits after would be read as a lapsed
		// claim, and a Get would answer "no record" for a claim whose
		// owner keeps it. The clock is read after the lock (LATERAL on the
		// locked row), so "live" is as of the row it returns.
		get: sql(`
WITH cfg AS MATERIALIZED (
    SELECT set_config('lock_timeout', $2::text, true) AS lock_timeout
), e AS MATERIALIZED (
    SELECT k.status, k.token, k.fingerprint, k.created_at,
           k.response_status, k.response_headers, k.response_body, k.body_omitted,
           k.recovery_point, k.recovery_data, k.lease_expires_at, k.expires_at
    FROM %[1]s AS k, cfg
    WHERE k.key_hash = sha256($1::bytea)
    FOR SHARE OF k
)
SELECT e.status, e.token, e.fingerprint, e.created_at,
       e.response_status, e.response_headers, e.response_body, e.body_omitted,
       e.lease_expires_at <= t.now AS suspended, e.recovery_point, e.recovery_data,
       (extract(epoch FROM e.lease_expires_at - t.now) * 1000000)::bigint AS lease_left
FROM e CROSS JOIN LATERAL (SELECT clock_timestamp() AS now, e.expires_at) AS t
WHERE e.expires_at > t.now`),

		// $1 key, $2 lock timeout. Deletes the key's row, whatever its
		// state (its recovery point goes with it), and its failures.
		remove: sql(`
WITH cfg AS MATERIALIZED (
    SELECT set_config('lock_timeout', $2::text, true) AS lock_timeout
), keys AS (
    DELETE FROM %[1]s AS k USING cfg WHERE k.key_hash = sha256($1::bytea)
)
DELETE FROM %[2]s AS f USING cfg WHERE f.key_hash = sha256($1::bytea)`),

		// $1 batch size, $2 grace (µs). Rows past their expiry by more
		// than the grace: completed records past their TTL, claims whose
		// lease lapsed or that were released, suspended records past their
		// recovery point's TTL; never a live claim or a suspended record.
		// Rows another transaction holds locked (a claim taking the key
		// over) are skipped. The batch is found with now(), not
		// clock_timestamp(): a volatile function cannot be an index
		// condition, and the scan would read the whole table for every
		// batch (TestCleanupUsesTheExpiryIndex); the statement's start
		// deletes a little less, never more.
		deleteKeys: sql(`
DELETE FROM %[1]s AS k
WHERE k.ctid = ANY (ARRAY(
        SELECT d.ctid FROM %[1]s AS d
        WHERE d.expires_at <= now() - $2::bigint * interval '1 microsecond'
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND k.expires_at <= clock_timestamp() - $2::bigint * interval '1 microsecond'`),

		deleteFailures: sql(`
DELETE FROM %[2]s AS f
WHERE f.ctid = ANY (ARRAY(
        SELECT d.ctid FROM %[2]s AS d
        WHERE d.expires_at <= now()
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
  AND f.expires_at <= clock_timestamp()`),
	}
	// The name the holds statement is prepared under on a connection, one
	// per text (stores of two schemas may share a pool).
	sum := sha256.Sum256([]byte(st.holds))
	st.holdsName = "pgstore_holds_" + hex.EncodeToString(sum[:8])
	return st
}

var errTooLate = errors.New("pgstore: acquire: the server ran the claim after its deadline, and refused it")

// errRaced: the claim lost a race with a claim of the same key that
// committed while the statement ran, too late for the statement's
// snapshot to show its row. Acquire sends the statement again.
var errRaced = errors.New("pgstore: acquire: raced with a concurrent claim of the same key")

// maxAcquireRaces bounds how often Acquire repeats its statement after
// losing a race (each repeat sees every claim committed before it).
const maxAcquireRaces = 3

// Acquire implements [idempotency.Store], in one statement unless the key
// holds a row that expired (and was not deleted yet) or a suspended
// record of the same request: taking that row over costs a second one.
// It refuses to
// claim when the server's clock is past ctx's deadline. It repeats the
// statement only when its connection broke, or when it lost a race with
// a concurrent claim of the same key whose row its snapshot could not see.
// A live record that cannot be decoded (a stored status outside 200 to
// 999, a corrupt header) is an error wrapping
// [idempotency.ErrRecordUnreadable]; [Store.Remove] deletes it.
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

// errTakeOver: the claim statement found a row that only the acquire
// statement can take over.
var errTakeOver = errors.New("pgstore: acquire: the key's row must be taken over")

func (s *Store) acquireOnce(ctx context.Context, key string, claim *idempotency.Record, lease time.Duration, notAfter *time.Time) (uint64, *idempotency.Record, error) {
	fence, rec, err := s.claimOnce(ctx, key, claim, lease, notAfter)
	if errors.Is(err, errTakeOver) {
		return s.takeOverOnce(ctx, key, claim, lease, notAfter)
	}
	return fence, rec, err
}

// claimOnce sends the claim statement. A row that it finds expired, or
// suspended for the same request, is errTakeOver.
func (s *Store) claimOnce(ctx context.Context, key string, claim *idempotency.Record, lease time.Duration, notAfter *time.Time) (uint64, *idempotency.Record, error) {
	var (
		fence   *int64
		tooLate bool
		live    *bool
		row     storedRow
	)
	err := s.queryRow(ctx, s.sql.claim,
		[]byte(key), []byte(claim.Token), []byte(claim.Fingerprint), claim.CreatedAt,
		lease.Microseconds(), notAfter, s.lockTimeoutParam(ctx),
	).Scan(&fence, &tooLate, &row.status, &row.token, &row.fence, &row.fingerprint, &row.created,
		&row.respStatus, &row.respHeader, &row.respBody, &row.bodyOmitted, &row.suspended, &row.point, &row.data, &row.leaseLeft, &live)
	switch {
	case err != nil:
		return 0, nil, err
	case fence != nil:
		return uint64(*fence), nil, nil // a new row: nothing to resume
	case row.status == nil && tooLate:
		return 0, nil, errTooLate
	case row.status == nil:
		return 0, nil, errRaced
	case live == nil || !*live:
		return 0, nil, errTakeOver
	case row.suspended != nil && *row.suspended && string(row.fingerprint) == claim.Fingerprint:
		return 0, nil, errTakeOver
	}
	return found(claim, &row, tooLate)
}

// takeOverOnce sends the acquire statement, which also takes over a row
// that expired or a suspended one of the same request.
func (s *Store) takeOverOnce(ctx context.Context, key string, claim *idempotency.Record, lease time.Duration, notAfter *time.Time) (uint64, *idempotency.Record, error) {
	var (
		fence   *int64
		point   *string
		data    []byte
		tooLate bool
		row     storedRow
	)
	err := s.queryRow(ctx, s.sql.acquire,
		[]byte(key), []byte(claim.Token), []byte(claim.Fingerprint), claim.CreatedAt,
		lease.Microseconds(), notAfter, s.lockTimeoutParam(ctx),
	).Scan(&fence, &point, &data, &tooLate, &row.status, &row.token, &row.fence, &row.fingerprint, &row.created,
		&row.respStatus, &row.respHeader, &row.respBody, &row.bodyOmitted, &row.suspended, &row.point, &row.data, &row.leaseLeft)
	switch {
	case err != nil:
		return 0, nil, err
	case fence != nil:
		return uint64(*fence), resumed(claim.Fingerprint, point, data), nil
	case row.status == nil && tooLate:
		return 0, nil, errTooLate
	case row.status == nil:
		return 0, nil, errRaced
	}
	return found(claim, &row, tooLate)
}

// found is Acquire's answer when its statement found a live row and
// claimed nothing.
func found(claim *idempotency.Record, row *storedRow, tooLate bool) (uint64, *idempotency.Record, error) {
	rec, err := row.record()
	if err != nil {
		return 0, nil, err
	}
	if rec.Response != nil {
		return 0, rec, nil
	}
	sameRequest := string(row.fingerprint) == claim.Fingerprint
	switch {
	case *row.suspended && sameRequest && tooLate:
		return 0, nil, errTooLate
	case *row.suspended && sameRequest:
		// The snapshot saw a suspended row this request could take over,
		// but the row had changed by the time the INSERT locked it
		// (another claim resumed it first).
		return 0, nil, errRaced
	case !*row.suspended && rec.Token == claim.Token && row.fence != nil:
		// Our own claim: this statement was sent again after the first
		// one's reply was lost.
		return uint64(*row.fence), resumed(claim.Fingerprint, row.point, row.data), nil
	}
	// Another request's claim, or partly done work of another request
	// (suspended: no owner, no lease).
	return 0, rec, nil
}

// resumed is what Acquire returns with a claim that took over a suspended
// record: its recovery point; nil when the claim starts afresh.
func resumed(fingerprint string, point *string, data []byte) *idempotency.Record {
	if point == nil {
		return nil
	}
	return &idempotency.Record{Fingerprint: fingerprint, RecoveryPoint: *point, RecoveryData: data}
}

// storedRow is a live row of idempotency_keys as Acquire and Get read it,
// every column nullable: the row may have been written by hand or by
// another version, and decoding it must fail, not panic.
type storedRow struct {
	status, point        *string
	token, fingerprint   []byte
	fence                *int64 // Acquire only
	created              *time.Time
	respStatus           *int32
	respHeader, respBody []byte
	bodyOmitted          *bool
	suspended            *bool // in flight, lease lapsed
	data                 []byte
	leaseLeft            *int64 // µs, by the database's clock
}

// record decodes r. A row this store cannot have written is an error
// wrapping [idempotency.ErrRecordUnreadable].
func (r *storedRow) record() (*idempotency.Record, error) {
	if r.status == nil {
		return nil, unreadable("no state")
	}
	rec := &idempotency.Record{Fingerprint: string(r.fingerprint)}
	if r.created != nil {
		rec.CreatedAt = *r.created
	}
	switch *r.status {
	case statusCompleted:
		resp, err := response(r.respStatus, r.respHeader, r.respBody, r.bodyOmitted)
		if err != nil {
			return nil, err
		}
		rec.Response = resp
		return rec, nil
	case statusInFlight:
	default:
		return nil, unreadable("state %q", *r.status)
	}
	if r.suspended == nil {
		return nil, unreadable("in flight without a lease")
	}
	if r.point != nil {
		rec.RecoveryPoint, rec.RecoveryData = *r.point, r.data
	}
	if *r.suspended {
		return rec, nil
	}
	if len(r.token) == 0 {
		return nil, unreadable("in flight without an owner")
	}
	rec.Token = string(r.token)
	if r.leaseLeft != nil {
		rec.LeaseLeft = max(time.Duration(*r.leaseLeft)*time.Microsecond, 0)
	}
	return rec, nil
}

// response decodes a stored response's columns. Only a status the
// middleware or the webhook helper stores is valid (200 to 999; 1xx are
// never stored): replaying another would make the middleware's
// WriteHeader panic, or send an interim response as the final one.
func response(status *int32, header, body []byte, bodyOmitted *bool) (*idempotency.Response, error) {
	switch {
	case status == nil:
		return nil, unreadable("completed without a status")
	case *status < 200 || *status > 999:
		return nil, unreadable("status %d is not from 200 to 999", *status)
	}
	h, err := decodeHeader(header)
	if err != nil {
		return nil, err
	}
	resp := &idempotency.Response{StatusCode: int(*status), Header: h, Body: body}
	if bodyOmitted != nil {
		resp.BodyOmitted = *bodyOmitted
	}
	return resp, nil
}

// unreadable returns an error wrapping [idempotency.ErrRecordUnreadable]
// that says what is wrong with the stored record.
func unreadable(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{idempotency.ErrRecordUnreadable}, args...)...)
}

const (
	statusInFlight  = "in_flight"
	statusCompleted = "completed"
)

// Extend implements [idempotency.Store] in one statement.
func (s *Store) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("pgstore: lease %v is not positive", lease)
	}
	return s.owned(ctx, "extend", token, func() (bool, error) {
		tag, err := s.exec(ctx, s.sql.extend, []byte(key), []byte(token), lease.Microseconds(), s.lockTimeoutParam(ctx))
		return tag.RowsAffected() == 1, err
	})
}

// Complete implements [idempotency.Store] in one statement, and drops the
// record's recovery point. The store keeps the token that completed the
// record, so that the same call repeated succeeds and changes nothing.
//
// When the claim in ctx has a transaction open ([Store.Tx]), Complete runs
// its statement in that transaction and commits it: the handler's writes
// and the stored response commit together, or neither does. Then nothing
// is sent again on another connection: a lost lease returns
// [idempotency.ErrLeaseLost], any other failure (a broken connection, a
// failed commit) an error, after the transaction was rolled back, so that
// the middleware answers 503 and frees the key.
func (s *Store) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	switch {
	case rec == nil || rec.Response == nil:
		s.abandonTx(ctx, key)
		return errors.New("pgstore: completion without a response")
	case ttl <= 0:
		s.abandonTx(ctx, key)
		return fmt.Errorf("pgstore: record TTL %v is not positive", ttl)
	}
	resp := rec.Response
	args := []any{[]byte(key), []byte(token), ttl.Microseconds(),
		[]byte(rec.Fingerprint), rec.CreatedAt, int32(resp.StatusCode), encodeHeader(resp.Header), resp.Body, resp.BodyOmitted,
		s.lockTimeoutParam(ctx)}
	if t := s.takeTx(ctx, key); t != nil {
		return s.completeInTx(ctx, t, token, args)
	}
	return s.owned(ctx, "complete", token, func() (bool, error) {
		var done bool
		err := s.queryRow(ctx, s.sql.complete, args...).Scan(&done)
		return done, err
	})
}

// Release implements [idempotency.Store] in one statement. A record with
// a recovery point ([Store.Checkpoint], [Store.Phase]) is suspended rather
// than deleted: see [idempotency.Checkpointer]. A key that nothing holds
// (no live row, a suspended one, the caller's own lapsed claim) is
// released already: the call changes nothing and succeeds, so the
// statement re-sent after its connection broke answers as the first one
// did; only a key that another owner or a completed record holds is
// [idempotency.ErrLeaseLost]. A transaction the claim in ctx has open
// ([Store.Tx]) is rolled back first.
//
// A statement sent again after its connection broke may find the key
// held by another claim. Whether the first send freed the key and let
// that claim in, or never ran while the caller's lease lapsed, is
// unknown: Release then returns an error of unknown outcome, not
// ErrLeaseLost, which would say that the call changed nothing.
func (s *Store) Release(ctx context.Context, key, token string) error {
	s.abandonTx(ctx, key)
	var mayHaveRun error // a send that broke off after it may have reached the server
	return s.owned(ctx, "release", token, func() (bool, error) {
		var (
			n    int64
			held bool
		)
		err := s.queryRow(ctx, s.sql.release, []byte(key), []byte(token), s.lockTimeoutParam(ctx)).Scan(&n, &held)
		switch {
		case err != nil:
			if !pgconn.SafeToRetry(err) {
				mayHaveRun = err
			}
			return false, err
		case n == 0 && held && mayHaveRun != nil:
			// Not wrapping the earlier error: that would make pg.Resend
			// send the statement again.
			return false, fmt.Errorf("%w (an earlier send: %v)", errReleaseUnknown, mayHaveRun)
		}
		return n == 1 || !held, nil
	})
}

// errReleaseUnknown: Release was sent again after its connection broke,
// and found the key held by another claim, which the first send may have
// let in by freeing the key.
var errReleaseUnknown = errors.New("sent again, found the key held by another claim: whether an earlier send released it is unknown")

// Fail implements [idempotency.FailureRecorder] in one statement: it
// frees the claim, as Release does, and counts the failure together. The
// reason is kept as text: invalid UTF-8 and NUL bytes become U+FFFD.
// Repeated by the same token after it succeeded, it returns the same count
// again. A transaction the claim in ctx has open ([Store.Tx]) is rolled
// back first.
//
// The repeat reads the failure history from its statement's snapshot.
// When the statement is the repeat of a Fail that was still committing
// (sent again after its connection broke), it waited for that Fail's lock
// on the key's row, and finds the row freed, its own, but the snapshot
// predates the failure counted: Fail then sends the statement once more,
// whose snapshot has it. Only a Fail that finds its own claim lapsed pays
// that second statement.
func (s *Store) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	s.abandonTx(ctx, key)
	if ttl <= 0 {
		return 0, fmt.Errorf("pgstore: failure TTL %v is not positive", ttl)
	}
	reason = strings.ToValidUTF8(strings.ReplaceAll(reason, "\x00", "\uFFFD"), "\uFFFD")
	var attempts int32
	err := s.owned(ctx, "fail", token, func() (bool, error) {
		for again := true; ; again = false {
			var (
				counted, before *int32
				mine            bool
			)
			err := s.queryRow(ctx, s.sql.fail, []byte(key), []byte(token), reason, ttl.Microseconds(),
				s.lockTimeoutParam(ctx)).Scan(&counted, &before, &mine)
			switch {
			case err != nil:
				return false, err
			case counted != nil:
				attempts = *counted
				return true, nil
			case before != nil:
				attempts = *before
				return true, nil
			case !mine || !again:
				return false, nil
			}
		}
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
		return s.queryRow(ctx, s.sql.failures, []byte(key)).Scan(&attempts, &reason)
	})
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return 0, "", nil
	case err != nil:
		return 0, "", fmt.Errorf("pgstore: failures: %w", err)
	}
	return int(attempts), reason, nil
}

// Remove implements [idempotency.Inspector] in one statement: it deletes
// the record under key in any state, with its recovery point and its
// failure history; a key with nothing under it is no error. A claim in
// flight loses its key: its later calls return [idempotency.ErrLeaseLost],
// and a transaction it has open ([Store.Tx]) is rolled back at its
// completion.
func (s *Store) Remove(ctx context.Context, key string) error {
	err := s.retry(ctx, func() error {
		_, err := s.exec(ctx, s.sql.remove, []byte(key), s.lockTimeoutParam(ctx))
		return err
	})
	if err != nil {
		return fmt.Errorf("pgstore: remove: %w", err)
	}
	return nil
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

// retry runs op, and again on another connection while it failed because
// its connection broke, until ctx's deadline ([pg.Resend]). Every statement
// of the store is safe to repeat.
func (s *Store) retry(ctx context.Context, op func() error) error {
	return pg.Resend(ctx, s.pool, op)
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
