package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/recordkey"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// The tests here run the middleware on a real PostgreSQL with handlers
// that write business rows through the claim's transaction (Store.Tx) and
// in atomic phases (Store.Phase).

// txEnv is a pool with the store's tables and a business table, venues.
type txEnv struct {
	pool    *pgxpool.Pool
	store   *pgstore.Store
	reports chan idempotency.Report
}

func newTxEnv(t *testing.T, configure ...func(*pgxpool.Config)) *txEnv {
	t.Helper()
	pool := testPool(t, configure...)
	exec(t, pool, "CREATE TABLE venues (id bigserial PRIMARY KEY, name text NOT NULL)")
	exec(t, pool, "CREATE TABLE venue_accounts (venue_id bigint PRIMARY KEY)")
	env := &txEnv{pool: pool, store: newStore(t, pool), reports: make(chan idempotency.Report, 100)}
	t.Cleanup(func() { env.requireNoLeaks(t) })
	return env
}

// middleware returns the middleware on store (env.store if nil), whose
// reports go to env.reports.
func (env *txEnv) middleware(t *testing.T, store idempotency.Store, h http.HandlerFunc, opts ...idempotency.Options) http.Handler {
	t.Helper()
	if store == nil {
		store = env.store
	}
	opts = append(opts, idempotency.Options{Observer: func(_ context.Context, r idempotency.Report) { env.reports <- r }})
	return newMiddleware(t, store, opts...).Handler(h)
}

func (env *txEnv) report(t *testing.T) idempotency.Report {
	t.Helper()
	select {
	case r := <-env.reports:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no report")
		return idempotency.Report{}
	}
}

func (env *txEnv) venues(t *testing.T) int {
	t.Helper()
	return count(t, env.pool, "SELECT count(*) FROM venues")
}

// requireNoLeaks checks that every connection went back to the pool and
// that the store holds no claim's transaction.
func (env *txEnv) requireNoLeaks(t *testing.T) {
	t.Helper()
	assert.Eventually(t, func() bool {
		return env.pool.Stat().AcquiredConns() == 0 && env.store.OpenTxs() == 0
	}, 2*time.Second, 5*time.Millisecond, "connections acquired: %d, transactions registered: %d",
		env.pool.Stat().AcquiredConns(), env.store.OpenTxs())
}

