package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisClient is the part of the go-redis v9 API that [RedisStore] uses.
// *redis.Client (single node and Sentinel failover), *redis.ClusterClient,
// *redis.Ring and every redis.UniversalClient satisfy it.
type RedisClient interface {
	SetArgs(ctx context.Context, key string, value any, a redis.SetArgs) *redis.StatusCmd
	redis.Scripter
}

// RedisStore is a [Store] in Redis (7.0 or later), shared by every process
// that uses the same Redis and prefix.
//
// Each record is one string value under one key. Acquire is a single
// SET key value NX PX lease GET: one round trip that either claims the key
// or returns the record already there, and that stays correct when go-redis
// retries it after a read timeout (the retry sees our own value and counts
// as acquired). Extend, Complete and Release are Lua scripts that change
// the key only while the owner token still holds it. Keys carry a hash tag,
// so the store works on Redis Cluster.
//
// The guarantees need Redis to keep what it acknowledged: run it with
// maxmemory-policy noeviction (an evicting policy silently drops records;
// under noeviction a full Redis answers errors, which the middleware turns
// into 503). Replication is asynchronous, so a failover can lose the most
// recent claims and records.
//
// A RedisStore is safe for concurrent use; create it with [NewRedisStore].
type RedisStore struct {
	client RedisClient
	prefix string
}

// DefaultRedisPrefix starts every key the store writes.
const DefaultRedisPrefix = "idem:"

// RedisOption configures a [RedisStore].
type RedisOption func(*RedisStore) error

// WithRedisPrefix sets the prefix of every key the store writes, to keep
// several applications or environments apart in one Redis. It must not
// contain braces, which would change the key's hash slot on Redis Cluster.
// Default: [DefaultRedisPrefix], "idem:".
func WithRedisPrefix(prefix string) RedisOption {
	return func(s *RedisStore) error {
		if strings.ContainsAny(prefix, "{}") {
			return fmt.Errorf("idempotency: redis prefix %q contains a brace", prefix)
		}
		s.prefix = prefix
		return nil
	}
}

// NewRedisStore returns a RedisStore that talks to Redis through client.
func NewRedisStore(client RedisClient, opts ...RedisOption) (*RedisStore, error) {
	if client == nil {
		return nil, errors.New("idempotency: redis client is nil")
	}
	s := &RedisStore{client: client, prefix: DefaultRedisPrefix}
	for _, opt := range opts {
		if err := opt(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

var _ Store = (*RedisStore)(nil)

// redisKey maps a record key to a Redis key: the prefix, then a hash of the
// record key as the hash tag. Hashing keeps client input out of Redis key
// names and out of slot selection, and bounds the key's length.
func (s *RedisStore) redisKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return s.prefix + "{" + hex.EncodeToString(sum[:16]) + "}"
}

// Acquire implements [Store] in one round trip.
func (s *RedisStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (*Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return nil, err
	}
	value := encodeRecord(&claim)
	previous, err := s.client.SetArgs(ctx, s.redisKey(key), value, redis.SetArgs{Mode: "NX", TTL: lease, Get: true}).Result()
	switch {
	case errors.Is(err, redis.Nil):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	case previous == value:
		// go-redis retried the command after our first attempt had already
		// stored the claim: it is ours.
		return nil, nil
	}
	rec, err := decodeRecord([]byte(previous))
	if err != nil {
		return nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	}
	return rec, nil
}

// The scripts compare the stored value's owner prefix (see ownerPrefix)
// with the caller's, so they act only for the token that holds the key.
var (
	redisExtend = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0`)

	// Complete also succeeds when the key already holds exactly the record
	// being stored: go-redis re-sent the script after its first run's
	// reply was lost.
	redisComplete = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if v == ARGV[2] then
  return 1
end
return 0`)

	redisRelease = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0`)
)

// Extend implements [Store].
func (s *RedisStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.runOwned(ctx, "extend", redisExtend, key, token, milliseconds(lease))
}

// Complete implements [Store].
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec Record, ttl time.Duration) error {
	if err := validateCompletion(&rec, ttl); err != nil {
		return err
	}
	rec.Token = ""
	return s.runOwned(ctx, "complete", redisComplete, key, token, encodeRecord(&rec), milliseconds(ttl))
}

// Release implements [Store].
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	return s.runOwned(ctx, "release", redisRelease, key, token)
}

func (s *RedisStore) runOwned(ctx context.Context, op string, script *redis.Script, key, token string, args ...any) error {
	if token == "" {
		return ErrLeaseLost
	}
	argv := append([]any{ownerPrefix(token)}, args...)
	n, err := script.Run(ctx, s.client, []string{s.redisKey(key)}, argv...).Int64()
	switch {
	case err != nil:
		return fmt.Errorf("idempotency: redis %s: %w", op, err)
	case n == 0:
		return ErrLeaseLost
	case n == 1:
		return nil
	default:
		return fmt.Errorf("idempotency: redis %s: unexpected reply %d", op, n)
	}
}

// milliseconds rounds d up, so a sub-millisecond duration is not zero,
// which Redis would reject.
func milliseconds(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}
