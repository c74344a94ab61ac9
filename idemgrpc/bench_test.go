package idemgrpc_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemgrpc"
	"github.com/seed70ea8305/idempotency/internal/benchtest"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
)

// Benchmarks compare a unary call through the interceptor, on the memory
// store, with the same call without it: a ~100-byte request and a
// ~200-byte response, as the middleware's benchmarks use. Run:
//
//	go test -run '^$' -bench . -benchmem ./idemgrpc
//
// "Direct" calls the interceptor as a function, so that only its own
// cost is measured; "Bufconn" makes real calls, client to server, over an
// in-memory connection. The Overhead benchmarks interleave the bare call
// with a first call and a replay in every iteration and report the
// differences, so that a noisy machine moves both sides alike.

var (
	benchInput  = strings.Repeat("i", 100)
	benchOutput = strings.Repeat("o", 200)
	benchInfo   = &grpc.UnaryServerInfo{FullMethod: "/idemtest.v1.OpService/Run"}
)

func benchHandler(context.Context, any) (any, error) {
	return &testpb.RunResponse{Output: benchOutput}, nil
}

func benchRun(_ context.Context, _ *testpb.RunRequest) (*testpb.RunResponse, error) {
	return &testpb.RunResponse{Output: benchOutput}, nil
}

// benchInterceptor is the interceptor on a memory store without limits: a
// benchmark's first calls add millions of records.
func benchInterceptor(b *testing.B) *idemgrpc.ServerInterceptor {
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		b.Fatal(err)
	}
	idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{KeyField: idemgrpc.AIPKeyField})
	if err != nil {
		b.Fatal(err)
	}
	return idem
}

func benchRequest(key string) *testpb.RunRequest {
	return &testpb.RunRequest{Input: benchInput, RequestId: key}
}

func BenchmarkDirect(b *testing.B) {
	idem := benchInterceptor(b)
	ctx := context.Background()
	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = benchHandler(ctx, benchRequest("k"))
		}
	})
	b.Run("first", func(b *testing.B) {
		keys := benchtest.Keys("first-", b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			if _, err := idem.Unary(ctx, benchRequest(keys[i]), benchInfo, benchHandler); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("replay", func(b *testing.B) {
		_, _ = idem.Unary(ctx, benchRequest("replay"), benchInfo, benchHandler)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := idem.Unary(ctx, benchRequest("replay"), benchInfo, benchHandler); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDirectOverhead reports, per call, the time the interceptor
// adds to the bare handler: first-over-bare-µs and replay-over-bare-µs.
func BenchmarkDirectOverhead(b *testing.B) {
	idem := benchInterceptor(b)
	ctx := context.Background()
	_, _ = idem.Unary(ctx, benchRequest("replay"), benchInfo, benchHandler)
	keys := benchtest.Keys("first-", b.N)
	var base, first, replay time.Duration
	b.ResetTimer()
	for i := range b.N {
		base += benchtest.Timed(func() { _, _ = benchHandler(ctx, benchRequest(keys[i])) })
		first += benchtest.Timed(func() { _, _ = idem.Unary(ctx, benchRequest(keys[i]), benchInfo, benchHandler) })
		replay += benchtest.Timed(func() { _, _ = idem.Unary(ctx, benchRequest("replay"), benchInfo, benchHandler) })
	}
	report(b, base, first, replay)
}

// benchClients returns a client of a bare server and one of a server with
// the interceptor, both on bufconn.
func benchClients(b *testing.B) (bare, wrapped testpb.OpServiceClient) {
	bareConn := serve(b, &funcServer{run: benchRun}, nil)
	idem := benchInterceptor(b)
	wrappedConn := serve(b, &funcServer{run: benchRun}, []grpc.ServerOption{grpc.ChainUnaryInterceptor(idem.Unary)})
	return testpb.NewOpServiceClient(bareConn), testpb.NewOpServiceClient(wrappedConn)
}

func BenchmarkBufconn(b *testing.B) {
	bare, wrapped := benchClients(b)
	ctx := context.Background()
	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := bare.Run(ctx, benchRequest("k")); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("first", func(b *testing.B) {
		keys := benchtest.Keys("first-", b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			if _, err := wrapped.Run(ctx, benchRequest(keys[i])); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("replay", func(b *testing.B) {
		var header metadata.MD
		if _, err := wrapped.Run(ctx, benchRequest("replay")); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := wrapped.Run(ctx, benchRequest("replay"), grpc.Header(&header)); err != nil {
				b.Fatal(err)
			}
		}
		if header.Get(idemgrpc.ReplayMetadata)[0] != "true" {
			b.Fatal("not replayed")
		}
	})
}

// BenchmarkBufconnOverhead reports, per call over bufconn, the time the
// interceptor adds to a bare call: bare-µs, first-over-bare-µs and
// replay-over-bare-µs.
func BenchmarkBufconnOverhead(b *testing.B) {
	bare, wrapped := benchClients(b)
	ctx := context.Background()
	if _, err := wrapped.Run(ctx, benchRequest("replay")); err != nil {
		b.Fatal(err)
	}
	keys := benchtest.Keys("first-", b.N)
	var base, first, replay time.Duration
	b.ResetTimer()
	for i := range b.N {
		base += benchtest.Timed(func() { _, _ = bare.Run(ctx, benchRequest(keys[i])) })
		first += benchtest.Timed(func() { _, _ = wrapped.Run(ctx, benchRequest(keys[i])) })
		replay += benchtest.Timed(func() { _, _ = wrapped.Run(ctx, benchRequest("replay")) })
	}
	report(b, base, first, replay)
}

func report(b *testing.B, base, first, replay time.Duration) {
	n := float64(b.N)
	b.ReportMetric(benchtest.Micros(base)/n, "bare-µs")
	b.ReportMetric(benchtest.Micros(first-base)/n, "first-over-bare-µs")
	b.ReportMetric(benchtest.Micros(replay-base)/n, "replay-over-bare-µs")
}
