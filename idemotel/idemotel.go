// Package idemotel exports what the idempotency middleware and webhook
// helper do as OpenTelemetry metrics, and marks it on the current trace
// span. It lives in its own package so that the core package links no
// OpenTelemetry code: a program that does not import idemotel pays
// nothing, and one that does depends on the OpenTelemetry metric and trace
// APIs only; the SDK and the exporter are the program's choice.
//
// Build one [Metrics] per meter provider, then give its observers to the
// middleware and to the webhook handler, and wrap the store to time its
// calls:
//
//	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter)) // e.g. the Prometheus exporter
//	m, err := idemotel.New(provider)
//	if err != nil {
//		return err
//	}
//	store := m.Store(idempotency.NewMemoryStore(idempotency.MemoryOptions{})) // optional: store call metrics
//	mw, err := idempotency.New(store, idempotency.Options{Observer: m.ObserveRequest})
//	if err != nil {
//		return err
//	}
//	wh, err := idempotency.NewWebhookHandler(store, verifier, process, idempotency.WebhookOptions{Observer: m.ObserveWebhook})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /venues", mw.Handler(http.HandlerFunc(createVenue)))
//	mux.Handle("POST /webhooks/stripe", wh)
//
// An observer of your own can call [Metrics.ObserveRequest] or
// [Metrics.ObserveWebhook] too.
//
// # Instruments
//
// Names follow OpenTelemetry's conventions (dots, base units, UCUM
// annotations); the Prometheus exporter turns dots into underscores, adds
// the unit to histograms and _total to counters.
//
//	OpenTelemetry                  Prometheus                                 what
//	idempotency.requests           idempotency_requests_total                 middleware requests, by outcome
//	idempotency.handler.duration   idempotency_handler_duration_seconds       how long the wrapped handler ran
//	idempotency.webhook.deliveries idempotency_webhook_deliveries_total       webhook deliveries, by outcome
//	idempotency.webhook.duration   idempotency_webhook_duration_seconds       how long the webhook function ran
//	idempotency.lease.lost         idempotency_lease_lost_total               attempts that lost their claim
//	idempotency.store.duration     idempotency_store_duration_seconds         store calls ([Metrics.Store] only)
//	idempotency.store.errors       idempotency_store_errors_total             failed store calls ([Metrics.Store] only)
//	idempotency.lease.renewals     idempotency_lease_renewals_total           lease renewals, Extend ([Metrics.Store] only)
//
// Requests, deliveries and their durations carry outcome (the
// [idempotency.Outcome]), http.request.method (the method, or "_OTHER" for
// one outside RFC 9110 and PATCH), http.route (the ServeMux pattern,
// [idempotency.Report].Route, when there is one), http.response.status_code
// (when a status was sent) and error.type (see below). Durations are
// recorded only when the handler or function ran. idempotency.lease.lost
// carries kind ("http" or "webhook") and outcome: "lease_lost" when the
// work finished but its claim had lapsed, "released" when its context was
// cancelled with [idempotency.ErrLeaseLost] and it was cut short. Store
// instruments carry operation ("acquire", "extend", "complete", "release",
// "fail", "failures", "checkpoint", "get"), store ("memory", "redis", or the Go type of another
// store) and, for failed calls, error.type.
//
// error.type is low-cardinality by construction: for reports, the
// package's sentinel error that Report.Err wraps, in snake case
// ("key_missing", "fingerprint_mismatch", "store_unavailable", ...), and
// absent when it wraps none (a handler that answered 500 is told apart by
// its status); for store calls, "lease_lost", "timeout", "canceled" or
// "_OTHER".
//
// No instrument and no span attribute carries an Idempotency-Key, a scope,
// an event ID or a request path: keys would let a reader of the metrics
// fetch stored responses, and all of them would make a series per request.
package idemotel

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/seed70ea8305/idempotency"
)

// ScopeName is the instrumentation scope of the meter that [New] takes
// from its provider.
const ScopeName = "github.com/seed70ea8305/idempotency/idemotel"

// Attribute keys of the instruments. The http.* and error.type keys are
// OpenTelemetry's semantic conventions.
const (
	outcomeKey   = attribute.Key("outcome")
	methodKey    = attribute.Key("http.request.method")
	routeKey     = attribute.Key("http.route")
	statusKey    = attribute.Key("http.response.status_code")
	errorTypeKey = attribute.Key("error.type")
	kindKey      = attribute.Key("kind")
	operationKey = attribute.Key("operation")
	storeKindKey = attribute.Key("store")
	providerKey  = attribute.Key("webhook.provider")
	apiVerKey    = attribute.Key("stripe.api_version")
)

