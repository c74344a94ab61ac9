package idemgrpc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
)

// Client defaults; each field of [ClientOptions] documents its own.
const (
	DefaultMaxAttempts = 5
	DefaultBaseDelay   = 100 * time.Millisecond
	DefaultMaxDelay    = 5 * time.Second
)

// ClientOptions configures a [ClientInterceptor] ([NewClientInterceptor]).
// The zero value is the defaults each field states.
type ClientOptions struct {
	// KeyField names the request field the key goes in, as the server's
	// [Options].KeyField: a request whose message has a string field of
	// that name gets the key there, in a copy of the message (the
	// caller's is never changed); other requests get it in the
	// [KeyMetadata] metadata. Default: "", metadata only.
	KeyField string

	// Methods decides which unary methods get a key and retries; the
	// others pass through untouched. It runs once per method, and its
	// answer is kept. Default: every method except those that their
	// .proto declares free of side effects or idempotent (as the server's
	// default).
	Methods func(fullMethod string) bool

	// MaxAttempts bounds the attempts the interceptor makes for one call,
	// the first included; 1 makes none of its own and leaves retries to a
	// retry policy of the channel's service config. Default: 5.
	MaxAttempts int

	// BaseDelay and MaxDelay shape the waits between attempts: capped
	// exponential backoff with full jitter, uniform in [0,
	// min(MaxDelay, BaseDelay·2^(n-1))] after attempt n; a RetryInfo
	// longer than that is honoured. Defaults: 100 ms and 5 s.
	BaseDelay time.Duration
	MaxDelay  time.Duration
}

// ClientInterceptor gives each call of a protected method one key, as
// AIP-4235 has client libraries do, and retries the call with that key.
// It is safe for concurrent use; create it with [NewClientInterceptor].
type ClientInterceptor struct {
	keyField    string
	methods     func(string) bool
	maxAttempts int
	baseDelay   time.Duration
	maxDelay    time.Duration
	protected   sync.Map // full method → bool
	sleep       func(ctx context.Context, d time.Duration) error
}

// NewClientInterceptor returns a client interceptor configured by opts.
// It fails when an option is invalid.
func NewClientInterceptor(opts ClientOptions) (*ClientInterceptor, error) {
	if err := rpcrecord.CheckFieldName(opts.KeyField); err != nil {
		return nil, errors.New("idemgrpc: " + err.Error())
	}
	switch {
	case opts.MaxAttempts < 0:
		return nil, fmt.Errorf("idemgrpc: MaxAttempts %d is negative", opts.MaxAttempts)
	case opts.BaseDelay < 0 || opts.MaxDelay < 0:
		return nil, fmt.Errorf("idemgrpc: BaseDelay %v and MaxDelay %v must not be negative", opts.BaseDelay, opts.MaxDelay)
	}
	c := &ClientInterceptor{
		keyField:    opts.KeyField,
		methods:     opts.Methods,
		maxAttempts: or(opts.MaxAttempts, DefaultMaxAttempts),
		baseDelay:   or(opts.BaseDelay, DefaultBaseDelay),
		maxDelay:    or(opts.MaxDelay, DefaultMaxDelay),
		sleep:       sleep,
	}
	if c.maxDelay < c.baseDelay {
		return nil, fmt.Errorf("idemgrpc: MaxDelay %v is shorter than BaseDelay %v", c.maxDelay, c.baseDelay)
	}
	if c.methods == nil {
		c.methods = func(fullMethod string) bool { return !rpcrecord.SafeToRepeat(rpcrecord.LookupMethod(fullMethod)) }
	}
	return c, nil
}

