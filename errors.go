package idempotency

import (
	"errors"
	"net/http"
	"strings"

	"github.com/seed70ea8305/idempotency/internal/problem"
)

// Errors reported by this package. The middleware hands them, possibly
// wrapped, to its error handler, and [WebhookHandler.Handle] returns them;
// test for them with [errors.Is]. Each answers with one HTTP status
// ([StatusCode]), whatever wraps it.
var (
	// ErrKeyMissing: the route requires an Idempotency-Key and the request
	// has none (400).
	ErrKeyMissing error = newKind(http.StatusBadRequest, "key missing", "ErrKeyMissing", "Idempotency-Key header missing")

	// ErrKeyInvalid: the Idempotency-Key header is malformed (400).
	ErrKeyInvalid error = newKind(http.StatusBadRequest, "invalid key", "ErrKeyInvalid", "Idempotency-Key header invalid")

	// ErrBodyTooLarge: the request body exceeds the configured limit (413).
	ErrBodyTooLarge error = newKind(http.StatusRequestEntityTooLarge, "request body too large", "ErrBodyTooLarge", "Request body too large")

	// ErrBodyUnreadable: reading the request body failed (400).
	ErrBodyUnreadable error = newKind(http.StatusBadRequest, "request body unreadable", "ErrBodyUnreadable", "Request body unreadable")

	// ErrInvalidJSON: canonical JSON fingerprinting was asked for and the
	// body is not valid JSON (400). A custom fingerprint function may wrap
	// it to reject a request as malformed; its own text is not shown.
	ErrInvalidJSON error = newKind(http.StatusBadRequest, "invalid JSON body", "ErrInvalidJSON", "Request body is not valid JSON")

	// ErrFingerprintMismatch: the key was used before for a different
	// request (422).
	ErrFingerprintMismatch error = newKind(http.StatusUnprocessableEntity, "key reused with a different request", "ErrFingerprintMismatch", "Idempotency-Key reused with a different request")

	// ErrKeyInUse: a request with the same key, or a delivery of the same
	// webhook event, is still being processed (409).
	ErrKeyInUse error = newKind(http.StatusConflict, "key in use", "ErrKeyInUse", "A request with this Idempotency-Key is still being processed")

	// ErrStoreUnavailable: the store failed or did not answer in time, so
	// the request could not be protected (503).
	ErrStoreUnavailable error = newKind(http.StatusServiceUnavailable, "store unavailable", "ErrStoreUnavailable", "Idempotency store unavailable")

	// ErrLeaseLost: the attempt no longer owns its key: its lease could not
	// be renewed in time, or the key was freed or claimed by someone else.
	// Stores return it from Extend, Complete and Release; a handler's
	// context is cancelled with a cause wrapping it (503 when it then
	// answers nothing).
	ErrLeaseLost error = newKind(http.StatusServiceUnavailable, "lease lost", "ErrLeaseLost", "The request lost its claim on the Idempotency-Key")

	// ErrShutdown: the handler's context was cancelled because the context
	// given to [Options].Shutdown ended (503 when it then answers nothing).
	ErrShutdown error = newKind(http.StatusServiceUnavailable, "shutting down", "ErrShutdown", "The server is shutting down")

	// ErrRecordUnreadable: the record stored under the key cannot be
	// decoded (corrupt, truncated, or written by an incompatible version),
	// so the request can be neither replayed nor run (500, no
	// Retry-After: retrying changes nothing). Stores return errors wrapping
	// it; the record stays until its TTL ends or an operator removes it
	// ([Inspector]).
	ErrRecordUnreadable error = newKind(http.StatusInternalServerError, "record unreadable", "ErrRecordUnreadable", "The stored record for this Idempotency-Key is unreadable")

	// ErrWebhookSignature: the delivery is not authentic: a signature
	// header is missing or malformed, no signature matches any of the
	// secrets, or its timestamp is outside the tolerance (400). Errors from
	// this package's [Verifier]s wrap it (the Stripe one also wraps the
	// error from stripe-go's webhook package: [webhook.ErrNotSigned],
	// [webhook.ErrInvalidHeader], [webhook.ErrNoValidSignature] or
	// [webhook.ErrTooOld]).
	ErrWebhookSignature error = newKind(http.StatusBadRequest, "invalid webhook signature", "ErrWebhookSignature", "Invalid webhook signature")

	// ErrWebhookPayload: the delivery is authentic but names no event this
	// handler can key: malformed JSON where the provider sends JSON, or no
	// event ID (400).
	ErrWebhookPayload error = newKind(http.StatusBadRequest, "invalid webhook payload", "ErrWebhookPayload", "Invalid webhook payload")

	// ErrWebhookFailed: the webhook function returned an error or panicked;
	// the event was released so that Stripe's next delivery processes it
	// again (500). It wraps the function's error.
	ErrWebhookFailed error = newKind(http.StatusInternalServerError, "webhook function failed", "ErrWebhookFailed", "Webhook processing failed")

	// ErrWebhookNotRecorded: the webhook function succeeded, but the event
	// could not be marked processed (the store failed, or the claim
	// lapsed). The event was processed, so [WebhookHandler.ServeHTTP] still
	// answers 200; a later delivery of it may run the function again.
	ErrWebhookNotRecorded error = newKind(http.StatusOK, "webhook processed but not recorded", "ErrWebhookNotRecorded", "Webhook processed")
)

