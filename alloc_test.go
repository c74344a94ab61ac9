package idempotency_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// The allocation budget of the middleware on the memory store, counted
// as issue 9 defines it: the wrapped handler serving a fresh httptest
// request and recorder, less the bare handler serving the same, for a
// ~100-byte JSON request and a 200-byte JSON 201 with a Content-Type.
// Making the key string is not counted (the keys are made beforehand).
const (
	allocBudgetFirst  = 8
	allocBudgetReplay = 3

	// allocWarmRecords are stored before the count, so that it is of a
	// store in use and not of one growing from empty.
	allocWarmRecords = 20_000
)

var (
	allocRequestBody  = `{"name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Lisbon","currency":"eur"}`
	allocResponseBody = []byte(`{"id":"venue_1","name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Lisbon","currency":"eur","stripe_account_id":"acct_1Nv0FGQ9RKHgCVdK","charges_enabled":false,"created":"2026-11-27T12:00:00Z"}`)
)

func allocHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		w.Write(allocResponseBody)
	})
}

func allocRequest(key string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(allocRequestBody))
	r.Header.Set("Content-Type", "application/json")
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	return r
}

// allocsOver returns the allocations per request of h over the bare
// handler; key(i) is the key of the i-th request.
func allocsOver(t *testing.T, h http.Handler, key func(i int) string) float64 {
	t.Helper()
	const runs = 200
	bare := allocHandler()
	base := testing.AllocsPerRun(runs, func() { bare.ServeHTTP(httptest.NewRecorder(), allocRequest("k")) })
	keys := make([]string, runs+1) // AllocsPerRun runs once more to warm up
	for i := range keys {
		keys[i] = key(i)
	}
	i := 0
	wrapped := testing.AllocsPerRun(runs, func() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, allocRequest(keys[i]))
		i++
		if w.Code != http.StatusCreated {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	})
	return wrapped - base
}

func TestAllocationBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts are for a full run")
	}
	if raceEnabled {
		t.Skip("the race detector allocates on its own; run without -race")
	}
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(allocHandler())
	// A store in use: its maps and heaps have grown past the sizes where
	// each new record would make them grow again.
	for i := range allocWarmRecords {
		serve(h, allocRequest("warm-"+strconv.Itoa(i)))
	}
	first := allocsOver(t, h, func(i int) string { return "first-" + strconv.Itoa(i) })
	serve(h, allocRequest("replay"))
	replay := allocsOver(t, h, func(int) string { return "replay" })
	t.Logf("extra allocations over the bare handler: first request %.0f, replay %.0f", first, replay)
	if first > allocBudgetFirst {
		t.Errorf("first request: %.0f extra allocations, budget %d", first, allocBudgetFirst)
	}
	if replay > allocBudgetReplay {
		t.Errorf("replay: %.0f extra allocations, budget %d", replay, allocBudgetReplay)
	}
}

// bytesBudgetPerRecord is the most live heap a record of
// TestAllocationBudget's shape (a UUID key, a 200-byte JSON body with a
// Content-Type) may take in the memory store, everything the store and
// the middleware keep for it included.
const bytesBudgetPerRecord = 700

// TestMemoryBytesPerRecord measures, through the middleware, the live
// heap that stored records take in a MemoryStore: the heap after
// storing them less the heap before, per record.
func TestMemoryBytesPerRecord(t *testing.T) {
	if testing.Short() {
		t.Skip("a heap measurement is for a full run")
	}
	if raceEnabled {
		t.Skip("the race detector allocates on its own; run without -race")
	}
	const n = 50_000
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i) // as long as a UUID
	}
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxBytes: -1})
	h := newMiddleware(t, store).Handler(allocHandler())
	before := liveHeap()
	for _, key := range keys {
		if w := serve(h, allocRequest(key)); w.Code != http.StatusCreated {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	}
	perRecord := float64(liveHeap()-before) / n
	runtime.KeepAlive(keys)
	t.Logf("live heap per stored record: %.0f bytes (%d records; the store counts %d)", perRecord, store.Len(), store.Bytes()/int64(store.Len()))
	require.Equal(t, n, store.Len())
	if perRecord > bytesBudgetPerRecord {
		t.Errorf("%.0f bytes per record, budget %d", perRecord, bytesBudgetPerRecord)
	}
	runtime.KeepAlive(h)
}
