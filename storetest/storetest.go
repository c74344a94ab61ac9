// Package storetest is the conformance suite of [idempotency.Store]: the
// claim protocol, owner checks, fences, TTLs, concurrency and, for stores
// that have them, failure histories, recovery points and the operator's
// reads and removals ([idempotency.FailureRecorder],
// [idempotency.Checkpointer], [idempotency.Inspector]). Every store of
// this module passes it; a store of your own proves itself with it, as
// [golang.org/x/net/nettest.TestConn] does for a net.Conn:
//
//	func TestMyStore(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) storetest.Harness {
//			return storetest.Harness{
//				Store:   newMyStore(t),  // fresh, or sharing no keys with the others
//				Advance: time.Sleep,     // or a fake clock's
//			}
//		})
//	}
//
// It needs a few seconds of real time for a store on a real server, whose
// clock only sleeping moves: its leases are 200 ms to 1 s.
package storetest

import (
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// Harness is one store under test.
type Harness struct {
	// Store is fresh for each call of the factory, or at least shares no
	// keys with other calls.
	Store idempotency.Store
	// Advance moves the store's clock forward by d: a fake clock, Redis'
	// FastForward, or a plain sleep for a real server.
	Advance func(d time.Duration)
}

// Run runs the suite against the stores newHarness returns, one per subtest.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	tests := []struct {
		name string
		run  func(t *testing.T, h Harness)
	}{
		{"AcquireFreeKey", testAcquireFreeKey},
		{"AcquireHeldKeyReturnsClaim", testAcquireHeldKey},
		{"AcquireHeldKeyTellsLeaseLeft", testAcquireLeaseLeft},
		{"CompleteStoresResponse", testComplete},
		{"CompleteKeepsForTTL", testCompleteTTL},
		{"ReleaseFreesKey", testRelease},
		{"ReleaseRefusesOnlyWhenHeld", testReleaseRefusesOnlyWhenHeld},
		{"LeaseExpiryFreesKey", testLeaseExpiry},
		{"ExtendKeepsLease", testExtend},
		{"StaleOwnerCannotWrite", testStaleOwner},
		{"WrongTokenChangesNothing", testWrongToken},
		{"CompletedRecordIsNotOwned", testCompletedNotOwned},
		{"CompleteRepeatedSucceeds", testCompleteRepeated},
		{"KeysAreIndependent", testKeysIndependent},
		{"UnusualKeys", testUnusualKeys},
		{"BinaryBodyAndHeaders", testBinaryResponse},
		{"InvalidArguments", testInvalidArguments},
		{"CancelledContext", testCancelledContext},
		{"ConcurrentAcquireHasOneWinner", testConcurrentAcquire},
		{"FencesGrow", testFencesGrow},
		{"FailureHistory", testFailureHistory},
		{"CheckpointResumesAfterLapse", testCheckpointResumesAfterLapse},
		{"CheckpointSurvivesRelease", testCheckpointSurvivesRelease},
		{"CheckpointBindsRequest", testCheckpointBindsRequest},
		{"CheckpointEndsWithCompletion", testCheckpointEndsWithCompletion},
		{"CheckpointOwnerChecked", testCheckpointOwnerChecked},
		{"CheckpointExpires", testCheckpointExpires},
		{"ReaderSeesRecords", testReaderSeesRecords},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.run(t, newHarness(t))
		})
	}
}

// A claim the test lets lapse gets lease; every other claim gets held,
// which no store call outlasts on a loaded machine (a real server's clock
// is moved by sleeping, so lapsing claims keep the suite short).
const (
	lease = 200 * time.Millisecond
	held  = 10 * time.Second
	ttl   = 2 * time.Second
)

func claim(fingerprint string) idempotency.Record {
	return idempotency.Record{
		Token:       rand.Text(),
		Fingerprint: fingerprint,
		CreatedAt:   time.UnixMilli(time.Now().UnixMilli()),
	}
}

func done(fingerprint string, status int, body string) *idempotency.Record {
	return &idempotency.Record{
		Fingerprint: fingerprint,
		CreatedAt:   time.UnixMilli(time.Now().UnixMilli()),
		Response: &idempotency.Response{
			StatusCode: status,
			Header:     http.Header{"Content-Type": {"application/json"}, "X-Multi": {"a", "b"}},
			Body:       []byte(body),
		},
	}
}

