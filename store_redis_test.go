package idempotency_test

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
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

func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (c *commandCounter) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.commands
	c.commands = nil
	return out
}

// TestRedisRoundTrips pins the round-trip floor: a first request costs two
// commands (claim, then store-if-owner), a replay, a 409 or a 422 one.
func TestRedisRoundTrips(t *testing.T) {
	_, client := redistest.Miniredis(t)
	counter := &commandCounter{}
	client.AddHook(counter)
	h := newMiddleware(t, newRedisStore(t, client)).Handler(createVenue())

	serve(h, post("warm-up", `{}`)) // loads the script into the server's cache
	counter.take()

	serve(h, post("k", `{}`))
	assert.Equal(t, []string{"set", "evalsha"}, counter.take(), "first request")
	serve(h, post("k", `{}`))
	assert.Equal(t, []string{"set"}, counter.take(), "replay")
	serve(h, post("k", `{"other":1}`))
	assert.Equal(t, []string{"set"}, counter.take(), "422")
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
	_, err := idempotency.NewRedisStore(nil)
	assert.Error(t, err)
	_, client := redistest.Miniredis(t)
	_, err = idempotency.NewRedisStore(client, idempotency.WithRedisPrefix("app:{tag}:"))
	assert.Error(t, err, "braces in the prefix would move keys between cluster slots")
}

// TestRedisStoreCorruptRecord: a value under our key that is not a record
// is a store failure (503), never a panic or a replay of garbage.
func TestRedisStoreCorruptRecord(t *testing.T) {
	mr, client := redistest.Miniredis(t)
	store := newRedisStore(t, client)
	h := newMiddleware(t, store).Handler(createVenue())
	require.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
	keys := mr.Keys()
	require.Len(t, keys, 1)
	require.NoError(t, mr.Set(keys[0], "\x01Cgarbage"))
	requireProblem(t, serve(h, post("k", `{}`)), http.StatusServiceUnavailable)
}

// TestRedisKeysOnTheWire: client keys never appear in Redis key names.
func TestRedisKeysOnTheWire(t *testing.T) {
	mr, client := redistest.Miniredis(t)
	store, err := idempotency.NewRedisStore(client)
	require.NoError(t, err)
	h := newMiddleware(t, store).Handler(createVenue())
	serve(h, post(`"{user-key}"`, `{}`))
	keys := mr.Keys()
	require.Len(t, keys, 1)
	assert.True(t, strings.HasPrefix(keys[0], "idem:{"), keys[0])
	assert.NotContains(t, keys[0], "user-key")
}
