package idempotency_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// The conformance suite and the middleware table run against Redis Cluster
// through storeKinds ("cluster"); the tests here cover what only a cluster
// can get wrong.

// TestClusterKeysNeverCrossSlot: client keys and scopes full of braces,
// unicode and length cannot make a command span two slots. Each request
// runs and replays, and every key the store wrote hashes to the slot of
// its hash tag alone.
func TestClusterKeysNeverCrossSlot(t *testing.T) {
	client := redistest.Cluster(t)
	prefix := redistest.Prefix(t)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
	require.NoError(t, err)
	tenant := func(r *http.Request) string { return r.Header.Get("X-Tenant") }
	handler := createVenue()
	h := newMiddleware(t, store, idempotency.Options{Scope: tenant}).Handler(handler)

	keys := []string{"{a}", "}{", "{{}}", "{", "}", "a{b}c{d}", "{}", strings.Repeat("{x}", 85), `"{quoted}"`}
	scopes := []string{"", "{tenant}", "ünïcødé {☃}", strings.Repeat("{", 1000), "\x00{\xff}"}
	executed := 0
	for _, scope := range scopes {
		for _, key := range keys {
			req := func() *http.Request {
				r := post(key, `{}`)
				r.Header.Set("X-Tenant", scope)
				return r
			}
			first := serve(h, req())
			require.Equal(t, http.StatusCreated, first.Code, "key %q scope %q: %s", key, scope, first.Body)
			executed++
			retry := serve(h, req())
			require.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"), "key %q scope %q", key, scope)
		}
	}
	assert.Equal(t, int32(executed), handler.calls.Load())

	ctx := context.Background()
	var mu sync.Mutex // ForEachMaster calls its function concurrently
	var stored []string
	require.NoError(t, client.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		found, err := node.Keys(ctx, prefix+"*").Result()
		mu.Lock()
		stored = append(stored, found...)
		mu.Unlock()
		return err
	}))
	records := 0
	for _, k := range stored {
		if !strings.HasSuffix(k, "}fence") {
			records++
		}
	}
	require.Equal(t, executed, records, "one record per key and scope, beside the fence counters")
	for _, k := range stored {
		tag := k[strings.IndexByte(k, '{')+1 : strings.IndexByte(k, '}')]
		assert.Equal(t, client.ClusterKeySlot(ctx, tag).Val(), client.ClusterKeySlot(ctx, k).Val(), k)
		assert.Equal(t, 1, strings.Count(k, "{"), k)
	}
}

// TestClusterRecoversFromScriptFlush: SCRIPT FLUSH on every node empties
// the per-node script caches; the next owner-checked write meets NOSCRIPT
// and loads the script again.
func TestClusterRecoversFromScriptFlush(t *testing.T) {
	client := redistest.Cluster(t)
	handler := createVenue()
	h := newMiddleware(t, newRedisStore(t, client)).Handler(handler)
	ctx := context.Background()
	// Keys on every shard, so each node has loaded the scripts.
	for _, k := range []string{"a", "b", "c", "d", "e", "f"} {
		require.Equal(t, http.StatusCreated, serve(h, post(k, `{}`)).Code)
	}
	require.NoError(t, client.ForEachShard(ctx, func(ctx context.Context, node *redis.Client) error {
		return node.ScriptFlush(ctx).Err()
	}))
	for _, k := range []string{"g", "h", "i", "j", "k", "l"} {
		require.Equal(t, http.StatusCreated, serve(h, post(k, `{}`)).Code, "key %s after SCRIPT FLUSH", k)
		assert.Equal(t, "true", serve(h, post(k, `{}`)).Header().Get("X-Idempotent-Replayed"), "key %s", k)
	}
	assert.Equal(t, int32(12), handler.calls.Load())
}

// TestClusterRedisWait: WithRedisWait on a ClusterClient pipelines WAIT to
// the master of each key's slot; with one replica per master, requests
// across all slots run and replay.
func TestClusterRedisWait(t *testing.T) {
	client := redistest.Cluster(t)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: redistest.Prefix(t), WaitReplicas: 1, WaitTimeout: time.Second})
	require.NoError(t, err)
	handler := createVenue()
	obs := &observed{}
	h := newMiddleware(t, store, idempotency.Options{Observer: obs.observe}).Handler(handler)
	for i := range 30 {
		k := fmt.Sprintf("k%d", i)
		require.Equal(t, http.StatusCreated, serve(h, post(k, `{}`)).Code, k)
		require.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome, "%s: %v", k, obs.last().Err)
		assert.Equal(t, "true", serve(h, post(k, `{}`)).Header().Get("X-Idempotent-Replayed"), k)
	}
	assert.Equal(t, int32(30), handler.calls.Load())
}
