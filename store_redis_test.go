package idempotency_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/faultproxy"
	"github.com/seed70ea8305/idempotency/internal/redistest"
	"github.com/seed70ea8305/idempotency/storetest"
)

// commandCounter is a go-redis hook that records every command sent.
type commandCounter struct {
	mu       sync.Mutex
	commands []string
}

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.mu.Lock()
		c.commands = append(c.commands, cmd.Name())
		c.mu.Unlock()
		return next(ctx, cmd)
	}
}

// ProcessPipelineHook records a pipeline, one round trip, as its commands
// joined with "+".
func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		names := make([]string, len(cmds))
		for i, cmd := range cmds {
			names[i] = cmd.Name()
		}
		c.mu.Lock()
		c.commands = append(c.commands, strings.Join(names, "+"))
		c.mu.Unlock()
		return next(ctx, cmds)
	}
}

func (c *commandCounter) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.commands
	c.commands = nil
	return out
}

// TestRedisRoundTrips pins the round-trip floor: a first request costs two
// commands (the claim script, then store-if-owner), a replay, a 409 or a
// 422 one.
func TestRedisRoundTrips(t *testing.T) {
	_, client := redistest.Miniredis(t)
	counter := &commandCounter{}
	client.AddHook(counter)
	h := newMiddleware(t, newRedisStore(t, client)).Handler(createVenue())

	serve(h, post("warm-up", `{}`)) // loads the script into the server's cache
	counter.take()

	serve(h, post("k", `{}`))
	assert.Equal(t, []string{"evalsha", "evalsha"}, counter.take(), "first request")
	serve(h, post("k", `{}`))
	assert.Equal(t, []string{"evalsha"}, counter.take(), "replay")
	serve(h, post("k", `{"other":1}`))
	assert.Equal(t, []string{"evalsha"}, counter.take(), "422")
}

func TestRedisStoreRecoversFromScriptFlush(t *testing.T) {
	_, client := redistest.Miniredis(t)
	h := newMiddleware(t, newRedisStore(t, client)).Handler(createVenue())
	require.Equal(t, http.StatusCreated, serve(h, post("a", `{}`)).Code)
	require.NoError(t, client.ScriptFlush(context.Background()).Err())
	require.Equal(t, http.StatusCreated, serve(h, post("b", `{}`)).Code)
	assert.Equal(t, "true", serve(h, post("b", `{}`)).Header().Get("X-Idempotent-Replayed"), "NOSCRIPT is handled by loading the script again")
}

func TestNewRedisStoreValidates(t *testing.T) {
	_, err := idempotency.NewRedisStore(nil, idempotency.RedisOptions{})
	assert.Error(t, err)
	_, client := redistest.Miniredis(t)
	_, err = idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: "app:{tag}:"})
	assert.Error(t, err, "braces in the prefix would move keys between cluster slots")
	_, err = idempotency.NewRedisStore(client, idempotency.RedisOptions{WaitReplicas: -1, WaitTimeout: time.Second})
	assert.Error(t, err, "a negative count of replicas")
	_, err = idempotency.NewRedisStore(client, idempotency.RedisOptions{WaitReplicas: 1, WaitTimeout: 0})
	assert.Error(t, err, "WAIT 0 blocks forever")
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	_, err = idempotency.NewRedisStore(ring, idempotency.RedisOptions{WaitReplicas: 1, WaitTimeout: time.Second})
	assert.Error(t, err, "a Ring cannot pipeline WAIT with the write it waits for")
	_, err = idempotency.NewRedisStore(ring, idempotency.RedisOptions{})
	assert.NoError(t, err)
}

// startReplicated starts a primary and a replica of the test's own; the
// replication link runs through the returned proxy, so tests can cut it.
func startReplicated(t *testing.T) (primary, replica string, link *faultproxy.Proxy) {
	t.Helper()
	primary, _ = redistest.StartServer(t, "--repl-diskless-sync-delay", "0")
	link = startProxy(t, primary)
	host, port, err := net.SplitHostPort(link.Addr())
	require.NoError(t, err)
	replica, _ = redistest.StartServer(t, "--replicaof", host, port)
	// Ready when a write on the primary is acknowledged by the replica.
	client := faultClient(t, primary, time.Second)
	require.Eventually(t, func() bool {
		pipe := client.Pipeline()
		pipe.Set(context.Background(), "replication-probe", "1", time.Minute)
		wait := pipe.Do(context.Background(), "wait", 1, 200)
		pipe.Exec(context.Background())
		n, _ := wait.Int64()
		return n == 1
	}, 10*time.Second, 20*time.Millisecond, "the replica never acknowledged a write")
	return primary, replica, link
}

