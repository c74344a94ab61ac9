// Command venue-rpc serves the venue creation of examples/venue-service
// over gRPC (grpc-go, on GRPC_ADDR) and over Connect (its Connect, gRPC
// and gRPC-Web protocols, on HTTP_ADDR, HTTP/2 without TLS included), from
// venue/v1/venue.proto. Both share one idempotency store: a CreateVenue
// sent over one and retried, with the same request_id, over the other
// gets the same venue.
//
//	go run . &
//	grpcurl -plaintext -H 'authorization: Bearer demo-key' \
//	  -d '{"name":"Hall","slug":"hall","request_id":"0b6f4a5e-9a53-4e0f-8d7a-0d4c3f1b2a10"}' \
//	  127.0.0.1:9090 venue.v1.VenueService/CreateVenue
//	curl -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' \
//	  -d '{"name":"Hall","slug":"hall","requestId":"0b6f4a5e-9a53-4e0f-8d7a-0d4c3f1b2a10"}' \
//	  http://127.0.0.1:8080/venue.v1.VenueService/CreateVenue
//
// The second call answers the venue the first created, with
// X-Idempotent-Replayed: true. Environment: GRPC_ADDR (127.0.0.1:9090),
// HTTP_ADDR (127.0.0.1:8080), API_KEYS ("key:tenant,…", default
// demo-key:demo).
//
// The generated code is committed; regenerate it with go generate
// ./venue/v1 (protoc and Go needed: see protoc.sh).
package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/seed70ea8305/idempotency"
	venuev1 "github.com/seed70ea8305/idempotency/examples/venue-rpc/venue/v1"
	"github.com/seed70ea8305/idempotency/examples/venue-rpc/venue/v1/venuev1connect"
	"github.com/seed70ea8305/idempotency/idemconnect"
	"github.com/seed70ea8305/idempotency/idemgrpc"
)

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(logger); err != nil {
		logger.Error("venue-rpc", "error", err)
		os.Exit(1)
	}
}

