package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisClient is the part of the go-redis v9 API that [RedisStore] uses.
// *redis.Client (single node and Sentinel failover), *redis.ClusterClient,
// *redis.Ring and every redis.UniversalClient satisfy it.
type RedisClient interface {
	SetArgs(ctx context.Context, key string, value any, a redis.SetArgs) *redis.StatusCmd
	HMGet(ctx context.Context, key string, fields ...string) *redis.SliceCmd
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
// recent claims and records; [WithRedisWait] narrows that window.
//
// A RedisStore is safe for concurrent use; create it with [NewRedisStore].
type RedisStore struct {
	client RedisClient
	prefix string

	waitReplicas int // 0: no WAIT
	waitTimeout  time.Duration
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

// WithRedisWait makes each claim and each stored response wait, in the
// same round trip, until at least replicas replicas have acknowledged it
// (Redis WAIT), for at most timeout. The command goes in one pipeline with
// the write it waits for, so it adds no round trip, only the time the
// replicas take to acknowledge.
//
// When fewer replicas acknowledge in time, the store fails closed: a claim
// becomes an error (the middleware answers 503 and takes the claim back)
// and a stored response becomes an error too (the client already has its
// response; the observer sees store_error). Replays, 409s and 422s do not
// depend on the count.
//
// It narrows, and does not close, the window in which a failover loses
// records: replicas acknowledge receiving a write, not persisting it; a
// failover may promote a replica other than those that acknowledged (ask
// for as many replicas as there are, or use Sentinel or Cluster, which
// prefer the most up-to-date replica); a write that timed out may still
// exist on the old primary; and lease renewals and releases are not
// waited for. With no replica reachable every new claim fails after
// timeout.
//
// Keep timeout below the client's ReadTimeout, or the read of the reply
// times out first. It works with *redis.Client (single node and Sentinel
// failover clients) and *redis.ClusterClient, where the pipeline goes to
// the master of the key's slot (a slot moving meanwhile makes the call
// fail, closed); other clients make [NewRedisStore] fail. Default: off.
func WithRedisWait(replicas int, timeout time.Duration) RedisOption {
	return func(s *RedisStore) error {
		switch {
		case replicas < 1:
			return fmt.Errorf("idempotency: redis wait for %d replicas: need at least one", replicas)
		case timeout < time.Millisecond:
			return fmt.Errorf("idempotency: redis wait timeout %v is shorter than a millisecond", timeout)
		}
		s.waitReplicas, s.waitTimeout = replicas, timeout
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
	if s.waitReplicas > 0 {
		switch client.(type) {
		case *redis.Client, *redis.ClusterClient:
		default:
			return nil, fmt.Errorf("idempotency: WithRedisWait needs a *redis.Client or *redis.ClusterClient, not %T", client)
		}
	}
	return s, nil
}

var (
	_ Store           = (*RedisStore)(nil)
	_ FailureRecorder = (*RedisStore)(nil)
)

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
	value := encodeRecord(&claim, claim.Token)
	rkey := s.redisKey(key)
	args := redis.SetArgs{Mode: "NX", TTL: lease, Get: true}
	var set *redis.StatusCmd
	var wait *redis.Cmd
	if s.waitReplicas > 0 {
		pipe, err := s.pipeline(ctx, rkey)
		if err != nil {
			return nil, fmt.Errorf("idempotency: redis acquire: %w", err)
		}
		set = pipe.SetArgs(ctx, rkey, value, args)
		wait = s.wait(ctx, pipe)
		_, _ = pipe.Exec(ctx) // each command's result is checked below
	} else {
		set = s.client.SetArgs(ctx, rkey, value, args)
	}
	previous, err := set.Result()
	switch {
	case errors.Is(err, redis.Nil), err == nil && previous == value:
		// Acquired. A previous equal to our value means go-redis retried
		// the command after our first attempt had already stored the
		// claim: it is ours.
		if err := s.checkWait("acquire", wait); err != nil {
			return nil, err
		}
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	}
	rec, _, err := decodeRecord([]byte(previous))
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

	// Complete also succeeds when this token already completed the record
	// (ARGV[4] is its completedPrefix): go-redis re-sent the script after
	// the first run's reply was lost.
	redisComplete = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if v and string.sub(v, 1, #ARGV[4]) == ARGV[4] then
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

	// Fail releases like redisRelease and counts the failure in a hash
	// beside the record (KEYS[2], same hash tag, so same cluster slot).
	// It returns the count, or 0 when the token does not own the key.
	redisFail = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  redis.call('HSET', KEYS[2], 'last_reason', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return n
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
	args := []any{encodeRecord(&rec, token), milliseconds(ttl), completedPrefix(token)}
	if s.waitReplicas > 0 {
		return s.runOwnedWaiting(ctx, "complete", redisComplete, key, token, args...)
	}
	return s.runOwned(ctx, "complete", redisComplete, key, token, args...)
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
	return ownedReply(op, n, err)
}

// ownedReply reads the reply of an owner-checked script: 1 done, 0 the
// token does not own the key.
func ownedReply(op string, n int64, err error) error {
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

// Fail implements [FailureRecorder] in one round trip.
func (s *RedisStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("idempotency: failure TTL %v is not positive", ttl)
	}
	if token == "" {
		return 0, ErrLeaseLost
	}
	rkey := s.redisKey(key)
	n, err := redisFail.Run(ctx, s.client, []string{rkey, rkey + redisFailuresSuffix},
		ownerPrefix(token), reason, milliseconds(ttl)).Int64()
	switch {
	case err != nil:
		return 0, fmt.Errorf("idempotency: redis fail: %w", err)
	case n == 0:
		return 0, ErrLeaseLost
	}
	return int(n), nil
}

// Failures implements [FailureRecorder].
func (s *RedisStore) Failures(ctx context.Context, key string) (int, string, error) {
	values, err := s.client.HMGet(ctx, s.redisKey(key)+redisFailuresSuffix, "attempts", "last_reason").Result()
	if err != nil {
		return 0, "", fmt.Errorf("idempotency: redis failures: %w", err)
	}
	if len(values) != 2 || values[0] == nil {
		return 0, "", nil
	}
	count, ok := values[0].(string)
	reason, _ := values[1].(string)
	attempts, err := strconv.Atoi(count)
	if !ok || err != nil {
		return 0, "", fmt.Errorf("%w: failure count %v", errCorruptRecord, values[0])
	}
	return attempts, reason, nil
}

// redisFailuresSuffix names the hash that counts a key's failed attempts,
// after the record's own key, hash tag included.
const redisFailuresSuffix = ":failures"

// runOwnedWaiting is runOwned followed by WAIT in the same pipeline. A
// pipeline cannot fall back from EVALSHA to EVAL on its own, so on
// NOSCRIPT it is sent once more with EVAL.
func (s *RedisStore) runOwnedWaiting(ctx context.Context, op string, script *redis.Script, key, token string, args ...any) error {
	if token == "" {
		return ErrLeaseLost
	}
	rkey := s.redisKey(key)
	argv := append([]any{ownerPrefix(token)}, args...)
	for _, eval := range []bool{false, true} {
		pipe, err := s.pipeline(ctx, rkey)
		if err != nil {
			return fmt.Errorf("idempotency: redis %s: %w", op, err)
		}
		var run *redis.Cmd
		if eval {
			run = script.Eval(ctx, pipe, []string{rkey}, argv...)
		} else {
			run = script.EvalSha(ctx, pipe, []string{rkey}, argv...)
		}
		wait := s.wait(ctx, pipe)
		_, _ = pipe.Exec(ctx) // each command's result is checked below
		if !eval && redis.HasErrorPrefix(run.Err(), "NOSCRIPT") {
			continue
		}
		n, err := run.Int64()
		if err := ownedReply(op, n, err); err != nil {
			return err
		}
		return s.checkWait(op, wait)
	}
	return fmt.Errorf("idempotency: redis %s: script not loaded", op) // not reached: EVAL needs no cache
}

// pipeline returns a pipeline whose commands all go, on one connection,
// to the server that holds rkey, so that WAIT counts the acknowledgements
// of the write sent before it.
func (s *RedisStore) pipeline(ctx context.Context, rkey string) (redis.Pipeliner, error) {
	switch c := s.client.(type) {
	case *redis.ClusterClient:
		node, err := c.MasterForKey(ctx, rkey)
		if err != nil {
			return nil, err
		}
		return node.Pipeline(), nil
	case *redis.Client:
		return c.Pipeline(), nil
	default: // NewRedisStore allows WithRedisWait only for the two above
		return nil, fmt.Errorf("cannot pipeline WAIT through %T", s.client)
	}
}

// wait queues WAIT on pipe.
func (s *RedisStore) wait(ctx context.Context, pipe redis.Pipeliner) *redis.Cmd {
	return pipe.Do(ctx, "wait", s.waitReplicas, milliseconds(s.waitTimeout))
}

// checkWait fails unless WAIT (nil when not asked for) counted enough
// replicas.
func (s *RedisStore) checkWait(op string, wait *redis.Cmd) error {
	if wait == nil {
		return nil
	}
	n, err := wait.Int64()
	switch {
	case err != nil:
		return fmt.Errorf("idempotency: redis %s: wait: %w", op, err)
	case n < int64(s.waitReplicas):
		return fmt.Errorf("idempotency: redis %s: acknowledged by %d of %d replicas within %v", op, n, s.waitReplicas, s.waitTimeout)
	}
	return nil
}

// milliseconds rounds d up, so a sub-millisecond duration is not zero,
// which Redis would reject.
func milliseconds(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}
