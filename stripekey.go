package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
)

// stripeKeyPrefix starts every derived key; the hex SHA-256 after it makes
// keys 69 characters long, well within Stripe's 255.
const stripeKeyPrefix = "idem_"

// StripeKey derives the idempotency key for one outgoing Stripe call made
// while serving an idempotent request or webhook event: a handler wrapped
// by [Middleware.Handler] or a webhook function ([NewWebhookHandler]). operation names the call
// within that work, for example "accounts.create" or "transfer:3"; use a
// different name for every call the work makes.
//
// The key depends only on the claim in ctx (kind, scope and key: the
// client's Idempotency-Key or the event id) and on operation, so a retry of
// the request, served by any process, sends Stripe the same key and gets
// the object created by the first attempt instead of a second one. Stripe
// rejects a key reused with different parameters, so the parameters of a
// call must be the same on every attempt too.
//
// The key is "idem_" followed by a hex SHA-256 (69 characters); it does not
// reveal the client's key. The error wraps [ErrNoClaim] when ctx carries no
// claim; an empty operation is an error too.
func StripeKey(ctx context.Context, operation string) (string, error) {
	if operation == "" {
		return "", errors.New("idempotency: StripeKey needs an operation name")
	}
	claim, ok := ClaimFromContext(ctx)
	if !ok {
		return "", fmt.Errorf("%w: cannot derive a Stripe idempotency key for %q", ErrNoClaim, operation)
	}
	return StripeKeyFrom(claim.Kind, claim.Scope, claim.Key, operation), nil
}

// StripeKeyFrom derives a Stripe idempotency key from explicit parts, for
// work that is not an idempotent request, such as a background job:
// StripeKeyFrom("payout-job", jobID, "transfer:3"). Parts are
// length-prefixed before hashing, so ("a", "bc") and ("ab", "c") give
// different keys. [StripeKey] is StripeKeyFrom(kind, scope, key, operation)
// over the request's claim.
//
// The result, 69 characters, is "idem_" followed by the lower-case hex
// SHA-256 of L("idempotency-stripe-key-v1"), the number of parts as a
// big-endian uint64, then L(part) for each part, where L(s) is len(s) as a
// big-endian uint64 followed by the bytes of s. The derivation is part of
// the API and does not change between versions: a retry that spans an
// upgrade, or that another service derives, gets the same key.
func StripeKeyFrom(parts ...string) string {
	b := appendField(nil, "idempotency-stripe-key-v1")
	b = appendLength(b, len(parts))
	for _, p := range parts {
		b = appendField(b, p)
	}
	sum := sha256.Sum256(b)
	return stripeKeyPrefix + hex.EncodeToString(sum[:])
}
