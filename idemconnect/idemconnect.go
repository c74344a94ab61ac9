// Package idemconnect makes the unary procedures of a Connect service
// idempotent, for its three protocols (Connect, gRPC and gRPC-Web), on
// the same engine, stores, leases, fences, waiting and observer as the
// net/http middleware of package idempotency, with the semantics of
// package idemgrpc and its answers as Connect errors.
//
// A call carries its key in a request field (AIP-155's request_id,
// AEP-155's idempotency_key: [Options].KeyField) or in the
// Idempotency-Key header. The first call with a key runs the handler and
// stores its outcome, the response message or a Connect error that is to
// be kept, with the headers and trailers the handler set; a retry with
// the same key and the same request (the same procedure and the same
// message apart from the key, compared by their deterministic protobuf
// encoding, whichever codec carried it) gets that outcome again, marked
// with the X-Idempotent-Replayed header; a call while the first still runs
// gets CodeAborted with a RetryInfo, or waits for the first's outcome
// ([idempotency.Options].Wait); the same key with another request gets
// CodeFailedPrecondition. Errors that ask for a retry ([Options].Retryable)
// and panics free the key. [Interceptor.WrapUnary] lists every answer.
//
//	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
//	mw, err := idempotency.New(store, idempotency.Options{})
//	if err != nil {
//		return err
//	}
//	idem, err := idemconnect.NewInterceptor(mw, idemconnect.Options{
//		KeyField: idemconnect.AIPKeyField, // request_id
//		Scope:    func(ctx context.Context, _ connect.AnyRequest) string { return tenantOf(ctx) },
//	})
//	if err != nil {
//		return err
//	}
//	path, handler := venuev1connect.NewVenueServiceHandler(svc, connect.WithInterceptors(authenticate, idem))
//	mux.Handle(path, handler)
//
// The handler finds the call's claim in its context with
// [idempotency.ClaimFromContext], as an HTTP handler does.
//
// Outcomes are kept under the record kind "grpc" in the format package
// idemgrpc uses: a call made through a Connect handler and retried through
// grpc-go serving the same service, or the reverse, is replayed.
package idemconnect

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/code"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
)

// Header names.
const (
	// KeyHeader is the request header that carries the key when the
	// request message does not ([Options].KeyField): the Idempotency-Key
	// header of the HTTP middleware, the idempotency-key metadata of
	// gRPC.
	KeyHeader = "Idempotency-Key"
	// ReplayHeader is the response header set to "true" on a replay.
	ReplayHeader = "X-Idempotent-Replayed"
)

// Key fields of the two conventions, for [Options].KeyField.
const (
	// AIPKeyField is AIP-155's request_id (at most 36 ASCII characters,
	// a UUID recommended).
	AIPKeyField = rpcrecord.AIPField
	// AEPKeyField is AEP-155's idempotency_key.
	AEPKeyField = rpcrecord.AEPField
)

// Options configures an [Interceptor] ([NewInterceptor]). The zero value
// is the defaults each field states. The rest (store, lease, TTL,
// waiting, observer, logger, shutdown) is the [idempotency.Middleware]'s.
type Options struct {
	// KeyField names the request field that carries the key, for the
	// procedures whose request message has a string field of that name:
	// [AIPKeyField] ("request_id") or [AEPKeyField] ("idempotency_key").
	// A request whose field is empty, or whose message has no such field,
	// carries its key in the [KeyHeader] header; one whose field and
	// header name different keys is refused. Default: "", the header
	// only.
	KeyField string

	// MaxFieldKeyLength caps the length of a key carried in KeyField, at
	// most 255. Default: 36, AIP-155's limit. A key in the header follows
	// the Idempotency-Key header's rules ([idempotency.ParseKey]).
	MaxFieldKeyLength int

	// KeyOptional serves calls that carry no key without protection, as
	// AIP-155 has request IDs optional, instead of refusing them with
	// CodeInvalidArgument. Such calls are not reported to the observer.
	KeyOptional bool

	// Scope derives the scope of a call, typically the tenant or the
	// authenticated principal (set by an authentication interceptor that
	// runs before this one), never a header the client chooses freely.
	// Records are kept per scope and key. It runs concurrently for
	// concurrent calls. Default: one scope for every call (see
	// [idempotency.Options].Scope for why an API with several clients
	// must set one).
	Scope func(ctx context.Context, req connect.AnyRequest) string

	// Procedures decides which unary procedures are protected; the
	// others pass through untouched. It runs once per procedure, and its
	// answer is kept. Default: every procedure whose Spec has no
	// idempotency level, that is, all but those the .proto declares free
	// of side effects or idempotent (idempotency_level), which the
	// generated code passes with [connect.WithIdempotency].
	Procedures func(procedure string) bool

	// Retryable decides which codes a handler's error may have and free
	// the key instead of being stored, as idemgrpc's rule, which the
	// middleware's own rule and [idempotency.Claim.Keep] then follow on
	// the HTTP status google.rpc.Code maps a kept code to. Default: every
	// code but InvalidArgument, NotFound, AlreadyExists,
	// PermissionDenied, Unauthenticated, FailedPrecondition and
	// OutOfRange (and a success): those whose HTTP mapping is a 5xx or
	// 429, plus Canceled and Aborted.
	Retryable func(c connect.Code) bool
}

