package idempotency_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"strings"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/benchtest"
)

// BenchmarkHeldResponse measures what holding a response until it is
// stored costs a client, against the same route with WithStreaming: the
// time to the first byte of the response and to its last, seen by a real
// client over loopback, each iteration running both modes on fresh keys
// so a noisy machine moves both alike. Two handlers: the usual small JSON
// 201, and a 64 KiB response written in four flushed chunks. Run:
//
//	go test -run '^$' -bench HeldResponse -benchmem
//	IDEMPOTENCY_TEST_REDIS_URL=redis://127.0.0.1:6379/0 go test -run '^$' -bench HeldResponse -benchmem
//
// A held response costs its first byte the rest of the handler and the
// store's write; what it holds in memory is the body the recorder keeps
// for the store in either mode, up to WithMaxStoredBytes.
func BenchmarkHeldResponse(b *testing.B) {
	chunk := strings.Repeat("x", 16<<10)
	handlers := map[string]http.Handler{
		"small": allocHandler(),
		"64KiB-flushed": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			rc := http.NewResponseController(w)
			for range 4 {
				io.WriteString(w, chunk)
				rc.Flush()
			}
		}),
	}
	stores := map[string]func(b *testing.B) idempotency.Store{
		"memory": func(*testing.B) idempotency.Store { return benchMemoryStore() },
		"redis":  func(b *testing.B) idempotency.Store { return newRedisStore(b, benchRedisClient(b)) },
	}
	for storeName, newStore := range stores {
		for handlerName, handler := range handlers {
			b.Run(storeName+"/"+handlerName, func(b *testing.B) {
				store := newStore(b)
				held := httptest.NewServer(newMiddleware(b, store).Handler(handler))
				defer held.Close()
				streamed := httptest.NewServer(newMiddleware(b, store, idempotency.Options{Streaming: true}).Handler(handler))
				defer streamed.Close()
				keys := benchtest.Keys("held-", b.N)
				var heldFirst, heldLast, streamedFirst, streamedLast time.Duration
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					first, last := timeResponse(b, held, "h"+keys[i])
					heldFirst, heldLast = heldFirst+first, heldLast+last
					first, last = timeResponse(b, streamed, "s"+keys[i])
					streamedFirst, streamedLast = streamedFirst+first, streamedLast+last
				}
				n := float64(b.N)
				b.ReportMetric(benchtest.Micros(heldFirst)/n, "held-ttfb-µs")
				b.ReportMetric(benchtest.Micros(streamedFirst)/n, "streamed-ttfb-µs")
				b.ReportMetric(benchtest.Micros(heldLast)/n, "held-total-µs")
				b.ReportMetric(benchtest.Micros(streamedLast)/n, "streamed-total-µs")
			})
		}
	}
}

// timeResponse sends one POST with key and returns the time to the
// response's first byte and to its last.
func timeResponse(b *testing.B, srv *httptest.Server, key string) (first, last time.Duration) {
	req, err := http.NewRequest(http.MethodPost, srv.URL+"/venues", strings.NewReader(allocRequestBody))
	if err != nil {
		b.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	start := time.Now()
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
		GotFirstResponseByte: func() { first = time.Since(start) },
	}))
	resp, err := srv.Client().Do(req)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		b.Fatal(err)
	}
	resp.Body.Close()
	last = time.Since(start)
	if resp.StatusCode >= 300 {
		b.Fatalf("status %d", resp.StatusCode)
	}
	return first, last
}

// discard is a response writer that keeps nothing, so that what a
// benchmark allocates is the middleware's.
type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(p []byte) (int, error) { return len(p), nil }
func (d *discard) WriteHeader(int)             {}

// BenchmarkHeldResponseMemory reports the bytes the middleware allocates
// per request, held and streamed, for the 64 KiB response of
// BenchmarkHeldResponse: the memory a request in flight takes.
func BenchmarkHeldResponseMemory(b *testing.B) {
	chunk := strings.Repeat("x", 16<<10)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for range 4 {
			io.WriteString(w, chunk)
		}
	})
	for name, opts := range map[string]idempotency.Options{"held": {}, "streamed": {Streaming: true}} {
		b.Run(name, func(b *testing.B) {
			h := newMiddleware(b, benchMemoryStore(), opts).Handler(handler)
			keys := benchtest.Keys(name, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				h.ServeHTTP(&discard{h: http.Header{}}, allocRequest(keys[i]))
			}
		})
	}
}
