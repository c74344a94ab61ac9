// Package rpcrecord is what the RPC adapters, idemgrpc and idemconnect,
// share so that they answer alike and either replays what the other
// stored: where a call's key comes from and what it may be, the
// fingerprint of a protobuf request, the record of an RPC's outcome, the
// status codes that free a key, and the status and error details of the
// middleware's own answers. It is not an API: the adapters document what
// it does.
//
// Both adapters keep their records under one kind, [Kind], in one format
// ([Outcome]), with one fingerprint (the full method and the
// deterministic encoding of the request without its key field): a call
// made through grpc-go and retried through a Connect handler of the same
// service, or the reverse, gets the stored outcome.
package rpcrecord

import (
	"crypto/rand"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Kind is the [idempotency.Claim] kind of every RPC call, whichever
// adapter serves it.
const Kind = "grpc"

// MetadataKey is the request metadata (an HTTP header for Connect) that
// carries the key when the request message does not.
const MetadataKey = "idempotency-key"

// ReplayHeader is the response metadata set to "true" on a replay, the
// middleware's X-Idempotent-Replayed in the lower case that gRPC
// metadata requires.
const ReplayHeader = "x-idempotent-replayed"

// Field names of the two conventions for a key in the request message.
const (
	// AIPField is AIP-155's request_id: at most 36 ASCII characters, a
	// UUID recommended.
	AIPField = "request_id"
	// AEPField is AEP-155's idempotency_key.
	AEPField = "idempotency_key"
)

// MaxFieldKeyLength is AIP-155's limit on a request_id, the default limit
// on a key carried in the request message.
const MaxFieldKeyLength = 36

// MaxKeyLength is the longest key the middleware accepts, and so the
// highest limit a field may be given.
const MaxKeyLength = 255

// CheckFieldName checks the name of the key field an adapter is given:
// empty (keys in metadata only) or a protobuf field name.
func CheckFieldName(name string) error {
	if name == "" || protoreflect.Name(name).IsValid() {
		return nil
	}
	return fmt.Errorf("KeyField %q is not a protobuf field name", name)
}

// CheckMaxFieldKeyLength checks the limit on a key carried in the
// request message.
func CheckMaxFieldKeyLength(n int) error {
	if n < 0 || n > MaxKeyLength {
		return fmt.Errorf("MaxFieldKeyLength %d is not between 0 (the default, %d) and %d", n, MaxFieldKeyLength, MaxKeyLength)
	}
	return nil
}

// KeyField returns the field of md named name when it is a string field
// that is not repeated, or nil: the request carries its key in metadata
// only.
func KeyField(md protoreflect.MessageDescriptor, name string) protoreflect.FieldDescriptor {
	if name == "" {
		return nil
	}
	fd := md.Fields().ByName(protoreflect.Name(name))
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.Cardinality() == protoreflect.Repeated {
		return nil
	}
	return fd
}

// MethodName turns a gRPC full method or a Connect procedure
// ("/pkg.Service/Method") into the method's protobuf full name
// ("pkg.Service.Method").
func MethodName(fullMethod string) protoreflect.FullName {
	return protoreflect.FullName(strings.Replace(strings.TrimPrefix(fullMethod, "/"), "/", ".", 1))
}

// LookupMethod returns the descriptor of fullMethod from the global
// registry, where generated code registers its files; nil when it is not
// there.
func LookupMethod(fullMethod string) protoreflect.MethodDescriptor {
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(MethodName(fullMethod))
	if err != nil {
		return nil
	}
	md, _ := d.(protoreflect.MethodDescriptor)
	return md
}

// SafeToRepeat reports whether md is declared in its .proto file as free
// of side effects or idempotent (option idempotency_level =
// NO_SIDE_EFFECTS or IDEMPOTENT), so that running it again is harmless
// and it needs no key. A nil md is not.
func SafeToRepeat(md protoreflect.MethodDescriptor) bool {
	if md == nil {
		return false
	}
	opts, ok := md.Options().(*descriptorpb.MethodOptions)
	return ok && opts.GetIdempotencyLevel() != descriptorpb.MethodOptions_IDEMPOTENCY_UNKNOWN
}

// httpStatus is the HTTP mapping that google.rpc.Code documents for each
// code.
var httpStatus = map[code.Code]int{
	code.Code_OK:                  200,
	code.Code_CANCELLED:           499,
	code.Code_UNKNOWN:             500,
	code.Code_INVALID_ARGUMENT:    400,
	code.Code_DEADLINE_EXCEEDED:   504,
	code.Code_NOT_FOUND:           404,
	code.Code_ALREADY_EXISTS:      409,
	code.Code_PERMISSION_DENIED:   403,
	code.Code_UNAUTHENTICATED:     401,
	code.Code_RESOURCE_EXHAUSTED:  429,
	code.Code_FAILED_PRECONDITION: 400,
	code.Code_ABORTED:             409,
	code.Code_OUT_OF_RANGE:        400,
	code.Code_UNIMPLEMENTED:       501,
	code.Code_INTERNAL:            500,
	code.Code_UNAVAILABLE:         503,
	code.Code_DATA_LOSS:           500,
}

// HTTPStatus returns the HTTP status that google.rpc.Code documents for
// c (500 for a code it does not know): the status a stored outcome is
// given, which the middleware's Retryable, Claim.Keep and observer see.
func HTTPStatus(c code.Code) int {
	if s, ok := httpStatus[c]; ok {
		return s
	}
	return 500
}

// Retryable is the default rule of which codes free the key instead of
// being stored, the RPC form of the middleware's "5xx, 408 and 429": the
// codes whose HTTP mapping is a 5xx (UNKNOWN, INTERNAL, DATA_LOSS,
// UNIMPLEMENTED, UNAVAILABLE, DEADLINE_EXCEEDED) or 429
// (RESOURCE_EXHAUSTED), and two that HTTP has no status for: CANCELLED
// (the work was cut short, as a handler whose request ended) and ABORTED
// (a concurrency failure that asks the client to try again, which a
// replay would repeat forever). Kept: OK, INVALID_ARGUMENT, NOT_FOUND,
// ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION
// and OUT_OF_RANGE, answers that the same request gets again.
func Retryable(c code.Code) bool {
	switch c {
	case code.Code_OK, code.Code_INVALID_ARGUMENT, code.Code_NOT_FOUND, code.Code_ALREADY_EXISTS,
		code.Code_PERMISSION_DENIED, code.Code_UNAUTHENTICATED, code.Code_FAILED_PRECONDITION, code.Code_OUT_OF_RANGE:
		return false
	}
	return true
}

// NewKey returns a random UUID, version 4, as AIP-155 recommends and
// AIP-4235 has clients generate.
func NewKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand, Go 1.24)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