// defaultDurationBuckets are the bucket boundaries, in seconds, of the
// handler and webhook function durations: those OpenTelemetry's HTTP
// semantic conventions advise for http.server.request.duration.
func defaultDurationBuckets() []float64 {
	return []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}
}

// defaultStoreBuckets are the bucket boundaries, in seconds, of the store
// call durations: from 100 µs (a memory store, a Redis round trip on
// loopback) to 5 s (past the default store timeout of 3 s).
func defaultStoreBuckets() []float64 {
	return []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}
}

// Metrics records the outcomes the middleware and the webhook helper
// report, and the store calls they make, as OpenTelemetry instruments. It
// is safe for concurrent use; create it with [New] (the zero Metrics is
// not usable). One Metrics may serve any number of middlewares, webhook
// handlers and stores.
type Metrics struct {
	requests        metric.Int64Counter
	requestDuration metric.Float64Histogram
	deliveries      metric.Int64Counter
	webhookDuration metric.Float64Histogram
	leaseLost       metric.Int64Counter
	storeDuration   metric.Float64Histogram
	storeErrors     metric.Int64Counter
	renewals        metric.Int64Counter

	tracing bool

	// attributes caches the attribute set of each combination of report
	// attributes seen, so a request costs no allocation for them. The
	// combinations are few (outcomes × methods × routes × statuses); the
	// cache stops growing at maxCachedSets all the same.
	mu         sync.RWMutex
	attributes map[reportAttrs]measurement
}

// measurement holds the options of a measurement with one attribute set,
// as the slices the instruments' variadic methods take: passing them
// whole costs no allocation, where a new option list would escape to the
// heap on every call.
type measurement struct {
	add    []metric.AddOption
	record []metric.RecordOption
}

func newMeasurement(set attribute.Set) measurement {
	opt := metric.WithAttributeSet(set)
	return measurement{add: []metric.AddOption{opt}, record: []metric.RecordOption{opt}}
}

// maxCachedSets bounds the attribute set cache; past it, sets are built
// for each report.
const maxCachedSets = 4096

// Option configures [New].
type Option func(*config) error

type config struct {
	tracing         bool
	durationBuckets []float64
	storeBuckets    []float64
}

// WithTracing adds the outcome of each request or delivery to the span in
// the request's context ([trace.SpanFromContext]), when that span is
// recording: the attributes idempotency.outcome and idempotency.replayed
// (true for a replayed response or a duplicate delivery), and, for a
// webhook whose function failed, idempotency.webhook.failed_attempts.
// A store wrapped by [Metrics.Store] adds, for each call, an event named
// idempotency.store at the call's start, with the attributes
// idempotency.store.operation ("acquire", "extend", ...),
// idempotency.store.kind ("memory", "redis", ...),
// idempotency.store.duration (seconds) and, for a failed call,
// error.type. It starts no span of its own. The span is whatever the server's tracing
// (otelhttp, for one) put in the request's context, whichever tracer
// provider made it. Default: spans are not touched.
func WithTracing() Option {
	return func(c *config) error {
		c.tracing = true
		return nil
	}
}

// WithDurationBuckets sets the bucket boundaries, in seconds and
// ascending, of idempotency.handler.duration and
// idempotency.webhook.duration. The SDK uses them unless a view overrides
// them. Default: those OpenTelemetry's HTTP semantic conventions advise
// for http.server.request.duration, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
// 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5 and 10 s.
func WithDurationBuckets(bounds ...float64) Option {
	return func(c *config) error {
		c.durationBuckets = slices.Clone(bounds)
		return checkBuckets("duration", bounds)
	}
}

// WithStoreBuckets sets the bucket boundaries, in seconds and ascending,
// of idempotency.store.duration. The SDK uses them unless a view overrides
// them. Default: 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250 and 500 ms,
// 1, 2.5 and 5 s: from a memory store or a Redis round trip on loopback to
// past the default store timeout (3 s).
func WithStoreBuckets(bounds ...float64) Option {
	return func(c *config) error {
		c.storeBuckets = slices.Clone(bounds)
		return checkBuckets("store", bounds)
	}
}

func checkBuckets(what string, bounds []float64) error {
	if len(bounds) == 0 {
		return fmt.Errorf("idemotel: no %s buckets", what)
	}
	for i := 1; i < len(bounds); i++ {
		if !(bounds[i] > bounds[i-1]) {
			return fmt.Errorf("idemotel: %s buckets are not ascending: %v", what, bounds)
		}
	}
	return nil
}