// TestRedisWaitRoundTrips: WithRedisWait pipelines WAIT with the claim and
// with the store-if-owner script: still two round trips for a first
// request and one for a replay.
func TestRedisWaitRoundTrips(t *testing.T) {
	primary, _, _ := startReplicated(t)
	client := faultClient(t, primary, faultReadTimeout) // longer than WAIT's timeout
	counter := &commandCounter{}
	client.AddHook(counter)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: redistest.Prefix(t), WaitReplicas: 1, WaitTimeout: time.Second})
	require.NoError(t, err)
	handler := createVenue()
	h := newMiddleware(t, store).Handler(handler)

	serve(h, post("warm-up", `{}`)) // loads the script into the server's cache
	counter.take()
	require.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
	assert.Equal(t, []string{"evalsha+wait", "evalsha+wait"}, counter.take(), "first request")
	assert.Equal(t, "true", serve(h, post("k", `{}`)).Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, []string{"evalsha+wait"}, counter.take(), "replay")

	require.NoError(t, client.ScriptFlush(context.Background()).Err())
	counter.take()
	require.Equal(t, http.StatusCreated, serve(h, post("after-flush", `{}`)).Code)
	assert.Equal(t, []string{"evalsha+wait", "eval+wait", "evalsha+wait", "eval+wait"}, counter.take(), "NOSCRIPT falls back to EVAL")
	assert.Equal(t, int32(3), handler.calls.Load())
}

