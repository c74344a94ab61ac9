package idemgrpc_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemgrpc"
	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
)

// funcServer serves Run with run, counting its calls; Read and Watch
// answer at once.
type funcServer struct {
	testpb.UnimplementedOpServiceServer
	calls atomic.Int32
	run   func(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error)
}

func (s *funcServer) Run(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
	s.calls.Add(1)
	return s.run(ctx, req)
}

func (s *funcServer) Read(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
	s.calls.Add(1)
	return &testpb.RunResponse{Output: "read " + req.GetInput()}, nil
}

func (s *funcServer) Watch(req *testpb.RunRequest, stream grpc.ServerStreamingServer[testpb.RunResponse]) error {
	s.calls.Add(1)
	return stream.Send(&testpb.RunResponse{Output: "watch " + req.GetInput()})
}

func echoRun(_ context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
	return &testpb.RunResponse{Output: req.GetInput()}, nil
}

// setup serves impl behind an interceptor built with opts on a memory
// store, and returns a client and the observer's reports.
func setup(t *testing.T, opts idemgrpc.Options, mwOpts idempotency.Options, impl *funcServer) (testpb.OpServiceClient, *reports) {
	t.Helper()
	rep := &reports{}
	mwOpts.Observer = rep.add
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), mwOpts)
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemgrpc.NewServerInterceptor(mw, opts)
	if err != nil {
		t.Fatal(err)
	}
	conn := serve(t, impl, []grpc.ServerOption{grpc.ChainUnaryInterceptor(idem.Unary), grpc.ChainStreamInterceptor(idem.Stream)})
	return testpb.NewOpServiceClient(conn), rep
}

type reports struct {
	mu   sync.Mutex
	list []idempotency.Report
}

func (r *reports) add(_ context.Context, rep idempotency.Report) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, rep)
}

func (r *reports) outcomes() []idempotency.Outcome {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []idempotency.Outcome
	for _, rep := range r.list {
		out = append(out, rep.Outcome)
	}
	return out
}

func withKey(key string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), idemgrpc.KeyMetadata, key)
}

func TestReplayKeepsMetadata(t *testing.T) {
	impl := &funcServer{run: func(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
		// SendHeader is held with the outcome: the header goes out with
		// the stored response.
		if err := grpc.SendHeader(ctx, metadata.Pairs("x-venue", "ven_1", "x-raw-bin", "\x00\xff")); err != nil {
			return nil, err
		}
		_ = grpc.SetTrailer(ctx, metadata.Pairs("x-cost", "3"))
		claim, _ := idempotency.ClaimFromContext(ctx)
		return &testpb.RunResponse{Output: claim.Kind + " " + claim.Route}, nil
	}}
	client, rep := setup(t, idemgrpc.Options{}, idempotency.Options{}, impl)
	for i, replayed := range []string{"", "true"} {
		var header, trailer metadata.MD
		resp, err := client.Run(withKey("k1"), &testpb.RunRequest{Input: "hall"}, grpc.Header(&header), grpc.Trailer(&trailer))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if want := "grpc /idemtest.v1.OpService/Run"; resp.GetOutput() != want {
			t.Errorf("call %d: output %q, want %q (the claim's kind and route)", i, resp.GetOutput(), want)
		}
		if first(header, "x-venue") != "ven_1" || first(header, "x-raw-bin") != "\x00\xff" || first(trailer, "x-cost") != "3" {
			t.Errorf("call %d: header %v, trailer %v", i, header, trailer)
		}
		if got := first(header, idemgrpc.ReplayMetadata); got != replayed {
			t.Errorf("call %d: %s %q, want %q", i, idemgrpc.ReplayMetadata, got, replayed)
		}
	}
	if n := impl.calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	if got := rep.outcomes(); len(got) != 2 || got[0] != idempotency.OutcomeExecuted || got[1] != idempotency.OutcomeReplayed {
		t.Errorf("outcomes %v", got)
	}
}