// Interceptor is a [connect.Interceptor] that makes the unary procedures
// of a handler idempotent and gives a client's calls their keys. It is
// safe for concurrent use; create it with [NewInterceptor].
type Interceptor struct {
	mw         *idempotency.Middleware
	keyField   string
	maxField   int
	optional   bool
	scope      func(context.Context, connect.AnyRequest) string
	procedures func(string) bool
	retryable  func(connect.Code) bool
	protected  sync.Map // procedure → bool
}

var _ connect.Interceptor = (*Interceptor)(nil)

// NewInterceptor returns an interceptor that runs protected calls through
// mw ([idempotency.Middleware.Do]), configured by opts. It fails when mw
// is nil or an option is invalid. A client may pass a nil mw: it only
// fills keys.
func NewInterceptor(mw *idempotency.Middleware, opts Options) (*Interceptor, error) {
	if err := rpcrecord.CheckFieldName(opts.KeyField); err != nil {
		return nil, errors.New("idemconnect: " + err.Error())
	}
	if err := rpcrecord.CheckMaxFieldKeyLength(opts.MaxFieldKeyLength); err != nil {
		return nil, errors.New("idemconnect: " + err.Error())
	}
	i := &Interceptor{
		mw:         mw,
		keyField:   opts.KeyField,
		maxField:   opts.MaxFieldKeyLength,
		optional:   opts.KeyOptional,
		scope:      opts.Scope,
		procedures: opts.Procedures,
		retryable:  opts.Retryable,
	}
	if i.maxField == 0 {
		i.maxField = rpcrecord.MaxFieldKeyLength
	}
	if i.scope == nil {
		i.scope = func(context.Context, connect.AnyRequest) string { return "" }
	}
	if i.retryable == nil {
		i.retryable = func(c connect.Code) bool { return rpcrecord.Retryable(code.Code(c)) }
	}
	return i, nil
}

func (i *Interceptor) isProtected(spec connect.Spec) bool {
	if p, ok := i.protected.Load(spec.Procedure); ok {
		return p.(bool)
	}
	var p bool
	if i.procedures != nil {
		p = i.procedures(spec.Procedure)
	} else {
		p = spec.IdempotencyLevel == connect.IdempotencyUnknown
	}
	i.protected.Store(spec.Procedure, p)
	return p
}

// errNoMiddleware answers a handler's call through an interceptor made
// for clients.
var errNoMiddleware = connect.NewError(connect.CodeInternal, errors.New("idemconnect: the interceptor has no Middleware"))

// WrapUnary wraps a unary procedure.
//
// On a handler, a protected call runs at most once per key at a time,
// across every process sharing the store. The handler's context carries
// the [idempotency.Claim] ([idempotency.ClaimFromContext]). Its outcome
// (the response, or an error whose code is not [Options].Retryable, with
// the headers and trailers the handler set on the response, on the
// error's Meta, or through [connect.CallInfoForHandlerContext]) is stored
// before it is sent; a retry gets it again with [ReplayHeader] set. A
// replayed response's Any is a [proto.Message] whose ProtoReflect is the
// stored message, of its generated type; it is not that type's pointer
// itself (a Connect response cannot be made for a type known only at run
// time), which only an interceptor outside this one that asserts the
// type can tell. An error whose code is Retryable frees the key and goes
// to the client as it is. A panic frees the key and goes on (to
// [connect.WithRecover], if the handler has it).
//
// The middleware's own answers, as idemgrpc's and for the same reasons,
// with google.rpc error details (an ErrorInfo of domain
// "idempotency.seed70ea8305.github.com" first): CodeInvalidArgument for a
// missing or malformed key (with a BadRequest), CodeFailedPrecondition
// for a key reused with another request (with a PreconditionFailure),
// CodeAborted for a key held by a running call (with a RetryInfo of the
// rest of its lease), CodeUnavailable for a store down or too slow, an
// outcome not stored or a shutdown (with a RetryInfo of 1 s), and
// CodeInternal for a record that cannot be read.
//
// On a client, a call of a protected procedure whose request carries no
// key, in the field or the [KeyHeader] header, gets one in the header,
// chosen once: the one in the context ([WithKey]) or a random UUID. The
// interceptor makes no retries.
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if !i.isProtected(spec) {
			return next(ctx, req)
		}
		if spec.IsClient {
			i.fillKey(ctx, req)
			return next(ctx, req)
		}
		if i.mw == nil {
			return nil, errNoMiddleware
		}
		return i.serve(ctx, req, next)
	}
}

