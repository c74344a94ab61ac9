package pgstore_test

import (
	"context"
	"crypto/rand"
	"errors"
	"io/fs"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
	"github.com/seed70ea8305/idempotency/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		return storetest.Harness{Store: freshStore(t), Advance: time.Sleep}
	})
}

// TestConformanceMiddleware: what a client of the middleware relies on,
// through HTTP, on the store.
func TestConformanceMiddleware(t *testing.T) {
	storetest.RunMiddleware(t, func(t *testing.T) idempotency.Store { return freshStore(t) })
}

// The same suite on tables in a named schema, through connections whose
// search_path does not lead there.
func TestConformanceWithSchema(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		cfg := pgtest.Config(t)
		schema := pgtest.Schema(cfg)
		cfg.ConnConfig.RuntimeParams["search_path"] = "public"
		pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
		require.NoError(t, err)
		t.Cleanup(pool.Close)
		require.NoError(t, pgstore.Migrate(context.Background(), pool, pgstore.MigrateOptions{Schema: schema}))
		return storetest.Harness{Store: newStore(t, pool, pgstore.Options{Schema: schema}), Advance: time.Sleep}
	})
}

// TestRoundTrips pins the round-trip floor with a pgx tracer: a first
// request sends two statements (claim, complete), three when its key's
// old record expired but is still there (the takeover, as for a claim
// that resumes a suspended record), a replay, a 409 and a 422 one each. A first request whose handler writes in the claim's
// transaction sends three more than its own statements: begin with the
// check that the claim holds its key (one round trip), then the
// completion and the commit; a phase three (begin, recovery point,
// commit).
func TestRoundTrips(t *testing.T) {
	counter := &statementCounter{}
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = counter })
	exec(t, pool, "CREATE TABLE venues (name text)")
	entered, finish := make(chan struct{}), make(chan struct{})
	handler := &counted{}
	store := newStore(t, pool)
	h := newMiddleware(t, store).Handler(handler)
	const insert = "INSERT INTO venues (name) VALUES ('Hall')"
	inTx := newMiddleware(t, store).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if r.URL.Query().Has("phase") {
			require.NoError(t, store.Phase(ctx, "venue_created", []byte("1"), func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, insert)
				return err
			}))
		}
		tx, err := store.Tx(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, insert)
		require.NoError(t, err)
		w.WriteHeader(http.StatusCreated)
	}))
	counter.Take() // the migration and the table

	require.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
	assert.Equal(t, []string{"acquire", "complete"}, kinds(counter.Take()), "first request")
	w := serve(h, post("k", `{}`))
	require.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, []string{"acquire"}, kinds(counter.Take()), "replay")
	require.Equal(t, http.StatusUnprocessableEntity, serve(h, post("k", `{"other":1}`)).Code)
	assert.Equal(t, []string{"acquire"}, kinds(counter.Take()), "422")
	exec(t, pool, "UPDATE idempotency_keys SET expires_at = now()") // the record expired, not deleted yet
	counter.Take()
	require.Equal(t, http.StatusCreated, serve(h, post("k", `{"other":1}`)).Code)
	assert.Equal(t, []string{"acquire", "takeover", "complete"}, kinds(counter.Take()), "first request on an expired record")

	handler.hold = func() {
		close(entered)
		<-finish
	}
	done := make(chan struct{})
	go func() { defer close(done); serve(h, post("held", `{}`)) }()
	<-entered
	counter.Take()
	require.Equal(t, http.StatusConflict, serve(h, post("held", `{}`)).Code)
	assert.Equal(t, []string{"acquire"}, kinds(counter.Take()), "409")
	close(finish)
	<-done
	counter.Take()

	require.Equal(t, http.StatusCreated, serve(inTx, post("tx", `{}`)).Code)
	assert.Equal(t, []string{"acquire", "begin+holds", insert, "complete", "commit"}, kinds(counter.Take()), "first request, Tx")
	w = serve(inTx, post("tx", `{}`))
	require.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, []string{"acquire"}, kinds(counter.Take()), "replay, Tx")

	r := post("phase", `{}`)
	r.URL.RawQuery = "phase"
	require.Equal(t, http.StatusCreated, serve(inTx, r).Code)
	assert.Equal(t, []string{"acquire", "begin", insert, "checkpoint", "commit", "begin+holds", insert, "complete", "commit"},
		kinds(counter.Take()), "first request, a phase and Tx")

	ctx := context.Background()
	claim := idempotency.Record{Token: "a", Fingerprint: "fp", CreatedAt: time.Now()}
	_, _, err := store.Acquire(ctx, "resume", claim, time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Checkpoint(ctx, "resume", "a", "step", nil, time.Minute))
	require.NoError(t, store.Release(ctx, "resume", "a")) // suspended
	counter.Take()
	claim.Token = "b"
	_, rec, err := store.Acquire(ctx, "resume", claim, time.Minute)
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, "step", rec.RecoveryPoint)
	assert.Equal(t, []string{"acquire", "takeover"}, kinds(counter.Take()), "a claim that resumes a suspended record")
}

