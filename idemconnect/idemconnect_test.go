package idemconnect_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemconnect"
	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb/testpbconnect"
)

// funcHandler serves Run with run, counting its calls, and records what
// an outer interceptor sees of the responses.
type funcHandler struct {
	testpbconnect.UnimplementedOpServiceHandler
	calls atomic.Int32
	run   func(ctx context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error)
}

func (h *funcHandler) Run(ctx context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
	h.calls.Add(1)
	return h.run(ctx, req)
}

func (h *funcHandler) Read(_ context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
	h.calls.Add(1)
	return connect.NewResponse(&testpb.RunResponse{Output: "read " + req.Msg.GetInput()}), nil
}

func (h *funcHandler) Watch(_ context.Context, req *connect.Request[testpb.RunRequest], stream *connect.ServerStream[testpb.RunResponse]) error {
	h.calls.Add(1)
	return stream.Send(&testpb.RunResponse{Output: "watch " + req.Msg.GetInput()})
}

// outerSeen is an interceptor outside the idempotency one that records
// the messages of the responses it sees.
type outerSeen struct {
	mu   sync.Mutex
	msgs []any
}

func (o *outerSeen) intercept(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		if resp != nil {
			o.mu.Lock()
			o.msgs = append(o.msgs, resp.Any())
			o.mu.Unlock()
		}
		return resp, err
	}
}

func setup(t *testing.T, opts idemconnect.Options, h *funcHandler, outer ...connect.Interceptor) testpbconnect.OpServiceClient {
	t.Helper()
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemconnect.NewInterceptor(mw, opts)
	if err != nil {
		t.Fatal(err)
	}
	url, client := serve(t, h, append(outer, idem)...)
	return testpbconnect.NewOpServiceClient(client, url, connect.WithGRPC())
}

func keyed[T any](key string, msg *T) *connect.Request[T] {
	req := connect.NewRequest(msg)
	if key != "" {
		req.Header().Set(idemconnect.KeyHeader, key)
	}
	return req
}

// Headers and trailers set on the response and through the call info,
// binary ones included, are stored and replayed; the replayed message is
// a proto.Message with the stored content.
func TestReplayKeepsMetadata(t *testing.T) {
	h := &funcHandler{run: func(ctx context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
		info, _ := connect.CallInfoForHandlerContext(ctx)
		info.ResponseHeader().Set("X-From-Info", "1")
		claim, _ := idempotency.ClaimFromContext(ctx)
		resp := connect.NewResponse(&testpb.RunResponse{Output: claim.Kind + " " + claim.Route})
		resp.Header().Set("X-Venue", "ven_1")
		resp.Header().Set("X-Raw-Bin", connect.EncodeBinaryHeader([]byte{0, 0xff}))
		resp.Trailer().Set("X-Cost", "3")
		return resp, nil
	}}
	outer := &outerSeen{}
	client := setup(t, idemconnect.Options{}, h, connect.UnaryInterceptorFunc(outer.intercept))
	for i, replayed := range []string{"", "true"} {
		resp, err := client.Run(context.Background(), keyed("k", &testpb.RunRequest{Input: "x"}))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		raw, _ := connect.DecodeBinaryHeader(resp.Header().Get("X-Raw-Bin"))
		if resp.Msg.GetOutput() != "grpc /idemtest.v1.OpService/Run" || resp.Header().Get("X-Venue") != "ven_1" ||
			resp.Header().Get("X-From-Info") != "1" || string(raw) != "\x00\xff" || resp.Trailer().Get("X-Cost") != "3" {
			t.Errorf("call %d: %v, header %v, trailer %v", i, resp.Msg, resp.Header(), resp.Trailer())
		}
		if got := resp.Header().Get(idemconnect.ReplayHeader); got != replayed {
			t.Errorf("call %d: %s %q, want %q", i, idemconnect.ReplayHeader, got, replayed)
		}
	}
	if n := h.calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	outer.mu.Lock()
	defer outer.mu.Unlock()
	if len(outer.msgs) != 2 {
		t.Fatalf("the outer interceptor saw %d responses", len(outer.msgs))
	}
	if _, ok := outer.msgs[0].(*testpb.RunResponse); !ok {
		t.Errorf("first response: %T", outer.msgs[0])
	}
	if m, ok := outer.msgs[1].(proto.Message); !ok || !proto.Equal(m, outer.msgs[0].(proto.Message)) {
		t.Errorf("replayed response: %T %v", outer.msgs[1], outer.msgs[1])
	}
}

