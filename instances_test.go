package idempotency_test

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// TestManyInstancesOneRedis runs several middleware instances, each with
// its own go-redis client (its own connection pool, as separate pods
// would have), against one Redis, and fires the same keys at all of them
// at once: every key must run exactly once across all instances, every
// other answer must be 409 or a replay of that one execution, and
// afterwards every instance replays every key. Twenty rounds, on a single
// Redis and on the Cluster.
func TestManyInstancesOneRedis(t *testing.T) {
	targets := []struct {
		name      string
		newClient func(t *testing.T) idempotency.RedisClient
	}{
		{"redis", func(t *testing.T) idempotency.RedisClient { return redistest.Client(t) }},
		{"cluster", func(t *testing.T) idempotency.RedisClient { return redistest.Cluster(t) }},
	}
	for _, target := range targets {
		t.Run(target.name, func(t *testing.T) {
			const instances, keys, perKey, rounds = 4, 16, 6, 20
			prefix := redistest.Prefix(t)
			var mu sync.Mutex
			executions := make(map[string]int)
			handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				key := r.Header.Get("Idempotency-Key")
				mu.Lock()
				executions[key]++
				mu.Unlock()
				time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
				w.WriteHeader(http.StatusCreated)
				io.WriteString(w, "created "+key)
			})
			hs := make([]http.Handler, instances)
			for i := range hs {
				store, err := idempotency.NewRedisStore(target.newClient(t), idempotency.RedisOptions{Prefix: prefix})
				require.NoError(t, err)
				hs[i] = newMiddleware(t, store, idempotency.Options{StoreTimeout: patientStoreTimeout}).Handler(handler)
			}

			var created, replayed, conflicts atomic.Int32
			for round := range rounds {
				start := make(chan struct{})
				var wg sync.WaitGroup
				for k := range keys {
					key := fmt.Sprintf("r%d-k%d", round, k)
					for j := range perKey {
						wg.Add(1)
						go func() {
							defer wg.Done()
							<-start
							w := serve(hs[(k+j)%instances], post(key, `{"name":"Hall"}`))
							switch {
							case w.Code == http.StatusConflict:
								conflicts.Add(1)
							case w.Code == http.StatusCreated && w.Header().Get("X-Idempotent-Replayed") == "true":
								assert.Equal(t, "created "+key, w.Body.String())
								replayed.Add(1)
							case w.Code == http.StatusCreated:
								created.Add(1)
							default:
								t.Errorf("key %s: unexpected answer %d: %s", key, w.Code, w.Body)
							}
						}()
					}
				}
				close(start)
				wg.Wait()
				for k := range keys {
					key := fmt.Sprintf("r%d-k%d", round, k)
					for i, h := range hs {
						w := serve(h, post(key, `{"name":"Hall"}`))
						require.Equal(t, "true", w.Header().Get("X-Idempotent-Replayed"), "instance %d key %s: %d %s", i, key, w.Code, w.Body)
					}
				}
			}
			mu.Lock()
			defer mu.Unlock()
			require.Len(t, executions, rounds*keys)
			for key, n := range executions {
				assert.Equal(t, 1, n, "key %s ran %d times", key, n)
			}
			assert.Equal(t, int32(rounds*keys), created.Load())
			assert.Equal(t, int32(rounds*keys*(perKey-1)), replayed.Load()+conflicts.Load())
			t.Logf("%d instances, %d keys x %d requests x %d rounds: %d executions, %d replays, %d conflicts",
				instances, keys, perKey, rounds, created.Load(), replayed.Load(), conflicts.Load())
		})
	}
}
