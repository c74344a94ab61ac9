package pgstore_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// TestFiguresClaimShape splits the claim of a new key's cost over the
// floor's INSERT: the same statements, each on a new key, interleaved
// 2,000 times on one pool, timed from the client. Run:
//
//	PGSTORE_FIGURES=1 IDEMPOTENCY_TEST_DATABASE_URL=... go test -count=1 -run TestFiguresClaimShape -v ./pgstore
//
// "plain INSERT" is the claim's INSERT into pgstore's table without the
// statement around it (the CTE that also reads an existing key's row);
// "without nextval" also leaves out the fence. The gaps between the rows
// are what the table and the statement's shape cost.
func TestFiguresClaimShape(t *testing.T) {
	if os.Getenv("PGSTORE_FIGURES") == "" {
		t.Skip("PGSTORE_FIGURES not set: skipping the claim's measurements")
	}
	pool := pgtest.Pool(t, pgtest.Config(t), migrate)
	exec(t, pool, pgtest.FloorTable)
	const plain = `INSERT INTO idempotency_keys (key, token, fingerprint, fence, status, lease_expires_at, expires_at, created_at)
SELECT $1::bytea, $2::bytea, $3::bytea, nextval('idempotency_fence'), 'in_flight', t + interval '1 minute', t + interval '1 minute', now()
FROM clock_timestamp() AS t
ON CONFLICT (key_hash) DO NOTHING`
	token, fingerprint := []byte("0123456789abcdef0123456789abcdef"), make([]byte, 32)
	three := func(key []byte) []any { return []any{key, token, fingerprint} }
	rows := []struct {
		name string
		sql  string
		args func(key []byte) []any
	}{
		{"floor INSERT", pgtest.FloorClaim, three},
		{"claim", pgstore.ClaimStatement(""), func(key []byte) []any {
			return []any{key, token, fingerprint, time.Now(), int64(time.Minute / time.Microsecond), nil, "5000"}
		}},
		{"plain INSERT", plain, three},
		{"plain INSERT without nextval", strings.Replace(plain, "nextval('idempotency_fence')", "1", 1), three},
	}
	const n = 2000
	took := make([]time.Duration, len(rows))
	for i := range n {
		for j, row := range rows {
			key := []byte(fmt.Sprintf("%d-%d", j, i))
			start := time.Now()
			run(t, pool, row.sql, row.args(key)...)
			took[j] += time.Since(start)
		}
	}
	for j, row := range rows {
		t.Logf("%-30s %6.0f µs (%.2f × the floor)", row.name, float64(took[j].Microseconds())/n, float64(took[j])/float64(took[0]))
	}
}

// run sends sql and reads its rows, if any, to the end.
func run(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	rows, err := pool.Query(context.Background(), sql, args...)
	if err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
}
