package pgstore_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed70ea8305/idempotency/internal/benchtest"
)

// Benchmarks of the middleware on PostgreSQL. Run:
//
//	IDEMPOTENCY_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test?sslmode=disable \
//		go test -run '^$' -bench . -benchmem ./pgstore
//
// BenchmarkPostgresOverhead interleaves the bare statements that are the
// floor with the middleware in every iteration and reports the
// differences, so that a noisy machine moves both sides alike.

// benchHandler answers a 200-byte JSON 201, like the root's benchmarks.
var benchBody = []byte(`{"id":"v_1","object":"venue","name":"Hall","capacity":1200,"city":"Lyon","stripe_account":"acct_1Example","created":1700000000,"metadata":{"source":"benchmark","region":"eu-west"},"features":["stage","bar"]}`)

func benchHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		w.Write(benchBody)
	})
}

func benchRequest(key string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(`{"name":"Hall","capacity":1200,"city":"Lyon","metadata":{"source":"benchmark"}}`))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Idempotency-Key", key)
	return r
}

// BenchmarkPostgres measures the middleware on PostgreSQL: a first
// request and a replay of a handler that writes nothing, and a first
// request of a handler that inserts one row, in the claim's transaction
// (first-tx: the row commits with the response) or in a transaction of its
// own that it commits before answering (first-own-tx: the same work
// without the atomicity, for comparison).
func BenchmarkPostgres(b *testing.B) {
	pool := testPool(b)
	exec(b, pool, "CREATE TABLE bench_venues (key text, body bytea)")
	store := newStore(b, pool)
	h := newMiddleware(b, store).Handler(benchHandler())
	const insert = "INSERT INTO bench_venues (key, body) VALUES ($1, $2)"
	inTx := newMiddleware(b, store).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tx, err := store.Tx(r.Context())
		if err != nil {
			b.Error(err)
			return
		}
		if _, err := tx.Exec(r.Context(), insert, r.Header.Get("Idempotency-Key"), benchBody); err != nil {
			b.Error(err)
		}
		benchHandler().ServeHTTP(w, r)
	}))
	ownTx := newMiddleware(b, store).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := pgx.BeginFunc(r.Context(), pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(r.Context(), insert, r.Header.Get("Idempotency-Key"), benchBody)
			return err
		})
		if err != nil {
			b.Error(err)
		}
		benchHandler().ServeHTTP(w, r)
	}))
	first := func(h http.Handler) func(b *testing.B) {
		return func(b *testing.B) {
			keys := benchtest.Keys(b.Name()+"-", b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				w := httptest.NewRecorder()
				h.ServeHTTP(w, benchRequest(keys[i]))
				if w.Code != http.StatusCreated {
					b.Fatalf("status %d", w.Code)
				}
			}
		}
	}
	b.Run("first", first(h))
	b.Run("first-tx", first(inTx))
	b.Run("first-own-tx", first(ownTx))
	b.Run("replay", func(b *testing.B) {
		h.ServeHTTP(httptest.NewRecorder(), benchRequest("replay"))
		b.ReportAllocs()
		for b.Loop() {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, benchRequest("replay"))
			if w.Code != http.StatusCreated {
				b.Fatalf("status %d", w.Code)
			}
		}
	})
}

// BenchmarkPostgresOverhead reports, per request, how far the middleware
// on PostgreSQL is from bare INSERT … ON CONFLICT round trips on the same
// pool: a first request against two of them (one that inserts a new key,
// one that updates it: the claim, then the completion), a replay against
// one that finds the key and writes nothing.
func BenchmarkPostgresOverhead(b *testing.B) {
	ctx := context.Background()
	pool := testPool(b)
	exec(b, pool, "CREATE TABLE bench_floor (key bytea PRIMARY KEY, value bytea)")
	// claim: inserts a new key, or (replay) finds it and writes nothing;
	// complete: writes the existing key's row.
	const (
		claim    = "INSERT INTO bench_floor (key) VALUES ($1) ON CONFLICT (key) DO NOTHING"
		complete = "INSERT INTO bench_floor (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
	)
	h := newMiddleware(b, newStore(b, pool)).Handler(benchHandler())
	h.ServeHTTP(httptest.NewRecorder(), benchRequest("replay"))
	keys := benchtest.Keys("first-", b.N)
	bare := func(sql string, args ...any) {
		if _, err := pool.Exec(ctx, sql, args...); err != nil {
			b.Fatal(err)
		}
	}
	bare(claim, []byte("warm-up")) // the statements prepared
	bare(complete, []byte("warm-up"), benchBody)
	var floorFirst, first, floorReplay, replay time.Duration
	b.ResetTimer()
	for i := range b.N {
		key := []byte(keys[i])
		floorFirst += benchtest.Timed(func() { bare(claim, key); bare(complete, key, benchBody) })
		first += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), benchRequest(keys[i])) })
		floorReplay += benchtest.Timed(func() { bare(claim, key) })
		replay += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), benchRequest("replay")) })
	}
	n := float64(b.N)
	b.ReportMetric(benchtest.Micros(floorFirst)/n, "floor-first-µs")
	b.ReportMetric(benchtest.Micros(first-floorFirst)/n, "first-over-floor-µs")
	b.ReportMetric(benchtest.Micros(floorReplay)/n, "floor-replay-µs")
	b.ReportMetric(benchtest.Micros(replay-floorReplay)/n, "replay-over-floor-µs")
}
