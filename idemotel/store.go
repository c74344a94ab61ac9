package idemotel

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/seed70ea8305/idempotency"
)

// The operations of a store, as the operation attribute names them.
type operation uint8

const (
	opAcquire operation = iota
	opExtend
	opComplete
	opRelease
	opFail
	opFailures
	opCheckpoint
	opGet
	opRemove
	numOperations
)

var operationNames = [numOperations]string{"acquire", "extend", "complete", "release", "fail", "failures", "checkpoint", "get", "remove"}

// The error types of a failed store call.
const (
	errNone = iota
	errLeaseLost
	errTimeout
	errCanceled
	errOther
	numErrorTypes
)

var storeErrorNames = [numErrorTypes]string{"", "lease_lost", "timeout", "canceled", "_OTHER"}

func storeErrorType(err error) int {
	switch {
	case err == nil:
		return errNone
	case errors.Is(err, idempotency.ErrLeaseLost):
		return errLeaseLost
	case errors.Is(err, context.DeadlineExceeded):
		return errTimeout
	case errors.Is(err, context.Canceled):
		return errCanceled
	}
	return errOther
}

// Store returns an [idempotency.Store] that passes every call to store and
// records its duration (idempotency.store.duration), its failures
// (idempotency.store.errors) and, for Extend, the lease renewal
// (idempotency.lease.renewals). Errors are returned unchanged. The
// store attribute is "memory" for an [*idempotency.MemoryStore], "redis"
// for an [*idempotency.RedisStore], else store's Go type. When store
// implements [idempotency.FailureRecorder], so does the result, so the
// webhook helper still counts failed attempts; when it implements
// [idempotency.Checkpointer] and [idempotency.Inspector] too, as every store
// of this module does, so does the result, and those calls are measured
// as well.
//
// With [WithTracing], each call also adds an event to the span in the
// call's context, when that span is recording (see [WithTracing]).
//
// The result has Unwrap, through which the middleware and the webhook
// helper still find a MemoryStore inside and skip the store timeout's
// deadline (a timer per call) for it, as for a bare one. Give the
// middleware and the webhook helper the same wrapped store.
func (m *Metrics) Store(store idempotency.Store) idempotency.Store {
	kind := storeKind(store)
	s := &instrumentedStore{inner: store, m: m, kind: kind}
	for op := range numOperations {
		for e := range numErrorTypes {
			kv := []attribute.KeyValue{operationKey.String(operationNames[op]), storeKindKey.String(kind)}
			if e != errNone {
				kv = append(kv, errorTypeKey.String(storeErrorNames[e]))
			}
			s.sets[op][e] = newMeasurement(attribute.NewSet(kv...))
		}
	}
	for e := range numErrorTypes {
		kv := []attribute.KeyValue{storeKindKey.String(kind)}
		if e != errNone {
			kv = append(kv, errorTypeKey.String(storeErrorNames[e]))
		}
		s.renewalSets[e] = newMeasurement(attribute.NewSet(kv...))
	}
	recorder, ok := store.(idempotency.FailureRecorder)
	if !ok {
		return s
	}
	rs := &recordingStore{instrumentedStore: s, recorder: recorder}
	checkpointer, ok1 := store.(idempotency.Checkpointer)
	inspector, ok2 := store.(idempotency.Inspector)
	if ok1 && ok2 {
		return &completeStore{recordingStore: rs, checkpointer: checkpointer, inspector: inspector}
	}
	return rs
}

func storeKind(store idempotency.Store) string {
	switch store.(type) {
	case *idempotency.MemoryStore:
		return "memory"
	case *idempotency.RedisStore:
		return "redis"
	}
	return fmt.Sprintf("%T", store)
}

// instrumentedStore is the store [Metrics.Store] returns.
type instrumentedStore struct {
	inner idempotency.Store
	m     *Metrics
	kind  string // the store attribute
	// The attribute sets of every operation and error type, made once.
	sets        [numOperations][numErrorTypes]measurement
	renewalSets [numErrorTypes]measurement
}

var (
	_ idempotency.Store           = (*instrumentedStore)(nil)
	_ idempotency.FailureRecorder = (*recordingStore)(nil)
	_ idempotency.Checkpointer    = (*completeStore)(nil)
	_ idempotency.Inspector       = (*completeStore)(nil)
)