func key(t *testing.T) string { return t.Name() + ":" + rand.Text() }

// acquire claims k for c, held, or returns the record already there.
func acquire(t *testing.T, s idempotency.Store, k string, c idempotency.Record) *idempotency.Record {
	t.Helper()
	return acquireFor(t, s, k, c, held)
}

// acquireToLapse is acquire with a lease the test lets lapse.
func acquireToLapse(t *testing.T, s idempotency.Store, k string, c idempotency.Record) *idempotency.Record {
	t.Helper()
	return acquireFor(t, s, k, c, lease)
}

func acquireFor(t *testing.T, s idempotency.Store, k string, c idempotency.Record, d time.Duration) *idempotency.Record {
	t.Helper()
	fence, existing, err := s.Acquire(context.Background(), k, c, d)
	require.NoError(t, err)
	if existing == nil {
		require.NotZero(t, fence, "an acquired key has a fence")
	} else {
		require.Zero(t, fence, "a key already held has no fence for the caller")
	}
	return existing
}

// acquireFence acquires the free key k, held, and returns its fence.
func acquireFence(t *testing.T, s idempotency.Store, k string, c idempotency.Record) uint64 {
	t.Helper()
	return acquireFenceFor(t, s, k, c, held)
}

// acquireFenceToLapse is acquireFence with a lease the test lets lapse.
func acquireFenceToLapse(t *testing.T, s idempotency.Store, k string, c idempotency.Record) uint64 {
	t.Helper()
	return acquireFenceFor(t, s, k, c, lease)
}

func acquireFenceFor(t *testing.T, s idempotency.Store, k string, c idempotency.Record, d time.Duration) uint64 {
	t.Helper()
	fence, existing, err := s.Acquire(context.Background(), k, c, d)
	require.NoError(t, err)
	require.Nil(t, existing, "%s is free", k)
	return fence
}

// testFencesGrow checks that every new owner of a key gets a greater fence
// than every owner before it: after a release, after a lapsed lease and
// after a completed record expired.
func testFencesGrow(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	first := claim("fp")
	f1 := acquireFence(t, h.Store, k, first)
	require.NoError(t, h.Store.Release(ctx, k, first.Token))

	f2 := acquireFenceToLapse(t, h.Store, k, claim("fp"))
	assert.Greater(t, f2, f1, "after a release")
	h.Advance(lease + 50*time.Millisecond)

	third := claim("fp")
	f3 := acquireFence(t, h.Store, k, third)
	assert.Greater(t, f3, f2, "after a lapsed lease")
	require.NoError(t, h.Store.Complete(ctx, k, third.Token, done("fp", 200, "ok"), lease))
	h.Advance(lease + 50*time.Millisecond)

	f4 := acquireFence(t, h.Store, k, claim("fp"))
	assert.Greater(t, f4, f3, "after the completed record expired")

	other := acquireFence(t, h.Store, key(t), claim("fp"))
	assert.NotZero(t, other, "another key has fences of its own sequence or a shared one")
}

func testAcquireFreeKey(t *testing.T, h Harness) {
	k := key(t)
	require.Nil(t, acquire(t, h.Store, k, claim("fp")), "a free key is acquired")
}

func testAcquireHeldKey(t *testing.T, h Harness) {
	k := key(t)
	first := claim("fp-1")
	require.Nil(t, acquire(t, h.Store, k, first))

	existing := acquire(t, h.Store, k, claim("fp-2"))
	require.NotNil(t, existing, "a held key is not acquired again")
	assert.Nil(t, existing.Response, "in flight")
	assert.Equal(t, first.Token, existing.Token)
	assert.Equal(t, "fp-1", existing.Fingerprint, "the first claim's fingerprint is kept")
	assert.True(t, first.CreatedAt.Equal(existing.CreatedAt), "created %v, got %v", first.CreatedAt, existing.CreatedAt)
}