// TestRedisStoreUnreadableRecord: a value under the key that is not a
// record this code can read gets a finite, documented answer: 500 naming
// the record as unreadable, no Retry-After (retrying cannot help), the
// handler not run, the key's hash in the log, the outcome counted; and an
// operator removes it with Middleware.Remove, after which the request
// runs afresh. Before issue 19 it answered 503 with Retry-After: 1 for as
// long as the record lived, so clients retried forever; and a stored 101
// was replayed as 101.
func TestRedisStoreUnreadableRecord(t *testing.T) {
	completed := func(status uint64) string {
		b := []byte{0x01, 'C'}
		for _, s := range []string{"tok", "fp"} {
			b = binary.AppendUvarint(b, uint64(len(s)))
			b = append(b, s...)
		}
		b = binary.AppendVarint(b, 0)       // createdAt
		b = binary.AppendUvarint(b, status) // status
		return string(append(b, 0, 0, 0))   // flags, no headers, empty body
	}
	for name, value := range map[string]string{
		"garbage":     "\x01Cgarbage",
		"version 9":   "\x09F\x03tok",
		"status 101":  completed(101),
		"status 0":    completed(0),
		"status 1000": completed(1000),
	} {
		t.Run(name, func(t *testing.T) {
			const key = "secret-key-7"
			mr, client := redistest.Miniredis(t)
			store := newRedisStore(t, client)
			obs := &observed{}
			var logs bytes.Buffer
			handler := createVenue()
			m := newMiddleware(t, store, idempotency.Options{Observer: obs.observe, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			h := m.Handler(handler)
			require.Equal(t, http.StatusCreated, serve(h, post(key, `{}`)).Code)
			keys := recordKeys(mr)
			require.Len(t, keys, 1)
			require.NoError(t, mr.Set(keys[0], value))

			for range 2 {
				w := serve(h, post(key, `{}`))
				p := requireProblem(t, w, http.StatusInternalServerError)
				assert.Contains(t, p.Type, "#ErrRecordUnreadable")
				assert.Empty(t, w.Header().Get("Retry-After"), "retrying cannot help")
			}
			assert.Equal(t, idempotency.OutcomeUnreadable, obs.last().Outcome)
			assert.ErrorIs(t, obs.last().Err, idempotency.ErrRecordUnreadable)
			assert.Contains(t, logs.String(), "key_hash=", "the log names the record by its key's hash")
			assert.NotContains(t, logs.String(), key, "and never by the key")
			assert.Equal(t, int32(1), handler.calls.Load(), "nothing ran")

			require.NoError(t, m.Remove(context.Background(), "", key))
			w := serve(h, post(key, `{}`))
			assert.Equal(t, http.StatusCreated, w.Code, "removed, the key runs afresh: %s", w.Body)
			assert.Equal(t, int32(2), handler.calls.Load())
		})
	}
}

// TestRedisKeysOnTheWire: client keys never appear in Redis key names.
func TestRedisKeysOnTheWire(t *testing.T) {
	mr, client := redistest.Miniredis(t)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{})
	require.NoError(t, err)
	h := newMiddleware(t, store).Handler(createVenue())
	serve(h, post(`"{user-key}"`, `{}`))
	keys := recordKeys(mr)
	require.Len(t, keys, 1)
	assert.True(t, strings.HasPrefix(keys[0], "idem:{"), keys[0])
	assert.NotContains(t, keys[0], "user-key")
}

// recordKeys lists the keys that hold records, leaving out the fence
// counters.
func recordKeys(mr *miniredis.Miniredis) []string {
	var keys []string
	for _, k := range mr.Keys() {
		if !strings.HasSuffix(k, "}fence") {
			keys = append(keys, k)
		}
	}
	return keys
}

// What the previous version of the store wrote (the record encoding of
// version 1, the fence counters, a recovery point), keys without their
// prefix: records written before an upgrade stay readable, and an
// upgraded process completes a claim that an old one made.
var redisRecordsOfV1 = []struct {
	key, value string
	hash       map[string]string
}{
	{"{6e00}e5505b7c1467b57659c906c50224", "\x01F\aTOKEN-C\x04fp-1\x80\xb0\x83Řh", nil},
	{"{6e00}fence", "1796306210648440", nil},
	{"{a4c3}ed04a95a3da14a9d235c83d868be", "\x01C\aTOKEN-A\x04fp-1\x80\xb0\x83Řh\xc9\x01\x00\x01\fContent-Type\x01\x10application/json\x10{\"id\":\"venue_1\"}", nil},
	{"{a4c3}fence", "1796306210646018", nil},
	{"{de2d}423ac0393a3265f41f3dbb2ef0b7:recovery", "", map[string]string{"data": "data-1", "fp": "\x04fp-1\x80\xb0\x83Řh", "point": "point-1"}},
	{"{de2d}423ac0393a3265f41f3dbb2ef0b7:released", "BHLAEMUORYBTZPIPFIRGR3WYQQ", nil},
	{"{de2d}fence", "1796306210646983", nil},
}

func TestRedisReadsRecordsOfThePreviousVersion(t *testing.T) {
	clients := map[string]func(t *testing.T) *redis.Client{
		"miniredis": func(t *testing.T) *redis.Client { _, c := redistest.Miniredis(t); return c },
		"redis":     func(t *testing.T) *redis.Client { return redistest.Client(t) },
	}
	for name, newClient := range clients {
		t.Run(name, func(t *testing.T) {
			client := newClient(t)
			ctx := context.Background()
			prefix := redistest.Prefix(t)
			for _, r := range redisRecordsOfV1 {
				if r.hash != nil {
					require.NoError(t, client.HSet(ctx, prefix+r.key, r.hash).Err())
					require.NoError(t, client.Expire(ctx, prefix+r.key, time.Hour).Err())
				} else {
					require.NoError(t, client.Set(ctx, prefix+r.key, r.value, time.Hour).Err())
				}
			}
			// A counter ahead of the clock: the next fence is one more.
			require.NoError(t, client.Set(ctx, prefix+"{de2d}fence", "9000000000000000", time.Hour).Err())
			store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
			require.NoError(t, err)
			at := time.UnixMilli(1_790_000_000_000)
			claim := func(token string) idempotency.Record {
				return idempotency.Record{Token: token, Fingerprint: "fp-1", CreatedAt: at}
			}

			want := &idempotency.Record{Fingerprint: "fp-1", CreatedAt: at, Response: &idempotency.Response{
				StatusCode: 201, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(`{"id":"venue_1"}`)}}
			got, err := store.Get(ctx, "done")
			require.NoError(t, err)
			assert.Equal(t, want, got)
			fence, got, err := store.Acquire(ctx, "done", claim("TOKEN-D"), time.Minute)
			require.NoError(t, err)
			assert.Zero(t, fence)
			assert.Equal(t, want, got)

			fence, got, err = store.Acquire(ctx, "inflight", claim("TOKEN-D"), time.Minute)
			require.NoError(t, err)
			assert.Zero(t, fence)
			require.NotNil(t, got)
			assert.Equal(t, "TOKEN-C", got.Token)
			assert.Positive(t, got.LeaseLeft)
			require.NoError(t, store.Complete(ctx, "inflight", "TOKEN-C", want, time.Hour), "the old claim's owner completes")
			got, err = store.Get(ctx, "inflight")
			require.NoError(t, err)
			assert.Equal(t, want, got)

			fence, got, err = store.Acquire(ctx, "suspended", claim("TOKEN-E"), time.Minute)
			require.NoError(t, err)
			assert.Equal(t, uint64(9000000000000001), fence)
			require.NotNil(t, got)
			assert.Equal(t, "point-1", got.RecoveryPoint)
			assert.Equal(t, []byte("data-1"), got.RecoveryData)
		})
	}
}

// scripterOnly is a RedisClient that is not one of go-redis' own: it has
// only the methods of the interface, so the store sends its scripts
// through EvalSha and Eval, and runs each call in a goroutine that it
// leaves at the deadline.
type scripterOnly struct{ idempotency.RedisClient }

// The store keeps its contract through a client of another kind.
func TestRedisStoreConformanceThroughAnotherClient(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		mr, client := redistest.Miniredis(t)
		store, err := idempotency.NewRedisStore(scripterOnly{client}, idempotency.RedisOptions{})
		require.NoError(t, err)
		return storetest.Harness{Store: store, Advance: mr.FastForward}
	})
}

// Through a Ring of two servers, every call of a key goes to the shard
// of its hash tag.
func TestRedisStoreConformanceThroughARing(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		a, b := miniredis.RunT(t), miniredis.RunT(t)
		ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": a.Addr(), "b": b.Addr()}})
		t.Cleanup(func() { ring.Close() })
		store, err := idempotency.NewRedisStore(ring, idempotency.RedisOptions{})
		require.NoError(t, err)
		return storetest.Harness{Store: store, Advance: func(d time.Duration) { a.FastForward(d); b.FastForward(d) }}
	})
}
