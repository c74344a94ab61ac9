package idemotel_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
	"github.com/seed70ea8305/idempotency/internal/overlay"
)

// The route the tests serve, and a request path with an identifier in it
// that must never become a label.
const (
	route       = "POST /venues/{id}/bookings"
	path        = "/venues/ven_secret_path_42/bookings"
	scopeHeader = "X-Tenant-ID"
	scope       = "tenant-secret-scope"
	body        = `{"seats":2}`
	secret      = "whsec_test_secret"
)

// newMetrics returns Metrics on an SDK provider read by a ManualReader.
func newMetrics(t testing.TB, opts ...idemotel.Option) (*idemotel.Metrics, *sdkmetric.ManualReader) {
	t.Helper()
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { provider.Shutdown(context.Background()) })
	m, err := idemotel.New(provider, opts...)
	require.NoError(t, err)
	return m, reader
}

// series names one data point: the instrument's name and its attributes,
// given as name, value pairs, in the SDK's encoding (sorted k=v pairs).
// Histograms are named with a "#count" suffix: their value is the count.
func series(name string, kv ...any) string {
	attrs := make([]attribute.KeyValue, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		k := attribute.Key(kv[i].(string))
		switch v := kv[i+1].(type) {
		case string:
			attrs = append(attrs, k.String(v))
		case int:
			attrs = append(attrs, k.Int(v))
		default:
			panic(fmt.Sprintf("series: %T", v))
		}
	}
	set := attribute.NewSet(attrs...)
	return name + "{" + set.Encoded(attribute.DefaultEncoder()) + "}"
}

// collected is what a reader collected: every counter's value and every
// histogram's count, by series, and every attribute value seen.
type collected struct {
	values map[string]int64
	bounds map[string][]float64 // histogram name: its bucket bounds
	attrs  []string             // every attribute as k=v
}

func collect(t testing.TB, reader *sdkmetric.ManualReader) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	c := collected{values: map[string]int64{}, bounds: map[string][]float64{}}
	seen := func(set attribute.Set) string {
		for _, kv := range set.ToSlice() {
			c.attrs = append(c.attrs, string(kv.Key)+"="+kv.Value.Emit())
		}
		return set.Encoded(attribute.DefaultEncoder())
	}
	for _, sm := range rm.ScopeMetrics {
		require.Equal(t, idemotel.ScopeName, sm.Scope.Name)
		for _, m := range sm.Metrics {
			switch data := m.Data.(type) {
			case metricdata.Sum[int64]:
				require.True(t, data.IsMonotonic, m.Name)
				for _, dp := range data.DataPoints {
					c.values[m.Name+"{"+seen(dp.Attributes)+"}"] += dp.Value
				}
			case metricdata.Histogram[float64]:
				for _, dp := range data.DataPoints {
					c.values[m.Name+"#count{"+seen(dp.Attributes)+"}"] += int64(dp.Count)
					c.bounds[m.Name] = dp.Bounds
				}
			default:
				t.Fatalf("%s: unexpected data %T", m.Name, m.Data)
			}
		}
	}
	for k, v := range c.values {
		if v == 0 {
			delete(c.values, k)
		}
	}
	return c
}

// only returns the values of the series whose names start with prefix.
func (c collected) only(prefix string) map[string]int64 {
	out := map[string]int64{}
	for k, v := range c.values {
		if strings.HasPrefix(k, prefix) {
			out[k] = v
		}
	}
	return out
}

func (c collected) String() string {
	keys := make([]string, 0, len(c.values))
	for k := range c.values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %d\n", k, c.values[k])
	}
	return b.String()
}

// requestSeries names the requests counter's series for the test route.
func requestSeries(outcome idempotency.Outcome, status int, errorType string) string {
	kv := []any{"outcome", string(outcome), "http.request.method", "POST", "http.route", route, "http.response.status_code", status}
	if errorType != "" {
		kv = append(kv, "error.type", errorType)
	}
	return series("idempotency.requests", kv...)
}

// durationSeries names the handler duration histogram's series.
func durationSeries(outcome idempotency.Outcome, status int, errorType string) string {
	return strings.Replace(requestSeries(outcome, status, errorType), "idempotency.requests", "idempotency.handler.duration#count", 1)
}

// storeSeries names the store duration histogram's series (errors:
// "idempotency.store.errors").
func storeSeries(name, kind, op, errorType string) string {
	kv := []any{"operation", op, "store", kind}
	if name != "idempotency.store.errors" {
		name += "#count"
	}
	if errorType != "" {
		kv = append(kv, "error.type", errorType)
	}
	return series(name, kv...)
}

// newRequest is a request to the test route, in the test scope, with key
// (none when empty).
func newRequest(key, body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set(scopeHeader, scope)
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	return r
}

// serveMux mounts h on the test route, so requests carry its pattern.
func serveMux(h http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle(route, h)
	return mux
}

func serve(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// middleware is the middleware on store, scoped by the tenant header.
func middleware(t testing.TB, store idempotency.Store, opts ...idempotency.Options) *idempotency.Middleware {
	t.Helper()
	scoped := idempotency.Options{Scope: func(r *http.Request) string { return r.Header.Get(scopeHeader) }}
	mw, err := idempotency.New(store, overlay.Merge(append([]idempotency.Options{scoped}, opts...)...))
	require.NoError(t, err)
	return mw
}

// created answers 201 with a small JSON body.
var created = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	w.Write([]byte(`{"id":"bkg_1"}`))
})

// event is a signed Stripe event with the given id.
func event(id string) (payload []byte, signature string) {
	payload = fmt.Appendf(nil, `{"id":%q,"object":"event","type":"account.updated","api_version":%q,"created":%d,"data":{"object":{"id":"acct_1","object":"account"}}}`,
		id, stripe.APIVersion, time.Now().Unix())
	signed := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: time.Now()})
	return payload, signed.Header
}

func delivery(payload []byte, signature string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/webhooks/stripe", strings.NewReader(string(payload)))
	r.Header.Set("Stripe-Signature", signature)
	return r
}

// faultyStore is a store whose calls can be made to fail.
type faultyStore struct {
	idempotency.Store
	acquire, extend, complete func() error // nil: pass through
}

func (s *faultyStore) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	if s.acquire != nil {
		if err := s.acquire(); err != nil {
			return 0, nil, err
		}
	}
	return s.Store.Acquire(ctx, key, claim, lease)
}

func (s *faultyStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if s.extend != nil {
		if err := s.extend(); err != nil {
			return err
		}
	}
	return s.Store.Extend(ctx, key, token, lease)
}

func (s *faultyStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if s.complete != nil {
		if err := s.complete(); err != nil {
			return err
		}
	}
	return s.Store.Complete(ctx, key, token, rec, ttl)
}