// WrapStreamingClient passes streaming calls through untouched.
func (i *Interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler applies the rule for streaming procedures: they
// are not protected, since a stream's messages are neither held, stored
// nor replayed. A streaming call without a key passes through untouched;
// one that carries the [KeyHeader] header is refused with
// CodeUnimplemented before its handler runs, rather than served as if the
// key protected it.
func (i *Interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if conn.RequestHeader().Get(KeyHeader) != "" {
			return connect.NewError(connect.CodeUnimplemented, errors.New("idemconnect: "+conn.Spec().Procedure+" is a streaming procedure, which idempotency keys cannot protect; send it without "+KeyHeader))
		}
		return next(ctx, conn)
	}
}

type keyContextKey struct{}

// WithKey returns a context whose client calls carry key instead of one
// the interceptor generates: for a logical call whose every try, made by
// the caller, must share a key. Calls whose request already carries a key
// keep that one.
func WithKey(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, keyContextKey{}, key)
}

func (i *Interceptor) fillKey(ctx context.Context, req connect.AnyRequest) {
	if req.Header().Get(KeyHeader) != "" {
		return
	}
	if msg, ok := req.Any().(proto.Message); ok && i.keyField != "" {
		m := msg.ProtoReflect()
		if fd := rpcrecord.KeyField(m.Descriptor(), i.keyField); fd != nil && m.Get(fd).String() != "" {
			return
		}
	}
	key, _ := ctx.Value(keyContextKey{}).(string)
	if key == "" {
		key = rpcrecord.NewKey()
	}
	req.Header().Set(KeyHeader, key)
}

func (i *Interceptor) serve(ctx context.Context, req connect.AnyRequest, next connect.UnaryFunc) (connect.AnyResponse, error) {
	spec := req.Spec()
	msg, ok := req.Any().(proto.Message)
	if !ok {
		return nil, connect.NewError(connect.CodeInternal, errors.New("idemconnect: the request is not a protobuf message"))
	}
	m := msg.ProtoReflect()
	fd := rpcrecord.KeyField(m.Descriptor(), i.keyField)
	key, source, err := rpcrecord.Key(m, fd, req.Header().Values(KeyHeader), i.maxField)
	if err != nil && i.optional && errors.Is(err, idempotency.ErrKeyMissing) {
		return next(ctx, req)
	}
	scope := i.scope(ctx, req)
	if err != nil {
		rejectedKey(ctx, i.mw, scope, spec.Procedure)
		return nil, rejection(err, source)
	}
	fingerprint, err := rpcrecord.Fingerprint(spec.Procedure, msg, fd)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("idemconnect: the request cannot be encoded"))
	}
	call := idempotency.Claim{Kind: rpcrecord.Kind, Scope: scope, Key: key, Fingerprint: fingerprint, Route: spec.Procedure}
	var run attempt
	stored, replayed, err := i.mw.Do(ctx, call, func(ctx context.Context) (*idempotency.Response, error) {
		return i.run(ctx, &run, req, next)
	})
	var failed *handlerFailed
	switch {
	case err == nil && replayed:
		return replay(stored)
	case err == nil:
		return run.resp, run.err
	case errors.As(err, &failed):
		return nil, failed.err
	}
	return nil, rejection(err, source)
}

// attempt is what one run of the handler answered.
type attempt struct {
	resp    connect.AnyResponse
	err     error
	outcome rpcrecord.Outcome
}

// handlerFailed is the error the work gives [idempotency.Middleware.Do]
// for a handler's error that frees the key; err goes to the client as it
// is.
type handlerFailed struct{ err error }

func (e *handlerFailed) Error() string { return "idemconnect: handler failed: " + e.err.Error() }
func (e *handlerFailed) Unwrap() error { return e.err }