// record records one call of op that started at start.
func (s *instrumentedStore) record(ctx context.Context, op operation, start time.Time, err error) {
	e := storeErrorType(err)
	set := s.sets[op][e]
	s.m.storeDuration.Record(ctx, time.Since(start).Seconds(), set.record...)
	if e != errNone {
		s.m.storeErrors.Add(ctx, 1, set.add...)
	}
	if op == opExtend {
		s.m.renewals.Add(ctx, 1, s.renewalSets[e].add...)
	}
	if s.m.tracing {
		s.addSpanEvent(ctx, op, start, e)
	}
}

// addSpanEvent adds the call to the span in ctx, if it records: an event
// at the call's start, with its operation, store, duration and, for a
// failed call, error type.
func (s *instrumentedStore) addSpanEvent(ctx context.Context, op operation, start time.Time, e int) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	kv := make([]attribute.KeyValue, 0, 4)
	kv = append(kv,
		spanStoreOperationKey.String(operationNames[op]),
		spanStoreKindKey.String(s.kind),
		spanStoreDurationKey.Float64(time.Since(start).Seconds()),
	)
	if e != errNone {
		kv = append(kv, errorTypeKey.String(storeErrorNames[e]))
	}
	span.AddEvent(spanStoreEvent, trace.WithTimestamp(start), trace.WithAttributes(kv...))
}

// Acquire implements [idempotency.Store].
func (s *instrumentedStore) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	start := time.Now()
	fence, existing, err := s.inner.Acquire(ctx, key, claim, lease)
	s.record(ctx, opAcquire, start, err)
	return fence, existing, err
}

// Extend implements [idempotency.Store].
func (s *instrumentedStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	start := time.Now()
	err := s.inner.Extend(ctx, key, token, lease)
	s.record(ctx, opExtend, start, err)
	return err
}

// Complete implements [idempotency.Store].
func (s *instrumentedStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	start := time.Now()
	err := s.inner.Complete(ctx, key, token, rec, ttl)
	s.record(ctx, opComplete, start, err)
	return err
}

// Unwrap returns the store that s wraps.
func (s *instrumentedStore) Unwrap() idempotency.Store { return s.inner }

// Release implements [idempotency.Store].
func (s *instrumentedStore) Release(ctx context.Context, key, token string) error {
	start := time.Now()
	err := s.inner.Release(ctx, key, token)
	s.record(ctx, opRelease, start, err)
	return err
}

// recordingStore is the store [Metrics.Store] returns for a store that
// keeps a failure history.
type recordingStore struct {
	*instrumentedStore
	recorder idempotency.FailureRecorder
}

// Fail implements [idempotency.FailureRecorder].
func (s *recordingStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	start := time.Now()
	n, err := s.recorder.Fail(ctx, key, token, reason, ttl)
	s.record(ctx, opFail, start, err)
	return n, err
}

// Failures implements [idempotency.FailureRecorder].
func (s *recordingStore) Failures(ctx context.Context, key string) (int, string, error) {
	start := time.Now()
	n, reason, err := s.recorder.Failures(ctx, key)
	s.record(ctx, opFailures, start, err)
	return n, reason, err
}

// completeStore is the store [Metrics.Store] returns for a store with
// every optional interface: failure history, recovery points and reads.
type completeStore struct {
	*recordingStore
	checkpointer idempotency.Checkpointer
	inspector    idempotency.Inspector
}

// Checkpoint implements [idempotency.Checkpointer].
func (s *completeStore) Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error {
	start := time.Now()
	err := s.checkpointer.Checkpoint(ctx, key, token, point, data, ttl)
	s.record(ctx, opCheckpoint, start, err)
	return err
}

// Get implements [idempotency.Inspector].
func (s *completeStore) Get(ctx context.Context, key string) (*idempotency.Record, error) {
	start := time.Now()
	rec, err := s.inspector.Get(ctx, key)
	s.record(ctx, opGet, start, err)
	return rec, err
}

// Remove implements [idempotency.Inspector].
func (s *completeStore) Remove(ctx context.Context, key string) error {
	start := time.Now()
	err := s.inspector.Remove(ctx, key)
	s.record(ctx, opRemove, start, err)
	return err
}
