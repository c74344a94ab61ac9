package idemconnect_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemconnect"
	"github.com/seed70ea8305/idempotency/internal/transporttest"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb/testpbconnect"
)

// TestTable plays the transports' table against a Connect handler on a
// loopback server (HTTP/2 over TLS), with each of its protocols, and
// with the key in the header and in request_id.
func TestTable(t *testing.T) {
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) { transporttest.Run(t, connectTransport("connect-"+p.name, "", p.opts...)) })
	}
	t.Run("request_id", func(t *testing.T) {
		transporttest.Run(t, connectTransport("connect-request_id", idemconnect.AIPKeyField))
	})
}

var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	{"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}},
}

func connectTransport(name, keyField string, clientOpts ...connect.ClientOption) transporttest.Transport {
	return transporttest.Transport{
		Name: name,
		Serve: func(t *testing.T, store idempotency.Store, opts idempotency.Options, op transporttest.Op) transporttest.Client {
			mw, err := idempotency.New(store, opts)
			if err != nil {
				t.Fatal(err)
			}
			idem, err := idemconnect.NewInterceptor(mw, idemconnect.Options{KeyField: keyField, Scope: tenantOf})
			if err != nil {
				t.Fatal(err)
			}
			url, httpClient := serve(t, &opServer{op: op}, idem)
			return &connectClient{client: testpbconnect.NewOpServiceClient(httpClient, url, clientOpts...), field: keyField != ""}
		},
	}
}

func tenantOf(_ context.Context, req connect.AnyRequest) string {
	return req.Header().Get(transporttest.TenantHeader)
}

// recoverPanics is the handler's panic recovery, outside the
// idempotency interceptor: a panic becomes CodeInternal.
var recoverPanics = connect.WithRecover(func(context.Context, connect.Spec, http.Header, any) error {
	return connect.NewError(connect.CodeInternal, errors.New("panic"))
})

// serve serves impl behind interceptors on a loopback server speaking
// HTTP/2 over TLS, until t ends.
func serve(t testing.TB, impl testpbconnect.OpServiceHandler, interceptors ...connect.Interceptor) (string, *http.Client) {
	t.Helper()
	path, handler := testpbconnect.NewOpServiceHandler(impl, recoverPanics, connect.WithInterceptors(interceptors...))
	mux := http.NewServeMux()
	mux.Handle(path, handler)
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.URL, srv.Client()
}

// opServer serves the table's operation.
type opServer struct {
	testpbconnect.UnimplementedOpServiceHandler
	op transporttest.Op
}

func (s *opServer) Run(ctx context.Context, req *connect.Request[testpb.RunRequest]) (*connect.Response[testpb.RunResponse], error) {
	out, err := s.op(ctx, req.Msg.GetInput())
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("operation failed"))
	}
	resp := connect.NewResponse(&testpb.RunResponse{Output: out})
	resp.Header().Set(transporttest.ResultHeader, out)
	return resp, nil
}

// connectClient is the table's client.
type connectClient struct {
	client testpbconnect.OpServiceClient
	field  bool
}

func (c *connectClient) Call(ctx context.Context, call transporttest.Call) transporttest.Reply {
	req := connect.NewRequest(&testpb.RunRequest{Input: call.Input})
	if call.Tenant != "" {
		req.Header().Set(transporttest.TenantHeader, call.Tenant)
	}
	if call.Key != "" {
		if c.field {
			req.Msg.RequestId = call.Key
		} else {
			req.Header().Set(idemconnect.KeyHeader, call.Key)
		}
	}
	resp, err := c.client.Run(ctx, req)
	return replyOf(resp, err)
}

func replyOf(resp *connect.Response[testpb.RunResponse], err error) transporttest.Reply {
	if err == nil {
		return transporttest.Reply{
			Class: transporttest.OK, Status: "OK",
			Output: resp.Msg.GetOutput(), Result: resp.Header().Get(transporttest.ResultHeader),
			Replayed: resp.Header().Get(idemconnect.ReplayHeader) == "true",
		}
	}
	c := connect.CodeOf(err)
	r := transporttest.Reply{Status: code.Code(c).String(), RetryAfter: retryInfo(err)}
	var cerr *connect.Error
	if errors.As(err, &cerr) {
		r.Replayed = cerr.Meta().Get(idemconnect.ReplayHeader) == "true"
	}
	switch c {
	case connect.CodeAborted:
		r.Class = transporttest.Conflict
	case connect.CodeFailedPrecondition:
		r.Class = transporttest.Mismatch
	case connect.CodeInvalidArgument:
		r.Class = transporttest.BadKey
	case connect.CodeUnavailable:
		r.Class = transporttest.Unavailable
	case connect.CodeInternal:
		r.Class = transporttest.Failed
	case connect.CodeCanceled, connect.CodeDeadlineExceeded:
		r.Class, r.Err = transporttest.Broken, err
	default:
		r.Class, r.Err = transporttest.Other, err
	}
	return r
}

// retryInfo returns the RetryInfo delay of a Connect error, 0 if none.
func retryInfo(err error) time.Duration {
	var cerr *connect.Error
	if !errors.As(err, &cerr) {
		return 0
	}
	for _, d := range cerr.Details() {
		if v, err := d.Value(); err == nil {
			if ri, ok := v.(*errdetails.RetryInfo); ok {
				return ri.GetRetryDelay().AsDuration()
			}
		}
	}
	return 0
}

// errorInfo returns the ErrorInfo of a Connect error, nil if none.
func errorInfo(err error) *errdetails.ErrorInfo {
	var cerr *connect.Error
	if !errors.As(err, &cerr) {
		return nil
	}
	for _, d := range cerr.Details() {
		if v, err := d.Value(); err == nil {
			if ei, ok := v.(*errdetails.ErrorInfo); ok {
				return ei
			}
		}
	}
	return nil
}
