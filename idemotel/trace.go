package idemotel

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/seed70ea8305/idempotency"
)

// Span attributes ([WithTracing]).
const (
	spanOutcomeKey        = attribute.Key("idempotency.outcome")
	spanReplayedKey       = attribute.Key("idempotency.replayed")
	spanFailedAttemptsKey = attribute.Key("idempotency.webhook.failed_attempts")
)

// Span events of the store wrapper ([Metrics.Store] with [WithTracing]):
// one per store call, named spanStoreEvent, at the call's start.
const (
	spanStoreEvent        = "idempotency.store"
	spanStoreOperationKey = attribute.Key("idempotency.store.operation")
	spanStoreKindKey      = attribute.Key("idempotency.store.kind")
	spanStoreDurationKey  = attribute.Key("idempotency.store.duration") // seconds
)

// annotateSpan adds r's outcome to the span in ctx, if it records.
func annotateSpan(ctx context.Context, r *idempotency.Report) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	kv := [3]attribute.KeyValue{
		spanOutcomeKey.String(string(r.Outcome)),
		spanReplayedKey.Bool(r.Outcome == idempotency.OutcomeReplayed),
	}
	n := 2
	if r.Attempts > 0 {
		kv[n] = spanFailedAttemptsKey.Int(r.Attempts)
		n++
	}
	span.SetAttributes(kv[:n]...)
}