// insertVenue is a handler that inserts a venue in the claim's
// transaction and answers 201 with the run's number, after hook (if set).
func (env *txEnv) insertVenue(t *testing.T, runs *atomic.Int32, hook func(ctx context.Context, tx pgx.Tx)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		n := runs.Add(1)
		tx, err := env.store.Tx(ctx)
		if !assert.NoError(t, err) {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_, err = tx.Exec(ctx, "INSERT INTO venues (name) VALUES ('Hall')")
		assert.NoError(t, err)
		if hook != nil {
			hook(ctx, tx)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"run":%d}`, n)
	}
}

// servePanicking serves r, recovering the handler's panic, which the
// middleware lets continue after freeing the key.
func servePanicking(h http.Handler, r *http.Request) (w *httptest.ResponseRecorder, recovered any) {
	w = httptest.NewRecorder()
	defer func() { recovered = recover() }()
	h.ServeHTTP(w, r)
	return w, nil
}

func requireProblem(t *testing.T, w *httptest.ResponseRecorder, status int) {
	t.Helper()
	require.Equal(t, status, w.Code, w.Body.String())
	assert.Equal(t, "application/problem+json", w.Header().Get("Content-Type"))
}

// TestRecordKey: Tx finds the claim's row by the record key the
// middleware stores, also for scopes that need quoting (its check travels
// with BEGIN, the key inlined).
func TestRecordKey(t *testing.T) {
	env := newTxEnv(t)
	scopes := []string{"", "tenant 1", `a"b\c:d`, "é\x00\xff\n", `it's'); SELECT '\x`}
	scope := func(r *http.Request) string {
		var i int
		fmt.Sscan(r.Header.Get("X-Scope"), &i)
		return scopes[i]
	}
	var runs atomic.Int32
	h := env.middleware(t, nil, env.insertVenue(t, &runs, nil), idempotency.Options{Scope: scope})
	for i, s := range scopes {
		key := fmt.Sprintf("key-%d", i)
		r := post(key, `{}`)
		r.Header.Set("X-Scope", fmt.Sprint(i))
		require.Equal(t, http.StatusCreated, serve(h, r).Code, "Tx found the claim's row by its key")
		assert.Equal(t, 1, count(t, env.pool, "SELECT count(*) FROM idempotency_keys WHERE key = $1",
			[]byte(recordkey.Name("http", s, key))), "scope %q", s)
		env.report(t)
	}
	assert.Equal(t, len(scopes), env.venues(t))
}

// TestTxCommitsWithResponse: the handler's writes are invisible until the
// response is stored, and both commit together; Tx twice returns the same
// transaction; Commit is refused; savepoints work; the response is held.
func TestTxCommitsWithResponse(t *testing.T) {
	env := newTxEnv(t)
	var runs atomic.Int32
	h := env.middleware(t, nil, env.insertVenue(t, &runs, func(ctx context.Context, tx pgx.Tx) {
		again, err := env.store.Tx(ctx)
		require.NoError(t, err)
		assert.Same(t, tx, again, "one transaction per attempt")
		assert.ErrorContains(t, tx.Commit(ctx), "committed by the store")
		assert.Zero(t, env.venues(t), "uncommitted while the handler runs")

		sp, err := tx.Begin(ctx) // a savepoint, given up
		require.NoError(t, err)
		_, err = sp.Exec(ctx, "INSERT INTO venues (name) VALUES ('given up')")
		require.NoError(t, err)
		require.NoError(t, sp.Rollback(ctx))

		claim, _ := idempotency.ClaimFromContext(ctx)
		assert.ErrorContains(t, claim.Checkpoint(ctx, "late", nil), "transaction is open", "a checkpoint would outlive the writes")
		assert.ErrorContains(t, env.store.Phase(ctx, "late", nil, func(pgx.Tx) error { return nil }), "transaction is open")
	}))

	w := serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
	assert.Equal(t, `{"run":1}`, w.Body.String())
	assert.Equal(t, idempotency.OutcomeExecuted, env.report(t).Outcome)
	assert.Equal(t, 1, env.venues(t))
	assert.Equal(t, 0, count(t, env.pool, "SELECT count(*) FROM venues WHERE name = 'given up'"))

	w = serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code)
	assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, int32(1), runs.Load())
	env.requireNoLeaks(t)
}

