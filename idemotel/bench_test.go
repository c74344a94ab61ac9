package idemotel_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/seed70ea8305/idempotency"
)

// BenchmarkMiddleware runs the middleware on a MemoryStore without
// metrics (the baseline), with the metrics observer (SDK, ManualReader
// never collected), with the observer and the wrapped store, and with a
// bare passthrough store wrapper (what a wrapped MemoryStore costs the
// engine, metrics aside). Bare is the handler alone.
//
//	go test -run '^$' -bench . -benchmem -count 8 ./idemotel
func BenchmarkMiddleware(b *testing.B) {
	sdk, _ := newMetrics(b)
	setups := []struct {
		name string
		h    func() http.Handler
	}{
		{"bare", func() http.Handler { return serveMux(created) }},
		{"no-metrics", func() http.Handler {
			return serveMux(middleware(b, idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})).Handler(created))
		}},
		{"observer", func() http.Handler {
			return serveMux(middleware(b, idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1}), idempotency.Options{Observer: sdk.ObserveRequest}).Handler(created))
		}},
		{"observer+store", func() http.Handler {
			return serveMux(middleware(b, sdk.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})), idempotency.Options{Observer: sdk.ObserveRequest}).Handler(created))
		}},
		{"passthrough-store", func() http.Handler {
			return serveMux(middleware(b, passthrough{idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})}).Handler(created))
		}},
	}
	for _, s := range setups {
		b.Run(s.name+"/first", func(b *testing.B) {
			h := s.h()
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				serveBench(b, h, newRequest("first-"+strconv.Itoa(i), body))
			}
		})
		b.Run(s.name+"/replay", func(b *testing.B) {
			h := s.h()
			serveBench(b, h, newRequest("replay", body))
			b.ReportAllocs()
			for b.Loop() {
				serveBench(b, h, newRequest("replay", body))
			}
		})
		b.Run(s.name+"/first-parallel", func(b *testing.B) {
			h := s.h()
			var n atomic.Int64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					serveBench(b, h, newRequest("parallel-"+strconv.FormatInt(n.Add(1), 10), body))
				}
			})
		})
	}
}

func serveBench(b *testing.B, h http.Handler, r *http.Request) {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusCreated {
		b.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

// BenchmarkObserveRequest is the observer alone, for one report, against
// the SDK: what metrics add to every request.
func BenchmarkObserveRequest(b *testing.B) {
	sdk, _ := newMetrics(b)
	r := idempotency.Report{Outcome: idempotency.OutcomeExecuted, Method: "POST", Route: route, Status: 201, Duration: 3e6}
	ctx := newRequest("k", body).Context()
	b.ReportAllocs()
	for b.Loop() {
		sdk.ObserveRequest(ctx, r)
	}
}
