package idemgrpc

import (
	"context"
	"errors"
	"strconv"
	"sync"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
)

// Metadata names.
const (
	// KeyMetadata is the request metadata that carries the key when the
	// request message does not ([Options].KeyField): gRPC's spelling of
	// the Idempotency-Key header.
	KeyMetadata = rpcrecord.MetadataKey
	// ReplayMetadata is the response header metadata set to "true" on a
	// replay, the middleware's X-Idempotent-Replayed in lower case.
	ReplayMetadata = rpcrecord.ReplayHeader
	// pushbackMetadata is the trailer with which a server tells gRPC's
	// retry policy when to retry (gRFC A6).
	pushbackMetadata = "grpc-retry-pushback-ms"
)

// Key fields of the two conventions, for [Options].KeyField and
// [ClientOptions].KeyField.
const (
	// AIPKeyField is AIP-155's request_id (at most 36 ASCII characters,
	// a UUID recommended).
	AIPKeyField = rpcrecord.AIPField
	// AEPKeyField is AEP-155's idempotency_key.
	AEPKeyField = rpcrecord.AEPField
)

// Options configures a [ServerInterceptor] ([NewServerInterceptor]). The
// zero value is the defaults each field states. The rest (store, lease,
// TTL, waiting, observer, logger, shutdown) is the [idempotency.Middleware]'s.
type Options struct {
	// KeyField names the request field that carries the key, for the
	// methods whose request message has a string field of that name:
	// [AIPKeyField] ("request_id") or [AEPKeyField] ("idempotency_key").
	// A request whose field is empty, or whose message has no such field,
	// carries its key in the [KeyMetadata] metadata; one whose field and
	// metadata name different keys is refused. Default: "", keys in
	// metadata only.
	KeyField string

	// MaxFieldKeyLength caps the length of a key carried in KeyField, at
	// most 255. Default: 36, AIP-155's limit. A key in metadata follows
	// the Idempotency-Key header's rules ([idempotency.ParseKey]).
	MaxFieldKeyLength int

	// KeyOptional serves calls that carry no key without protection, as
	// AIP-155 has request IDs optional, instead of refusing them with
	// INVALID_ARGUMENT. Such calls are not reported to the observer.
	KeyOptional bool

	// Scope derives the scope of a call, typically the tenant or the
	// authenticated principal (set by an authentication interceptor that
	// runs before this one), never metadata the client chooses freely.
	// Records are kept per scope and key. It runs concurrently for
	// concurrent calls. Default: one scope for every call (see
	// [idempotency.Options].Scope for why an API with several clients
	// must set one).
	Scope func(ctx context.Context, fullMethod string) string

	// Methods decides which unary methods are protected; the others pass
	// through untouched. It runs once per method, and its answer is kept.
	// Default: every method except those that their .proto declares free
	// of side effects or idempotent (option idempotency_level =
	// NO_SIDE_EFFECTS or IDEMPOTENT), which are safe to repeat without a
	// key.
	Methods func(fullMethod string) bool

	// Retryable decides which status codes a handler's error may have and
	// free the key instead of being stored, so that a retry runs the
	// handler again. A handler's response, and an error with any other
	// code, is stored and replayed with its header and trailer metadata;
	// the middleware's own rule ([idempotency.Options].Retryable) and
	// [idempotency.Claim.Keep] are then applied to the HTTP status that
	// google.rpc.Code maps the code to (OK is 200), so keep that rule at
	// its default on a Middleware that serves gRPC. Default: every code
	// but OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
	// PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION and
	// OUT_OF_RANGE: the codes whose HTTP mapping is a 5xx or 429, as the
	// middleware's rule has it, plus CANCELLED (the work was cut short) and
	// ABORTED (a conflict that asks for a retry).
	Retryable func(c codes.Code) bool
}

