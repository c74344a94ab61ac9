package idemotel_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
)

// Metrics for a middleware and its store, read here with a ManualReader;
// a service passes its exporter's reader (Prometheus, OTLP) instead.
func Example() {
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer provider.Shutdown(context.Background())

	m, err := idemotel.New(provider)
	if err != nil {
		panic(err)
	}
	mw, err := idempotency.New(m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), idempotency.Options{Observer: m.ObserveRequest})
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /venues", mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	})))

	for range 3 { // the first runs the handler; the retries get its response
		r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(`{"name":"Hall"}`))
		r.Header.Set("Idempotency-Key", "venue-1")
		mux.ServeHTTP(httptest.NewRecorder(), r)
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		panic(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, metric := range sm.Metrics {
			if sum, ok := metric.Data.(metricdata.Sum[int64]); ok && metric.Name == "idempotency.requests" {
				for _, dp := range sum.DataPoints {
					outcome, _ := dp.Attributes.Value("outcome")
					route, _ := dp.Attributes.Value("http.route")
					fmt.Printf("%s{outcome=%s, http.route=%q} %d\n", metric.Name, outcome.AsString(), route.AsString(), dp.Value)
				}
			}
		}
	}
	// Unordered output:
	// idempotency.requests{outcome=executed, http.route="POST /venues"} 1
	// idempotency.requests{outcome=replayed, http.route="POST /venues"} 2
}

// An observer of the application's own, an audit log here, that also
// feeds the metrics: WithObserver keeps one observer.
func ExampleMetrics_ObserveRequest() {
	m, err := idemotel.New(sdkmetric.NewMeterProvider())
	if err != nil {
		panic(err)
	}
	_, err = idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: func(ctx context.Context, r idempotency.Report) {
		m.ObserveRequest(ctx, r)
		if r.Outcome == idempotency.OutcomeReplayed {
			fmt.Println("replayed", r.Route)
		}
	}},
	)
	fmt.Println(err)
	// Output: <nil>
}
