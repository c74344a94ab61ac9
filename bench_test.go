package idempotency_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// Benchmarks compare the middleware with the same handler unwrapped. Run:
//
//	go test -run '^$' -bench . -benchmem
//	IDEMPOTENCY_TEST_REDIS_URL=redis://127.0.0.1:6379/0 go test -run '^$' -bench Redis -benchmem

const benchBody = `{"name":"Concert Hall","slug":"concert-hall","capacity":1200}`

func benchHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		w.Write([]byte(`{"id":"venue_1","name":"Concert Hall","slug":"concert-hall","stripe_account_id":"acct_1"}`))
	})
}

func benchRequest(key string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(benchBody))
	r.Header.Set("Content-Type", "application/json")
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	return r
}

func BenchmarkBaseline(b *testing.B) {
	h := benchHandler()
	b.ReportAllocs()
	for b.Loop() {
		h.ServeHTTP(httptest.NewRecorder(), benchRequest(""))
	}
}

func BenchmarkMemory(b *testing.B) {
	benchmarkStore(b, idempotency.NewMemoryStore())
}

func BenchmarkRedis(b *testing.B) {
	client := redistest.Client(b)
	// The floor: one go-redis round trip with nothing else around it.
	b.Run("ping", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := client.Ping(b.Context()).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	store := newRedisStore(b, client)
	// The store's own round trips, without HTTP or the middleware: a claim
	// and a completion, then a claim that finds the record.
	b.Run("store-first", func(b *testing.B) {
		ctx := b.Context()
		resp := &idempotency.Record{Fingerprint: "fp", Response: &idempotency.Response{StatusCode: 201, Body: []byte(benchBody)}}
		b.ReportAllocs()
		for b.Loop() {
			key := "store-" + strconv.Itoa(int(time.Now().UnixNano()))
			claim := idempotency.Record{Token: key, Fingerprint: "fp"}
			if _, _, err := store.Acquire(ctx, key, claim, time.Minute); err != nil {
				b.Fatal(err)
			}
			if err := store.Complete(ctx, key, claim.Token, resp, time.Hour); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("store-replay", func(b *testing.B) {
		ctx := b.Context()
		b.ReportAllocs()
		for b.Loop() {
			if _, existing, err := store.Acquire(ctx, "store-replay", idempotency.Record{Token: "t"}, time.Minute); err != nil {
				b.Fatal(err)
			} else if existing == nil {
				b.StopTimer()
				store.Complete(ctx, "store-replay", "t", &idempotency.Record{Response: &idempotency.Response{StatusCode: 201}}, time.Hour)
				b.StartTimer()
			}
		}
	})
	benchmarkStore(b, store)
}

func benchmarkStore(b *testing.B, store idempotency.Store) {
	h := newMiddleware(b, store).Handler(benchHandler())
	var seq atomic.Int64

	b.Run("first", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			h.ServeHTTP(httptest.NewRecorder(), benchRequest("first-"+strconv.FormatInt(seq.Add(1), 10)))
		}
	})
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
	b.Run("first-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				h.ServeHTTP(httptest.NewRecorder(), benchRequest("par-"+strconv.FormatInt(seq.Add(1), 10)))
			}
		})
	})
}