// A kept error is stored with its details and replayed; a retryable one
// frees the key.
func TestStoredErrors(t *testing.T) {
	var fail atomic.Value
	impl := &funcServer{run: func(context.Context, *testpb.RunRequest) (*testpb.RunResponse, error) {
		return nil, fail.Load().(error)
	}}
	client, _ := setup(t, idemgrpc.Options{}, idempotency.Options{}, impl)

	st, _ := status.New(codes.NotFound, "no such publisher").WithDetails(&errdetails.ResourceInfo{ResourceName: "publishers/1"})
	fail.Store(st.Err())
	for i := range 2 {
		var header metadata.MD
		_, err := client.Run(withKey("kept"), &testpb.RunRequest{Input: "x"}, grpc.Header(&header))
		got := status.Convert(err)
		if got.Code() != codes.NotFound || got.Message() != "no such publisher" || len(got.Details()) != 1 {
			t.Errorf("call %d: %v %v", i, got, got.Details())
		}
		if replayed := first(header, idemgrpc.ReplayMetadata) == "true"; replayed != (i == 1) {
			t.Errorf("call %d: replayed %v", i, replayed)
		}
	}
	if n := impl.calls.Load(); n != 1 {
		t.Errorf("NOT_FOUND: handler ran %d times, want 1 (stored)", n)
	}

	for _, c := range []codes.Code{codes.Unavailable, codes.Aborted, codes.Internal, codes.ResourceExhausted, codes.Canceled} {
		impl.calls.Store(0)
		fail.Store(status.Error(c, "try again"))
		for i := range 2 {
			_, err := client.Run(withKey("freed-"+c.String()), &testpb.RunRequest{Input: "x"})
			if got := status.Convert(err); got.Code() != c || got.Message() != "try again" {
				t.Errorf("%v, call %d: %v", c, i, got)
			}
		}
		if n := impl.calls.Load(); n != 2 {
			t.Errorf("%v: handler ran %d times, want 2 (the key freed)", c, n)
		}
	}
}

func TestRetryableOption(t *testing.T) {
	impl := &funcServer{run: func(context.Context, *testpb.RunRequest) (*testpb.RunResponse, error) {
		return nil, status.Error(codes.NotFound, "not yet")
	}}
	client, _ := setup(t, idemgrpc.Options{Retryable: func(c codes.Code) bool { return c == codes.NotFound }}, idempotency.Options{}, impl)
	for range 2 {
		_, _ = client.Run(withKey("k"), &testpb.RunRequest{})
	}
	if n := impl.calls.Load(); n != 2 {
		t.Errorf("handler ran %d times, want 2", n)
	}
}

// The middleware's own answers carry the details the doc promises.
func TestRejectionDetails(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	impl := &funcServer{run: func(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
		if req.GetInput() == "block" {
			close(entered)
			<-release
		}
		return echoRun(ctx, req)
	}}
	client, _ := setup(t, idemgrpc.Options{KeyField: idemgrpc.AIPKeyField}, idempotency.Options{}, impl)

	// Missing, too long for AIP-155, and field and metadata disagreeing.
	for _, c := range []struct {
		name  string
		ctx   context.Context
		req   *testpb.RunRequest
		field string
	}{
		{"missing", context.Background(), &testpb.RunRequest{}, "request_id"},
		{"too long", context.Background(), &testpb.RunRequest{RequestId: strings.Repeat("a", 37)}, "request_id"},
		{"bad metadata", withKey("two words"), &testpb.RunRequest{}, idemgrpc.KeyMetadata},
		{"disagreeing", withKey("k-meta"), &testpb.RunRequest{RequestId: "k-field"}, "request_id"},
	} {
		_, err := client.Run(c.ctx, c.req)
		st := status.Convert(err)
		var bad *errdetails.BadRequest
		for _, d := range st.Details() {
			if b, ok := d.(*errdetails.BadRequest); ok {
				bad = b
			}
		}
		if st.Code() != codes.InvalidArgument || bad == nil || bad.GetFieldViolations()[0].GetField() != c.field {
			t.Errorf("%s: %v, details %v", c.name, st, st.Details())
		}
		if ei := errorInfo(err); ei.GetDomain() != rpcrecord.Domain || !strings.HasPrefix(ei.GetReason(), "IDEMPOTENCY_KEY_") {
			t.Errorf("%s: ErrorInfo %v", c.name, ei)
		}
	}

	// The same key in metadata or in the field is the same key.
	if _, err := client.Run(withKey("k-1"), &testpb.RunRequest{Input: "a"}); err != nil {
		t.Fatal(err)
	}
	var header metadata.MD
	if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "a", RequestId: "k-1"}, grpc.Header(&header)); err != nil || first(header, idemgrpc.ReplayMetadata) != "true" {
		t.Errorf("the key in the field: %v, header %v; want the replay", err, header)
	}

	// Reused with another request.
	_, err := client.Run(context.Background(), &testpb.RunRequest{Input: "b", RequestId: "k-1"})
	st := status.Convert(err)
	var pf *errdetails.PreconditionFailure
	for _, d := range st.Details() {
		if p, ok := d.(*errdetails.PreconditionFailure); ok {
			pf = p
		}
	}
	if st.Code() != codes.FailedPrecondition || pf == nil || errorInfo(err).GetReason() != rpcrecord.ReasonKeyReused {
		t.Errorf("reused key: %v %v", st, st.Details())
	}

	// In use: ABORTED with RetryInfo and the pushback trailer.
	done := make(chan error, 1)
	go func() {
		_, err := client.Run(context.Background(), &testpb.RunRequest{Input: "block", RequestId: "k-2"})
		done <- err
	}()
	<-entered
	var trailer metadata.MD
	_, err = client.Run(context.Background(), &testpb.RunRequest{Input: "block", RequestId: "k-2"}, grpc.Trailer(&trailer))
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := status.Convert(err); st.Code() != codes.Aborted || retryInfo(err) <= 0 || errorInfo(err).GetReason() != rpcrecord.ReasonKeyInUse {
		t.Errorf("in use: %v %v", st, st.Details())
	}
	if got := first(trailer, "grpc-retry-pushback-ms"); got == "" || got == "0" {
		t.Errorf("in use: pushback trailer %q", got)
	}
}