// New creates the instruments with a meter named [ScopeName] from
// provider. Pass otel.GetMeterProvider() to use the global provider.
func New(provider metric.MeterProvider, opts ...Option) (*Metrics, error) {
	if provider == nil {
		return nil, errors.New("idemotel: meter provider is nil")
	}
	c := config{durationBuckets: defaultDurationBuckets(), storeBuckets: defaultStoreBuckets()}
	for _, opt := range opts {
		if opt == nil {
			return nil, errors.New("idemotel: nil Option")
		}
		if err := opt(&c); err != nil {
			return nil, err
		}
	}
	meter := provider.Meter(ScopeName)
	m := &Metrics{tracing: c.tracing, attributes: make(map[reportAttrs]measurement)}
	var errs []error
	add := func(err error) { errs = append(errs, err) }
	var err error

	m.requests, err = meter.Int64Counter("idempotency.requests", metric.WithUnit("{request}"),
		metric.WithDescription("Requests the idempotency middleware handled, by outcome."))
	add(err)
	m.requestDuration, err = meter.Float64Histogram("idempotency.handler.duration", metric.WithUnit("s"),
		metric.WithDescription("How long the handler wrapped by the idempotency middleware ran."),
		metric.WithExplicitBucketBoundaries(c.durationBuckets...))
	add(err)
	m.deliveries, err = meter.Int64Counter("idempotency.webhook.deliveries", metric.WithUnit("{delivery}"),
		metric.WithDescription("Stripe webhook deliveries the idempotency webhook handler handled, by outcome."))
	add(err)
	m.webhookDuration, err = meter.Float64Histogram("idempotency.webhook.duration", metric.WithUnit("s"),
		metric.WithDescription("How long the webhook function ran."),
		metric.WithExplicitBucketBoundaries(c.durationBuckets...))
	add(err)
	m.leaseLost, err = meter.Int64Counter("idempotency.lease.lost", metric.WithUnit("{attempt}"),
		metric.WithDescription("Attempts that lost their claim on a key while or after they ran."))
	add(err)
	m.storeDuration, err = meter.Float64Histogram("idempotency.store.duration", metric.WithUnit("s"),
		metric.WithDescription("How long idempotency store calls took, by operation."),
		metric.WithExplicitBucketBoundaries(c.storeBuckets...))
	add(err)
	m.storeErrors, err = meter.Int64Counter("idempotency.store.errors", metric.WithUnit("{error}"),
		metric.WithDescription("Idempotency store calls that returned an error, by operation."))
	add(err)
	m.renewals, err = meter.Int64Counter("idempotency.lease.renewals", metric.WithUnit("{renewal}"),
		metric.WithDescription("Lease renewals (store Extend calls); failed ones carry error.type."))
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("idemotel: creating instruments: %w", err)
	}
	return m, nil
}

// ObserveRequest records one middleware report: give it to the middleware
// as [idempotency.Options].Observer, or call it from an observer of your
// own:
//
//	Observer: func(ctx context.Context, r idempotency.Report) {
//		m.ObserveRequest(ctx, r)
//		audit(ctx, r)
//	},
func (m *Metrics) ObserveRequest(ctx context.Context, r idempotency.Report) {
	attrs := m.attributesOf(&r)
	m.requests.Add(ctx, 1, attrs.add...)
	if r.Duration > 0 {
		m.requestDuration.Record(ctx, r.Duration.Seconds(), attrs.record...)
	}
	m.common(ctx, &r, kindHTTP)
}

// ObserveWebhook records one webhook delivery report: give it to the
// webhook handler as [idempotency.WebhookOptions].Observer. Its series
// also carry webhook.provider and, for Stripe events, stripe.api_version,
// so that events in an API version other than stripe-go's show.
func (m *Metrics) ObserveWebhook(ctx context.Context, r idempotency.Report) {
	attrs := m.attributesOf(&r)
	m.deliveries.Add(ctx, 1, attrs.add...)
	if r.Duration > 0 {
		m.webhookDuration.Record(ctx, r.Duration.Seconds(), attrs.record...)
	}
	m.common(ctx, &r, kindWebhook)
}

type reportKind uint8

const (
	kindHTTP reportKind = iota
	kindWebhook
)

var leaseLostSets = [2][2]measurement{
	kindHTTP: {
		newMeasurement(attribute.NewSet(kindKey.String("http"), outcomeKey.String(string(idempotency.OutcomeLeaseLost)))),
		newMeasurement(attribute.NewSet(kindKey.String("http"), outcomeKey.String(string(idempotency.OutcomeReleased)))),
	},
	kindWebhook: {
		newMeasurement(attribute.NewSet(kindKey.String("webhook"), outcomeKey.String(string(idempotency.OutcomeLeaseLost)))),
		newMeasurement(attribute.NewSet(kindKey.String("webhook"), outcomeKey.String(string(idempotency.OutcomeReleased)))),
	},
}