// TestTxKillBeforeCommit: the handler inserts a row in the claim's
// transaction, then the server terminates that transaction's backend
// before the commit, and the handler answers 201. The client gets 503
// (not the 201), nothing is committed, the key is free: the retry runs the
// handler again and gets 201, and a third request replays it.
func TestTxKillBeforeCommit(t *testing.T) {
	counter := &statementCounter{}
	env := newTxEnv(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = counter })
	var runs atomic.Int32
	var kill atomic.Bool
	kill.Store(true)
	var killedPID int32
	h := env.middleware(t, nil, env.insertVenue(t, &runs, func(ctx context.Context, tx pgx.Tx) {
		if !kill.CompareAndSwap(true, false) {
			return
		}
		require.NoError(t, tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&killedPID))
		var terminated bool
		require.NoError(t, env.pool.QueryRow(context.Background(), "SELECT pg_terminate_backend($1, 5000)", killedPID).Scan(&terminated))
		require.True(t, terminated, "the backend ended within 5 s")
	}))
	counter.Take()

	w := serve(h, post("k", `{"name":"Hall"}`))
	requireProblem(t, w, http.StatusServiceUnavailable)
	rep := env.report(t)
	assert.Equal(t, idempotency.OutcomeStoreError, rep.Outcome)
	sent := kinds(counter.Take())
	t.Logf("killed backend %d; client got %d %s; outcome %s: %v", killedPID, w.Code, w.Header().Get("Content-Type"), rep.Outcome, rep.Err)
	t.Logf("statements: %q", sent)
	assert.Equal(t, 1, countOf(sent, "complete"), "the completion is not sent again on another connection")
	assert.Equal(t, "release", sent[len(sent)-1], "the key is freed")
	assert.Zero(t, env.venues(t), "nothing committed")
	env.requireNoLeaks(t)

	w = serve(h, post("k", `{"name":"Hall"}`))
	require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
	assert.Equal(t, `{"run":2}`, w.Body.String(), "the retry ran the handler again")
	assert.Equal(t, 1, env.venues(t))
	env.report(t)

	w = serve(h, post("k", `{"name":"Hall"}`))
	require.Equal(t, http.StatusCreated, w.Code)
	assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, `{"run":2}`, w.Body.String())
	assert.Equal(t, 1, env.venues(t))
	assert.Equal(t, int32(2), runs.Load())
}

func countOf(list []string, s string) int {
	n := 0
	for _, v := range list {
		if v == s {
			n++
		}
	}
	return n
}

// noRenewals claims to renew leases and does not: its owners' leases lapse
// at the store while their handlers run on.
type noRenewals struct{ *pgstore.Store }

func (noRenewals) Extend(context.Context, string, string, time.Duration) error { return nil }

// TestTxLeaseLostBeforeCommit: the handler's lease lapses while it holds
// uncommitted writes, and another request takes the key over. The claim's
// transaction does not block that (it locks no row of the store). The
// late handler's commit is refused: nothing of it is committed and its
// client gets 503; the key holds the other request's response.
func TestTxLeaseLostBeforeCommit(t *testing.T) {
	env := newTxEnv(t)
	const lease = 300 * time.Millisecond
	inserted, proceed := make(chan struct{}), make(chan struct{})
	var runs atomic.Int32
	late := env.middleware(t, noRenewals{env.store}, env.insertVenue(t, &runs, func(context.Context, pgx.Tx) {
		close(inserted)
		<-proceed
	}), idempotency.Options{Lease: lease})
	other := &counted{}
	taker := env.middleware(t, nil, other.ServeHTTP, idempotency.Options{Lease: lease})

	done := make(chan *httptest.ResponseRecorder)
	go func() { done <- serve(late, post("k", `{}`)) }()
	<-inserted
	time.Sleep(lease + 100*time.Millisecond)
	w := serve(taker, post("k", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, "the lapsed key was taken over")
	assert.Equal(t, idempotency.OutcomeExecuted, env.report(t).Outcome)
	close(proceed)

	w = <-done
	requireProblem(t, w, http.StatusServiceUnavailable)
	rep := env.report(t)
	assert.Equal(t, idempotency.OutcomeLeaseLost, rep.Outcome)
	assert.ErrorIs(t, rep.Err, idempotency.ErrLeaseLost)
	t.Logf("late owner: %d, outcome %s: %v", w.Code, rep.Outcome, rep.Err)
	assert.Zero(t, env.venues(t), "the late owner's writes were rolled back")

	w = serve(taker, post("k", `{}`))
	assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, `{"execution":1}`, w.Body.String(), "the key holds the other request's response")
	env.report(t)
}

