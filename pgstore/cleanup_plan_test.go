package pgstore_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

// TestCleanupUsesTheExpiryIndex: with 20,000 live records, none expired,
// a cleanup batch finds its rows through the expires_at indexes instead of
// reading both tables whole; at 24 h of retention a table holds millions
// of rows, and the cleanup runs every few seconds.
func TestCleanupUsesTheExpiryIndex(t *testing.T) {
	pool := pgtest.Pool(t, pgtest.Config(t), migrate)
	store := newStore(t, pool)
	ctx := context.Background()
	for _, fill := range []string{
		`INSERT INTO idempotency_keys (key, token, fingerprint, fence, status, expires_at, created_at, completed_at, response_status)
		 SELECT convert_to('k' || i, 'UTF8'), '\x01', '\x02', i, 'completed', now() + interval '1 day', now(), now(), 201
		 FROM generate_series(1, 20000) AS i`,
		`INSERT INTO idempotency_failures (key, attempts, last_reason, last_token, failed_at, expires_at)
		 SELECT convert_to('k' || i, 'UTF8'), 1, 'panic', '\x01', now(), now() + interval '1 day'
		 FROM generate_series(1, 20000) AS i`,
		`ANALYZE idempotency_keys`,
		`ANALYZE idempotency_failures`,
	} {
		_, err := pool.Exec(ctx, fill)
		require.NoError(t, err)
	}
	for stmt, args := range store.CleanupStatements(1000) {
		rows, err := pool.Query(ctx, "EXPLAIN "+stmt, args...)
		require.NoError(t, err)
		var plan strings.Builder
		for rows.Next() {
			var line string
			require.NoError(t, rows.Scan(&line))
			plan.WriteString(line + "\n")
		}
		require.NoError(t, rows.Err())
		require.NotContains(t, plan.String(), "Seq Scan", "a cleanup batch reads its table whole:\n%s\n%s", stmt, plan.String())
		require.Contains(t, plan.String(), "_expires_at", "the batch is found through the expiry index:\n%s", plan.String())
	}
	deleted, err := store.DeleteExpired(ctx, 1000)
	require.NoError(t, err)
	require.Zero(t, deleted, "no record has expired")
}