// A kept error is replayed with its details and metadata; a retryable one
// frees the key.
func TestStoredErrors(t *testing.T) {
	var code atomic.Int32
	h := &funcHandler{run: func(context.Context, *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
		err := connect.NewError(connect.Code(code.Load()), errors.New("no such publisher"))
		detail, _ := connect.NewErrorDetail(&errdetails.ResourceInfo{ResourceName: "publishers/1"})
		err.AddDetail(detail)
		err.Meta().Set("X-Why", "gone")
		return nil, err
	}}
	client := setup(t, idemconnect.Options{}, h)
	code.Store(int32(connect.CodeNotFound))
	for i := range 2 {
		_, err := client.Run(context.Background(), keyed("kept", &testpb.RunRequest{}))
		var cerr *connect.Error
		if !errors.As(err, &cerr) || cerr.Code() != connect.CodeNotFound || cerr.Message() != "no such publisher" ||
			len(cerr.Details()) != 1 || cerr.Meta().Get("X-Why") != "gone" || (cerr.Meta().Get(idemconnect.ReplayHeader) == "true") != (i == 1) {
			t.Errorf("call %d: %v %v", i, err, cerr.Meta())
		}
	}
	if n := h.calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	h.calls.Store(0)
	code.Store(int32(connect.CodeUnavailable))
	for range 2 {
		if _, err := client.Run(context.Background(), keyed("freed", &testpb.RunRequest{})); connect.CodeOf(err) != connect.CodeUnavailable {
			t.Error(err)
		}
	}
	if n := h.calls.Load(); n != 2 {
		t.Errorf("UNAVAILABLE: handler ran %d times, want 2", n)
	}
}

func TestRejectionDetails(t *testing.T) {
	h := &funcHandler{run: func(_ context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
		return connect.NewResponse(&testpb.RunResponse{Output: req.Msg.GetInput()}), nil
	}}
	client := setup(t, idemconnect.Options{KeyField: idemconnect.AIPKeyField}, h)
	_, err := client.Run(context.Background(), keyed("", &testpb.RunRequest{}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || errorInfo(err).GetReason() != rpcrecord.ReasonKeyMissing || errorInfo(err).GetDomain() != rpcrecord.Domain {
		t.Errorf("missing: %v %v", err, errorInfo(err))
	}
	if _, err := client.Run(context.Background(), keyed("", &testpb.RunRequest{Input: "a", RequestId: "k"})); err != nil {
		t.Fatal(err)
	}
	_, err = client.Run(context.Background(), keyed("", &testpb.RunRequest{Input: "b", RequestId: "k"}))
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || errorInfo(err).GetReason() != rpcrecord.ReasonKeyReused {
		t.Errorf("reused: %v %v", err, errorInfo(err))
	}
}

// Streams pass without a key and are refused with one; a procedure
// declared free of side effects needs no key; a client's calls get one.
func TestStreamsProceduresAndClients(t *testing.T) {
	h := &funcHandler{run: func(_ context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
		return connect.NewResponse(&testpb.RunResponse{Output: req.Header().Get(idemconnect.KeyHeader)}), nil
	}}
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemconnect.NewInterceptor(mw, idemconnect.Options{})
	if err != nil {
		t.Fatal(err)
	}
	url, httpClient := serve(t, h, idem)
	plain := testpbconnect.NewOpServiceClient(httpClient, url)

	stream, err := plain.Watch(context.Background(), connect.NewRequest(&testpb.RunRequest{Input: "x"}))
	if err != nil || !stream.Receive() || stream.Msg().GetOutput() != "watch x" {
		t.Errorf("a stream without a key: %v %v", err, stream.Err())
	}
	stream.Close()
	stream, err = plain.Watch(context.Background(), keyed("k", &testpb.RunRequest{Input: "x"}))
	if err == nil {
		stream.Receive()
		err = stream.Err()
		stream.Close()
	}
	if connect.CodeOf(err) != connect.CodeUnimplemented {
		t.Errorf("a stream with a key: %v", err)
	}
	if resp, err := plain.Read(context.Background(), connect.NewRequest(&testpb.RunRequest{Input: "x"})); err != nil || resp.Msg.GetOutput() != "read x" {
		t.Errorf("Read without a key: %v %v", resp, err)
	}

	keysIn, err := idemconnect.NewInterceptor(nil, idemconnect.Options{})
	if err != nil {
		t.Fatal(err)
	}
	withKeys := testpbconnect.NewOpServiceClient(httpClient, url, connect.WithInterceptors(keysIn))
	resp, err := withKeys.Run(context.Background(), connect.NewRequest(&testpb.RunRequest{Input: "x"}))
	if err != nil || len(resp.Msg.GetOutput()) != 36 {
		t.Errorf("a client call without a key: %v %v, want a UUID", resp, err)
	}
	resp, err = withKeys.Run(idemconnect.WithKey(context.Background(), "chosen"), connect.NewRequest(&testpb.RunRequest{Input: "y"}))
	if err != nil || resp.Msg.GetOutput() != "chosen" {
		t.Errorf("a client call with WithKey: %v %v", resp, err)
	}
}

func TestNewInterceptorErrors(t *testing.T) {
	for _, opts := range []idemconnect.Options{{KeyField: "request-id"}, {MaxFieldKeyLength: 300}} {
		if _, err := idemconnect.NewInterceptor(nil, opts); err == nil {
			t.Errorf("%+v: no error", opts)
		}
	}
}