// TestTxHandlerFails: a handler that answers 500, or panics, after writing
// in the claim's transaction: its writes are rolled back, its client gets
// the 500, and the key is free for the retry.
func TestTxHandlerFails(t *testing.T) {
	for _, mode := range []string{"500", "panic"} {
		t.Run(mode, func(t *testing.T) {
			env := newTxEnv(t)
			var fail atomic.Bool
			fail.Store(true)
			var runs atomic.Int32
			h := env.middleware(t, nil, func(w http.ResponseWriter, r *http.Request) {
				ctx := r.Context()
				runs.Add(1)
				tx, err := env.store.Tx(ctx)
				require.NoError(t, err)
				_, err = tx.Exec(ctx, "INSERT INTO venues (name) VALUES ('Hall')")
				require.NoError(t, err)
				if fail.CompareAndSwap(true, false) {
					if mode == "panic" {
						panic("handler bug")
					}
					http.Error(w, "downstream failed", http.StatusInternalServerError)
					return
				}
				w.WriteHeader(http.StatusCreated)
			})
			w, recovered := servePanicking(h, post("k", `{}`))
			if mode == "panic" {
				assert.Equal(t, "handler bug", recovered)
			} else {
				assert.Equal(t, http.StatusInternalServerError, w.Code, "the client gets the 500")
			}
			assert.Equal(t, idempotency.OutcomeReleased, env.report(t).Outcome)
			assert.Zero(t, env.venues(t), "rolled back")
			env.requireNoLeaks(t)

			w = serve(h, post("k", `{}`))
			require.Equal(t, http.StatusCreated, w.Code, "the key was free: the handler ran again")
			assert.Equal(t, 1, env.venues(t))
			assert.Equal(t, int32(2), runs.Load())
			env.report(t)
		})
	}
}

// TestTxRolledBackByHandler: a handler that gives its writes up with
// Rollback still has its response stored.
func TestTxRolledBackByHandler(t *testing.T) {
	env := newTxEnv(t)
	h := env.middleware(t, nil, func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		tx, err := env.store.Tx(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, "INSERT INTO venues (id, name) VALUES (1, 'Hall'), (1, 'Hall')")
		require.Error(t, err, "a unique violation aborts the transaction")
		require.NoError(t, tx.Rollback(ctx))
		assert.ErrorIs(t, tx.Rollback(ctx), pgx.ErrTxClosed)
		_, err = env.store.Tx(ctx)
		assert.ErrorContains(t, err, "rolled back")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusConflict)
		w.Write([]byte(`{"error":"venue exists"}`))
	})
	w := serve(h, post("k", `{}`))
	require.Equal(t, http.StatusConflict, w.Code)
	assert.Equal(t, idempotency.OutcomeExecuted, env.report(t).Outcome)
	w = serve(h, post("k", `{}`))
	assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"), "stored without the writes")
	assert.Zero(t, env.venues(t))
	env.report(t)
}

// TestTxErrors: Tx without a claim, and for a claim that lost its key.
func TestTxErrors(t *testing.T) {
	env := newTxEnv(t)
	_, err := env.store.Tx(context.Background())
	assert.ErrorIs(t, err, idempotency.ErrNoClaim)
	err = env.store.Phase(context.Background(), "p", nil, func(pgx.Tx) error { return nil })
	assert.ErrorIs(t, err, idempotency.ErrNoClaim)

	h := env.middleware(t, nil, func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		// Another process ends the claim (as a lapsed lease would).
		exec(t, env.pool, "UPDATE idempotency_keys SET lease_expires_at = now(), expires_at = now()")
		_, err := env.store.Tx(ctx)
		assert.ErrorIs(t, err, idempotency.ErrLeaseLost)
		_, err = env.store.Tx(ctx)
		assert.ErrorIs(t, err, idempotency.ErrLeaseLost, "the same error again")
		w.WriteHeader(http.StatusCreated)
	})
	serve(h, post("k", `{}`))
	assert.Equal(t, idempotency.OutcomeLeaseLost, env.report(t).Outcome)
	env.requireNoLeaks(t)
}

