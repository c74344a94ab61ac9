package pgstore_test

import (
	"context"
	"crypto/rand"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// insertExpired inserts n rows past their expiry, and past the cleanup's
// grace after it, into idempotency_keys, half completed records past their
// TTL, half claims whose lease lapsed, and n/100 expired failure
// histories.
func insertExpired(t testing.TB, pool *pgxpool.Pool, prefix string, n int) {
	t.Helper()
	exec(t, pool, `INSERT INTO idempotency_keys (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at,
			response_status, response_body)
		SELECT convert_to($1 || i, 'UTF8'), 'tok', 'fp', nextval('idempotency_fence'),
			CASE WHEN i % 2 = 0 THEN 'completed' ELSE 'in_flight' END,
			CASE WHEN i % 2 = 0 THEN NULL ELSE now() - interval '1 hour' END,
			now() - interval '1 hour', now() - interval '1 day',
			CASE WHEN i % 2 = 0 THEN 201 END,
			CASE WHEN i % 2 = 0 THEN convert_to(repeat('x', 200), 'UTF8') END
		FROM generate_series(1, $2::int) AS i`, prefix, n)
	exec(t, pool, `INSERT INTO idempotency_failures (key, attempts, last_reason, last_token, failed_at, expires_at)
		SELECT convert_to($1 || i, 'UTF8'), 1, 'boom', 'tok', now() - interval '1 day', now() - interval '1 second'
		FROM generate_series(1, $2::int) AS i`, prefix, n/100)
}

// TestDeleteExpired deletes 20,000 expired rows in batches of 1,000 and
// reports the rate. Live claims and live records are never deleted: every
// live claim can still be extended afterwards.
func TestDeleteExpired(t *testing.T) {
	ctx := context.Background()
	counter := &statementCounter{}
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = counter })
	store := newStore(t, pool)

	live := make(map[string]string) // key: token
	for i := range 100 {
		claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
		key := "live-" + rand.Text()
		_, existing, err := store.Acquire(ctx, key, claim, time.Minute)
		require.NoError(t, err)
		require.Nil(t, existing)
		if i%2 == 0 { // half stay in flight, half are completed
			live[key] = claim.Token
			continue
		}
		rec := &idempotency.Record{Fingerprint: "fp", Response: &idempotency.Response{StatusCode: 201}}
		require.NoError(t, store.Complete(ctx, key, claim.Token, rec, time.Hour))
	}
	liveFailure := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
	_, _, err := store.Acquire(ctx, "live-failure", liveFailure, time.Minute)
	require.NoError(t, err)
	_, err = store.Fail(ctx, "live-failure", liveFailure.Token, "boom", time.Hour)
	require.NoError(t, err)

	const n = 20_000
	insertExpired(t, pool, "expired-", n)
	exec(t, pool, "ANALYZE idempotency_keys")
	counter.Take()

	start := time.Now()
	deleted, err := store.DeleteExpired(ctx, 1000)
	took := time.Since(start)
	require.NoError(t, err)
	assert.Equal(t, n+n/100, deleted)
	t.Logf("deleted %d expired rows in %v: %.0f rows/s (batches of 1000)", deleted, took, float64(deleted)/took.Seconds())
	// 20 full batches and an empty one from the records, one short batch
	// from the failures.
	assert.Len(t, counter.Take(), n/1000+1+1, "bounded batches, one statement each")

	assert.Equal(t, 100, count(t, pool, "SELECT count(*) FROM idempotency_keys WHERE expires_at > clock_timestamp()"), "every live row is left")
	assert.Equal(t, 1, count(t, pool, "SELECT count(*) FROM idempotency_keys WHERE expires_at <= clock_timestamp()"),
		"the failed claim's row, freed a moment ago, is left for the cleanup's grace")
	assert.Equal(t, 1, count(t, pool, "SELECT count(*) FROM idempotency_failures"))
	for key, token := range live {
		require.NoError(t, store.Extend(ctx, key, token, time.Minute), "the live claim %s is still held", key)
	}
	attempts, _, err := store.Failures(ctx, "live-failure")
	require.NoError(t, err)
	assert.Equal(t, 1, attempts)

	deleted, err = store.DeleteExpired(ctx, 1000)
	require.NoError(t, err)
	assert.Zero(t, deleted, "nothing left to delete")

	for _, batch := range []int{0, -1, 100_001} {
		_, err := store.DeleteExpired(ctx, batch)
		assert.Error(t, err, "batch %d", batch)
	}
}

// TestCleanupNeverTakesLiveClaims: cleanup runs in a loop, in small
// batches, while expired rows keep arriving and 20 owners keep their
// short-leased claims alive (and others take over lapsed ones). Every
// renewal of a live claim succeeds: cleanup never deleted one.
func TestCleanupNeverTakesLiveClaims(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pool := testPool(t, func(cfg *pgxpool.Config) { cfg.MaxConns = 8 })
	store := newStore(t, pool)

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		assert.NoError(t, store.RunCleanup(ctx, time.Millisecond, 10))
	}()
	wg.Add(1)
	go func() { // expired rows keep arriving
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			if _, err := pool.Exec(ctx, `INSERT INTO idempotency_keys (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at)
				SELECT convert_to($1 || i, 'UTF8'), 'tok', 'fp', 0, 'in_flight', t.now, t.now, now()
				FROM generate_series(1, 50) AS i, (SELECT clock_timestamp() AS now) AS t`, "lapsed-"+rand.Text()); err != nil && ctx.Err() == nil {
				t.Error(err)
				return
			}
		}
	}()

	const lease = 2 * time.Second
	deadline := time.Now().Add(2 * time.Second)
	var owners sync.WaitGroup
	for i := range 20 {
		owners.Add(1)
		go func() {
			defer owners.Done()
			key := "owned-" + string(rune('a'+i))
			for time.Now().Before(deadline) {
				claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp"}
				_, existing, err := store.Acquire(ctx, key, claim, lease)
				if !assert.NoError(t, err) || !assert.Nil(t, existing, "the previous owner released it") {
					return
				}
				for range 5 {
					time.Sleep(5 * time.Millisecond)
					if !assert.NoError(t, store.Extend(ctx, key, claim.Token, lease), "a live claim was deleted") {
						return
					}
				}
				if !assert.NoError(t, store.Release(ctx, key, claim.Token)) {
					return
				}
			}
		}()
	}
	owners.Wait()
	cancel()
	wg.Wait()
	assert.Zero(t, count(t, pool, `SELECT count(*) FROM idempotency_keys
		WHERE convert_from(key, 'UTF8') LIKE 'owned-%' AND expires_at > clock_timestamp()`), "every owner released its key")
}

func TestRunCleanup(t *testing.T) {
	pool := testPool(t)
	store := newStore(t, pool)
	ctx, cancel := context.WithCancel(context.Background())
	assert.Error(t, store.RunCleanup(ctx, 0, 100))
	assert.Error(t, store.RunCleanup(ctx, time.Second, 0))

	insertExpired(t, pool, "expired-", 500)
	done := make(chan error)
	go func() { done <- store.RunCleanup(ctx, 20*time.Millisecond, 100) }()
	require.Eventually(t, func() bool {
		return count(t, pool, "SELECT count(*) FROM idempotency_keys") == 0
	}, 5*time.Second, 10*time.Millisecond)
	insertExpired(t, pool, "later-", 300) // the next passes find these
	require.Eventually(t, func() bool {
		return count(t, pool, "SELECT count(*) FROM idempotency_keys") == 0
	}, 5*time.Second, 10*time.Millisecond)
	cancel()
	assert.NoError(t, <-done, "RunCleanup returns when its context ends")
}
