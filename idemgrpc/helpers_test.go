package idemgrpc_test

import (
	"context"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/seed70ea8305/idempotency/idemgrpc"
	"github.com/seed70ea8305/idempotency/internal/transporttest"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
)

// opServer serves the table's operation: Run and Read run it, Watch
// streams its output once.
type opServer struct {
	testpb.UnimplementedOpServiceServer
	op transporttest.Op
}

func (s *opServer) Run(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
	out, err := s.op(ctx, req.GetInput())
	if err != nil {
		return nil, status.Error(codes.Internal, "operation failed")
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(strings.ToLower(transporttest.ResultHeader), out))
	return &testpb.RunResponse{Output: out}, nil
}

func (s *opServer) Read(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
	return s.Run(ctx, req)
}

func (s *opServer) Watch(req *testpb.RunRequest, stream grpc.ServerStreamingServer[testpb.RunResponse]) error {
	out, err := s.op(stream.Context(), req.GetInput())
	if err != nil {
		return status.Error(codes.Internal, "operation failed")
	}
	return stream.Send(&testpb.RunResponse{Output: out})
}

// grpcClient is the table's client of the gRPC transport.
type grpcClient struct {
	client testpb.OpServiceClient
	field  bool // send the key in request_id, not in metadata
}

func (c *grpcClient) Call(ctx context.Context, call transporttest.Call) transporttest.Reply {
	req := &testpb.RunRequest{Input: call.Input}
	if call.Tenant != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, strings.ToLower(transporttest.TenantHeader), call.Tenant)
	}
	if call.Key != "" {
		if c.field {
			req.RequestId = call.Key
		} else {
			ctx = metadata.AppendToOutgoingContext(ctx, idemgrpc.KeyMetadata, call.Key)
		}
	}
	var header, trailer metadata.MD
	resp, err := c.client.Run(ctx, req, grpc.Header(&header), grpc.Trailer(&trailer))
	return replyOf(resp, err, header, trailer)
}

// replyOf puts what a gRPC call got in the table's terms.
func replyOf(resp *testpb.RunResponse, err error, header, trailer metadata.MD) transporttest.Reply {
	st := status.Convert(err)
	r := transporttest.Reply{
		Status:     code.Code(st.Code()).String(),
		Replayed:   first(header, idemgrpc.ReplayMetadata) == "true" || first(trailer, idemgrpc.ReplayMetadata) == "true",
		RetryAfter: retryInfo(err),
	}
	switch st.Code() {
	case codes.OK:
		r.Class, r.Output, r.Result = transporttest.OK, resp.GetOutput(), first(header, strings.ToLower(transporttest.ResultHeader))
	case codes.Aborted:
		r.Class = transporttest.Conflict
	case codes.FailedPrecondition:
		r.Class = transporttest.Mismatch
	case codes.InvalidArgument:
		r.Class = transporttest.BadKey
	case codes.Unavailable:
		r.Class = transporttest.Unavailable
	case codes.Internal:
		r.Class = transporttest.Failed
	case codes.Canceled, codes.DeadlineExceeded:
		r.Class, r.Err = transporttest.Broken, err
	default:
		r.Class, r.Err = transporttest.Other, err
	}
	return r
}

func first(md metadata.MD, name string) string {
	if v := md.Get(name); len(v) > 0 {
		return v[0]
	}
	return ""
}

// retryInfo returns the RetryInfo delay of err's status, 0 if none.
func retryInfo(err error) time.Duration {
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	return 0
}

// errorInfo returns the ErrorInfo of err's status, nil if none.
func errorInfo(err error) *errdetails.ErrorInfo {
	for _, d := range status.Convert(err).Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei
		}
	}
	return nil
}
