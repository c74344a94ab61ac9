package storetest

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// The recovery-point tests run for stores that implement
// idempotency.Checkpointer; see its documentation for the contract.

func checkpointer(t *testing.T, h Harness) idempotency.Checkpointer {
	t.Helper()
	cp, ok := h.Store.(idempotency.Checkpointer)
	if !ok {
		t.Skipf("%T keeps no recovery points", h.Store)
	}
	return cp
}

// claimOrFind acquires k, held, and returns the fence (0 when not
// claimed) and whatever record came with it.
func claimOrFind(t *testing.T, s idempotency.Store, k string, c idempotency.Record) (uint64, *idempotency.Record) {
	t.Helper()
	return claimOrFindFor(t, s, k, c, held)
}

func claimOrFindFor(t *testing.T, s idempotency.Store, k string, c idempotency.Record, d time.Duration) (uint64, *idempotency.Record) {
	t.Helper()
	fence, rec, err := s.Acquire(context.Background(), k, c, d)
	require.NoError(t, err)
	return fence, rec
}

// testCheckpointResumesAfterLapse: the claim after a lapsed lease, for the
// same request, resumes from the last recovery point and keeps it.
func testCheckpointResumesAfterLapse(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	first := claim("fp")
	f1 := acquireFenceToLapse(t, h.Store, k, first)
	require.NoError(t, cp.Checkpoint(ctx, k, first.Token, "one", []byte("1"), ttl))
	data := []byte{0, 1, 0xff, '\n', 'x'}
	require.NoError(t, cp.Checkpoint(ctx, k, first.Token, "two: é", data, ttl))

	h.Advance(lease + 50*time.Millisecond)
	second := claim("fp")
	f2, resumed := claimOrFindFor(t, h.Store, k, second, lease) // lapses below too
	require.NotZero(t, f2, "the same request claims the suspended key")
	assert.Greater(t, f2, f1)
	require.NotNil(t, resumed, "the claim reports the recovery point it resumes from")
	assert.Nil(t, resumed.Response)
	assert.Equal(t, "two: é", resumed.RecoveryPoint)
	assert.Equal(t, data, resumed.RecoveryData)
	assert.Equal(t, "fp", resumed.Fingerprint)

	assert.ErrorIs(t, cp.Checkpoint(ctx, k, first.Token, "late", nil, ttl), idempotency.ErrLeaseLost, "the lapsed owner")
	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing, "the resumed claim holds the key")
	assert.Equal(t, second.Token, existing.Token)

	// The resumed claim keeps the point: a second crash resumes from it too.
	h.Advance(lease + 50*time.Millisecond)
	f3, resumed := claimOrFind(t, h.Store, k, claim("fp"))
	require.NotZero(t, f3)
	require.NotNil(t, resumed)
	assert.Equal(t, "two: é", resumed.RecoveryPoint)
}

// testCheckpointSurvivesRelease: a released or failed attempt leaves its
// recovery point for the next one; a fresh claim has none.
func testCheckpointSurvivesRelease(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	fence, rec := claimOrFind(t, h.Store, k, c)
	require.NotZero(t, fence)
	assert.Nil(t, rec, "a fresh claim resumes from nothing")
	require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "charged", []byte("ch_1"), ttl))
	require.NoError(t, h.Store.Release(ctx, k, c.Token))
	assert.ErrorIs(t, cp.Checkpoint(ctx, k, c.Token, "after", nil, ttl), idempotency.ErrLeaseLost, "a released owner")
	assert.ErrorIs(t, h.Store.Extend(ctx, k, c.Token, lease), idempotency.ErrLeaseLost)
	require.NoError(t, h.Store.Release(ctx, k, c.Token), "repeated: a suspended key has no owner to refuse for")
	require.NoError(t, h.Store.Release(ctx, k, "another token"), "nor for another token")

	c = claim("fp")
	fence, rec = claimOrFind(t, h.Store, k, c)
	require.NotZero(t, fence, "a released key is claimed again at once")
	require.NotNil(t, rec)
	assert.Equal(t, "charged", rec.RecoveryPoint)
	assert.Equal(t, []byte("ch_1"), rec.RecoveryData)

	if fr, ok := h.Store.(idempotency.FailureRecorder); ok {
		_, err := fr.Fail(ctx, k, c.Token, "boom", ttl)
		require.NoError(t, err)
		fence, rec = claimOrFind(t, h.Store, k, claim("fp"))
		require.NotZero(t, fence, "a failed key is claimed again at once")
		require.NotNil(t, rec)
		assert.Equal(t, "charged", rec.RecoveryPoint, "after Fail")
	}
}

// testCheckpointBindsRequest: partly done work keeps its key from another
// request; the same request still resumes it.
func testCheckpointBindsRequest(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	c := claim("fp-1")
	acquireFence(t, h.Store, k, c)
	require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "half", []byte("h"), ttl))
	require.NoError(t, h.Store.Release(ctx, k, c.Token))

	fence, rec := claimOrFind(t, h.Store, k, claim("fp-2"))
	assert.Zero(t, fence, "another request does not claim a suspended key")
	require.NotNil(t, rec)
	assert.Nil(t, rec.Response)
	assert.Equal(t, "fp-1", rec.Fingerprint, "the suspended request's fingerprint, for the 422")

	fence, rec = claimOrFind(t, h.Store, k, claim("fp-1"))
	require.NotZero(t, fence)
	require.NotNil(t, rec)
	assert.Equal(t, "half", rec.RecoveryPoint)
}

