package idempotency

import (
	"context"
	"fmt"
	"net/http"
	"time"
)

// Store keeps one [Record] per key: claimed by one owner while the work
// runs, then holding the outcome for later retries.
//
// The protocol is "claim, then record the outcome":
//
//   - [Store.Acquire] claims a free key for a short lease, or returns the
//     record already there;
//   - while the work runs, the owner renews the lease with [Store.Extend];
//   - the owner then either stores the outcome with [Store.Complete] or frees
//     the key with [Store.Release] so a retry can run the work again.
//
// Every call after Acquire names the owner's token and must change nothing
// unless that token still owns the key; otherwise it returns [ErrLeaseLost]
// (Release, only when someone else holds the key: see there). That is what
// keeps an owner whose lease lapsed from overwriting or deleting the record
// of the owner that came after it. ErrLeaseLost always means the call
// changed nothing.
//
// Every call must return by its context's deadline: the middleware gives
// each call one (the store timeout), except to [MemoryStore], whose calls
// never wait. A call that returns an error may still have taken effect.
//
// Implementations must be safe for concurrent use, also from several
// processes sharing one backend. Keys are opaque strings built by this
// package; they may hold any byte.
type Store interface {
	// Acquire claims key for claim.Token for the given lease when no live
	// record exists under key, and returns the claim's fencing token: a
	// number greater than every fence it returned for key before. When a
	// record exists (in flight or completed), Acquire changes nothing and
	// returns it; the caller must not modify it. claim must be in flight
	// (Token set, Response nil). Acquire must not claim after ctx's
	// deadline has passed, so that a caller that gave up on the call can
	// tell when a late claim could still land.
	Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (fence uint64, existing *Record, err error)

	// Extend renews the lease of the in-flight record that token owns.
	Extend(ctx context.Context, key, token string, lease time.Duration) error

	// Complete replaces the in-flight record that token owns with rec, which
	// must carry a Response, and keeps it for ttl. The store may keep rec
	// itself; the caller must not modify it afterwards, and the store must
	// not modify it either: records may share their Response.Header map
	// (the middleware reuses the previous response's map when the headers
	// are the same, to save an allocation per request). Repeating the call
	// with the same token after it succeeded succeeds again and changes
	// nothing: a client library may re-send a call whose reply it lost.
	Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error

	// Release deletes the in-flight record that token owns, so the key can be
	// claimed again. It returns ErrLeaseLost, and changes nothing, only
	// when the key is held by someone else: in flight under another
	// owner's running lease, or completed (by any token: the outcome stays).
	// When nothing holds the key (it is free, suspended with a recovery
	// point and no owner, or token's own claim lapsed and no one took it
	// over) Release changes nothing and returns nil. So a repeated Release
	// succeeds: a client library may re-send a call whose reply it lost,
	// and the repeat finds the key that the first call freed; ErrLeaseLost
	// would tell the caller that its claim was taken from it, which never
	// happened. A repeat that finds another claim holding the key (which
	// came after the first send freed it, or after the caller's lease
	// lapsed) must not answer ErrLeaseLost unless the store knows that no
	// earlier send ran: it answers nil when it knows one did (RedisStore
	// remembers the call), or another error, of unknown outcome.
	Release(ctx context.Context, key, token string) error
}

// FailureRecorder is implemented by stores that keep a history of failed
// attempts per key. The webhook helper uses it, when its store has it,
// instead of [Store.Release] after the webhook function failed, so an
// operator can see how often an event failed and why (see
// [WebhookHandler.Event]).
type FailureRecorder interface {
	// Fail releases the in-flight record that token owns, as Release does,
	// and counts a failed attempt under key with reason as the last error,
	// keeping both for ttl after this failure. It returns the number of
	// failed attempts counted so far. Repeated by the same token after it
	// succeeded (a client library re-sent it after losing its reply), it
	// counts nothing and returns the count again, while that failure is
	// the last one counted and its history lives. Otherwise, when token
	// does not own the key, it returns ErrLeaseLost and counts nothing:
	// unlike Release, also when nothing holds the key, since a failure is
	// counted only for the claim it ends.
	Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (attempts int, err error)

	// Failures returns the failed attempts counted under key and the last
	// reason; zero and "" when none were, or their history expired.
	Failures(ctx context.Context, key string) (attempts int, lastReason string, err error)
}

