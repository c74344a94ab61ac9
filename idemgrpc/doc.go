// Package idemgrpc makes the unary methods of a gRPC server idempotent, on
// the same engine, stores, leases, fences, waiting and observer as the
// net/http middleware of package idempotency, and gives gRPC clients the
// keys that go with it.
//
// A call carries its key in a request field (AIP-155's request_id,
// AEP-155's idempotency_key: [Options].KeyField) or in the
// idempotency-key metadata. The first call with a key runs the handler and
// stores its outcome, the response message or an error that is to be kept,
// with the header and trailer metadata the handler set; a retry with the
// same key and the same request (the same method and the same message
// apart from the key, compared by their deterministic protobuf encoding)
// gets that outcome again, marked with the x-idempotent-replayed header; a
// call while the first still runs gets ABORTED with a RetryInfo, or waits
// for the first's outcome ([idempotency.Options].Wait); the same key with
// another request gets FAILED_PRECONDITION. Errors that ask for a retry
// (UNAVAILABLE, INTERNAL, ABORTED…: [Options].Retryable) and panics free
// the key. [ServerInterceptor.Unary] lists every status it answers, and
// why.
//
//	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
//	mw, err := idempotency.New(store, idempotency.Options{})
//	if err != nil {
//		return err
//	}
//	idem, err := idemgrpc.NewServerInterceptor(mw, idemgrpc.Options{
//		KeyField: idemgrpc.AIPKeyField, // request_id
//		Scope:    func(ctx context.Context, _ string) string { return tenantOf(ctx) },
//	})
//	if err != nil {
//		return err
//	}
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(authenticate, recoverPanics, idem.Unary),
//		grpc.ChainStreamInterceptor(idem.Stream),
//	)
//
// The handler finds the call's claim in its context with
// [idempotency.ClaimFromContext], as an HTTP handler does: its fence, its
// recovery point ([idempotency.Claim.Checkpoint]), and the key from which
// [idempotency.StripeKey] derives keys for outgoing calls.
//
// Streaming methods are not protected: [ServerInterceptor.Stream] passes
// them through, and refuses with UNIMPLEMENTED a stream that carries a
// key, whose client would take a retry for safe.
//
// On the client, [ClientInterceptor] fills the key once per call, in the
// field or the metadata, when the caller has not (AIP-4235), and keeps
// it on every retry, its own and those of the channel's retry policy:
//
//	keys, err := idemgrpc.NewClientInterceptor(idemgrpc.ClientOptions{KeyField: idemgrpc.AIPKeyField})
//	if err != nil {
//		return err
//	}
//	conn, err := grpc.NewClient(target,
//		grpc.WithTransportCredentials(creds),
//		grpc.WithChainUnaryInterceptor(keys.Unary),
//	)
//
// Outcomes are kept under the record kind "grpc" in a format that package
// idemconnect shares: a call made through grpc-go and retried through a
// Connect handler of the same service, or the reverse, is replayed.
package idemgrpc