func TestNewValidates(t *testing.T) {
	ctx := context.Background()
	_, err := pgstore.New(ctx, nil, pgstore.Options{})
	assert.Error(t, err, "nil pool")
	assert.Error(t, pgstore.Migrate(ctx, nil, pgstore.MigrateOptions{}), "nil pool")
	pool := &pgxpool.Pool{} // never used: options are checked first
	for name, opts := range map[string]pgstore.Options{
		"quoted schema":         {Schema: `a"b`},
		"upper-case schema":     {Schema: "Idem"},
		"schema with a space":   {Schema: "a b"},
		"long schema":           {Schema: string(make([]byte, 64))},
		"negative lock timeout": {LockTimeout: -time.Second},
		"sub-ms lock timeout":   {LockTimeout: time.Microsecond},
		"short recovery TTL":    {RecoveryTTL: time.Millisecond},
		"negative recovery TTL": {RecoveryTTL: -time.Hour},
	} {
		_, err := pgstore.New(ctx, pool, opts)
		assert.Error(t, err, name)
	}
	assert.Error(t, pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{Schema: "A"}), "upper-case schema")
	store := newStore(t, testPool(t), pgstore.Options{LockTimeout: time.Second, RecoveryTTL: time.Hour})
	assert.NotNil(t, store, "valid options; zero ones are the defaults")
}

// TestNewFailsFast: a store on tables that are missing, or older than the
// code, is refused at construction with an error that says what was found
// and to run Migrate, in one round trip; so are an inbox's constructors
// (see package inbox). After Migrate, the same call succeeds.
func TestNewFailsFast(t *testing.T) {
	ctx := context.Background()
	counter := &statementCounter{}
	cfg := pgtest.Config(t)
	cfg.ConnConfig.Tracer = counter
	pool := pgtest.Pool(t, cfg)

	_, err := pgstore.New(ctx, pool, pgstore.Options{})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	assert.ErrorContains(t, err, "run pgstore.Migrate")
	assert.Len(t, counter.Take(), 1, "one round trip")

	_, err = pgstore.New(ctx, pool, pgstore.Options{Schema: "no_such_schema_here"})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	assert.ErrorContains(t, err, `schema "no_such_schema_here" does not exist`)

	// Tables at an older migration: the first three files (before files
	// recorded themselves), recorded.
	names, err := fs.Glob(pgstore.Migrations(), "*.sql")
	require.NoError(t, err)
	exec(t, pool, "CREATE TABLE idempotency_schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
	_, err = pgstore.New(ctx, pool, pgstore.Options{})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated, "no migration recorded")
	for _, name := range names[:3] {
		body, err := fs.ReadFile(pgstore.Migrations(), name)
		require.NoError(t, err)
		exec(t, pool, string(body))
		exec(t, pool, "INSERT INTO idempotency_schema_migrations (version) VALUES ($1)", strings.TrimSuffix(name, ".sql"))
	}
	_, err = pgstore.New(ctx, pool, pgstore.Options{})
	require.ErrorIs(t, err, pgstore.ErrNotMigrated)
	assert.ErrorContains(t, err, "at migration 0003_recovery_points, this version of pgstore needs "+pg.Required)
	t.Log(err)

	require.NoError(t, pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{}))
	counter.Take()
	_, err = pgstore.New(ctx, pool, pgstore.Options{})
	require.NoError(t, err)
	assert.Len(t, counter.Take(), 1, "one round trip")

	// A database that cannot be reached fails New too.
	down := cfg.Copy()
	down.ConnConfig.Port, down.ConnConfig.ConnectTimeout = 1, 200*time.Millisecond
	downPool, err := pgxpool.NewWithConfig(ctx, down)
	require.NoError(t, err)
	defer downPool.Close()
	_, err = pgstore.New(ctx, downPool, pgstore.Options{})
	require.Error(t, err)
	assert.NotErrorIs(t, err, pgstore.ErrNotMigrated)
}

