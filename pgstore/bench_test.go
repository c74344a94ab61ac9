package pgstore_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/seed70ea8305/idempotency/internal/benchtest"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
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
// on PostgreSQL is from the floor's statements ([pgtest.FloorClaim] and the others) on the same pool,
// both run in every iteration: a first request against a claim and a
// completion, a replay against one SELECT, and a first request whose
// handler inserts a row in the claim's transaction ([pgstore.Store.Tx])
// against a claim, then BEGIN, the handler's INSERT, the completion and
// COMMIT. The handler's own statement runs on both sides.
func BenchmarkPostgresOverhead(b *testing.B) {
	ctx := context.Background()
	pool := testPool(b)
	exec(b, pool, pgtest.FloorTable)
	exec(b, pool, "CREATE TABLE bench_venues (key text, body bytea)")
	const insert = "INSERT INTO bench_venues (key, body) VALUES ($1, $2)"
	store := newStore(b, pool)
	h := newMiddleware(b, store).Handler(benchHandler())
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
	h.ServeHTTP(httptest.NewRecorder(), benchRequest("replay"))
	keys, txKeys := benchtest.Keys("first-", b.N), benchtest.Keys("tx-", b.N)
	token, fingerprint, header := []byte("0123456789abcdef0123456789abcdef"), make([]byte, 32), []byte("\x00\x01Content-Type\x00\x10application/json")
	bare := func(q interface {
		Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
	}, sql string, args ...any) {
		if _, err := q.Exec(ctx, sql, args...); err != nil {
			b.Fatal(err)
		}
	}
	floorFirst := func(key []byte) {
		bare(pool, pgtest.FloorClaim, key, token, fingerprint)
		bare(pool, pgtest.FloorComplete, key, token, int32(http.StatusCreated), header, benchBody)
	}
	floorReplayOnce := func() {
		var (
			status          string
			tok, fp, hd, bd []byte
			code            int32
		)
		if err := pool.QueryRow(ctx, pgtest.FloorReplay, []byte("replay")).Scan(&status, &tok, &fp, &code, &hd, &bd); err != nil {
			b.Fatal(err)
		}
	}
	floorTx := func(key []byte) {
		bare(pool, pgtest.FloorClaim, key, token, fingerprint)
		tx, err := pool.Begin(ctx)
		if err != nil {
			b.Fatal(err)
		}
		bare(tx, insert, string(key), benchBody)
		bare(tx, pgtest.FloorComplete, key, token, int32(http.StatusCreated), header, benchBody)
		if err := tx.Commit(ctx); err != nil {
			b.Fatal(err)
		}
	}
	floorFirst([]byte("replay")) // the statements prepared
	floorReplayOnce()
	floorTx([]byte("warm-up"))
	var floorFirstT, first, floorReplayT, replay, floorTxT, firstTx time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		key := []byte(keys[i])
		floorFirstT += benchtest.Timed(func() { floorFirst(key) })
		first += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), benchRequest(keys[i])) })
		floorReplayT += benchtest.Timed(floorReplayOnce)
		replay += benchtest.Timed(func() { h.ServeHTTP(httptest.NewRecorder(), benchRequest("replay")) })
		floorTxT += benchtest.Timed(func() { floorTx([]byte(txKeys[i])) })
		firstTx += benchtest.Timed(func() { inTx.ServeHTTP(httptest.NewRecorder(), benchRequest(txKeys[i])) })
	}
	n := float64(b.N)
	b.ReportMetric(benchtest.Micros(floorFirstT)/n, "floor-first-µs")
	b.ReportMetric(benchtest.Micros(first-floorFirstT)/n, "first-over-floor-µs")
	b.ReportMetric(benchtest.Micros(floorReplayT)/n, "floor-replay-µs")
	b.ReportMetric(benchtest.Micros(replay-floorReplayT)/n, "replay-over-floor-µs")
	b.ReportMetric(benchtest.Micros(floorTxT)/n, "floor-tx-µs")
	b.ReportMetric(benchtest.Micros(firstTx-floorTxT)/n, "tx-over-floor-µs")
}