// TestTxOrphaned: the handler's transaction outlives its attempt. Here
// the middleware has another Store than the one the handler called Tx on,
// so neither Complete nor Release reaches it; and a handler that goes on
// long after its context ended (the client left, WithCancelOnDisconnect).
// Once the grace is over the store ends the claim and rolls the
// transaction back: its connection returns to the pool, and no response
// is stored without its writes.
func TestTxOrphaned(t *testing.T) {
	t.Run("another store", func(t *testing.T) {
		env := newTxEnv(t)
		var logs bytes.Buffer
		var mu sync.Mutex
		handlerTx, err := pgstore.New(context.Background(), env.pool, pgstore.Options{Logger: slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))})
		require.NoError(t, err)
		handlerTx.SetOrphanGrace(100 * time.Millisecond)
		h := env.middleware(t, nil, func(w http.ResponseWriter, r *http.Request) {
			tx, err := handlerTx.Tx(r.Context())
			require.NoError(t, err)
			_, err = tx.Exec(r.Context(), "INSERT INTO venues (name) VALUES ('Hall')")
			require.NoError(t, err)
			w.WriteHeader(http.StatusCreated)
		})
		serve(h, post("k", `{}`))
		env.report(t)
		require.Eventually(t, func() bool { return env.pool.Stat().AcquiredConns() == 0 && handlerTx.OpenTxs() == 0 },
			2*time.Second, 5*time.Millisecond, "the orphaned transaction was rolled back")
		assert.Zero(t, env.venues(t))
		mu.Lock()
		assert.Contains(t, logs.String(), "another Store")
		mu.Unlock()
	})

	t.Run("handler outlives its context", func(t *testing.T) {
		env := newTxEnv(t)
		env.store.SetOrphanGrace(100 * time.Millisecond)
		var runs atomic.Int32
		started := make(chan struct{})
		h := env.middleware(t, nil, env.insertVenue(t, &runs, func(ctx context.Context, _ pgx.Tx) {
			if runs.Load() == 1 {
				close(started)
				<-ctx.Done()
				time.Sleep(300 * time.Millisecond)
			}
		}), idempotency.Options{CancelOnDisconnect: true})
		client, hangUp := context.WithCancel(context.Background())
		done := make(chan *httptest.ResponseRecorder)
		go func() { done <- serve(h, post("k", `{}`).WithContext(client)) }()
		<-started
		hangUp()
		<-done
		rep := env.report(t)
		assert.Equal(t, idempotency.OutcomeLeaseLost, rep.Outcome, "its response was not stored without its writes")
		assert.Zero(t, env.venues(t))

		w := serve(h, post("k", `{}`))
		require.Equal(t, http.StatusCreated, w.Code, "the key was freed")
		assert.Equal(t, 1, env.venues(t))
		env.report(t)
	})
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// phased is a handler in two phases: it creates a venue in a phase of its
// own (recovery point "venue_created", the venue's ID), then, in the
// claim's transaction, its account, and answers 201 with the venue's ID.
// crash, if set, runs between the two phases.
func (env *txEnv) phased(t *testing.T, claims chan<- idempotency.Claim, crash func()) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		claim, _ := idempotency.ClaimFromContext(ctx)
		claims <- claim
		venueID := string(claim.RecoveryData)
		if claim.RecoveryPoint != "venue_created" {
			require.NoError(t, env.pool.QueryRow(ctx, "SELECT nextval('venues_id_seq')::text").Scan(&venueID))
			err := env.store.Phase(ctx, "venue_created", []byte(venueID), func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "INSERT INTO venues (id, name) VALUES ($1::bigint, 'Hall')", venueID)
				return err
			})
			if !assert.NoError(t, err) {
				http.Error(w, err.Error(), idempotency.StatusCode(err))
				return
			}
		}
		if crash != nil {
			crash()
		}
		tx, err := env.store.Tx(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, "INSERT INTO venue_accounts (venue_id) VALUES ($1::bigint)", venueID)
		require.NoError(t, err)
		w.WriteHeader(http.StatusCreated)
		w.Write([]byte(venueID))
	}
}

