package idemotel_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
)

// TestTracing: with WithTracing, the outcome lands on the request's span
// (as the server's tracing started it) and no span is started; without
// it, spans are left alone.
func TestTracing(t *testing.T) {
	for _, tracing := range []bool{true, false} {
		t.Run(map[bool]string{true: "WithTracing", false: "default"}[tracing], func(t *testing.T) {
			spans := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
			t.Cleanup(func() { tp.Shutdown(context.Background()) })
			var opts []idemotel.Option
			if tracing {
				opts = append(opts, idemotel.WithTracing())
			}
			m, _ := newMetrics(t, opts...)
			h := serveMux(middleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: m.ObserveRequest}).Handler(created))

			for range 2 {
				ctx, span := tp.Tracer("server").Start(context.Background(), "POST /venues/{id}/bookings")
				w := serve(h, newRequest("secret-key-1", body).WithContext(ctx))
				require.Equal(t, http.StatusCreated, w.Code)
				span.End()
			}
			ended := spans.Ended()
			require.Len(t, ended, 2, "no span of its own")
			var got [][]attribute.KeyValue
			for _, s := range ended {
				got = append(got, s.Attributes())
			}
			if !tracing {
				assert.Equal(t, [][]attribute.KeyValue{nil, nil}, got)
				return
			}
			assert.Equal(t, [][]attribute.KeyValue{
				{attribute.String("idempotency.outcome", "executed"), attribute.Bool("idempotency.replayed", false)},
				{attribute.String("idempotency.outcome", "replayed"), attribute.Bool("idempotency.replayed", true)},
			}, got)
		})
	}
}

// storeEvent is one idempotency.store span event, as the tests compare it.
type storeEvent struct {
	operation, kind, errorType string
	duration                   float64
}

func storeEvents(t *testing.T, events []sdktrace.Event) []storeEvent {
	t.Helper()
	var out []storeEvent
	for _, ev := range events {
		require.Equal(t, "idempotency.store", ev.Name)
		var e storeEvent
		for _, kv := range ev.Attributes {
			switch kv.Key {
			case "idempotency.store.operation":
				e.operation = kv.Value.AsString()
			case "idempotency.store.kind":
				e.kind = kv.Value.AsString()
			case "idempotency.store.duration":
				e.duration = kv.Value.AsFloat64()
			case "error.type":
				e.errorType = kv.Value.AsString()
			default:
				t.Errorf("unexpected event attribute %s=%s", kv.Key, kv.Value.Emit())
			}
		}
		out = append(out, e)
	}
	return out
}

// TestTracingStoreEvents: with WithTracing, the wrapped store adds one
// event per call to the request's span, with the operation, the store,
// the duration and, for a failed call, the error type, and starts no
// span; without WithTracing, or without a recording span, it adds none.
func TestTracingStoreEvents(t *testing.T) {
	for _, tracing := range []bool{true, false} {
		t.Run(map[bool]string{true: "WithTracing", false: "default"}[tracing], func(t *testing.T) {
			spans := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
			t.Cleanup(func() { tp.Shutdown(context.Background()) })
			var opts []idemotel.Option
			if tracing {
				opts = append(opts, idemotel.WithTracing())
			}
			m, _ := newMetrics(t, opts...)
			var failAcquire atomic.Bool
			faulty := &faultyStore{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), acquire: func() error {
				if failAcquire.Load() {
					return errors.New("connection refused")
				}
				return nil
			}}
			h := serveMux(middleware(t, m.Store(faulty), idempotency.Options{Observer: m.ObserveRequest}).Handler(created))

			request := func(key string, want int) {
				t.Helper()
				ctx, span := tp.Tracer("server").Start(context.Background(), "POST /venues/{id}/bookings")
				w := serve(h, newRequest(key, body).WithContext(ctx))
				require.Equal(t, want, w.Code, "%s", w.Body)
				span.End()
			}
			request("secret-key-1", http.StatusCreated) // acquire, complete
			request("secret-key-1", http.StatusCreated) // acquire: a replay
			failAcquire.Store(true)
			request("secret-key-2", http.StatusServiceUnavailable) // a failed acquire
			// Outside any span: nothing to annotate, nothing breaks.
			failAcquire.Store(false)
			require.Equal(t, http.StatusCreated, serve(h, newRequest("secret-key-3", body)).Code)

			ended := spans.Ended()
			require.Len(t, ended, 3, "no span of its own")
			if !tracing {
				for _, s := range ended {
					assert.Empty(t, s.Events())
				}
				return
			}
			kind := "*idemotel_test.faultyStore"
			var got [][]storeEvent
			for n, s := range ended {
				events := storeEvents(t, s.Events())
				if n == 2 {
					// After a failed acquire the engine takes the claim back
					// in the background (a release, owner-checked); whether
					// it runs before the span ends is a matter of timing.
					events = slices.DeleteFunc(events, func(e storeEvent) bool { return e.operation == "release" })
				}
				for i, e := range events {
					assert.Greater(t, e.duration, 0.0, "%s: a duration", e.operation)
					assert.Less(t, e.duration, 5.0, "%s: a duration in seconds", e.operation)
					events[i].duration = 0
					assert.False(t, s.Events()[i].Time.Before(s.StartTime()), "the event lies within the span")
					assert.False(t, s.Events()[i].Time.After(s.EndTime()), "the event lies within the span")
				}
				got = append(got, events)
			}
			assert.Equal(t, [][]storeEvent{
				{{operation: "acquire", kind: kind}, {operation: "complete", kind: kind}},
				{{operation: "acquire", kind: kind}},
				{{operation: "acquire", kind: kind, errorType: "_OTHER"}},
			}, got)
			for _, s := range ended {
				for _, ev := range s.Events() {
					for _, kv := range ev.Attributes {
						assert.NotContains(t, kv.Value.Emit(), "secret", "a key or scope in a span event")
					}
				}
			}
		})
	}
}
