package lincheck_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/lincheck"
)

// broken is a MemoryStore with one bug of the kind a store could have.
type broken struct {
	*idempotency.MemoryStore
	bug string
}

func (b broken) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	fence, existing, err := b.MemoryStore.Acquire(ctx, key, claim, lease)
	switch {
	case err != nil:
	case b.bug == "fence from a counter that restarts" && fence != 0:
		fence = 1 + fence%4
	case b.bug == "a claim ignores the lease in flight" && existing != nil && existing.Response == nil:
		b.Remove(ctx, key)
		return b.MemoryStore.Acquire(ctx, key, claim, lease)
	}
	return fence, existing, err
}

func (b broken) Release(ctx context.Context, key, token string) error {
	if b.bug == "release without an owner check" {
		return b.Remove(ctx, key)
	}
	return b.MemoryStore.Release(ctx, key, token)
}

func (b broken) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	err := b.MemoryStore.Complete(ctx, key, token, rec, ttl)
	if b.bug == "complete without an owner check" && errors.Is(err, idempotency.ErrLeaseLost) {
		// Whatever holds the key, in flight or completed, is replaced.
		b.Remove(ctx, key)
		if _, _, err := b.MemoryStore.Acquire(ctx, key, idempotency.Record{Token: token, Fingerprint: rec.Fingerprint}, time.Minute); err != nil {
			return err
		}
		return b.MemoryStore.Complete(ctx, key, token, rec, ttl)
	}
	return err
}

// TestBrokenStoresFail: the workload, the recorder and the checker
// together catch a store that breaks the protocol, in each of a few ways;
// the same workload on the store without the bug passes (TestMemoryStore).
func TestBrokenStoresFail(t *testing.T) {
	for _, bug := range []string{
		"fence from a counter that restarts",
		"a claim ignores the lease in flight",
		"release without an owner check",
		"complete without an owner check",
	} {
		t.Run(bug, func(t *testing.T) {
			rec := lincheck.NewRecorder()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			// Leases lapse, so that stale owners write; clients that find a
			// key taken come back later, so that lapsed keys are claimed
			// again while their stale owners still write.
			w := lincheck.Workload{Lease: 5 * time.Millisecond, MaxWork: 8 * time.Millisecond, MaxOps: 3000, Retry: 5 * time.Millisecond}
			w.Run(ctx, broken{idempotency.NewMemoryStore(idempotency.MemoryOptions{}), bug}, rec)
			res := lincheck.Check(rec.History(), time.Minute)
			t.Logf("%s", res)
			if res.Verdict != porcupine.Illegal {
				t.Errorf("the checker accepted a store whose %s", bug)
			}
		})
	}
}