// crashed is a process that died: it neither renews its leases nor frees
// its keys.
type crashed struct{ *pgstore.Store }

func (crashed) Extend(context.Context, string, string, time.Duration) error { return nil }
func (crashed) Release(context.Context, string, string) error               { return nil }

// TestPhaseRecovery: the first attempt commits its first phase (a venue
// and the recovery point naming it) and then crashes: it panics (the
// middleware releases the key, which suspends it) or its process dies
// (the lease lapses). Meanwhile another request under the key gets 422.
// The retry resumes from the recovery point: it creates no second venue,
// finishes the work and its response commits with the second phase.
func TestPhaseRecovery(t *testing.T) {
	const lease = 300 * time.Millisecond
	for _, mode := range []string{"panic", "process died"} {
		t.Run(mode, func(t *testing.T) {
			env := newTxEnv(t)
			claims := make(chan idempotency.Claim, 10)
			var crashes atomic.Int32
			crashes.Store(1)
			crash := func() {
				if crashes.Add(-1) == 0 {
					panic("crash after the first phase")
				}
			}
			var store idempotency.Store = env.store
			if mode == "process died" {
				store = crashed{env.store}
			}
			first := env.middleware(t, store, env.phased(t, claims, crash), idempotency.Options{Lease: lease})
			h := env.middleware(t, nil, env.phased(t, claims, nil), idempotency.Options{Lease: lease})

			_, recovered := servePanicking(first, post("k", `{"name":"Hall"}`))
			require.Equal(t, "crash after the first phase", recovered)
			claim := <-claims
			assert.Empty(t, claim.RecoveryPoint, "a fresh start")
			env.report(t)
			assert.Equal(t, 1, env.venues(t), "the first phase committed")
			venueID := fmt.Sprint(count(t, env.pool, "SELECT id FROM venues"))

			rec, err := env.store.Get(context.Background(), recordkey.Name("http", "", "k"))
			require.NoError(t, err)
			require.NotNil(t, rec)
			assert.Equal(t, "venue_created", rec.RecoveryPoint)
			assert.Equal(t, venueID, string(rec.RecoveryData))
			if mode == "process died" {
				assert.NotEmpty(t, rec.Token, "in flight until its lease lapses")
				requireProblem(t, serve(h, post("k", `{"name":"Hall"}`)), http.StatusConflict)
				env.report(t)
				time.Sleep(lease + 50*time.Millisecond)
			} else {
				assert.Empty(t, rec.Token, "suspended")
			}

			requireProblem(t, serve(h, post("k", `{"name":"Other"}`)), http.StatusUnprocessableEntity)
			env.report(t)

			w := serve(h, post("k", `{"name":"Hall"}`))
			require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
			assert.Equal(t, venueID, w.Body.String())
			claim = <-claims
			assert.Equal(t, "venue_created", claim.RecoveryPoint, "the retry resumed")
			assert.Equal(t, venueID, string(claim.RecoveryData))
			assert.Equal(t, 1, env.venues(t), "no second venue")
			assert.Equal(t, 1, count(t, env.pool, "SELECT count(*) FROM venue_accounts"))
			env.report(t)

			w = serve(h, post("k", `{"name":"Hall"}`))
			assert.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, venueID, w.Body.String())
			rec, err = env.store.Get(context.Background(), recordkey.Name("http", "", "k"))
			require.NoError(t, err)
			assert.Empty(t, rec.RecoveryPoint, "the stored response dropped the recovery point")
			env.report(t)
		})
	}
}

