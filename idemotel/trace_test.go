package idemotel_test

import (
	"context"
	"net/http"
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
			h := serveMux(middleware(t, idempotency.NewMemoryStore(), m.Observer()).Handler(created))

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