func (i *Interceptor) run(ctx context.Context, a *attempt, req connect.AnyRequest, next connect.UnaryFunc) (*idempotency.Response, error) {
	info, _ := connect.CallInfoForHandlerContext(ctx)
	var outerHeader, outerTrailer http.Header
	if info != nil {
		outerHeader, outerTrailer = info.ResponseHeader().Clone(), info.ResponseTrailer().Clone()
	}
	a.resp, a.err = next(ctx, req)
	if info != nil {
		addNew(&a.outcome.Header, info.ResponseHeader(), outerHeader)
		addNew(&a.outcome.Trailer, info.ResponseTrailer(), outerTrailer)
	}
	if a.err != nil {
		c := connect.CodeOf(a.err)
		if i.retryable(c) {
			return nil, &handlerFailed{err: a.err}
		}
		st := &spb.Status{Code: int32(c), Message: a.err.Error()}
		var cerr *connect.Error
		if errors.As(a.err, &cerr) {
			st.Message = cerr.Message()
			for _, d := range cerr.Details() {
				st.Details = append(st.Details, &anypb.Any{TypeUrl: "type.googleapis.com/" + d.Type(), Value: d.Bytes()})
			}
			addNew(&a.outcome.Trailer, cerr.Meta(), nil)
		}
		a.outcome.Status = st
		return a.outcome.Response()
	}
	if a.resp == nil {
		return nil, errors.New("idemconnect: the handler returned no response")
	}
	pm, ok := a.resp.Any().(proto.Message)
	if !ok || pm == nil {
		return nil, errors.New("idemconnect: the response is not a protobuf message")
	}
	addNew(&a.outcome.Header, a.resp.Header(), nil)
	addNew(&a.outcome.Trailer, a.resp.Trailer(), nil)
	var err error
	if a.outcome.Message, err = proto.Marshal(pm); err != nil {
		return nil, err
	}
	a.outcome.Type = pm.ProtoReflect().Descriptor().FullName()
	return a.outcome.Response()
}

// addNew adds to *md the headers of h that are part of an outcome and
// that outer does not already hold, in the stored form: lower-case names,
// binary values decoded.
func addNew(md *map[string][]string, h, outer http.Header) {
	for name, values := range h {
		lower := strings.ToLower(name)
		if !rpcrecord.Stored(lower) {
			continue
		}
		if prev, ok := outer[name]; ok && equal(prev, values) {
			continue
		}
		if *md == nil {
			*md = make(map[string][]string, len(h))
		}
		for _, v := range values {
			if strings.HasSuffix(lower, "-bin") {
				if raw, err := connect.DecodeBinaryHeader(v); err == nil {
					v = string(raw)
				}
			}
			(*md)[lower] = append((*md)[lower], v)
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// setAll sets the stored metadata md on h, in header form.
func setAll(h http.Header, md map[string][]string) {
	for name, values := range md {
		for _, v := range values {
			if strings.HasSuffix(name, "-bin") {
				v = connect.EncodeBinaryHeader([]byte(v))
			}
			h.Add(name, v)
		}
	}
}

// replayed is the message of a replayed response: the stored message,
// of its generated type, behind the one type a Connect response can be
// made with here.
type replayed struct{ proto.Message }

// replay answers a stored outcome.
func replay(resp *idempotency.Response) (connect.AnyResponse, error) {
	o, err := rpcrecord.FromResponse(resp)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("idemconnect: the stored outcome cannot be replayed"))
	}
	if o.Status != nil {
		cerr := connect.NewError(connect.Code(o.Status.GetCode()), errors.New(o.Status.GetMessage()))
		for _, d := range o.Status.GetDetails() {
			if detail, err := connect.NewErrorDetail(d); err == nil {
				cerr.AddDetail(detail)
			}
		}
		setAll(cerr.Meta(), o.Header)
		setAll(cerr.Meta(), o.Trailer)
		cerr.Meta().Set(ReplayHeader, "true")
		return nil, cerr
	}
	msg, err := o.NewMessage()
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("idemconnect: the stored response cannot be replayed"))
	}
	out := connect.NewResponse(&replayed{Message: msg})
	setAll(out.Header(), o.Header)
	setAll(out.Trailer(), o.Trailer)
	out.Header().Set(ReplayHeader, "true")
	return out, nil
}

// rejection is the Connect error that answers one of the middleware's
// errors (see [Interceptor.WrapUnary]).
func rejection(err error, source string) error {
	r := rpcrecord.Reject(err, source)
	cerr := connect.NewError(connect.Code(r.Code), errors.New(r.Message))
	for _, d := range r.Details {
		if detail, err := connect.NewErrorDetail(d); err == nil {
			cerr.AddDetail(detail)
		}
	}
	return cerr
}

// rejectedKey reports a call refused for its key to the middleware's
// observer: [idempotency.Middleware.Do] refuses an empty key, without
// running anything, and reports it as [idempotency.OutcomeRejected].
func rejectedKey(ctx context.Context, mw *idempotency.Middleware, scope, route string) {
	_, _, _ = mw.Do(ctx, idempotency.Claim{Kind: rpcrecord.Kind, Scope: scope, Route: route}, func(context.Context) (*idempotency.Response, error) {
		return nil, errors.New("idemconnect: unreachable")
	})
}