func or[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

type keyContextKey struct{}

// WithKey returns a context whose calls carry key instead of one the
// interceptor generates: for a logical call that outlives one call of
// the stub (a job that a queue redelivers, a caller's own retry loop),
// whose every try must share a key derived from it. Calls whose request
// field or outgoing metadata already carries a key keep that one.
func WithKey(ctx context.Context, key string) context.Context {
	return context.WithValue(ctx, keyContextKey{}, key)
}

// Unary is a [grpc.UnaryClientInterceptor]: install it with
// [grpc.WithChainUnaryInterceptor].
//
// A call of a protected method keeps the key its request already has (in
// the [ClientOptions].KeyField field or in the [KeyMetadata] outgoing
// metadata); otherwise it gets one, chosen once for the call: the one in
// the context ([WithKey]), or a random UUID (version 4). Every attempt,
// the interceptor's own and those a retry policy of the channel makes
// (which re-send the same message and metadata), carries that key, so
// the server runs the call once whichever layer re-sent it.
//
// An attempt is retried, after a backoff, when it fails with UNAVAILABLE
// (the server, or its store, could not take the call; the call may or may
// not have reached the handler, which is what the key makes safe) or with
// a status that carries a RetryInfo (the server asks for the same call
// again: the middleware's ABORTED while the first call with the key
// runs, a rate limit), and not when the call's context has ended or its
// deadline falls before the next attempt. The two layers multiply: give
// MaxAttempts 1 to a channel whose retry policy already retries.
func (c *ClientInterceptor) Unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if !c.isProtected(method) {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	ctx, req = c.withKey(ctx, req)
	for attempt := 1; ; attempt++ {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err == nil || attempt >= c.maxAttempts || ctx.Err() != nil {
			return err
		}
		delay, ok := c.retryDelay(err, attempt)
		if !ok {
			return err
		}
		if deadline, has := ctx.Deadline(); has && time.Until(deadline) <= delay {
			return err
		}
		if c.sleep(ctx, delay) != nil {
			return err
		}
	}
}

func (c *ClientInterceptor) isProtected(fullMethod string) bool {
	if p, ok := c.protected.Load(fullMethod); ok {
		return p.(bool)
	}
	p := c.methods(fullMethod)
	c.protected.Store(fullMethod, p)
	return p
}

// withKey returns the context and request of a call that carry its key.
func (c *ClientInterceptor) withKey(ctx context.Context, req any) (context.Context, any) {
	given, _ := ctx.Value(keyContextKey{}).(string)
	md, _ := metadata.FromOutgoingContext(ctx)
	var inMetadata string
	if values := md[KeyMetadata]; len(values) > 0 {
		inMetadata = values[0]
	}
	if msg, ok := req.(proto.Message); ok {
		if fd := keyFieldOf(msg, c.keyField); fd != nil {
			if msg.ProtoReflect().Get(fd).String() != "" {
				return ctx, req
			}
			key := firstOf(inMetadata, given)
			if key == "" {
				key = rpcrecord.NewKey()
			}
			clone := proto.Clone(msg)
			clone.ProtoReflect().Set(fd, protoreflect.ValueOfString(key))
			return ctx, clone
		}
	}
	if inMetadata != "" {
		return ctx, req
	}
	key := given
	if key == "" {
		key = rpcrecord.NewKey()
	}
	return metadata.AppendToOutgoingContext(ctx, KeyMetadata, key), req
}

func firstOf(values ...string) string {
	for _, v := range values {
		if v != "" {
			return v
		}
	}
	return ""
}

// retryDelay returns the wait before the attempt after attempt n that
// failed with err, and whether there is to be one.
func (c *ClientInterceptor) retryDelay(err error, n int) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	var asked time.Duration
	hasInfo := false
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			hasInfo = true
			asked = max(asked, ri.GetRetryDelay().AsDuration())
		}
	}
	if st.Code() != codes.Unavailable && !hasInfo {
		return 0, false
	}
	return max(c.backoff(n), asked), true
}

// backoff returns the jittered wait after attempt n (1 for the first).
func (c *ClientInterceptor) backoff(n int) time.Duration {
	ceiling := c.maxDelay
	if shift := n - 1; shift < 62 {
		if d := c.baseDelay << shift; d > 0 && d>>shift == c.baseDelay && d < ceiling {
			ceiling = d
		}
	}
	return time.Duration(rand.Int64N(int64(ceiling) + 1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
