package idempotency

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

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

// Checkpoint records a recovery point for the work this claim belongs to:
// point names the phase just finished ("venue_created"), data is what the
// rest of the work needs from it (an ID), at most 64 KiB. A later attempt
// at the same key and request, after this one crashed, lost its lease or
// failed, starts with [Claim.RecoveryPoint] and [Claim.RecoveryData] set
// to the last checkpoint recorded, and can skip what was done.
//
// The checkpoint is kept by the store only while this claim still owns the
// key: the error wraps [ErrLeaseLost] when it does not, and the work's
// context is then cancelled with it, as when a renewal finds the key
// taken; it wraps [ErrStoreUnavailable] when the store failed, and
// [errors.ErrUnsupported] when the store keeps no recovery points. A
// stored response ends the recovery point's life. ctx should be the
// handler's context; the call is bounded by the store timeout.
func (c Claim) Checkpoint(ctx context.Context, point string, data []byte) error {
	a := c.attempt
	switch {
	case a == nil:
		return fmt.Errorf("%w: no attempt to checkpoint", ErrNoClaim)
	case point == "" || len(point) > maxRecoveryPoint || !utf8.ValidString(point) || strings.IndexByte(point, 0) >= 0:
		return fmt.Errorf("idempotency: recovery point name must be 1 to %d bytes of UTF-8 without NUL", maxRecoveryPoint)
	case len(data) > maxRecoveryData:
		return fmt.Errorf("idempotency: recovery data of %d bytes exceeds %d", len(data), maxRecoveryData)
	}
	cp, ok := findStore[Checkpointer](a.engine.store)
	if !ok {
		return fmt.Errorf("idempotency: %T keeps no recovery points: %w", a.engine.store, errors.ErrUnsupported)
	}
	callCtx, cancel := a.engine.bound(ctx)
	defer cancel()
	err := cp.Checkpoint(callCtx, a.key, a.token, point, data, a.engine.ttl)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrLeaseLost):
		// The work must stop, as when a renewal finds the key taken.
		a.cancel(err)
		return err
	default:
		return fmt.Errorf("%w: recording recovery point %q: %w", ErrStoreUnavailable, point, err)
	}
}

// HoldResponse makes the middleware hold this claim's response until its
// outcome is stored, also on a route served [WithStreaming], where
// responses otherwise pass through as they are written (without it, every
// response is held). A store that commits the response with the handler's
// own writes asks for it (pgstore's Tx does), so that a client never sees
// a success that was rolled back. Call it before the handler writes. It
// does nothing for a webhook function, whose answer is written after its
// outcome is stored anyway, or on a Claim no attempt runs.
func (c Claim) HoldResponse() {
	if c.attempt != nil {
		c.attempt.hold.Store(true)
	}
}