// Inspector is implemented by stores that let an operator look at a
// record without claiming its key, and remove one whatever its state.
// [WebhookHandler.Event] reads with it, [Middleware.Remove] and
// [WebhookHandler.Remove] remove with it. Every store of this module
// implements it.
type Inspector interface {
	// Get returns the live record under key, or nil when there is none: a
	// completed record, an in-flight one (with its owner's Token and its
	// LeaseLeft), or a suspended one (its recovery point, no Token; see
	// [Checkpointer]). The caller must not modify it. A record that cannot
	// be decoded is an error wrapping [ErrRecordUnreadable].
	Get(ctx context.Context, key string) (*Record, error)

	// Remove deletes the record under key, in any state, with its recovery
	// point and failure history; a key with nothing under it is no error.
	// It is the operator's way out of a record that cannot be read
	// ([ErrRecordUnreadable]). A record in flight loses its owner: a
	// duplicate may then run the work again, so use it only on a record
	// that is unreadable or known to be abandoned.
	Remove(ctx context.Context, key string) error
}

// Checkpointer is implemented by stores that keep recovery points: named
// checkpoints with a little data that an owner records as its work
// progresses, so that after a crash the next attempt resumes from the last
// one instead of starting over (Brandur Leach's "atomic phases"). Every
// store of this module implements it.
//
// A recovery point outlives its owner. When the lease of a record that
// holds one lapses, or its owner frees it ([Store.Release],
// [FailureRecorder.Fail]), the record is suspended rather than deleted,
// until ttl after the last checkpoint:
//
//   - [Store.Acquire] with the same fingerprint claims it as usual (a new
//     owner, a greater fence) and the claim keeps the recovery point;
//     Acquire then returns the fence together with the suspended record,
//     which carries RecoveryPoint and RecoveryData (and no Token, no
//     Response): a non-zero fence means claimed, whatever else is returned;
//   - Acquire with another fingerprint claims nothing and returns the
//     suspended record, so the middleware answers 422: the key is bound to
//     work already partly done;
//   - [Store.Complete] drops the recovery point with the in-flight state.
type Checkpointer interface {
	// Checkpoint records point and data as the recovery point of the
	// in-flight record that token owns, replacing the one before, and keeps
	// it at least ttl from now. It returns ErrLeaseLost, and changes
	// nothing, when token does not own a live in-flight record under key.
	// Repeating the call is harmless.
	Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error
}

// Limits on what a recovery point holds: a name and a little data (an ID or
// two), not a payload.
const (
	maxRecoveryPoint = 255
	maxRecoveryData  = 64 << 10
)

// Record is what a [Store] keeps under one key.
type Record struct {
	// Token identifies the owner of an in-flight record. It is empty once
	// the record is completed.
	Token string

	// Fingerprint identifies the request that claimed the key; a later
	// request with the same key and another fingerprint is rejected.
	Fingerprint string

	// CreatedAt is when the key was claimed.
	CreatedAt time.Time

	// Response is the stored outcome; nil while the record is in flight.
	Response *Response

	// LeaseLeft, on an in-flight record that [Store.Acquire] returns, is
	// how long its lease has left unless renewed, by the store's clock: the
	// middleware derives a 409's Retry-After from it, and a waiting
	// duplicate ([Options].Wait) re-reads the key when it ends. Zero when the
	// store does not tell; stores ignore it in what they are given.
	LeaseLeft time.Duration

	// RecoveryPoint and RecoveryData are the last recovery point an owner
	// of the key recorded ([Checkpointer]), on a record that Acquire
	// returns from a store that keeps them; empty when there is none.
	RecoveryPoint string
	RecoveryData  []byte
}

// Response is a stored outcome: for the middleware, the HTTP response the
// handler wrote; for the webhook helper, the answer given to Stripe.
type Response struct {
	StatusCode int
	Header     http.Header
	Body       []byte

	// BodyOmitted is set when the body exceeded the storage cap and was
	// not stored; Body is then empty.
	BodyOmitted bool
}

func validateClaim(claim *Record, lease time.Duration) error {
	switch {
	case claim.Token == "":
		return fmt.Errorf("idempotency: claim without an owner token")
	case claim.Response != nil:
		return fmt.Errorf("idempotency: claim must be in flight (Response nil)")
	case lease <= 0:
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return nil
}

func validateCompletion(rec *Record, ttl time.Duration) error {
	switch {
	case rec == nil || rec.Response == nil:
		return fmt.Errorf("idempotency: completion without a response")
	case ttl <= 0:
		return fmt.Errorf("idempotency: record TTL %v is not positive", ttl)
	}
	return nil
}