func testComplete(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	want := done("fp", http.StatusCreated, `{"id":"v_1"}`)
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, want, ttl))

	got := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, got)
	assert.NotNil(t, got.Response, "completed")
	assert.Empty(t, got.Token, "a completed record has no owner")
	assert.Equal(t, "fp", got.Fingerprint)
	assert.True(t, want.CreatedAt.Equal(got.CreatedAt))
	assert.Equal(t, http.StatusCreated, got.Response.StatusCode)
	assert.Equal(t, want.Response.Header, got.Response.Header)
	assert.Equal(t, `{"id":"v_1"}`, string(got.Response.Body))
	assert.False(t, got.Response.BodyOmitted)

	again := acquire(t, h.Store, k, claim("fp"))
	assert.Equal(t, `{"id":"v_1"}`, string(again.Response.Body), "every lookup returns the record")
}

func testCompleteTTL(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 200, "ok"), ttl))

	h.Advance(lease * 2)
	require.NotNil(t, acquire(t, h.Store, k, claim("fp")), "the record outlives the lease")
	h.Advance(ttl)
	require.Nil(t, acquire(t, h.Store, k, claim("fp")), "the record is gone after its TTL")
}

func testRelease(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	require.NoError(t, h.Store.Release(ctx, k, c.Token))
	require.Nil(t, acquire(t, h.Store, k, claim("other")), "a released key can be claimed, even for another request")
	assert.ErrorIs(t, h.Store.Release(ctx, k, c.Token), idempotency.ErrLeaseLost, "a second release by the old owner")
}

// testReleaseRefusesOnlyWhenHeld: Release returns ErrLeaseLost, changing
// nothing, only when someone else holds the key. When nothing does, it
// succeeds and changes nothing: repeated by the same token (a client
// library re-sends a call whose reply it lost, and the repeat finds the
// key that the first one freed), on a key nobody ever claimed, or on the
// token's own claim whose lease lapsed with nobody taking it over.
func testReleaseRefusesOnlyWhenHeld(t *testing.T, h Harness) {
	ctx := context.Background()

	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	require.NoError(t, h.Store.Release(ctx, k, c.Token))
	require.NoError(t, h.Store.Release(ctx, k, c.Token), "the same release repeated")
	require.Nil(t, acquire(t, h.Store, k, claim("other")), "the key is free")

	never := key(t)
	require.NoError(t, h.Store.Release(ctx, never, c.Token), "a key nobody claimed")
	require.Nil(t, acquire(t, h.Store, never, claim("fp")), "and nothing was created under it")

	lapsed := key(t)
	own := claim("fp")
	f1 := acquireFenceToLapse(t, h.Store, lapsed, own)
	h.Advance(lease + 50*time.Millisecond)
	require.NoError(t, h.Store.Release(ctx, lapsed, own.Token), "the token's own lapsed claim, nobody took it over")
	assert.ErrorIs(t, h.Store.Extend(ctx, lapsed, own.Token, lease), idempotency.ErrLeaseLost, "and it stays lapsed")

	// Another owner claims it: now the stale token's release is refused
	// and changes nothing.
	fresh := claim("fp")
	f2 := acquireFence(t, h.Store, lapsed, fresh)
	assert.Greater(t, f2, f1)
	assert.ErrorIs(t, h.Store.Release(ctx, lapsed, own.Token), idempotency.ErrLeaseLost, "another owner holds the key")
	existing := acquire(t, h.Store, lapsed, claim("fp"))
	require.NotNil(t, existing)
	assert.Equal(t, fresh.Token, existing.Token, "the new owner's claim survived")
	require.NoError(t, h.Store.Extend(ctx, lapsed, fresh.Token, held))
	require.NoError(t, h.Store.Release(ctx, lapsed, fresh.Token))
	require.NoError(t, h.Store.Release(ctx, lapsed, own.Token), "free again: nothing holds it")
	assert.Greater(t, acquireFence(t, h.Store, lapsed, claim("fp")), f2, "fences still grow")
}

func testLeaseExpiry(t *testing.T, h Harness) {
	k := key(t)
	require.Nil(t, acquireToLapse(t, h.Store, k, claim("fp")))
	h.Advance(lease + 50*time.Millisecond)
	require.Nil(t, acquire(t, h.Store, k, claim("fp")), "an expired lease frees the key")
}

func testExtend(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	// A lease long enough that a renewal sent a quarter of it apart lands
	// in time on a loaded machine, renewed past its first end.
	const long = time.Second
	fence, existing, err := h.Store.Acquire(ctx, k, c, long)
	require.NoError(t, err)
	require.Nil(t, existing)
	require.NotZero(t, fence)
	for range 5 {
		h.Advance(long / 4)
		require.NoError(t, h.Store.Extend(ctx, k, c.Token, long))
	}
	existing = acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing, "extended past the original lease, the key is still held")
	assert.Equal(t, c.Token, existing.Token)
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 200, "ok"), ttl))
}