// TestPhaseRollsBack: a phase whose function fails, or whose claim lost
// its key meanwhile, commits nothing: neither its writes nor its recovery
// point.
func TestPhaseRollsBack(t *testing.T) {
	env := newTxEnv(t)
	const lease = 300 * time.Millisecond
	boom := errors.New("boom")
	var errs []error
	takenOver, proceed := make(chan struct{}), make(chan struct{})
	h := env.middleware(t, noRenewals{env.store}, func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		insert := func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO venues (name) VALUES ('Hall')")
			return err
		}
		errs = append(errs, env.store.Phase(ctx, "failed", nil, func(tx pgx.Tx) error {
			insert(tx)
			assert.Error(t, tx.Commit(ctx), "Phase commits")
			assert.Error(t, tx.Rollback(ctx), "Phase rolls back")
			return boom
		}))
		errs = append(errs, env.store.Phase(ctx, "", nil, insert))
		errs = append(errs, env.store.Phase(ctx, "too much", make([]byte, 64<<10+1), insert))
		close(takenOver)
		<-proceed
		errs = append(errs, env.store.Phase(ctx, "late", []byte("1"), insert))
		w.WriteHeader(http.StatusCreated)
	}, idempotency.Options{Lease: lease})

	done := make(chan struct{})
	go func() { defer close(done); serve(h, post("k", `{}`)) }()
	<-takenOver
	rec, err := env.store.Get(context.Background(), recordkey.Name("http", "", "k"))
	require.NoError(t, err)
	assert.Empty(t, rec.RecoveryPoint)
	time.Sleep(lease + 50*time.Millisecond)
	_, _, err = env.store.Acquire(context.Background(), recordkey.Name("http", "", "k"),
		idempotency.Record{Token: "other", Fingerprint: rec.Fingerprint}, time.Minute)
	require.NoError(t, err)
	close(proceed)
	<-done
	env.report(t)

	require.Len(t, errs, 4)
	assert.ErrorIs(t, errs[0], boom, "fn's error as it is")
	assert.ErrorContains(t, errs[1], "1 to 255 bytes")
	assert.ErrorContains(t, errs[2], "exceeds")
	assert.ErrorIs(t, errs[3], idempotency.ErrLeaseLost)
	assert.Zero(t, env.venues(t))
	rec, err = env.store.Get(context.Background(), recordkey.Name("http", "", "k"))
	require.NoError(t, err)
	assert.Equal(t, "other", rec.Token)
	assert.Empty(t, rec.RecoveryPoint)
}

// TestGet: what Inspector.Get returns for each state of a record.
func TestGet(t *testing.T) {
	store := newStore(t, testPool(t))
	ctx := context.Background()
	rec, err := store.Get(ctx, "k")
	require.NoError(t, err)
	assert.Nil(t, rec, "unseen")

	claim := idempotency.Record{Token: "tok", Fingerprint: "fp", CreatedAt: time.UnixMilli(time.Now().UnixMilli())}
	_, _, err = store.Acquire(ctx, "k", claim, time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Checkpoint(ctx, "k", "tok", "half", []byte{0, 1}, time.Hour))
	assert.Error(t, store.Checkpoint(ctx, "k", "tok", "bad\xff", nil, time.Hour), "not UTF-8")
	assert.Error(t, store.Checkpoint(ctx, "k", "tok", "nul\x00", nil, time.Hour))
	rec, err = store.Get(ctx, "k")
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, "tok", rec.Token)
	assert.Equal(t, "fp", rec.Fingerprint)
	assert.True(t, claim.CreatedAt.Equal(rec.CreatedAt))
	assert.InDelta(t, time.Minute, rec.LeaseLeft, float64(5*time.Second))
	assert.Equal(t, "half", rec.RecoveryPoint)
	assert.Equal(t, []byte{0, 1}, rec.RecoveryData)
	assert.Nil(t, rec.Response)

	require.NoError(t, store.Release(ctx, "k", "tok"))
	rec, err = store.Get(ctx, "k")
	require.NoError(t, err)
	require.NotNil(t, rec, "suspended")
	assert.Empty(t, rec.Token)
	assert.Zero(t, rec.LeaseLeft)
	assert.Equal(t, "half", rec.RecoveryPoint)

	fence, resumed, err := store.Acquire(ctx, "k", idempotency.Record{Token: "tok2", Fingerprint: "fp"}, time.Minute)
	require.NoError(t, err)
	assert.NotZero(t, fence)
	require.NotNil(t, resumed)
	assert.Equal(t, "half", resumed.RecoveryPoint)
	require.NoError(t, store.Complete(ctx, "k", "tok2", &idempotency.Record{Fingerprint: "fp",
		Response: &idempotency.Response{StatusCode: 201, Body: []byte("made")}}, time.Hour))
	rec, err = store.Get(ctx, "k")
	require.NoError(t, err)
	require.NotNil(t, rec.Response)
	assert.Equal(t, 201, rec.Response.StatusCode)
	assert.Equal(t, "made", string(rec.Response.Body))
	assert.Empty(t, rec.Token)
	assert.Empty(t, rec.RecoveryPoint)
}