// ServerInterceptor makes the unary methods of a gRPC server idempotent,
// on the engine of an [idempotency.Middleware]. It is safe for concurrent
// use; create it with [NewServerInterceptor].
type ServerInterceptor struct {
	mw        *idempotency.Middleware
	keyField  string
	maxField  int
	optional  bool
	scope     func(context.Context, string) string
	methods   func(string) bool
	retryable func(codes.Code) bool
	protected sync.Map // full method → bool
}

// NewServerInterceptor returns an interceptor that runs protected calls
// through mw ([idempotency.Middleware.Do]), configured by opts. It fails
// when mw is nil or an option is invalid.
func NewServerInterceptor(mw *idempotency.Middleware, opts Options) (*ServerInterceptor, error) {
	if mw == nil {
		return nil, errors.New("idemgrpc: Middleware is nil")
	}
	if err := rpcrecord.CheckFieldName(opts.KeyField); err != nil {
		return nil, errors.New("idemgrpc: " + err.Error())
	}
	if err := rpcrecord.CheckMaxFieldKeyLength(opts.MaxFieldKeyLength); err != nil {
		return nil, errors.New("idemgrpc: " + err.Error())
	}
	s := &ServerInterceptor{
		mw:        mw,
		keyField:  opts.KeyField,
		maxField:  opts.MaxFieldKeyLength,
		optional:  opts.KeyOptional,
		scope:     opts.Scope,
		methods:   opts.Methods,
		retryable: opts.Retryable,
	}
	if s.maxField == 0 {
		s.maxField = rpcrecord.MaxFieldKeyLength
	}
	if s.scope == nil {
		s.scope = func(context.Context, string) string { return "" }
	}
	if s.methods == nil {
		s.methods = func(fullMethod string) bool { return !rpcrecord.SafeToRepeat(rpcrecord.LookupMethod(fullMethod)) }
	}
	if s.retryable == nil {
		s.retryable = func(c codes.Code) bool { return rpcrecord.Retryable(code.Code(c)) }
	}
	return s, nil
}

func (s *ServerInterceptor) isProtected(fullMethod string) bool {
	if p, ok := s.protected.Load(fullMethod); ok {
		return p.(bool)
	}
	p := s.methods(fullMethod)
	s.protected.Store(fullMethod, p)
	return p
}