func testStaleOwner(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	stale := claim("fp")
	require.Nil(t, acquireToLapse(t, h.Store, k, stale))
	h.Advance(lease + 50*time.Millisecond)
	fresh := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, fresh), "the new owner takes the lapsed key")

	assert.ErrorIs(t, h.Store.Extend(ctx, k, stale.Token, lease), idempotency.ErrLeaseLost)
	assert.ErrorIs(t, h.Store.Complete(ctx, k, stale.Token, done("fp", 200, "stale"), ttl), idempotency.ErrLeaseLost)
	assert.ErrorIs(t, h.Store.Release(ctx, k, stale.Token), idempotency.ErrLeaseLost, "the key is another owner's")

	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing)
	assert.Equal(t, fresh.Token, existing.Token, "the new owner's claim survived the stale owner's writes")
	require.NoError(t, h.Store.Extend(ctx, k, fresh.Token, held), "the new owner still owns it")

	require.NoError(t, h.Store.Complete(ctx, k, fresh.Token, done("fp", 201, "fresh"), ttl))
	assert.ErrorIs(t, h.Store.Complete(ctx, k, stale.Token, done("fp", 200, "stale"), ttl), idempotency.ErrLeaseLost)
	got := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, got.Response)
	assert.Equal(t, "fresh", string(got.Response.Body))
}

func testWrongToken(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	for _, token := range []string{"", "not-the-token", c.Token[:len(c.Token)-1], c.Token + "x"} {
		assert.ErrorIs(t, h.Store.Extend(ctx, k, token, lease), idempotency.ErrLeaseLost, "extend with %q", token)
		assert.ErrorIs(t, h.Store.Complete(ctx, k, token, done("fp", 200, "x"), ttl), idempotency.ErrLeaseLost, "complete with %q", token)
		assert.ErrorIs(t, h.Store.Release(ctx, k, token), idempotency.ErrLeaseLost, "release with %q", token)
	}
	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing)
	assert.Equal(t, c.Token, existing.Token)

	// Nothing is created for a key nobody holds. Releasing it is done
	// already (see testReleaseRefusesOnlyWhenHeld).
	missing := key(t)
	assert.ErrorIs(t, h.Store.Complete(ctx, missing, c.Token, done("fp", 200, "x"), ttl), idempotency.ErrLeaseLost)
	assert.ErrorIs(t, h.Store.Extend(ctx, missing, c.Token, lease), idempotency.ErrLeaseLost)
	assert.NoError(t, h.Store.Release(ctx, missing, c.Token))
	require.Nil(t, acquire(t, h.Store, missing, claim("fp")))
}

func testCompletedNotOwned(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 200, "first"), ttl))

	assert.ErrorIs(t, h.Store.Complete(ctx, k, "other-token", done("fp", 200, "second"), ttl), idempotency.ErrLeaseLost)
	assert.ErrorIs(t, h.Store.Release(ctx, k, c.Token), idempotency.ErrLeaseLost, "a completed record cannot be released")
	assert.ErrorIs(t, h.Store.Extend(ctx, k, c.Token, lease), idempotency.ErrLeaseLost)
	got := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, got)
	assert.Equal(t, "first", string(got.Response.Body))
}

// testCompleteRepeated: a client library may re-send Complete after losing
// its reply; the repeat succeeds and changes nothing. A stale owner whose
// record is byte-identical to the new owner's still gets ErrLeaseLost.
func testCompleteRepeated(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	rec := done("fp", 201, "once")
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, rec, ttl))
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, rec, ttl), "the repeated call succeeds")
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 500, "other"), ttl), "and changes nothing")
	got := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, got)
	assert.Equal(t, "once", string(got.Response.Body))
	assert.Equal(t, 201, got.Response.StatusCode)

	k2 := key(t)
	stale := claim("fp")
	require.Nil(t, acquireToLapse(t, h.Store, k2, stale))
	h.Advance(lease + 50*time.Millisecond)
	fresh := claim("fp")
	require.Nil(t, acquire(t, h.Store, k2, fresh))
	same := done("fp", 200, "identical")
	require.NoError(t, h.Store.Complete(ctx, k2, fresh.Token, same, ttl))
	assert.ErrorIs(t, h.Store.Complete(ctx, k2, stale.Token, same, ttl), idempotency.ErrLeaseLost,
		"an identical record from a stale owner is still the stale owner's")
}

