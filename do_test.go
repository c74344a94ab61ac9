package idempotency_test

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// Do runs work once per key for transports that are not net/http, on the
// same engine: these tests hold it to what the middleware promises.

func rpc(key, fingerprint string) idempotency.Claim {
	return idempotency.Claim{Kind: "rpc", Scope: "tenant", Key: key, Fingerprint: fingerprint, Route: "/venues.v1.Venues/Create"}
}

func TestDoRunsOncePerKey(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			store, _ := kind.new(t)
			obs := &observed{}
			mw := newMiddleware(t, store, idempotency.Options{Observer: obs.observe})
			var calls atomic.Int32
			work := func(ctx context.Context) (*idempotency.Response, error) {
				claim, ok := idempotency.ClaimFromContext(ctx)
				require.True(t, ok)
				assert.NotZero(t, claim.Fence)
				assert.Equal(t, "/venues.v1.Venues/Create", claim.Route)
				n := calls.Add(1)
				return &idempotency.Response{StatusCode: http.StatusOK, Body: []byte{byte('0' + n)}}, nil
			}
			ctx := context.Background()
			resp, replayed, err := mw.Do(ctx, rpc("k", "fp"), work)
			require.NoError(t, err)
			assert.False(t, replayed)
			assert.Equal(t, "1", string(resp.Body))

			resp, replayed, err = mw.Do(ctx, rpc("k", "fp"), work)
			require.NoError(t, err)
			assert.True(t, replayed)
			assert.Equal(t, "1", string(resp.Body))

			_, _, err = mw.Do(ctx, rpc("k", "other"), work)
			assert.ErrorIs(t, err, idempotency.ErrFingerprintMismatch)
			_, _, err = mw.Do(ctx, rpc("bad key", "fp"), work)
			assert.ErrorIs(t, err, idempotency.ErrKeyInvalid)

			other := rpc("k", "fp")
			other.Scope = "another tenant"
			resp, replayed, err = mw.Do(ctx, other, work)
			require.NoError(t, err)
			assert.False(t, replayed, "scopes keep records apart")
			assert.Equal(t, "2", string(resp.Body))
			assert.Equal(t, int32(2), calls.Load())
			assert.Equal(t, "rpc", obs.last().Kind)
			assert.Equal(t, "/venues.v1.Venues/Create", obs.last().Route)
		})
	}
}

func TestDoInFlightAndFailures(t *testing.T) {
	mw := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	ctx := context.Background()
	entered, finish := make(chan struct{}), make(chan struct{})
	done := make(chan error)
	go func() {
		_, _, err := mw.Do(ctx, rpc("k", "fp"), func(context.Context) (*idempotency.Response, error) {
			close(entered)
			<-finish
			return &idempotency.Response{StatusCode: http.StatusOK}, nil
		})
		done <- err
	}()
	<-entered
	_, _, err := mw.Do(ctx, rpc("k", "fp"), func(context.Context) (*idempotency.Response, error) {
		t.Error("a duplicate ran")
		return nil, nil
	})
	assert.ErrorIs(t, err, idempotency.ErrKeyInUse)
	assert.Equal(t, http.StatusConflict, idempotency.StatusCode(err))
	close(finish)
	require.NoError(t, <-done)

	// An error frees the key; so does a retryable status, which is still
	// handed back.
	boom := errors.New("downstream unavailable")
	_, _, err = mw.Do(ctx, rpc("e", "fp"), func(context.Context) (*idempotency.Response, error) { return nil, boom })
	assert.ErrorIs(t, err, boom)
	resp, replayed, err := mw.Do(ctx, rpc("e", "fp"), func(context.Context) (*idempotency.Response, error) {
		return &idempotency.Response{StatusCode: http.StatusServiceUnavailable}, nil
	})
	require.NoError(t, err)
	assert.False(t, replayed)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	resp, replayed, err = mw.Do(ctx, rpc("e", "fp"), func(context.Context) (*idempotency.Response, error) {
		return &idempotency.Response{StatusCode: http.StatusCreated}, nil
	})
	require.NoError(t, err)
	assert.False(t, replayed, "the 503 was not stored")
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
}

// TestDoNeverReportsAnUnstoredSuccess: when storing fails, the caller gets
// an error beside the response, so it must not send it as a success.
func TestDoNeverReportsAnUnstoredSuccess(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	store := &completeHook{Store: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), before: func() error {
		if fail.Swap(false) {
			return errors.New("connection reset")
		}
		return nil
	}}
	mw := newMiddleware(t, store)
	ctx := context.Background()
	var calls atomic.Int32
	work := func(context.Context) (*idempotency.Response, error) {
		calls.Add(1)
		return &idempotency.Response{StatusCode: http.StatusOK}, nil
	}
	_, _, err := mw.Do(ctx, rpc("k", "fp"), work)
	assert.ErrorIs(t, err, idempotency.ErrStoreUnavailable)
	_, replayed, err := mw.Do(ctx, rpc("k", "fp"), work)
	require.NoError(t, err, "the key was freed for the retry")
	assert.False(t, replayed)
	assert.Equal(t, int32(2), calls.Load())

	_, _, err = mw.Do(ctx, idempotency.Claim{Key: "k"}, work)
	assert.Error(t, err, "a kind of its own is required")
}