func run(logger *slog.Logger) error {
	keys, err := parseAPIKeys(envOr("API_KEYS", "demo-key:demo"))
	if err != nil {
		return fmt.Errorf("API_KEYS: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := newApp(keys, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), &venues{payments: &fakePayments{}}, logger)
	if err != nil {
		return err
	}
	grpcLis, err := net.Listen("tcp", envOr("GRPC_ADDR", "127.0.0.1:9090"))
	if err != nil {
		return err
	}
	httpSrv := &http.Server{Addr: envOr("HTTP_ADDR", "127.0.0.1:8080"), Handler: a.http, Protocols: new(http.Protocols), ReadHeaderTimeout: 10 * time.Second}
	httpSrv.Protocols.SetHTTP1(true)
	httpSrv.Protocols.SetUnencryptedHTTP2(true) // the gRPC protocol without TLS
	errs := make(chan error, 2)
	go func() { errs <- a.grpc.Serve(grpcLis) }()
	go func() { errs <- httpSrv.ListenAndServe() }()
	logger.Info("serving", "grpc", grpcLis.Addr().String(), "http", httpSrv.Addr, "tenants", keys.tenants())
	select {
	case err = <-errs:
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a.grpc.GracefulStop()
	if serr := httpSrv.Shutdown(shutdown); err == nil {
		err = serr
	}
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// app is the service on both transports.
type app struct {
	grpc *grpc.Server
	http http.Handler
}

// newApp serves v over gRPC and Connect, each call authenticated by its
// bearer key and protected by one middleware on store, scoped by tenant.
func newApp(keys apiKeys, store idempotency.Store, v *venues, logger *slog.Logger) (*app, error) {
	mw, err := idempotency.New(store, idempotency.Options{
		Logger: logger,
		// A duplicate of a call still running waits up to 10 s for its
		// outcome instead of getting ABORTED at once.
		Wait: 10 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	grpcIdem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{
		KeyField: idemgrpc.AIPKeyField,
		// Records belong to the authenticated tenant (authentication runs
		// first), never to metadata the client chooses.
		Scope: func(ctx context.Context, _ string) string { return tenantFrom(ctx) },
	})
	if err != nil {
		return nil, err
	}
	connectIdem, err := idemconnect.NewInterceptor(mw, idemconnect.Options{
		KeyField: idemconnect.AIPKeyField,
		Scope:    func(ctx context.Context, _ connect.AnyRequest) string { return tenantFrom(ctx) },
	})
	if err != nil {
		return nil, err
	}
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(keys.grpcAuth, recoverGRPC(logger), grpcIdem.Unary),
		grpc.ChainStreamInterceptor(grpcIdem.Stream),
	)
	venuev1.RegisterVenueServiceServer(srv, grpcVenues{v: v})
	path, handler := venuev1connect.NewVenueServiceHandler(connectVenues{v: v},
		connect.WithRecover(func(ctx context.Context, spec connect.Spec, _ http.Header, p any) error {
			logger.ErrorContext(ctx, "panic", "procedure", spec.Procedure, "value", fmt.Sprint(p))
			return connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}),
		connect.WithInterceptors(keys.connectAuth(), connectIdem),
	)
	mux := http.NewServeMux()
	mux.Handle(path, handler)
	return &app{grpc: srv, http: mux}, nil
}

// recoverGRPC answers a panic with INTERNAL; it sits outside the
// idempotency interceptor, which frees the key and lets the panic go on.
func recoverGRPC(logger *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if p := recover(); p != nil {
				logger.ErrorContext(ctx, "panic", "method", info.FullMethod, "value", fmt.Sprint(p))
				resp, err = nil, status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(ctx, req)
	}
}

// grpcVenues is the grpc-go service.
type grpcVenues struct {
	venuev1.UnimplementedVenueServiceServer
	v *venues
}

func (s grpcVenues) CreateVenue(ctx context.Context, req *venuev1.CreateVenueRequest) (*venuev1.Venue, error) {
	venue, err := s.v.create(ctx, tenantFrom(ctx), req)
	if err != nil {
		return nil, grpcError(err)
	}
	// Stored with the response and sent again with its replay.
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-venue-id", venue.GetId()))
	return venue, nil
}

func (s grpcVenues) GetVenue(ctx context.Context, req *venuev1.GetVenueRequest) (*venuev1.Venue, error) {
	venue, err := s.v.get(tenantFrom(ctx), req.GetId())
	if err != nil {
		return nil, grpcError(err)
	}
	return venue, nil
}

func grpcError(err error) error {
	var ae *apiError
	if errors.As(err, &ae) {
		return status.Error(codes.Code(ae.code), ae.msg)
	}
	if c := idempotency.StatusCode(err); c == http.StatusServiceUnavailable {
		return status.Error(codes.Unavailable, "retry with the same request_id")
	}
	return status.Error(codes.Internal, "internal error")
}

// connectVenues is the Connect service.
type connectVenues struct{ v *venues }

func (s connectVenues) CreateVenue(ctx context.Context, req *connect.Request[venuev1.CreateVenueRequest]) (*connect.Response[venuev1.Venue], error) {
	venue, err := s.v.create(ctx, tenantFrom(ctx), req.Msg)
	if err != nil {
		return nil, connectError(err)
	}
	resp := connect.NewResponse(venue)
	resp.Header().Set("X-Venue-Id", venue.GetId())
	return resp, nil
}

func (s connectVenues) GetVenue(ctx context.Context, req *connect.Request[venuev1.GetVenueRequest]) (*connect.Response[venuev1.Venue], error) {
	venue, err := s.v.get(tenantFrom(ctx), req.Msg.GetId())
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(venue), nil
}

func connectError(err error) error {
	var ae *apiError
	if errors.As(err, &ae) {
		return connect.NewError(connect.Code(ae.code), errors.New(ae.msg))
	}
	if c := idempotency.StatusCode(err); c == http.StatusServiceUnavailable {
		return connect.NewError(connect.CodeUnavailable, errors.New("retry with the same request_id"))
	}
	return connect.NewError(connect.CodeInternal, errors.New("internal error"))
}

// apiKeys maps the SHA-256 of each API key to its tenant.
type apiKeys map[[sha256.Size]byte]string

// parseAPIKeys reads "key:tenant,key:tenant".
func parseAPIKeys(text string) (apiKeys, error) {
	keys := apiKeys{}
	for pair := range strings.SplitSeq(text, ",") {
		key, tenant, ok := strings.Cut(strings.TrimSpace(pair), ":")
		if !ok || key == "" || tenant == "" {
			return nil, errors.New("want key:tenant pairs separated by commas")
		}
		keys[sha256.Sum256([]byte(key))] = tenant
	}
	return keys, nil
}

func (k apiKeys) tenants() string {
	var names []string
	for _, t := range k {
		names = append(names, t)
	}
	return strings.Join(names, ",")
}

// tenant returns the tenant of an Authorization value.
func (k apiKeys) tenant(authorization string) (string, bool) {
	scheme, token, ok := strings.Cut(authorization, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tenant, ok := k[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	return tenant, ok
}

type tenantKey struct{}

func tenantFrom(ctx context.Context) string {
	tenant, _ := ctx.Value(tenantKey{}).(string)
	return tenant
}

// grpcAuth lets through calls whose authorization metadata carries a
// known key, with its tenant in the context.
func (k apiKeys) grpcAuth(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	var auth string
	if v := md.Get("authorization"); len(v) > 0 {
		auth = v[0]
	}
	tenant, ok := k.tenant(auth)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "send authorization: Bearer <api key>")
	}
	return handler(context.WithValue(ctx, tenantKey{}, tenant), req)
}

// connectAuth does the same for Connect.
func (k apiKeys) connectAuth() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			tenant, ok := k.tenant(req.Header().Get("Authorization"))
			if !ok {
				return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("send Authorization: Bearer <api key>"))
			}
			return next(context.WithValue(ctx, tenantKey{}, tenant), req)
		}
	}
}
