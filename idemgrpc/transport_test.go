package idemgrpc_test

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemgrpc"
	"github.com/seed70ea8305/idempotency/internal/transporttest"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
)

// TestTable plays the transports' table against a gRPC server on bufconn,
// with the key in metadata and, as AIP-155 has it, in request_id.
func TestTable(t *testing.T) {
	t.Run("metadata", func(t *testing.T) { transporttest.Run(t, grpcTransport("grpc", "")) })
	t.Run("request_id", func(t *testing.T) { transporttest.Run(t, grpcTransport("grpc-request_id", idemgrpc.AIPKeyField)) })
}

func grpcTransport(name, keyField string) transporttest.Transport {
	return transporttest.Transport{
		Name: name,
		Serve: func(t *testing.T, store idempotency.Store, opts idempotency.Options, op transporttest.Op) transporttest.Client {
			mw, err := idempotency.New(store, opts)
			if err != nil {
				t.Fatal(err)
			}
			idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{KeyField: keyField, Scope: tenantOf})
			if err != nil {
				t.Fatal(err)
			}
			conn := serve(t, &opServer{op: op}, []grpc.ServerOption{grpc.ChainUnaryInterceptor(recoverPanics, idem.Unary), grpc.ChainStreamInterceptor(idem.Stream)})
			return &grpcClient{client: testpb.NewOpServiceClient(conn), field: keyField != ""}
		},
	}
}

// tenantOf is the scope: the tenant metadata (authentication, in a real
// service).
func tenantOf(ctx context.Context, _ string) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(transporttest.TenantHeader); len(v) > 0 {
		return v[0]
	}
	return ""
}

// recoverPanics is the recovery interceptor a server puts outside the
// idempotency interceptor: a panic becomes INTERNAL.
func recoverPanics(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			resp, err = nil, status.Error(codes.Internal, "panic")
		}
	}()
	return handler(ctx, req)
}

// serve serves srv on bufconn with opts until t ends, and returns a
// client connection to it made with dial.
func serve(t testing.TB, impl testpb.OpServiceServer, opts []grpc.ServerOption, dial ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	srv := grpc.NewServer(opts...)
	testpb.RegisterOpServiceServer(srv, impl)
	lis := bufconn.Listen(1 << 20)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	dial = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, dial...)
	conn, err := grpc.NewClient("passthrough:///bufnet", dial...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-done
	})
	return conn
}