// testCheckpointEndsWithCompletion: a stored response drops the recovery
// point; once it expires the key starts afresh.
func testCheckpointEndsWithCompletion(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	acquireFence(t, h.Store, k, c)
	require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "half", nil, ttl))
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 201, "made"), lease))
	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing)
	require.NotNil(t, existing.Response)
	assert.Equal(t, 201, existing.Response.StatusCode)
	assert.ErrorIs(t, cp.Checkpoint(ctx, k, c.Token, "after", nil, ttl), idempotency.ErrLeaseLost, "a completed record takes no checkpoint")

	h.Advance(lease + 50*time.Millisecond)
	fence, rec := claimOrFind(t, h.Store, k, claim("fp-2"))
	require.NotZero(t, fence, "the expired record leaves no recovery point behind")
	assert.Nil(t, rec)
}

// testCheckpointOwnerChecked: only the owner records a point, and a refused
// call changes nothing.
func testCheckpointOwnerChecked(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	assert.ErrorIs(t, cp.Checkpoint(ctx, k, "nobody", "x", nil, ttl), idempotency.ErrLeaseLost, "a free key")
	c := claim("fp")
	acquireFence(t, h.Store, k, c)
	require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "mine", nil, ttl))
	assert.ErrorIs(t, cp.Checkpoint(ctx, k, "not-the-token", "theirs", nil, ttl), idempotency.ErrLeaseLost)
	assert.ErrorIs(t, cp.Checkpoint(ctx, k, "", "theirs", nil, ttl), idempotency.ErrLeaseLost)
	require.NoError(t, h.Store.Release(ctx, k, c.Token))
	fence, rec := claimOrFind(t, h.Store, k, claim("fp"))
	require.NotZero(t, fence)
	require.NotNil(t, rec)
	assert.Equal(t, "mine", rec.RecoveryPoint)
	assert.Empty(t, rec.RecoveryData)
}

// testCheckpointExpires: a suspended key's recovery point lasts its TTL.
func testCheckpointExpires(t *testing.T, h Harness) {
	cp := checkpointer(t, h)
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	acquireFenceToLapse(t, h.Store, k, c) // a store may keep the record to its lease's end
	short := 2 * lease
	require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "half", nil, short))
	require.NoError(t, h.Store.Release(ctx, k, c.Token))
	h.Advance(short + 50*time.Millisecond)
	fence, rec := claimOrFind(t, h.Store, k, claim("fp-other"))
	require.NotZero(t, fence, "an expired recovery point binds nothing")
	assert.Nil(t, rec)
}

// testReaderSeesRecords runs for stores that implement idempotency.Reader:
// Get reads every state of a key and claims nothing.
func testReaderSeesRecords(t *testing.T, h Harness) {
	r, ok := h.Store.(idempotency.Inspector)
	if !ok {
		t.Skipf("%T cannot read records", h.Store)
	}
	ctx := context.Background()
	k := key(t)
	rec, err := r.Get(ctx, k)
	require.NoError(t, err)
	assert.Nil(t, rec, "a free key")
	rec, err = r.Get(ctx, k)
	require.NoError(t, err)
	assert.Nil(t, rec, "Get claims nothing")

	c := claim("fp")
	acquireFence(t, h.Store, k, c)
	rec, err = r.Get(ctx, k)
	require.NoError(t, err)
	require.NotNil(t, rec, "in flight")
	assert.Equal(t, c.Token, rec.Token)
	assert.Equal(t, "fp", rec.Fingerprint)
	assert.Nil(t, rec.Response)
	assert.LessOrEqual(t, rec.LeaseLeft, held)

	if cp, ok := h.Store.(idempotency.Checkpointer); ok {
		require.NoError(t, cp.Checkpoint(ctx, k, c.Token, "half", []byte("d"), ttl))
		require.NoError(t, h.Store.Release(ctx, k, c.Token))
		rec, err = r.Get(ctx, k)
		require.NoError(t, err)
		require.NotNil(t, rec, "suspended")
		assert.Empty(t, rec.Token, "a suspended record has no owner")
		assert.Equal(t, "half", rec.RecoveryPoint)
		assert.Equal(t, []byte("d"), rec.RecoveryData)
		assert.Equal(t, "fp", rec.Fingerprint)
		c = claim("fp")
		fence, _ := claimOrFind(t, h.Store, k, c)
		require.NotZero(t, fence)
	}

	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 201, "made"), ttl))
	rec, err = r.Get(ctx, k)
	require.NoError(t, err)
	require.NotNil(t, rec, "completed")
	require.NotNil(t, rec.Response)
	assert.Equal(t, 201, rec.Response.StatusCode)
	assert.Equal(t, "made", string(rec.Response.Body))
	assert.Empty(t, rec.RecoveryPoint)
}
