package idempotency_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/benchtest"
)

// BenchmarkWebhookProviders reports the time to acknowledge a new event
// through the synchronous handler on the memory store, with a function
// that does nothing, for each provider's verifier, interleaved in every
// iteration so the machine's noise moves all alike: the cost of each
// signature scheme and payload decoding against Stripe's path. Signing is
// not timed. Run:
//
//	go test -run '^$' -bench WebhookProviders -benchmem
func BenchmarkWebhookProviders(b *testing.B) {
	handlers := make([]http.Handler, len(providers))
	for i, p := range providers {
		h, err := idempotency.NewWebhookHandler(benchMemoryStore(), p.v(b), func(context.Context, idempotency.WebhookEvent) error { return nil }, idempotency.WebhookOptions{})
		if err != nil {
			b.Fatal(err)
		}
		handlers[i] = h
	}
	type delivery struct {
		payload []byte
		header  http.Header
	}
	run := strconv.FormatInt(time.Now().UnixNano(), 36)
	deliveries := make([][]delivery, len(providers))
	for i, p := range providers {
		deliveries[i] = make([]delivery, b.N)
		for n := range b.N {
			id := "evt_" + run + "_" + strconv.Itoa(n)
			payload := eventFor(p.name, id)
			deliveries[i][n] = delivery{payload, p.deliver(id, payload)}
		}
	}
	spent := make([]time.Duration, len(providers))
	b.ResetTimer()
	for n := range b.N {
		for i := range providers {
			d := deliveries[i][n]
			req := httptest.NewRequest(http.MethodPost, "/webhooks", bytes.NewReader(d.payload))
			req.Header = d.header
			rec := httptest.NewRecorder()
			spent[i] += benchtest.Timed(func() { handlers[i].ServeHTTP(rec, req) })
			if rec.Code != http.StatusOK {
				b.Fatalf("%s: %d %s", providers[i].name, rec.Code, rec.Body)
			}
		}
	}
	for i, p := range providers {
		b.ReportMetric(benchtest.Micros(spent[i])/float64(b.N), p.name+"-µs")
		b.ReportMetric(float64(spent[i])/float64(spent[0]), p.name+"/stripe")
	}
}
