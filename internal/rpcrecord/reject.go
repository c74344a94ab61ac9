package rpcrecord

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/seed70ea8305/idempotency"
)

// Domain is the ErrorInfo domain of the middleware's own answers, so a
// client tells them from the application's (an ABORTED of the
// middleware asks for the same call again; one of the application may
// not).
const Domain = "idempotency.seed70ea8305.github.com"

// ErrorInfo reasons of the middleware's answers.
const (
	ReasonKeyMissing     = "IDEMPOTENCY_KEY_MISSING"
	ReasonKeyInvalid     = "IDEMPOTENCY_KEY_INVALID"
	ReasonKeyReused      = "IDEMPOTENCY_KEY_REUSED"
	ReasonKeyInUse       = "IDEMPOTENCY_KEY_IN_USE"
	ReasonUnavailable    = "IDEMPOTENCY_STORE_UNAVAILABLE"
	ReasonNotStored      = "IDEMPOTENCY_OUTCOME_NOT_STORED"
	ReasonShutdown       = "IDEMPOTENCY_SHUTDOWN"
	ReasonUnreadable     = "IDEMPOTENCY_RECORD_UNREADABLE"
	ReasonInternal       = "IDEMPOTENCY_INTERNAL"
	PreconditionKeyReuse = "IDEMPOTENCY_KEY"
)

// Rejection is how an RPC adapter answers one of the middleware's
// errors: a status code, a message of fixed text (or, for a key the
// client got wrong, text this module wrote about it), error details, and
// when the client may retry the same call.
type Rejection struct {
	Code    code.Code
	Message string
	// Details go into the status: an ErrorInfo always, a BadRequest for
	// a key, a PreconditionFailure for a reused key, a RetryInfo when
	// RetryDelay is set.
	Details []proto.Message
	// RetryDelay, when positive, is how long the client should wait
	// before it sends the same call again (RetryInfo, and gRPC's
	// grpc-retry-pushback-ms for its retry policy).
	RetryDelay time.Duration
}

// Reject returns the answer to err, one of the middleware's errors from
// [idempotency.Middleware.Do] or from [Key]; source names where the key
// came from (a field, or the key metadata).
//
// The codes, and why:
//   - a missing or malformed key: INVALID_ARGUMENT (400), with a
//     BadRequest naming the field or metadata: the request is wrong
//     whatever the server's state;
//   - a key reused with another request: FAILED_PRECONDITION (422), with
//     a PreconditionFailure: the key is bound to another request, a state
//     that no retry of this call changes; a new key does;
//   - a call whose key is still running: ABORTED (409), with a RetryInfo
//     of the rest of the running call's lease: a concurrency conflict that
//     clears once the first call ends, when the same call gets its
//     outcome; not UNAVAILABLE, since the server is fine, and not
//     ALREADY_EXISTS, which handlers return about their own resources;
//   - the store down, the outcome not stored, or a shutdown: UNAVAILABLE
//     (503), with a RetryInfo of 1 s: nothing is stored, so the same call
//     is safe to send again, and gRPC's retry policies retry UNAVAILABLE;
//   - a record that cannot be read: INTERNAL (500), no RetryInfo:
//     retrying changes nothing until an operator removes it;
//   - anything else: INTERNAL, with fixed text.
func Reject(err error, source string) Rejection {
	var r Rejection
	var reason string
	switch {
	case errors.Is(err, idempotency.ErrKeyMissing):
		r.Code, reason, r.Message = code.Code_INVALID_ARGUMENT, ReasonKeyMissing, idempotency.ErrKeyMissing.Error()+": send "+source
		r.Details = append(r.Details, badKey(source, "missing"))
	case errors.Is(err, idempotency.ErrKeyInvalid):
		// The text is about the client's own key, written by this module
		// or the middleware's ParseKey: it shows no internal detail.
		r.Code, reason, r.Message = code.Code_INVALID_ARGUMENT, ReasonKeyInvalid, err.Error()
		r.Details = append(r.Details, badKey(source, err.Error()))
	case errors.Is(err, idempotency.ErrFingerprintMismatch):
		r.Code, reason, r.Message = code.Code_FAILED_PRECONDITION, ReasonKeyReused, idempotency.ErrFingerprintMismatch.Error()
		r.Details = append(r.Details, &errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{{
			Type:        PreconditionKeyReuse,
			Subject:     source,
			Description: "the key was used before with a different request: send a new key for a new request",
		}}})
	case errors.Is(err, idempotency.ErrKeyInUse):
		r.Code, reason, r.Message = code.Code_ABORTED, ReasonKeyInUse, idempotency.ErrKeyInUse.Error()
		r.RetryDelay = RetryAfter(err)
	case errors.Is(err, idempotency.ErrRecordUnreadable):
		r.Code, reason, r.Message = code.Code_INTERNAL, ReasonUnreadable, idempotency.ErrRecordUnreadable.Error()
	case errors.Is(err, idempotency.ErrShutdown):
		r.Code, reason, r.Message = code.Code_UNAVAILABLE, ReasonShutdown, idempotency.ErrShutdown.Error()
		r.RetryDelay = RetryAfter(err)
	case errors.Is(err, idempotency.ErrLeaseLost):
		r.Code, reason, r.Message = code.Code_UNAVAILABLE, ReasonNotStored, "idempotency: the outcome could not be stored; send the call again"
		r.RetryDelay = RetryAfter(err)
	case errors.Is(err, idempotency.ErrStoreUnavailable):
		r.Code, reason, r.Message = code.Code_UNAVAILABLE, ReasonUnavailable, idempotency.ErrStoreUnavailable.Error()
		r.RetryDelay = RetryAfter(err)
	default:
		r.Code, reason, r.Message = code.Code_INTERNAL, ReasonInternal, "idempotency: internal error"
	}
	r.Details = append([]proto.Message{&errdetails.ErrorInfo{Reason: reason, Domain: Domain}}, r.Details...)
	if r.RetryDelay > 0 {
		r.Details = append(r.Details, &errdetails.RetryInfo{RetryDelay: durationpb.New(r.RetryDelay)})
	}
	return r
}

func badKey(source, description string) *errdetails.BadRequest {
	return &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: source, Description: description}}}
}

// RetryAfter returns the wait that the middleware's own answer to err
// tells an HTTP client in Retry-After (the rest of the running call's
// lease for a key in use, else 1 s), as a duration, so that every
// transport gives the same advice.
func RetryAfter(err error) time.Duration {
	w := headerWriter{h: make(http.Header, 4)}
	idempotency.WriteError(&w, nil, err)
	secs, perr := strconv.Atoi(w.h.Get("Retry-After"))
	if perr != nil || secs < 1 {
		return time.Second
	}
	return time.Duration(secs) * time.Second
}

// headerWriter keeps the headers of an answer and drops its body.
type headerWriter struct{ h http.Header }

func (w *headerWriter) Header() http.Header         { return w.h }
func (w *headerWriter) WriteHeader(int)             {}
func (w *headerWriter) Write(p []byte) (int, error) { return len(p), nil }
