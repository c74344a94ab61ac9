package idemgrpc_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemgrpc"
	"github.com/seed70ea8305/idempotency/internal/transporttest/testpb"
)

// attempts records what each attempt that reached the server carried,
// and fails the first ones with UNAVAILABLE, before any handler runs, as
// a server that is briefly down.
type attempts struct {
	mu       sync.Mutex
	seen     []attemptSeen
	failWith []codes.Code // the codes of the first attempts
}

type attemptSeen struct {
	method, metadataKey, requestID, previous string
}

func (a *attempts) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	r, _ := req.(*testpb.RunRequest)
	a.mu.Lock()
	n := len(a.seen)
	a.seen = append(a.seen, attemptSeen{info.FullMethod, first(md, idemgrpc.KeyMetadata), r.GetRequestId(), first(md, "grpc-previous-rpc-attempts")})
	a.mu.Unlock()
	if n < len(a.failWith) {
		return nil, status.Error(a.failWith[n], "briefly down")
	}
	return handler(ctx, req)
}

func (a *attempts) list() []attemptSeen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]attemptSeen(nil), a.seen...)
}

// clientSetup serves an echo handler behind rec and the idempotency
// interceptor, and returns a client that goes through keys.
func clientSetup(t *testing.T, rec *attempts, keys *idemgrpc.ClientInterceptor, dial ...grpc.DialOption) testpb.OpServiceClient {
	t.Helper()
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{KeyField: idemgrpc.AIPKeyField})
	if err != nil {
		t.Fatal(err)
	}
	dial = append(dial, grpc.WithChainUnaryInterceptor(keys.Unary))
	conn := serve(t, &funcServer{run: echoRun}, []grpc.ServerOption{grpc.ChainUnaryInterceptor(rec.intercept, idem.Unary)}, dial...)
	return testpb.NewOpServiceClient(conn)
}

// noSleep makes a client's waits end at once: the tests wait for events.
func noSleep(c *idemgrpc.ClientInterceptor) *idemgrpc.ClientInterceptor {
	idemgrpc.SetSleep(c, func(context.Context, time.Duration) error { return nil })
	return c
}

func newClient(t *testing.T, opts idemgrpc.ClientOptions) *idemgrpc.ClientInterceptor {
	t.Helper()
	c, err := idemgrpc.NewClientInterceptor(opts)
	if err != nil {
		t.Fatal(err)
	}
	return noSleep(c)
}

// The interceptor's own retries carry the key it chose once.
func TestClientOwnRetriesKeepTheKey(t *testing.T) {
	for _, c := range []struct {
		name     string
		keyField string
	}{{"metadata", ""}, {"request_id", idemgrpc.AIPKeyField}} {
		t.Run(c.name, func(t *testing.T) {
			rec := &attempts{failWith: []codes.Code{codes.Unavailable, codes.Unavailable}}
			client := clientSetup(t, rec, newClient(t, idemgrpc.ClientOptions{KeyField: c.keyField}))
			req := &testpb.RunRequest{Input: "hall"}
			if _, err := client.Run(context.Background(), req); err != nil {
				t.Fatal(err)
			}
			if req.GetRequestId() != "" {
				t.Errorf("the caller's request was changed: request_id %q", req.GetRequestId())
			}
			seen := rec.list()
			if len(seen) != 3 {
				t.Fatalf("%d attempts, want 3: %+v", len(seen), seen)
			}
			key := seen[0].metadataKey + seen[0].requestID
			if len(key) != 36 || (c.keyField == "") != (seen[0].metadataKey != "") {
				t.Errorf("first attempt carried %+v, want a UUID in the %s", seen[0], c.name)
			}
			for i, s := range seen {
				if s.metadataKey+s.requestID != key {
					t.Errorf("attempt %d carried %+v, want the key %q", i, s, key)
				}
			}
		})
	}
}

// gRPC's own retry policy re-sends the message and metadata of the call:
// the key the interceptor chose once goes with every attempt.
func TestClientRetryPolicyKeepsTheKey(t *testing.T) {
	const serviceConfig = `{"methodConfig": [{
		"name": [{"service": "idemtest.v1.OpService"}],
		"retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.001s", "maxBackoff": "0.001s",
			"backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}`
	for _, c := range []struct {
		name     string
		keyField string
	}{{"metadata", ""}, {"request_id", idemgrpc.AIPKeyField}} {
		t.Run(c.name, func(t *testing.T) {
			rec := &attempts{failWith: []codes.Code{codes.Unavailable, codes.Unavailable}}
			keys := newClient(t, idemgrpc.ClientOptions{KeyField: c.keyField, MaxAttempts: 1})
			client := clientSetup(t, rec, keys, grpc.WithDefaultServiceConfig(serviceConfig))
			resp, err := client.Run(context.Background(), &testpb.RunRequest{Input: "hall"})
			if err != nil || resp.GetOutput() != "hall" {
				t.Fatal(resp, err)
			}
			seen := rec.list()
			if len(seen) != 3 {
				t.Fatalf("%d attempts, want 3: %+v", len(seen), seen)
			}
			for i, s := range seen {
				if s.metadataKey+s.requestID != seen[0].metadataKey+seen[0].requestID || s.metadataKey+s.requestID == "" {
					t.Errorf("attempt %d carried %+v, first %+v", i, s, seen[0])
				}
			}
			if seen[2].previous != "2" {
				t.Errorf("the last attempt says %q earlier attempts, want 2: the retry policy did not retry", seen[2].previous)
			}
		})
	}
}

