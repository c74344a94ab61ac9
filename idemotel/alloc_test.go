package idemotel_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"go.opentelemetry.io/otel/metric/noop"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
)

// The allocations metrics add to a request, over the same middleware
// without them, on the memory store: measured by TestAllocations and
// reported by it with -v. The observer adds none (attribute sets and
// option lists are cached; the SDK's counters and histograms update in
// place), and must add none. The observer with the wrapped store, with or
// without WithTracing (no recording span: the span events cost only when
// a span records), may add at most allocBudgetWrapped; it adds none
// today: the wrapper allocates nothing and has Unwrap, through which the
// engine finds the MemoryStore inside and keeps its fast path. A wrapper
// without Unwrap (the passthrough row) costs the store timeout's context
// and timer, 4 allocations per store call, and would break the budget.
const (
	allocBudgetObserver = 0
	allocBudgetWrapped  = 2 // observer and wrapped store, first request or replay
)

// allocsPerRequest returns the allocations per request h makes; key(i) is
// the key of the i-th request.
func allocsPerRequest(t *testing.T, h http.Handler, key func(i int) string) float64 {
	t.Helper()
	const runs = 300
	reqs := make([]*http.Request, runs+1) // AllocsPerRun runs once more to warm up
	for i := range reqs {
		reqs[i] = newRequest(key(i), body)
	}
	i := 0
	return testing.AllocsPerRun(runs, func() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, reqs[i])
		i++
		if w.Code != http.StatusCreated {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	})
}

// TestAllocations measures the allocations per request of the middleware
// without metrics (idemotel unused: the core is unchanged, so is this
// number), with the observer on a no-op provider and on the SDK, and with
// the SDK and the wrapped store, for first requests and replays.
func TestAllocations(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts are for a full run")
	}
	if raceEnabled {
		t.Skip("the race detector allocates on its own; run without -race")
	}
	sdk, _ := newMetrics(t)
	traced, _ := newMetrics(t, idemotel.WithTracing())
	nop, err := idemotel.New(noop.NewMeterProvider())
	if err != nil {
		t.Fatal(err)
	}
	setups := []struct {
		name  string
		build func() http.Handler
	}{
		{"no metrics", func() http.Handler {
			return serveMux(middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(created))
		}},
		{"observer, no-op provider", func() http.Handler {
			return serveMux(middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: nop.ObserveRequest}).Handler(created))
		}},
		{"observer, SDK", func() http.Handler {
			return serveMux(middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: sdk.ObserveRequest}).Handler(created))
		}},
		{"observer and wrapped store, SDK", func() http.Handler {
			return serveMux(middleware(t, sdk.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: sdk.ObserveRequest}).Handler(created))
		}},
		{"passthrough store, no metrics", func() http.Handler {
			return serveMux(middleware(t, passthrough{idempotency.NewMemoryStore(idempotency.MemoryOptions{})}).Handler(created))
		}},
		{"observer, wrapped store, tracing", func() http.Handler {
			return serveMux(middleware(t, traced.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: traced.ObserveRequest}).Handler(created))
		}},
	}
	first := make([]float64, len(setups))
	replay := make([]float64, len(setups))
	for i, s := range setups {
		h := s.build()
		first[i] = allocsPerRequest(t, h, func(n int) string { return "first-" + strconv.Itoa(n) })
		serve(h, newRequest("replay", body))
		replay[i] = allocsPerRequest(t, h, func(int) string { return "replay" })
		t.Logf("%-34s first request %3.0f allocs (+%.0f), replay %3.0f allocs (+%.0f)", s.name, first[i], first[i]-first[0], replay[i], replay[i]-replay[0])
	}
	check := func(what string, got, budget float64) {
		if got > budget {
			t.Errorf("%s: %.0f extra allocations per request, budget %.0f", what, got, budget)
		}
	}
	check("observer, no-op provider, first", first[1]-first[0], allocBudgetObserver)
	check("observer, no-op provider, replay", replay[1]-replay[0], allocBudgetObserver)
	check("observer, SDK, first", first[2]-first[0], allocBudgetObserver)
	check("observer, SDK, replay", replay[2]-replay[0], allocBudgetObserver)
	check("observer and wrapped store, first", first[3]-first[0], allocBudgetWrapped)
	check("observer and wrapped store, replay", replay[3]-replay[0], allocBudgetWrapped)
	check("observer, wrapped store and tracing, first", first[5]-first[0], allocBudgetWrapped)
	check("observer, wrapped store and tracing, replay", replay[5]-replay[0], allocBudgetWrapped)
}

// passthrough hides a store's type, as any wrapper does.
type passthrough struct{ idempotency.Store }