func testKeysIndependent(t *testing.T, h Harness) {
	ctx := context.Background()
	a, b := key(t), key(t)
	ca, cb := claim("a"), claim("b")
	require.Nil(t, acquire(t, h.Store, a, ca))
	require.Nil(t, acquire(t, h.Store, b, cb))
	require.NoError(t, h.Store.Complete(ctx, a, ca.Token, done("a", 200, "A"), ttl))
	require.NoError(t, h.Store.Release(ctx, b, cb.Token))
	got := acquire(t, h.Store, a, claim("a"))
	require.NotNil(t, got)
	assert.Equal(t, "A", string(got.Response.Body))
	assert.ErrorIs(t, h.Store.Complete(ctx, a, cb.Token, done("b", 200, "B"), ttl), idempotency.ErrLeaseLost, "b's token does not own a")
}

func testUnusualKeys(t *testing.T, h Harness) {
	ctx := context.Background()
	base := key(t)
	keys := []string{
		base + "{braces}", base + "}{", base + "{", base + " spaces and\ttabs",
		base + "\x00nul", base + "ünïcødé", base + strings.Repeat("k", 1000), base + "*?[glob]",
	}
	for i, k := range keys {
		c := claim("fp")
		require.Nil(t, acquire(t, h.Store, k, c), "key %d", i)
		require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 200, k), ttl), "key %d", i)
	}
	for i, k := range keys {
		got := acquire(t, h.Store, k, claim("fp"))
		require.NotNil(t, got, "key %d", i)
		assert.Equal(t, k, string(got.Response.Body), "key %d keeps its own record", i)
	}
}

func testBinaryResponse(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	body := make([]byte, 256*1024)
	for i := range body {
		body[i] = byte(i * 7)
	}
	rec := &idempotency.Record{
		Fingerprint: "fp",
		CreatedAt:   time.UnixMilli(time.Now().UnixMilli()),
		Response: &idempotency.Response{
			StatusCode: 299,
			Header:     http.Header{"Set-Cookie": {"a=1", "b=2"}, "X-Empty": {""}, "X-Binary": {"\x00\xff"}},
			Body:       body,
		},
	}
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, rec, ttl))
	got := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, got)
	assert.Equal(t, 299, got.Response.StatusCode)
	assert.Equal(t, rec.Response.Header, got.Response.Header)
	assert.Equal(t, body, got.Response.Body)

	k2 := key(t)
	c2 := claim("fp")
	require.Nil(t, acquire(t, h.Store, k2, c2))
	omitted := &idempotency.Record{Fingerprint: "fp", Response: &idempotency.Response{StatusCode: 200, BodyOmitted: true}}
	require.NoError(t, h.Store.Complete(ctx, k2, c2.Token, omitted, ttl))
	got = acquire(t, h.Store, k2, claim("fp"))
	require.NotNil(t, got)
	assert.True(t, got.Response.BodyOmitted)
	assert.Empty(t, got.Response.Body)
}

func testInvalidArguments(t *testing.T, h Harness) {
	ctx := context.Background()
	k := key(t)
	_, _, err := h.Store.Acquire(ctx, k, idempotency.Record{Fingerprint: "fp"}, lease)
	assert.Error(t, err, "a claim without a token")
	_, _, err = h.Store.Acquire(ctx, k, claim("fp"), 0)
	assert.Error(t, err, "a zero lease")
	_, _, err = h.Store.Acquire(ctx, k, *done("fp", 200, "x"), lease)
	assert.Error(t, err, "a completed record as a claim")
	require.Nil(t, acquire(t, h.Store, k, claim("fp")), "invalid calls stored nothing")

	k2 := key(t)
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k2, c))
	assert.Error(t, h.Store.Complete(ctx, k2, c.Token, &idempotency.Record{Fingerprint: "fp"}, ttl), "completing without a response")
	assert.Error(t, h.Store.Complete(ctx, k2, c.Token, done("fp", 200, "x"), 0), "a zero TTL")
	existing := acquire(t, h.Store, k2, claim("fp"))
	require.NotNil(t, existing)
	assert.Nil(t, existing.Response, "invalid completions changed nothing")
}