// A key the caller chose (in the field, the metadata or the context) is
// kept; a call that fails for good is not retried; a method declared free
// of side effects gets no key.
func TestClientKeys(t *testing.T) {
	rec := &attempts{}
	client := clientSetup(t, rec, newClient(t, idemgrpc.ClientOptions{KeyField: idemgrpc.AIPKeyField}))
	if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "a", RequestId: "caller-field"}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Run(withKey("caller-metadata"), &testpb.RunRequest{Input: "b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Run(idemgrpc.WithKey(context.Background(), "caller-context"), &testpb.RunRequest{Input: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Read(context.Background(), &testpb.RunRequest{Input: "d"}); err != nil {
		t.Fatal(err)
	}
	// The same key with another input: FAILED_PRECONDITION, final.
	if _, err := client.Run(context.Background(), &testpb.RunRequest{Input: "other", RequestId: "caller-field"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("reused key: %v", err)
	}
	seen := rec.list()
	want := []string{"caller-field", "caller-metadata", "caller-context", "", "caller-field"}
	if len(seen) != len(want) {
		t.Fatalf("%d attempts, want %d: %+v", len(seen), len(want), seen)
	}
	for i, s := range seen {
		if s.requestID != want[i] {
			t.Errorf("call %d carried %+v, want request_id %q", i, s, want[i])
		}
	}
	if seen[1].metadataKey != "caller-metadata" {
		t.Errorf("the caller's metadata key was not sent: %+v", seen[1])
	}
}

// A duplicate that gets the middleware's ABORTED waits as its RetryInfo
// says and is retried with its key: it gets the first call's outcome.
func TestClientRetriesKeyInUse(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	impl := &funcServer{run: func(ctx context.Context, req *testpb.RunRequest) (*testpb.RunResponse, error) {
		if impl := req.GetInput(); impl == "block" {
			select {
			case entered <- struct{}{}:
				<-release
			default:
			}
		}
		return echoRun(ctx, req)
	}}
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{})
	if err != nil {
		t.Fatal(err)
	}
	keys := newClient(t, idemgrpc.ClientOptions{})
	firstDone := make(chan error, 1)
	var asked []time.Duration
	idemgrpc.SetSleep(keys, func(ctx context.Context, d time.Duration) error {
		// The duplicate was told to wait: let the first call finish, and
		// retry once it has.
		asked = append(asked, d)
		close(release)
		if err := <-firstDone; err != nil {
			t.Error(err)
		}
		return nil
	})
	rec := &attempts{}
	conn := serve(t, impl, []grpc.ServerOption{grpc.ChainUnaryInterceptor(rec.intercept, idem.Unary)}, grpc.WithChainUnaryInterceptor(keys.Unary))
	client := testpb.NewOpServiceClient(conn)

	ctx := idemgrpc.WithKey(context.Background(), "shared-key")
	go func() {
		_, err := client.Run(ctx, &testpb.RunRequest{Input: "block"})
		firstDone <- err
	}()
	<-entered
	var header metadata.MD
	resp, err := client.Run(ctx, &testpb.RunRequest{Input: "block"}, grpc.Header(&header))
	if err != nil || resp.GetOutput() != "block" || first(header, idemgrpc.ReplayMetadata) != "true" {
		t.Errorf("the duplicate got %v %v, header %v; want the replay", resp, err, header)
	}
	if len(asked) != 1 || asked[0] < time.Second {
		t.Errorf("waits %v, want one of at least the RetryInfo's 1 s", asked)
	}
	if n := impl.calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

func TestNewClientInterceptorErrors(t *testing.T) {
	for _, opts := range []idemgrpc.ClientOptions{
		{KeyField: "request id"},
		{MaxAttempts: -1},
		{BaseDelay: -time.Second},
		{BaseDelay: time.Second, MaxDelay: time.Millisecond},
	} {
		if _, err := idemgrpc.NewClientInterceptor(opts); err == nil || !strings.HasPrefix(err.Error(), "idemgrpc: ") {
			t.Errorf("%+v: %v", opts, err)
		}
	}
}