func TestKeyOptionalAndMethods(t *testing.T) {
	impl := &funcServer{run: echoRun}
	client, rep := setup(t, idemgrpc.Options{KeyOptional: true}, idempotency.Options{}, impl)
	for range 2 {
		if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	if n := impl.calls.Load(); n != 2 || len(rep.outcomes()) != 0 {
		t.Errorf("without a key: handler ran %d times, reports %v; want 2 and none", n, rep.outcomes())
	}

	strict := &funcServer{run: echoRun}
	client, _ = setup(t, idemgrpc.Options{}, idempotency.Options{}, strict)
	// Read is declared NO_SIDE_EFFECTS: no key needed, nothing stored.
	if resp, err := client.Read(context.Background(), &testpb.RunRequest{Input: "x"}); err != nil || resp.GetOutput() != "read x" {
		t.Errorf("Read: %v %v", resp, err)
	}
	if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "x"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Run without a key: %v", err)
	}

	custom := &funcServer{run: echoRun}
	client, _ = setup(t, idemgrpc.Options{Methods: func(m string) bool { return !strings.HasSuffix(m, "/Run") }}, idempotency.Options{}, custom)
	if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "x"}); err != nil {
		t.Errorf("Run left out by Methods: %v", err)
	}
	if _, err := client.Read(context.Background(), &testpb.RunRequest{Input: "x"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Read put in by Methods: %v", err)
	}
}

func TestStreamsRule(t *testing.T) {
	impl := &funcServer{run: echoRun}
	client, _ := setup(t, idemgrpc.Options{}, idempotency.Options{}, impl)
	stream, err := client.Watch(context.Background(), &testpb.RunRequest{Input: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := stream.Recv(); err != nil || resp.GetOutput() != "watch x" {
		t.Errorf("a stream without a key: %v %v", resp, err)
	}
	stream, err = client.Watch(withKey("k"), &testpb.RunRequest{Input: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.Unimplemented {
		t.Errorf("a stream with a key: %v, want UNIMPLEMENTED", err)
	}
	if n := impl.calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

// The interceptor called directly: a replay is a message of the
// generated type.
func TestReplayType(t *testing.T) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{KeyField: idemgrpc.AIPKeyField})
	if err != nil {
		t.Fatal(err)
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/idemtest.v1.OpService/Run"}
	handler := func(ctx context.Context, req any) (any, error) {
		return &testpb.RunResponse{Output: "made"}, nil
	}
	req := &testpb.RunRequest{Input: "x", RequestId: "k", Labels: map[string]string{"a": "1", "b": "2", "c": "3"}}
	for range 2 {
		resp, err := idem.Unary(context.Background(), proto.Clone(req), info, handler)
		if got, ok := resp.(*testpb.RunResponse); err != nil || !ok || got.GetOutput() != "made" {
			t.Fatalf("%T %v %v", resp, resp, err)
		}
	}
}

func TestNewServerInterceptorErrors(t *testing.T) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		mw   *idempotency.Middleware
		opts idemgrpc.Options
	}{
		{nil, idemgrpc.Options{}},
		{mw, idemgrpc.Options{KeyField: "request-id"}},
		{mw, idemgrpc.Options{MaxFieldKeyLength: 256}},
		{mw, idemgrpc.Options{MaxFieldKeyLength: -1}},
	} {
		if _, err := idemgrpc.NewServerInterceptor(c.mw, c.opts); err == nil || !strings.HasPrefix(err.Error(), "idemgrpc: ") {
			t.Errorf("%+v: %v", c.opts, err)
		}
	}
}