// TestMigrationsByHand: a team applying the files of Migrations with a
// tool of its own (no Migrate) gets the migrations table from 0004 on,
// with every version recorded, so New accepts its tables; Migrate then
// finds nothing to do.
func TestMigrationsByHand(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t, pgtest.Config(t))
	names, err := fs.Glob(pgstore.Migrations(), "*.sql")
	require.NoError(t, err)
	require.Equal(t, pg.Required+".sql", names[len(names)-1], "pg.Required names the last migration")
	for _, name := range names {
		body, err := fs.ReadFile(pgstore.Migrations(), name)
		require.NoError(t, err)
		exec(t, pool, string(body))
	}
	_, err = pgstore.New(ctx, pool, pgstore.Options{})
	require.NoError(t, err)
	require.NoError(t, pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{}))
	assert.Equal(t, len(names), count(t, pool, "SELECT count(*) FROM idempotency_schema_migrations"))
}

// TestMigrateConcurrentAndIdempotent: eight processes' worth of Migrate at
// once on an empty schema, then again: every call succeeds and each file
// is applied once.
func TestMigrateConcurrentAndIdempotent(t *testing.T) {
	cfg := pgtest.Config(t)
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	defer pool.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- pgstore.Migrate(context.Background(), pool, pgstore.MigrateOptions{})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.NoError(t, pgstore.Migrate(context.Background(), pool, pgstore.MigrateOptions{}), "again")
	files, err := fs.Glob(pgstore.Migrations(), "*.sql")
	require.NoError(t, err)
	require.Equal(t, pg.Required+".sql", files[len(files)-1])
	assert.Equal(t, len(files), count(t, pool, "SELECT count(*) FROM idempotency_schema_migrations"))
	for _, table := range []string{"idempotency_keys", "idempotency_failures", "webhook_events"} {
		assert.Equal(t, 0, count(t, pool, "SELECT count(*) FROM "+table), table)
	}

	err = pgstore.Migrate(context.Background(), pool, pgstore.MigrateOptions{Schema: "no_such_schema_here"})
	assert.ErrorContains(t, err, "does not exist")
}

func TestMigrationsAreReadable(t *testing.T) {
	body, err := fs.ReadFile(pgstore.Migrations(), "0001_tables.sql")
	require.NoError(t, err)
	assert.Contains(t, string(body), "CREATE TABLE idempotency_keys")
	assert.Contains(t, string(body), "NOT USED YET")
}

// lyingDeadline has a deadline already past but is never done, so pgx
// sends the statement: the server must refuse the claim by its own clock.
type lyingDeadline struct {
	context.Context
	deadline time.Time
}

func (c lyingDeadline) Deadline() (time.Time, bool) { return c.deadline, true }

func TestAcquireRefusesAfterDeadline(t *testing.T) {
	store := freshStore(t)
	claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
	late := lyingDeadline{Context: context.Background(), deadline: time.Now().Add(-time.Millisecond)}
	_, _, err := store.Acquire(late, "k", claim, time.Minute)
	require.Error(t, err, "the server's clock is past the deadline")
	assert.ErrorContains(t, err, "after its deadline")

	fence, existing, err := store.Acquire(context.Background(), "k", claim, time.Minute)
	require.NoError(t, err)
	assert.Nil(t, existing, "the refused claim left the key free")
	assert.NotZero(t, fence)

	// A key already held is returned after the deadline as before it.
	other := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
	_, existing, err = store.Acquire(late, "k", other, time.Minute)
	require.NoError(t, err)
	require.NotNil(t, existing)
	assert.Equal(t, claim.Token, existing.Token)

	// A deadline in the future claims.
	_, existing, err = store.Acquire(lyingDeadline{Context: context.Background(), deadline: time.Now().Add(time.Hour)}, "k2", other, time.Minute)
	require.NoError(t, err)
	assert.Nil(t, existing)
}