// common records what requests and deliveries share: lost leases and the
// span.
func (m *Metrics) common(ctx context.Context, r *idempotency.Report, k reportKind) {
	switch {
	case r.Outcome == idempotency.OutcomeLeaseLost:
		m.leaseLost.Add(ctx, 1, leaseLostSets[k][0].add...)
	case r.Outcome == idempotency.OutcomeReleased && r.Err != nil && errors.Is(r.Err, idempotency.ErrLeaseLost):
		m.leaseLost.Add(ctx, 1, leaseLostSets[k][1].add...)
	}
	if m.tracing {
		annotateSpan(ctx, r)
	}
}

// reportAttrs is what the attributes of a report are made of.
type reportAttrs struct {
	outcome    idempotency.Outcome
	method     string
	route      string
	status     int
	errorType  string
	provider   string // webhooks only
	apiVersion string // Stripe webhooks only
}

// attributesOf returns the attribute set of r, from the cache when it can.
func (m *Metrics) attributesOf(r *idempotency.Report) measurement {
	k := reportAttrs{outcome: r.Outcome, method: methodOf(r.Method), route: r.Route, status: r.Status, apiVersion: r.APIVersion}
	if provider, ok := strings.CutSuffix(r.Kind, "-webhook"); ok {
		k.provider = provider
	}
	if r.Err != nil {
		k.errorType = reportErrorType(r.Err)
	}
	m.mu.RLock()
	opt, ok := m.attributes[k]
	m.mu.RUnlock()
	if ok {
		return opt
	}
	opt = newMeasurement(k.set())
	m.mu.Lock()
	if len(m.attributes) < maxCachedSets {
		m.attributes[k] = opt
	}
	m.mu.Unlock()
	return opt
}

func (k reportAttrs) set() attribute.Set {
	kv := make([]attribute.KeyValue, 0, 7)
	kv = append(kv, outcomeKey.String(string(k.outcome)))
	if k.method != "" {
		kv = append(kv, methodKey.String(k.method))
	}
	if k.route != "" {
		kv = append(kv, routeKey.String(k.route))
	}
	if k.status != 0 {
		kv = append(kv, statusKey.Int(k.status))
	}
	if k.errorType != "" {
		kv = append(kv, errorTypeKey.String(k.errorType))
	}
	if k.provider != "" {
		kv = append(kv, providerKey.String(k.provider))
	}
	if k.apiVersion != "" {
		kv = append(kv, apiVerKey.String(k.apiVersion))
	}
	return attribute.NewSet(kv...)
}

// methodOf keeps the methods of RFC 9110 and PATCH, as OpenTelemetry's
// HTTP conventions do; any other is "_OTHER", so a client cannot make new
// series by inventing methods.
func methodOf(m string) string {
	switch m {
	case "":
		return ""
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return m
	}
	return "_OTHER"
}

// reportErrors names the package's sentinels for error.type, the most
// specific first: a webhook that was processed but not recorded wraps a
// store error, a cut-short handler wraps the lease loss.
var reportErrors = [...]struct {
	err  error
	name string
}{
	{idempotency.ErrWebhookNotRecorded, "webhook_not_recorded"},
	{idempotency.ErrWebhookFailed, "webhook_failed"},
	{idempotency.ErrLeaseLost, "lease_lost"},
	{idempotency.ErrShutdown, "shutdown"},
	{idempotency.ErrStoreUnavailable, "store_unavailable"},
	{idempotency.ErrRecordUnreadable, "record_unreadable"},
	{idempotency.ErrKeyMissing, "key_missing"},
	{idempotency.ErrKeyInvalid, "key_invalid"},
	{idempotency.ErrBodyTooLarge, "body_too_large"},
	{idempotency.ErrBodyUnreadable, "body_unreadable"},
	{idempotency.ErrInvalidJSON, "invalid_json"},
	{idempotency.ErrFingerprintMismatch, "fingerprint_mismatch"},
	{idempotency.ErrKeyInUse, "key_in_use"},
	{idempotency.ErrWebhookSignature, "webhook_signature"},
	{idempotency.ErrWebhookPayload, "webhook_payload"},
}

// reportErrorType names the sentinel err wraps, or "" for none.
func reportErrorType(err error) string {
	for _, e := range reportErrors {
		if errors.Is(err, e.err) {
			return e.name
		}
	}
	return ""
}
