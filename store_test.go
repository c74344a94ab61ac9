package idempotency_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/storetest"
)

func TestStoreConformance(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			storetest.Run(t, func(t *testing.T) storetest.Harness {
				store, advance := kind.new(t)
				return storetest.Harness{Store: store, Advance: advance}
			})
			storetest.RunMiddleware(t, func(t *testing.T) idempotency.Store {
				store, _ := kind.new(t)
				return store
			})
		})
	}
}

func TestMemoryStorePurgesExpiredRecords(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	for i := range 1000 {
		claim := idempotency.Record{Token: "t", Fingerprint: "fp"}
		_, _, err := store.Acquire(ctx, string(rune('a'+i%26))+time.Duration(i).String(), claim, time.Second)
		require.NoError(t, err)
	}
	require.Equal(t, 1000, store.Len())

	clock.Advance(2 * time.Minute)
	_, _, err := store.Acquire(ctx, "new", idempotency.Record{Token: "t"}, time.Second)
	require.NoError(t, err)
	store.WaitPurge() // the claim purged its shard and started a pass over the others
	assert.Equal(t, 1, store.Len(), "expired records are purged, in every shard; only the new claim is left")
	assert.Equal(t, claimBytes("new", idempotency.Record{Token: "t"}), store.Bytes())
}