// ErrNoClaim: [StripeKey] was called with a context that
// belongs to no idempotent request or webhook event, so there is nothing
// durable to derive a key from. Use [StripeKeyFrom] with explicit parts
// outside requests.
var ErrNoClaim = errors.New("idempotency: no idempotent request in context")

// kind is the type of every sentinel above: its status and problem text
// travel with it, so the mapping holds whatever wraps the error and in
// whatever order the sentinels are declared.
type kind struct {
	status int
	msg    string
	anchor string // the sentinel's name, for the problem type URI
	title  string
}

func newKind(status int, msg, anchor, title string) *kind {
	return &kind{status: status, msg: "idempotency: " + msg, anchor: anchor, title: title}
}

func (k *kind) Error() string { return k.msg }

// requestError is a sentinel with a detail about the client's own request
// (which key rule it broke, where the JSON is malformed). Only this package
// creates them, from text it controls, so only they show a detail.
type requestError struct {
	kind   *kind
	detail string
	cause  error // optional, for errors.Is (stripe-go's signature errors)
}

func (e *requestError) Error() string { return e.kind.msg + ": " + e.detail }

func (e *requestError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.cause}
}

func newRequestError(k error, detail string) error {
	return &requestError{kind: k.(*kind), detail: detail}
}

// internalError answers what is not one of the package's errors.
var internalError = kind{status: http.StatusInternalServerError, anchor: "WriteError", title: "Internal server error"}

// kindOf returns the kind of the outermost sentinel err wraps.
func kindOf(err error) *kind {
	var k *kind
	if errors.As(err, &k) {
		return k
	}
	return &internalError
}

// StatusCode returns the HTTP status the package answers err with: the
// status of the sentinel it wraps (see each), or 500 for anything else.
func StatusCode(err error) int { return kindOf(err).status }

// WriteError is the default error handler: it answers err as an RFC 9457
// application/problem+json document with the status from [StatusCode]; 409
// and 503 carry Retry-After (on a 409 from the middleware, the rest of the
// running request's lease in whole seconds, rounded up; else 1). Only errors the package made from the client's
// own request (a malformed key, body or JSON) show a detail; every other
// error, including any from a custom fingerprint function, store or
// webhook function, gets fixed text, so internal details never reach the
// client.
func WriteError(w http.ResponseWriter, _ *http.Request, err error) {
	writeProblem(w, kindOf(err), err)
}

const (
	problemTypeBase = "https://pkg.go.dev/github.com/seed70ea8305/idempotency#"
	// Retry-After seconds, on 503 and on a 409 whose lease is unknown: a
	// 503 costs little to retry.
	retryAfterSeconds = "1"
)

func writeProblem(w http.ResponseWriter, k *kind, err error) {
	p := problem.Problem{Type: problemTypeBase + k.anchor, Title: k.title, Status: k.status}
	var re *requestError
	if errors.As(err, &re) && re.kind == k {
		p.Detail = strings.TrimPrefix(re.Error(), "idempotency: ")
	}
	var wait string
	if k.status == http.StatusConflict || k.status == http.StatusServiceUnavailable {
		wait = retryAfter(err)
	}
	problem.Write(w, p, wait)
}