// TestAcquireRepeatedFindsOwnClaim: a claim sent again after its reply was
// lost finds the caller's own token and counts as acquired, with the same
// fence; a repeated Complete or Fail succeeds again.
func TestRepeatedCallsSucceed(t *testing.T) {
	store := freshStore(t)
	ctx := context.Background()
	claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
	f1, existing, err := store.Acquire(ctx, "k", claim, time.Minute)
	require.NoError(t, err)
	require.Nil(t, existing)
	f2, existing, err := store.Acquire(ctx, "k", claim, time.Minute)
	require.NoError(t, err)
	assert.Nil(t, existing, "our own claim")
	assert.Equal(t, f1, f2)

	n, err := store.Fail(ctx, "k", claim.Token, "boom", time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	n, err = store.Fail(ctx, "k", claim.Token, "boom", time.Minute)
	require.NoError(t, err, "a repeated Fail by the same owner")
	assert.Equal(t, 1, n, "is not counted twice")
	_, err = store.Fail(ctx, "k", "other", "boom", time.Minute)
	assert.ErrorIs(t, err, idempotency.ErrLeaseLost)
}

// TestLockTimeout: another transaction holds the key's row (an uncommitted
// insert, or a row lock). The claim waits for at most the lock timeout and
// fails with SQLSTATE 55P03, which the middleware answers with 503. The
// setting does not outlive the statement. A server-side statement_timeout
// fails the same way (57014).
func TestLockTimeout(t *testing.T) {
	ctx := context.Background()
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.MaxConns = 2 })
	store := newStore(t, pool, pgstore.Options{LockTimeout: 100 * time.Millisecond})
	handler := &counted{}
	h := newMiddleware(t, store, idempotency.Options{StoreTimeout: 2 * time.Second}).Handler(handler)

	// The key's record key as the middleware builds it, claimed by a
	// transaction that neither commits nor rolls back.
	serve(h, post("probe", `{}`))
	var key []byte
	require.NoError(t, pool.QueryRow(ctx, "SELECT key FROM idempotency_keys").Scan(&key))
	racing := append(key[:len(key)-len("probe")], "k"...)
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, `INSERT INTO idempotency_keys (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at)
		VALUES ($1, 'other', 'fp', nextval('idempotency_fence'), 'in_flight', now() + interval '1 minute', now() + interval '1 minute', now())`, racing)
	require.NoError(t, err)

	claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
	start := time.Now()
	_, _, err = store.Acquire(ctx, string(racing), claim, time.Minute)
	took := time.Since(start)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	assert.Equal(t, "55P03", pgErr.Code, "lock_not_available")
	assert.Less(t, took, time.Second)
	t.Logf("claim racing an uncommitted insert failed after %v (lock timeout 100ms)", took)

	w, took := timedServe(h, post("k", `{}`))
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)
	assert.Equal(t, "1", w.Header().Get("Retry-After"))
	assert.Less(t, took, time.Second)
	assert.Equal(t, int32(1), handler.calls.Load(), "the handler did not run")

	var setting string
	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	require.NoError(t, conn.QueryRow(ctx, "SHOW lock_timeout").Scan(&setting))
	conn.Release()
	assert.Equal(t, "0", setting, "the statement's lock_timeout did not stay on the connection")

	require.NoError(t, tx.Rollback(ctx))
	require.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code, "the key runs once the racing transaction is gone")

	t.Run("statement_timeout", func(t *testing.T) {
		// The tables first, without the timeout (a migration on a loaded
		// machine can take longer).
		cfg := pgtest.Config(t)
		pgtest.Pool(t, cfg.Copy(), migrate)
		cfg.ConnConfig.RuntimeParams["statement_timeout"] = "100"
		pool := pgtest.Pool(t, cfg)
		store := newStore(t, pool, pgstore.Options{LockTimeout: time.Minute})
		claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
		_, _, err := store.Acquire(ctx, "k", claim, time.Minute)
		require.NoError(t, err)
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		defer tx.Rollback(ctx)
		_, err = tx.Exec(ctx, "SELECT 1 FROM idempotency_keys FOR UPDATE")
		require.NoError(t, err)
		err = store.Release(ctx, "k", claim.Token)
		require.ErrorAs(t, err, &pgErr)
		assert.Equal(t, "57014", pgErr.Code, "query_canceled")
		assert.False(t, errors.Is(err, idempotency.ErrLeaseLost), "a timeout is not a lost lease")
	})
}
