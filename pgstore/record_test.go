package pgstore_test

import (
	"context"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// dropChecks drops the CHECK constraints of idempotency_keys (in the
// test's own schema), so that a test can write the rows a damaged
// database, or another version's, might hold.
func dropChecks(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	exec(t, pool, `DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'idempotency_keys'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE idempotency_keys DROP CONSTRAINT %I', c.conname);
    END LOOP;
END $$`)
}

// complete stores a 201 with a header under key, through the store.
func complete(t *testing.T, store *pgstore.Store, key string) idempotency.Record {
	t.Helper()
	ctx := context.Background()
	claim := idempotency.Record{Token: "owner-" + key, Fingerprint: "fp", CreatedAt: time.Now()}
	_, existing, err := store.Acquire(ctx, key, claim, time.Minute)
	require.NoError(t, err)
	require.Nil(t, existing)
	rec := &idempotency.Record{Fingerprint: claim.Fingerprint, CreatedAt: claim.CreatedAt, Response: &idempotency.Response{
		StatusCode: http.StatusCreated, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(`{}`),
	}}
	require.NoError(t, store.Complete(ctx, key, claim.Token, rec, time.Hour))
	return claim
}

// TestUnreadableRecord: a live row that the store cannot have written
// makes Acquire and Get fail with ErrRecordUnreadable (500), not with a
// store failure, and never replays it; the row is left as it is, until
// Remove deletes it and the key can be claimed again. Statuses 200 and 999
// are the bounds of what replays.
func TestUnreadableRecord(t *testing.T) {
	pool := testPool(t)
	dropChecks(t, pool)
	store := newStore(t, pool)
	ctx := context.Background()
	tests := []struct {
		name     string
		set      string // an UPDATE's SET clause for the completed row
		replayed int    // the status replayed, 0 when unreadable
	}{
		{"status 0", "response_status = 0", 0},
		{"status -1", "response_status = -1", 0},
		{"status 1000", "response_status = 1000", 0},
		{"status 101", "response_status = 101", 0},
		{"status 199", "response_status = 199", 0},
		{"status NULL", "response_status = NULL", 0},
		{"header of an unknown version", `response_headers = '\x02'::bytea`, 0},
		{"header truncated", `response_headers = '\x010105'::bytea`, 0},
		{"unknown state", "status = 'archived'", 0},
		{"in flight without a lease", "status = 'in_flight', lease_expires_at = NULL", 0},
		{"in flight without an owner", "status = 'in_flight', token = '', lease_expires_at = clock_timestamp() + interval '1 hour'", 0},
		{"status 200", "response_status = 200", 200},
		{"status 999", "response_status = 999", 999},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := "k " + tt.name
			claim := complete(t, store, key)
			exec(t, pool, "UPDATE idempotency_keys SET "+tt.set+" WHERE key = $1", []byte(key))
			row := func() string {
				var s string
				require.NoError(t, pool.QueryRow(ctx, "SELECT k::text FROM idempotency_keys AS k WHERE key = $1", []byte(key)).Scan(&s))
				return s
			}
			stored := row()
			retry := idempotency.Record{Token: "retry", Fingerprint: claim.Fingerprint, CreatedAt: time.Now()}

			fence, existing, acquireErr := store.Acquire(ctx, key, retry, time.Minute)
			got, getErr := store.Get(ctx, key)
			if tt.replayed != 0 {
				require.NoError(t, acquireErr)
				require.NotNil(t, existing)
				require.NotNil(t, existing.Response)
				assert.Equal(t, tt.replayed, existing.Response.StatusCode)
				require.NoError(t, getErr)
				assert.Equal(t, existing, got)
				return
			}
			for op, err := range map[string]error{"acquire": acquireErr, "get": getErr} {
				require.ErrorIs(t, err, idempotency.ErrRecordUnreadable, op)
				assert.NotErrorIs(t, err, idempotency.ErrStoreUnavailable, op)
				assert.Equal(t, http.StatusInternalServerError, idempotency.StatusCode(err), op)
			}
			assert.Zero(t, fence)
			assert.Nil(t, existing)
			assert.Nil(t, got)
			t.Log(acquireErr)
			assert.Equal(t, stored, row(), "the row is left as it was")

			require.NoError(t, store.Remove(ctx, key))
			fence, existing, err := store.Acquire(ctx, key, retry, time.Minute)
			require.NoError(t, err)
			assert.Positive(t, fence, "claimed after Remove")
			assert.Nil(t, existing)
		})
	}
}

