package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/seed70ea8305/idempotency"
	venuev1 "github.com/seed70ea8305/idempotency/examples/venue-rpc/venue/v1"
	"github.com/seed70ea8305/idempotency/examples/venue-rpc/venue/v1/venuev1connect"
	"github.com/seed70ea8305/idempotency/idemgrpc"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// harness is the service on real loopback servers, gRPC and Connect
// (HTTP/2 over TLS), and a client of each: the gRPC one through the
// idemgrpc client interceptor, which fills request_id.
type harness struct {
	grpc     venuev1.VenueServiceClient
	connect  venuev1connect.VenueServiceClient
	payments *fakePayments
	venues   *venues
}

func newHarness(t *testing.T, connectOpts ...connect.ClientOption) *harness {
	t.Helper()
	keys, err := parseAPIKeys("key-a:tenant-a,key-b:tenant-b")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{payments: &fakePayments{}}
	h.venues = &venues{payments: h.payments}
	a, err := newApp(keys, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), h.venues, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = a.grpc.Serve(lis)
	}()
	web := httptest.NewUnstartedServer(a.http)
	web.EnableHTTP2 = true
	web.StartTLS()

	keysIn, err := idemgrpc.NewClientInterceptor(idemgrpc.ClientOptions{KeyField: idemgrpc.AIPKeyField, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithChainUnaryInterceptor(keysIn.Unary))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		a.grpc.Stop()
		<-served
		web.Close()
	})
	h.grpc = venuev1.NewVenueServiceClient(conn)
	h.connect = venuev1connect.NewVenueServiceClient(web.Client(), web.URL, connectOpts...)
	return h
}

func grpcAs(apiKey string, ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+apiKey)
}

func connectAs[T any](apiKey string, msg *T) *connect.Request[T] {
	req := connect.NewRequest(msg)
	req.Header().Set("Authorization", "Bearer "+apiKey)
	return req
}

const requestID = "0b6f4a5e-9a53-4e0f-8d7a-0d4c3f1b2a10"