// TestResumeResent: a claim that resumed a suspended record, sent again
// after its reply was lost, finds its own claim and the same recovery
// point.
func TestResumeResent(t *testing.T) {
	store := newStore(t, testPool(t))
	ctx := context.Background()
	first := idempotency.Record{Token: "t1", Fingerprint: "fp"}
	_, _, err := store.Acquire(ctx, "k", first, time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Checkpoint(ctx, "k", "t1", "half", []byte("x"), time.Hour))
	require.NoError(t, store.Release(ctx, "k", "t1"))

	second := idempotency.Record{Token: "t2", Fingerprint: "fp"}
	f1, r1, err := store.Acquire(ctx, "k", second, time.Minute)
	require.NoError(t, err)
	f2, r2, err := store.Acquire(ctx, "k", second, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, f1, f2)
	require.NotNil(t, r1)
	require.NotNil(t, r2)
	assert.Equal(t, "half", r2.RecoveryPoint)
	assert.Equal(t, []byte("x"), r2.RecoveryData)

	// Failing suspends it again, and the history counts.
	n, err := store.Fail(ctx, "k", "t2", "boom", time.Hour)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	deleted, err := store.DeleteExpired(ctx, 100)
	require.NoError(t, err)
	assert.Zero(t, deleted, "a suspended record is not deleted before its recovery point's TTL")
	_, rec, err := store.Acquire(ctx, "k", idempotency.Record{Token: "t3", Fingerprint: "other"}, time.Minute)
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, "fp", rec.Fingerprint)
	assert.Equal(t, "half", rec.RecoveryPoint)
	assert.Empty(t, rec.Token)
}

// TestTxCheckUnprepared: the check that Tx sends with BEGIN runs a
// statement prepared on the connection; a connection that lost it (a
// pooler between, DEALLOCATE) still opens the transaction, sending the
// check on its own.
func TestTxCheckUnprepared(t *testing.T) {
	env := newTxEnv(t, func(cfg *pgxpool.Config) { cfg.MaxConns = 1 })
	var runs atomic.Int32
	var lost atomic.Bool
	h := env.middleware(t, nil, func(w http.ResponseWriter, r *http.Request) {
		if lost.Load() {
			// The one connection forgets the check's statement.
			exec(t, env.pool, `DO $$ DECLARE n text; BEGIN
    FOR n IN SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgstore_holds_%' LOOP EXECUTE 'DEALLOCATE ' || n; END LOOP;
END $$`)
		}
		env.insertVenue(t, &runs, nil)(w, r)
	})
	require.Equal(t, http.StatusCreated, serve(h, post("k1", `{}`)).Code)
	env.report(t)
	lost.Store(true)
	w := serve(h, post("k2", `{}`))
	require.Equal(t, http.StatusCreated, w.Code, w.Body.String())
	assert.Equal(t, idempotency.OutcomeExecuted, env.report(t).Outcome)
	assert.Equal(t, 2, env.venues(t))
	assert.Zero(t, count(t, env.pool, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgstore_holds_%'"),
		"(on the one connection) the check ran without its statement")
}