// Unary is a [grpc.UnaryServerInterceptor]: install it with
// [grpc.ChainUnaryInterceptor], after the interceptors that authenticate
// the caller and recover from panics.
//
// A protected call runs its handler at most once per key at a time, across
// every process sharing the store. The handler's context carries the
// [idempotency.Claim] ([idempotency.ClaimFromContext]) and tells the truth
// about the lease, as for HTTP. Its outcome (the response message, or an
// error whose code is not [Options].Retryable, with the header and trailer
// metadata the handler set through [grpc.SetHeader], [grpc.SendHeader]
// and [grpc.SetTrailer]) is held until it is stored, then sent; a retry
// gets it again with [ReplayMetadata] set, as a message of the generated
// type registered for it. Header metadata the handler sends is held too:
// [grpc.SendHeader] records it and sends nothing. An error whose code is
// Retryable frees the key and goes to the client as it is. A panic frees
// the key and goes on.
//
// The middleware's own answers, with google.rpc error details (an
// ErrorInfo of domain "idempotency.seed70ea8305.github.com" first):
//
//   - no key, or a malformed one: INVALID_ARGUMENT, with a BadRequest
//     naming the field or metadata; the request is wrong whatever the
//     server's state;
//   - the key used before with another request (another method, or
//     another message apart from the key): FAILED_PRECONDITION, with a
//     PreconditionFailure; the key is bound to that request, which no
//     retry changes, only a new key;
//   - the key held by a call still running: ABORTED, with a RetryInfo of
//     the rest of its lease (and the grpc-retry-pushback-ms trailer that
//     gRPC's retry policy reads); it is a concurrency conflict, which
//     clears when the first call ends and the same call then gets its
//     outcome: not UNAVAILABLE, since the server is fine, and not
//     ALREADY_EXISTS, which handlers use for their own resources. With
//     [idempotency.Options].Wait the duplicate waits for that outcome
//     instead;
//   - the store down or too slow, the outcome not stored (the lease was
//     lost, the store failed after the handler ran), or a shutdown:
//     UNAVAILABLE, with a RetryInfo of 1 s: nothing is stored, so the
//     same call is safe to send again, and retry policies retry
//     UNAVAILABLE. A response that could not be stored is never sent;
//   - a stored record that cannot be read: INTERNAL, no RetryInfo.
func (s *ServerInterceptor) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !s.isProtected(info.FullMethod) {
		return handler(ctx, req)
	}
	msg, ok := req.(proto.Message)
	if !ok {
		return nil, status.Error(codes.Internal, "idemgrpc: the request is not a protobuf message")
	}
	m := msg.ProtoReflect()
	fd := rpcrecord.KeyField(m.Descriptor(), s.keyField)
	md, _ := metadata.FromIncomingContext(ctx)
	key, source, err := rpcrecord.Key(m, fd, md[KeyMetadata], s.maxField)
	if err != nil && s.optional && errors.Is(err, idempotency.ErrKeyMissing) {
		return handler(ctx, req)
	}
	scope := s.scope(ctx, info.FullMethod)
	if err != nil {
		rejectedKey(ctx, s.mw, scope, info.FullMethod)
		return nil, rejection(ctx, err, source)
	}
	fingerprint, err := rpcrecord.Fingerprint(info.FullMethod, msg, fd)
	if err != nil {
		return nil, status.Error(codes.Internal, "idemgrpc: the request cannot be encoded")
	}
	call := idempotency.Claim{Kind: rpcrecord.Kind, Scope: scope, Key: key, Fingerprint: fingerprint, Route: info.FullMethod}
	var run attempt
	stored, replayed, err := s.mw.Do(ctx, call, func(ctx context.Context) (*idempotency.Response, error) {
		return s.run(ctx, &run, req, info, handler)
	})
	var failed *handlerFailed
	switch {
	case err == nil && replayed:
		return replay(ctx, stored)
	case err == nil:
		// Stored, or not to be stored by the middleware's rule: sent as
		// the handler answered.
		run.send(ctx)
		return run.resp, run.err
	case errors.As(err, &failed):
		run.send(ctx)
		return nil, failed.err
	}
	return nil, rejection(ctx, err, source)
}

// attempt is what one run of the handler answered.
type attempt struct {
	stream  capture
	resp    any
	err     error
	outcome rpcrecord.Outcome
}

// handlerFailed is the error the work gives [idempotency.Middleware.Do]
// for a handler's error that frees the key; err goes to the client as it
// is.
type handlerFailed struct{ err error }

func (e *handlerFailed) Error() string { return "idemgrpc: handler failed: " + e.err.Error() }
func (e *handlerFailed) Unwrap() error { return e.err }