// A venue created over gRPC and retried over Connect (each of its
// protocols), and the reverse, is created once: the retry gets the same
// venue and header, marked as a replay.
func TestCreateOverBothTransports(t *testing.T) {
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}}} {
		t.Run(p.name, func(t *testing.T) {
			h := newHarness(t, p.opts...)
			// gRPC first: the client interceptor puts the key of the
			// context in request_id.
			var header metadata.MD
			ctx := idemgrpc.WithKey(grpcAs("key-a", context.Background()), requestID)
			created, err := h.grpc.CreateVenue(ctx, &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall"}, grpc.Header(&header))
			if err != nil {
				t.Fatal(err)
			}
			if created.GetStatus() != "active" || created.GetPaymentAccountId() == "" || header.Get("x-venue-id")[0] != created.GetId() {
				t.Fatalf("created %v, header %v", created, header)
			}
			// Then Connect, with the same request_id.
			resp, err := h.connect.CreateVenue(context.Background(), connectAs("key-a", &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall", RequestId: requestID}))
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(resp.Msg, created) || resp.Header().Get("X-Idempotent-Replayed") != "true" || resp.Header().Get("X-Venue-Id") != created.GetId() {
				t.Errorf("over Connect: %v, header %v; want the replay of %v", resp.Msg, resp.Header(), created)
			}

			// Connect first, then gRPC.
			const other = "9c1d2e3f-4a5b-4c6d-8e7f-a0b1c2d3e4f5"
			resp, err = h.connect.CreateVenue(context.Background(), connectAs("key-a", &venuev1.CreateVenueRequest{Name: "Arena", Slug: "arena", RequestId: other}))
			if err != nil {
				t.Fatal(err)
			}
			header = nil
			again, err := h.grpc.CreateVenue(grpcAs("key-a", context.Background()), &venuev1.CreateVenueRequest{Name: "Arena", Slug: "arena", RequestId: other}, grpc.Header(&header))
			if err != nil || !proto.Equal(again, resp.Msg) || header.Get(idemgrpc.ReplayMetadata)[0] != "true" || header.Get("x-venue-id")[0] != resp.Msg.GetId() {
				t.Errorf("over gRPC: %v %v, header %v; want the replay of %v", again, err, header, resp.Msg)
			}
			if n := h.payments.count(); n != 2 {
				t.Errorf("%d payment accounts, want 2", n)
			}
		})
	}
}

// A creation that fails after its payment account is retried by the
// client interceptor with the same request_id, and resumes after the
// account: one account, one venue.
func TestResumesAfterAFailure(t *testing.T) {
	h := newHarness(t)
	var failed atomic.Bool
	h.venues.failAfter = func(point string) bool { return point == "account_created" && failed.CompareAndSwap(false, true) }
	venue, err := h.grpc.CreateVenue(grpcAs("key-a", context.Background()), &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall"})
	if err != nil {
		t.Fatal(err)
	}
	if !failed.Load() || venue.GetStatus() != "active" || h.payments.count() != 1 {
		t.Errorf("venue %v, injected failure %v, %d accounts; want an active venue and one account", venue, failed.Load(), h.payments.count())
	}
	got, err := h.grpc.GetVenue(grpcAs("key-a", context.Background()), &venuev1.GetVenueRequest{Id: venue.GetId()})
	if err != nil || !proto.Equal(got, venue) {
		t.Errorf("GetVenue: %v %v", got, err)
	}
}

// Keys belong to tenants; answers that are kept (a taken slug, a missing
// field) are replayed; a call without credentials is refused before any
// key is claimed.
func TestTenantsAndKeptAnswers(t *testing.T) {
	h := newHarness(t)
	a, err := h.grpc.CreateVenue(grpcAs("key-a", context.Background()), &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall", RequestId: requestID})
	if err != nil {
		t.Fatal(err)
	}
	b, err := h.grpc.CreateVenue(grpcAs("key-b", context.Background()), &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall", RequestId: requestID})
	if err != nil || b.GetTenant() != "tenant-b" || b.GetId() == a.GetId() {
		t.Errorf("tenant b with tenant a's request_id: %v %v", b, err)
	}
	for i := range 2 {
		var header metadata.MD
		_, err := h.grpc.CreateVenue(grpcAs("key-a", context.Background()), &venuev1.CreateVenueRequest{Name: "Other hall", Slug: "hall", RequestId: "taken-slug"}, grpc.Header(&header))
		if status.Code(err) != codes.AlreadyExists || (len(header.Get(idemgrpc.ReplayMetadata)) > 0) != (i == 1) {
			t.Errorf("taken slug, call %d: %v, header %v", i, err, header)
		}
	}
	_, err = h.connect.CreateVenue(context.Background(), connect.NewRequest(&venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall", RequestId: requestID}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("without credentials: %v", err)
	}
	_, err = h.connect.CreateVenue(context.Background(), connectAs("key-a", &venuev1.CreateVenueRequest{Name: "Hall", Slug: "hall"}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("over Connect without a request_id: %v", err)
	}
}

// The committed generated code is what protoc.sh generates from
// venue.proto. Needs protoc; skipped without it.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	if testing.Short() {
		t.Skip("regenerating needs the plugins, built from the module proxy")
	}
	if _, err := exec.LookPath("protoc"); err != nil {
		t.Skip("protoc not installed (Debian: apt-get install protobuf-compiler)")
	}
	dir := t.TempDir()
	src, err := os.ReadFile("venue/v1/venue.proto")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "venue.proto"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	script, err := filepath.Abs("protoc.sh")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", script, "venue.proto")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("protoc.sh: %v\n%s", err, out)
	}
	for _, f := range []string{"venue.pb.go", "venue_grpc.pb.go", "venuev1connect/venue.connect.go"} {
		want, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join("venue/v1", f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("venue/v1/%s differs from what protoc.sh generates: run go generate ./venue/v1", f)
		}
	}
}