// TestUnreadableRecordMiddleware: a retry of a request whose stored
// status is 0 (WriteHeader would panic) or 101 (an interim response)
// gets 500 and is not replayed, nor run again, until Middleware.Remove
// deletes the record: then it runs afresh.
func TestUnreadableRecordMiddleware(t *testing.T) {
	for _, status := range []int{0, 101} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			pool := testPool(t)
			handler := &counted{}
			reports := make(chan idempotency.Report, 10)
			m := newMiddleware(t, newStore(t, pool), idempotency.Options{Observer: func(_ context.Context, r idempotency.Report) { reports <- r }})
			h := m.Handler(handler)
			require.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
			<-reports
			exec(t, pool, "UPDATE idempotency_keys SET response_status = $1", status)

			w, recovered := servePanicking(h, post("k", `{}`))
			require.Nil(t, recovered)
			requireProblem(t, w, http.StatusInternalServerError)
			assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, int32(1), handler.calls.Load())
			rep := <-reports
			assert.Equal(t, idempotency.OutcomeUnreadable, rep.Outcome)

			require.NoError(t, m.Remove(context.Background(), rep.Scope, "k"))
			w = serve(h, post("k", `{}`))
			assert.Equal(t, http.StatusCreated, w.Code, "runs afresh after Remove")
			assert.Equal(t, int32(2), handler.calls.Load())
		})
	}
}

// TestRemove: Remove deletes what is under a key in any state, in one
// statement: the row, its recovery point, its failure history. The
// owner of a claim removed in flight has lost it; other keys stay; a
// missing key is no error.
func TestRemove(t *testing.T) {
	counter := &statementCounter{}
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = counter })
	store := newStore(t, pool)
	ctx := context.Background()
	claim := func(key, token string) idempotency.Record {
		t.Helper()
		c := idempotency.Record{Token: token, Fingerprint: "fp", CreatedAt: time.Now()}
		fence, existing, err := store.Acquire(ctx, key, c, time.Minute)
		require.NoError(t, err)
		require.Nil(t, existing)
		require.Positive(t, fence)
		return c
	}
	remove := func(key string) {
		t.Helper()
		counter.Take()
		require.NoError(t, store.Remove(ctx, key))
		assert.Len(t, counter.Take(), 1, "one statement")
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		assert.Nil(t, rec)
		attempts, reason, err := store.Failures(ctx, key)
		require.NoError(t, err)
		assert.Zero(t, attempts)
		assert.Empty(t, reason)
		assert.Zero(t, count(t, pool, `SELECT (SELECT count(*) FROM idempotency_keys WHERE key = $1)
			+ (SELECT count(*) FROM idempotency_failures WHERE key = $1)`, []byte(key)))
		claim(key, "after") // free again, nothing to resume
	}
	complete(t, store, "other") // stays

	t.Run("completed", func(t *testing.T) {
		complete(t, store, "completed")
		remove("completed")
	})
	t.Run("in flight", func(t *testing.T) {
		owner := claim("in flight", "owner")
		remove("in flight")
		require.ErrorIs(t, store.Extend(ctx, "in flight", owner.Token, time.Minute), idempotency.ErrLeaseLost)
		require.ErrorIs(t, store.Release(ctx, "in flight", owner.Token), idempotency.ErrLeaseLost)
	})
	t.Run("suspended with a recovery point", func(t *testing.T) {
		owner := claim("suspended", "owner")
		require.NoError(t, store.Checkpoint(ctx, "suspended", owner.Token, "charged", []byte("ch_1"), time.Hour))
		require.NoError(t, store.Release(ctx, "suspended", owner.Token))
		rec, err := store.Get(ctx, "suspended")
		require.NoError(t, err)
		require.NotNil(t, rec)
		require.Equal(t, "charged", rec.RecoveryPoint)
		remove("suspended")
	})
	t.Run("with a failure history", func(t *testing.T) {
		owner := claim("failed", "owner")
		attempts, err := store.Fail(ctx, "failed", owner.Token, "boom", time.Hour)
		require.NoError(t, err)
		require.Equal(t, 1, attempts)
		claim("failed", "second") // in flight again, one failure counted
		remove("failed")
	})
	t.Run("missing key", func(t *testing.T) {
		remove("missing")
	})

	rec, err := store.Get(ctx, "other")
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, http.StatusCreated, rec.Response.StatusCode)
}