func (s *ServerInterceptor) run(ctx context.Context, a *attempt, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (*idempotency.Response, error) {
	a.stream.method = info.FullMethod
	a.resp, a.err = handler(grpc.NewContextWithServerTransportStream(ctx, &a.stream), req)
	a.stream.mu.Lock()
	a.outcome.Header, a.outcome.Trailer = stored(a.stream.header), stored(a.stream.trailer)
	a.stream.mu.Unlock()
	if a.err != nil {
		st := status.Convert(a.err)
		if s.retryable(st.Code()) {
			return nil, &handlerFailed{err: a.err}
		}
		a.outcome.Status = st.Proto()
		return a.outcome.Response()
	}
	pm, ok := a.resp.(proto.Message)
	if !ok || pm == nil {
		return nil, errors.New("idemgrpc: the response is not a protobuf message")
	}
	var err error
	if a.outcome.Message, err = proto.Marshal(pm); err != nil {
		return nil, err
	}
	a.outcome.Type = pm.ProtoReflect().Descriptor().FullName()
	return a.outcome.Response()
}

// send gives the client the metadata the handler set.
func (a *attempt) send(ctx context.Context) {
	a.stream.mu.Lock()
	defer a.stream.mu.Unlock()
	if len(a.stream.header) > 0 {
		_ = grpc.SetHeader(ctx, a.stream.header)
	}
	if len(a.stream.trailer) > 0 {
		_ = grpc.SetTrailer(ctx, a.stream.trailer)
	}
}

// replay answers a stored outcome.
func replay(ctx context.Context, resp *idempotency.Response) (any, error) {
	o, err := rpcrecord.FromResponse(resp)
	if err != nil {
		return nil, status.Error(codes.Internal, "idemgrpc: the stored outcome cannot be replayed")
	}
	header := metadata.MD(o.Header).Copy()
	if header == nil {
		header = metadata.MD{}
	}
	header[ReplayMetadata] = []string{"true"}
	_ = grpc.SetHeader(ctx, header)
	if len(o.Trailer) > 0 {
		_ = grpc.SetTrailer(ctx, metadata.MD(o.Trailer))
	}
	if o.Status != nil {
		return nil, status.ErrorProto(o.Status)
	}
	msg, err := o.NewMessage()
	if err != nil {
		return nil, status.Error(codes.Internal, "idemgrpc: the stored response cannot be replayed")
	}
	return msg, nil
}

// rejection is the status error that answers one of the middleware's
// errors (see [ServerInterceptor.Unary]).
func rejection(ctx context.Context, err error, source string) error {
	r := rpcrecord.Reject(err, source)
	st := status.New(codes.Code(r.Code), r.Message)
	if r.RetryDelay > 0 {
		_ = grpc.SetTrailer(ctx, metadata.Pairs(pushbackMetadata, strconv.FormatInt(r.RetryDelay.Milliseconds(), 10)))
	}
	p := st.Proto()
	for _, d := range r.Details {
		if a, err := anypb.New(d); err == nil {
			p.Details = append(p.Details, a)
		}
	}
	return status.ErrorProto(p)
}

// rejectedKey reports a call refused for its key to the middleware's
// observer: [idempotency.Middleware.Do] refuses an empty key, without
// running anything, and reports it as [idempotency.OutcomeRejected].
func rejectedKey(ctx context.Context, mw *idempotency.Middleware, scope, route string) {
	_, _, _ = mw.Do(ctx, idempotency.Claim{Kind: rpcrecord.Kind, Scope: scope, Route: route}, func(context.Context) (*idempotency.Response, error) {
		return nil, errors.New("idemgrpc: unreachable")
	})
}

// stored returns the metadata of md that is part of an outcome.
func stored(md metadata.MD) map[string][]string {
	var out map[string][]string
	for name, values := range md {
		if rpcrecord.Stored(name) {
			if out == nil {
				out = make(map[string][]string, len(md))
			}
			out[name] = values
		}
	}
	return out
}

// capture stands for the call's transport stream in the handler's
// context: it records the metadata the handler sets, for the outcome,
// and sends nothing.
type capture struct {
	method          string
	mu              sync.Mutex
	header, trailer metadata.MD
}

var _ grpc.ServerTransportStream = (*capture)(nil)

func (c *capture) Method() string { return c.method }

func (c *capture) SetHeader(md metadata.MD) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.header = metadata.Join(c.header, md)
	return nil
}

// SendHeader records md, as SetHeader: the header is sent with the
// outcome, once it is stored.
func (c *capture) SendHeader(md metadata.MD) error { return c.SetHeader(md) }

func (c *capture) SetTrailer(md metadata.MD) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.trailer = metadata.Join(c.trailer, md)
	return nil
}

// keyFieldOf returns the key field of msg's type for name, or nil.
func keyFieldOf(msg proto.Message, name string) protoreflect.FieldDescriptor {
	if name == "" {
		return nil
	}
	return rpcrecord.KeyField(msg.ProtoReflect().Descriptor(), name)
}