func testCancelledContext(t *testing.T, h Harness) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	k := key(t)
	_, _, err := h.Store.Acquire(ctx, k, claim("fp"), lease)
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.Canceled), "got %v", err)
	require.Nil(t, acquire(t, h.Store, k, claim("fp")), "a cancelled acquire claimed nothing")
}

func testConcurrentAcquire(t *testing.T, h Harness) {
	const n = 50
	k := key(t)
	var winners atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, existing, err := h.Store.Acquire(context.Background(), k, claim("fp"), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			if existing == nil {
				winners.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, int32(1), winners.Load(), "exactly one of %d concurrent claims wins", n)
}

// testFailureHistory runs for stores that implement FailureRecorder.
func testFailureHistory(t *testing.T, h Harness) {
	fr, ok := h.Store.(idempotency.FailureRecorder)
	if !ok {
		t.Skipf("%T keeps no failure history", h.Store)
	}
	ctx := context.Background()
	k := key(t)
	attempts, reason, err := fr.Failures(ctx, k)
	require.NoError(t, err)
	assert.Equal(t, 0, attempts)
	assert.Empty(t, reason)

	for i := 1; i <= 3; i++ {
		c := claim("fp")
		require.Nil(t, acquire(t, h.Store, k, c), "attempt %d: a failed key is free again", i)
		n, err := fr.Fail(ctx, k, c.Token, "boom "+string(rune('0'+i)), ttl)
		require.NoError(t, err)
		assert.Equal(t, i, n)
		// A client library re-sends a call whose reply it lost.
		n, err = fr.Fail(ctx, k, c.Token, "repeated", ttl)
		require.NoError(t, err, "attempt %d: the same Fail repeated", i)
		assert.Equal(t, i, n, "attempt %d: a repeated Fail returns the count again and counts nothing", i)
	}
	attempts, reason, err = fr.Failures(ctx, k)
	require.NoError(t, err)
	assert.Equal(t, 3, attempts)
	assert.Equal(t, "boom 3", reason)

	// Only the owner can fail a claim, and a stale owner counts nothing.
	c := claim("fp")
	require.Nil(t, acquire(t, h.Store, k, c))
	_, err = fr.Fail(ctx, k, "not-the-token", "stale", ttl)
	assert.ErrorIs(t, err, idempotency.ErrLeaseLost)
	attempts, _, err = fr.Failures(ctx, k)
	require.NoError(t, err)
	assert.Equal(t, 3, attempts)
	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing, "a refused Fail left the claim in place")
	assert.Equal(t, c.Token, existing.Token)

	// Success does not erase the history; time does.
	require.NoError(t, h.Store.Complete(ctx, k, c.Token, done("fp", 200, "ok"), ttl))
	attempts, _, err = fr.Failures(ctx, k)
	require.NoError(t, err)
	assert.Equal(t, 3, attempts)
	h.Advance(ttl + 50*time.Millisecond)
	attempts, reason, err = fr.Failures(ctx, k)
	require.NoError(t, err)
	assert.Equal(t, 0, attempts, "the history expires")
	assert.Empty(t, reason)

	// Histories are per key.
	other := key(t)
	c = claim("fp")
	require.Nil(t, acquire(t, h.Store, other, c))
	n, err := fr.Fail(ctx, other, c.Token, "x", ttl)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
}

// testAcquireLeaseLeft: an in-flight record that Acquire returns tells the
// rest of its lease, or 0 when the store does not know; never more than
// the lease. A completed record carries none.
func testAcquireLeaseLeft(t *testing.T, h Harness) {
	k := key(t)
	c := claim("fp")
	acquire(t, h.Store, k, c)
	existing := acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing)
	assert.GreaterOrEqual(t, existing.LeaseLeft, time.Duration(0))
	assert.LessOrEqual(t, existing.LeaseLeft, held)
	require.NoError(t, h.Store.Complete(context.Background(), k, c.Token, done("fp", http.StatusCreated, "ok"), ttl))
	existing = acquire(t, h.Store, k, claim("fp"))
	require.NotNil(t, existing)
	require.NotNil(t, existing.Response)
	assert.Zero(t, existing.LeaseLeft)
}
