package idempotency

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed70ea8305/idempotency/internal/wire"
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
// Each record is one string value under one key. Every call is one round
// trip, a Lua script that changes the key only while the owner token still
// holds it. Acquire either claims the key or returns the record already
// there; it stays correct when go-redis re-sends it after a read timeout
// (the re-sent script finds our own claim and counts it as acquired), and
// refuses to claim once the call's deadline has passed by the server's
// clock, so a claim queued behind a stalled server cannot land after the
// caller gave up. Keys carry a hash tag, so the store works on Redis
// Cluster.
//
// Fences never go backwards, also when Redis loses its memory (a restart
// without persistence, a failover to a replica that missed the last
// writes): a new fence is the greater of the last fence under the key's
// hash tag plus one and the server's clock in microseconds, so a counter
// that was lost restarts above every fence handed out before, as long as
// the server's clock did not step back by more than the outage lasted.
// The counters, one per hash tag (65,536 of them, a few MiB at most),
// never expire. Fences are below 2^53, which Lua's numbers hold exactly,
// until the year 2255.
//
// Calls honour their context's deadline when the client has
// ContextTimeoutEnabled, and then run on the caller's goroutine; otherwise
// go-redis reads with its own timeouts, and each call runs in a goroutine
// that the caller leaves at the deadline. When the server has lost the
// scripts (a restart, SCRIPT FLUSH, a new cluster node), a write sends the
// script itself with a budget of its own, so it may take up to twice the
// store timeout.
//
// The guarantees need Redis to keep what it acknowledged: run it with
// maxmemory-policy noeviction (an evicting policy silently drops records;
// under noeviction a full Redis answers errors, which the middleware turns
// into 503). Replication is asynchronous, so a failover can lose the most
// recent claims and records; [RedisOptions].WaitReplicas narrows that window.
//
// Completing or freeing a key publishes on a channel named as its key
// (SPUBLISH on a Cluster, so the message stays in the slot's shard), in the
// same script, to wake duplicates that wait ([Options].Wait). Waiters share one
// pub/sub connection per store (per master node on a Cluster) and one
// goroutine reading it, both opened when the first waiter comes and closed
// when the last leaves. A *redis.Ring, or another client, gets no
// wake-ups: its waiters re-read at the holder's lease end and at their
// deadline.
//
// A RedisStore is safe for concurrent use; create it with [NewRedisStore].
type RedisStore struct {
	client RedisClient
	prefix string

	waitReplicas int // 0: no WAIT
	waitTimeout  time.Duration

	// honoursDeadlines: the client returns by a context's deadline
	// (ContextTimeoutEnabled), so calls run inline; otherwise each runs
	// in a goroutine that the caller leaves at the deadline.
	honoursDeadlines bool

	// publish is the command the write scripts wake waiters with:
	// "publish" on one server, "spublish" (sharded, the channel stays in
	// its slot's shard) on a Cluster, "" for clients whose subscriptions
	// the store cannot place (a Ring), whose waiters re-read on timers.
	publish string
	hub     redisHub
}

// RedisOptions configures a [RedisStore] ([NewRedisStore]). The zero value
// is the defaults each field states.
type RedisOptions struct {
	// Prefix starts every key the store writes, to keep several
	// applications or environments apart in one Redis. It must not
	// contain braces, which would change the key's hash slot on Redis
	// Cluster. Default: "idem:".
	Prefix string

	// WaitReplicas, when positive, makes each claim and each stored
	// response wait, in the same round trip, until at least that many
	// replicas have acknowledged it (Redis WAIT), for at most WaitTimeout
	// (at least 1 ms). The command goes in one pipeline with the write it
	// waits for, so it adds no round trip, only the time the replicas take
	// to acknowledge.
	//
	// When fewer replicas acknowledge in time, the store fails closed: a
	// claim becomes an error (the middleware answers 503 and takes the
	// claim back) and a stored response becomes an error too (the held
	// response is not sent: the client gets 503). Replays, 409s and 422s
	// do not depend on the count.
	//
	// It narrows, and does not close, the window in which a failover
	// loses records: replicas acknowledge receiving a write, not
	// persisting it; a failover may promote a replica other than those
	// that acknowledged (ask for as many replicas as there are, or use
	// Sentinel or Cluster, which prefer the most up-to-date replica); a
	// write that timed out may still exist on the old primary; and lease
	// renewals and releases are not waited for. With no replica reachable
	// every new claim fails after WaitTimeout.
	//
	// Keep WaitTimeout below the client's ReadTimeout, or the read of the
	// reply times out first. It works with *redis.Client (single node and
	// Sentinel failover clients) and *redis.ClusterClient, where the
	// pipeline goes to the master of the key's slot (a slot moving
	// meanwhile makes the call fail, closed); other clients make
	// [NewRedisStore] fail. Default: 0, no WAIT.
	WaitReplicas int
	WaitTimeout  time.Duration
}

// NewRedisStore returns a RedisStore that talks to Redis through client.
func NewRedisStore(client RedisClient, opts RedisOptions) (*RedisStore, error) {
	if client == nil || reflect.ValueOf(client).Kind() == reflect.Pointer && reflect.ValueOf(client).IsNil() {
		return nil, errors.New("idempotency: redis client is nil")
	}
	prefix := or(opts.Prefix, "idem:")
	switch {
	case strings.ContainsAny(prefix, "{}"):
		return nil, fmt.Errorf("idempotency: redis prefix %q contains a brace", prefix)
	case opts.WaitReplicas < 0:
		return nil, fmt.Errorf("idempotency: WaitReplicas %d is negative", opts.WaitReplicas)
	case opts.WaitReplicas > 0 && opts.WaitTimeout < time.Millisecond:
		return nil, fmt.Errorf("idempotency: WaitTimeout %v is shorter than a millisecond", opts.WaitTimeout)
	}
	s := &RedisStore{client: client, prefix: prefix, waitReplicas: opts.WaitReplicas, waitTimeout: opts.WaitTimeout}
	s.hub.store = s
	switch c := client.(type) {
	case *redis.Client:
		s.honoursDeadlines = c.Options().ContextTimeoutEnabled
		s.publish = "publish"
	case *redis.ClusterClient:
		s.honoursDeadlines = c.Options().ContextTimeoutEnabled
		s.publish = "spublish"
	case *redis.Ring:
		s.honoursDeadlines = c.Options().ContextTimeoutEnabled
	}
	if s.waitReplicas > 0 {
		switch client.(type) {
		case *redis.Client, *redis.ClusterClient:
		default:
			return nil, fmt.Errorf("idempotency: WaitReplicas needs a *redis.Client or *redis.ClusterClient, not %T", client)
		}
	}
	return s, nil
}

var (
	_ Store           = (*RedisStore)(nil)
	_ FailureRecorder = (*RedisStore)(nil)
	_ Checkpointer    = (*RedisStore)(nil)
	_ Inspector       = (*RedisStore)(nil)
	_ waker           = (*RedisStore)(nil)
)

// redisKey maps a record key to a Redis key: the prefix, then a SHA-256 of
// the record key, its first 4 hex digits as the hash tag. Hashing keeps
// client input out of Redis key names and out of slot selection, and
// bounds the key's length; the short tag lets the keys that share it share
// one fence counter too.
func (s *RedisStore) redisKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	var buf [64]byte
	b := append(buf[:0], s.prefix...)
	b = append(b, '{')
	b = hex.AppendEncode(b, sum[:2])
	b = append(b, '}')
	b = hex.AppendEncode(b, sum[2:16])
	return string(b)
}

// fenceKey is the counter of the fences of every key sharing rkey's tag.
func fenceKey(rkey string) string {
	return rkey[:strings.IndexByte(rkey, '}')+1] + "fence"
}

// Scripts. Each compares the stored value's owner prefix (see ownerPrefix)
// with the caller's, so it acts only for the token that holds the key.
var (
	// KEYS: record, fence counter, recovery point. ARGV: owner prefix,
	// claim, lease ms, not-after (Unix ms by the caller's clock; 0: none),
	// the claim's encoded fingerprint. Returns the fence (acquired), the
	// record already there (with its PTTL when in flight: the 409's
	// Retry-After and a waiter's timer), -1 (too late), or, when a
	// recovery point is kept under the key (see redisCheckpoint), {fence,
	// its fingerprint, point, data}: fence is 0 when the point belongs to
	// another request and nothing was claimed.
	redisAcquire = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    local f = tonumber(redis.call('GET', KEYS[2]) or '0')
    local rp = redis.call('HMGET', KEYS[3], 'fp', 'point', 'data')
    if rp[1] and string.sub(rp[1], 1, #ARGV[5]) == ARGV[5] then
      return {f, rp[1], rp[2], rp[3]}
    end
    return f
  end
  if string.sub(v, 2, 2) == 'F' then
    return {v, redis.call('PTTL', KEYS[1])}
  end
  return v
end
local rp = redis.call('HMGET', KEYS[3], 'fp', 'point', 'data')
if rp[1] and string.sub(rp[1], 1, #ARGV[5]) ~= ARGV[5] then
  return {0, rp[1], rp[2], rp[3]}
end
local t = redis.call('TIME')
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[4] ~= '0' and math.floor(us / 1000) > tonumber(ARGV[4]) then
  return -1
end
local f = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, us)
redis.call('SET', KEYS[2], string.format('%.0f', f))
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if rp[1] then
  return {f, rp[1], rp[2], rp[3]}
end
return f`)

	// Checkpoint keeps the recovery point in a hash beside the record
	// (KEYS[2], same hash tag), so that it outlives the record's lease and
	// a release: Release and Fail delete only the record, which leaves the
	// key suspended. Its 'fp' is the in-flight value after the owner
	// prefix, which starts with the length-prefixed fingerprint that
	// Acquire compares. ARGV: owner prefix, point, data, keep ms.
	redisCheckpoint = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'fp', string.sub(v, #ARGV[1] + 1), 'point', ARGV[2], 'data', ARGV[3])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
  return 1
end
return 0`)

	// Get reads a record without claiming it: the value (with its PTTL
	// when in flight, and the recovery point if any), or {0, fp, point,
	// data} for a suspended key.
	redisGet = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
local rp = redis.call('HMGET', KEYS[2], 'fp', 'point', 'data')
if v then
  if string.sub(v, 2, 2) == 'F' then
    return {v, redis.call('PTTL', KEYS[1]), rp[2], rp[3]}
  end
  return v
end
if rp[1] then
  return {0, rp[1], rp[2], rp[3]}
end
return false`)

	redisExtend = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0`)

	// Complete drops the recovery point (KEYS[2]) with the in-flight
	// state. It also succeeds when this token already completed the record
	// (ARGV[4] is its completedPrefix): go-redis re-sent the script after
	// the first run's reply was lost. Complete, Release and Fail publish on
	// the record's channel (its own key name, so the same hash slot) with
	// the command in their last ARGV ('' for none), which wakes waiting
	// duplicates in the same round trip; through pcall, since a failed
	// wake-up must not fail the write (waiters re-read at their deadline).
	redisComplete = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  if ARGV[5] ~= '' then redis.pcall(ARGV[5], KEYS[1], 'c') end
  return 1
end
if v and string.sub(v, 1, #ARGV[4]) == ARGV[4] then
  return 1
end
return 0`)

	// Release refuses (0) only when another owner's claim or a completed
	// record holds the key. A key with no value is free, suspended (its
	// recovery point, if any, is a hash of its own), or the caller's
	// lapsed claim: nothing to do, and done (1).
	//
	// go-redis re-sends the script when the connection broke, also after
	// the first run deleted the key, whose reply was lost. The re-sent run
	// usually finds the key free; but another claim may have taken it in
	// between, and then the key is held, which is refused for any other
	// Release. So the run that deletes notes the call's own random ID
	// beside the record (KEYS[2], same hash tag) for redisReleaseMemory,
	// and a run that finds the key held answers done when its call's ID is
	// there: the same call, re-sent. KEYS: record, released. ARGV: owner
	// prefix, publish command, call ID, memory ms.
	redisRelease = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then
  return 1
end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  if ARGV[2] ~= '' then redis.pcall(ARGV[2], KEYS[1], 'r') end
  return 1
end
if redis.call('GET', KEYS[2]) == ARGV[3] then
  return 1
end
return 0`)

	// Fail releases like redisRelease and counts the failure in a hash
	// beside the record (KEYS[2], same hash tag, so same cluster slot),
	// with the owner prefix of the token counted last, so that the script
	// re-sent after a lost reply returns the same count instead of
	// counting again. It returns the count, or 0 when the token neither
	// owns the key nor failed it last.
	redisFail = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  redis.call('HSET', KEYS[2], 'last_reason', ARGV[2], 'last_token', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  if ARGV[4] ~= '' then redis.pcall(ARGV[4], KEYS[1], 'r') end
  return n
end
local last = redis.call('HMGET', KEYS[2], 'last_token', 'attempts')
if last[1] == ARGV[1] and last[2] then
  return tonumber(last[2])
end
return 0`)
)

var errTooLate = errors.New("idempotency: redis acquire: the server ran the claim after its deadline, and refused it")

// Acquire implements [Store] in one round trip.
func (s *RedisStore) Acquire(ctx context.Context, key string, claim Record, lease time.Duration) (uint64, *Record, error) {
	if err := validateClaim(&claim, lease); err != nil {
		return 0, nil, err
	}
	var notAfter int64
	if deadline, ok := ctx.Deadline(); ok {
		notAfter = deadline.UnixMilli()
	}
	rkey := s.redisKey(key)
	owner := ownerPrefix(claim.Token)
	var fence uint64
	var existing *Record
	err := s.call(ctx, 0, func(ctx context.Context) error {
		reply, err := s.eval(ctx, redisAcquire, s.waitReplicas > 0, 0, []string{rkey, fenceKey(rkey), rkey + redisRecoverySuffix},
			owner, encodeRecord(&claim, claim.Token), milliseconds(lease), notAfter, string(wire.AppendString(nil, claim.Fingerprint)))
		if err != nil {
			return err
		}
		if v, ok := reply.(int64); ok {
			if v < 0 {
				return errTooLate
			}
			fence = uint64(v)
			return nil
		}
		fence, existing, err = decodeRedisRecord(reply)
		return err
	})
	if err != nil {
		return 0, nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	}
	return fence, existing, nil
}

// decodeRedisRecord decodes a record that the acquire and get scripts
// return: a value, an in-flight value with its PTTL and recovery point, or
// a fence with a recovery point.
func decodeRedisRecord(reply any) (uint64, *Record, error) {
	switch v := reply.(type) {
	case string:
		rec, _, err := decodeRecord(v)
		return 0, rec, err
	case []any:
		if len(v) < 2 {
			break
		}
		if value, ok := v[0].(string); ok { // in flight, with its PTTL
			pttl, ok := v[1].(int64)
			if !ok {
				break
			}
			rec, _, err := decodeRecord(value)
			if err != nil {
				return 0, nil, err
			}
			if pttl > 0 {
				rec.LeaseLeft = time.Duration(pttl) * time.Millisecond
			}
			if len(v) == 4 {
				rec.RecoveryPoint, _ = v[2].(string)
				if data, _ := v[3].(string); data != "" {
					rec.RecoveryData = []byte(data)
				}
			}
			return 0, rec, nil
		}
		fence, ok := v[0].(int64)
		if !ok || len(v) != 4 || fence < 0 {
			break
		}
		fp, _ := v[1].(string)
		point, _ := v[2].(string)
		data, _ := v[3].(string)
		d := wire.Decoder{B: fp}
		rec := &Record{Fingerprint: d.String(), RecoveryPoint: point}
		if data != "" {
			rec.RecoveryData = []byte(data)
		}
		if d.Err != nil || point == "" {
			return 0, nil, fmt.Errorf("%w: recovery point", errCorruptRecord)
		}
		return uint64(fence), rec, nil
	}
	return 0, nil, fmt.Errorf("unexpected reply %T", reply)
}

// redisRecoverySuffix names the hash that keeps a key's recovery point,
// after the record's own key, hash tag included.
const redisRecoverySuffix = ":recovery"

// Checkpoint implements [Checkpointer] in one round trip.
func (s *RedisStore) Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error {
	if ttl <= 0 {
		return fmt.Errorf("idempotency: recovery point TTL %v is not positive", ttl)
	}
	return s.runOwned(ctx, "checkpoint", redisCheckpoint, false, key, token, []string{redisRecoverySuffix}, point, data, milliseconds(ttl))
}

// Get implements [Inspector] in one round trip.
func (s *RedisStore) Get(ctx context.Context, key string) (*Record, error) {
	rkey := s.redisKey(key)
	var rec *Record
	err := s.call(ctx, 0, func(ctx context.Context) error {
		reply, err := s.eval(ctx, redisGet, false, 0, []string{rkey, rkey + redisRecoverySuffix})
		if errors.Is(err, redis.Nil) {
			return nil
		}
		if err != nil {
			return err
		}
		_, rec, err = decodeRedisRecord(reply)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("idempotency: redis get: %w", err)
	}
	return rec, nil
}

// Extend implements [Store].
func (s *RedisStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if lease <= 0 {
		return fmt.Errorf("idempotency: lease %v is not positive", lease)
	}
	return s.runOwned(ctx, "extend", redisExtend, false, key, token, nil, milliseconds(lease))
}

// Complete implements [Store].
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := validateCompletion(rec, ttl); err != nil {
		return err
	}
	return s.runOwned(ctx, "complete", redisComplete, s.waitReplicas > 0, key, token, []string{redisRecoverySuffix},
		encodeRecord(rec, token), milliseconds(ttl), completedPrefix(token), s.publish)
}

// Release implements [Store] in one round trip. A key that nothing holds
// (no value under it: free, suspended or the caller's lapsed claim) is
// released already: the call succeeds and changes nothing. The call has
// an ID of its own, which the release leaves beside the record for a
// minute, so that go-redis re-sending it after its reply was lost
// succeeds also when another claim took the key in between.
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	return s.runOwned(ctx, "release", redisRelease, false, key, token, []string{redisReleasedSuffix},
		s.publish, rand.Text(), milliseconds(redisReleaseMemory))
}

// redisReleasedSuffix names the key that holds the ID of the Release call
// that last deleted the record, after the record's own key, hash tag
// included; redisReleaseMemory is how long it stays, far beyond the time
// within which go-redis re-sends a call.
const (
	redisReleasedSuffix = ":released"
	redisReleaseMemory  = time.Minute
)

// Fail implements [FailureRecorder] in one round trip. The same call
// repeated after it succeeded returns the same count, while no other
// failure was counted since.
func (s *RedisStore) Fail(ctx context.Context, key, token, reason string, ttl time.Duration) (int, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("idempotency: failure TTL %v is not positive", ttl)
	}
	if token == "" {
		return 0, ErrLeaseLost
	}
	rkey := s.redisKey(key)
	budget := writeBudget(ctx)
	var n int64
	err := s.call(ctx, budget, func(ctx context.Context) error {
		reply, err := s.eval(ctx, redisFail, false, budget, []string{rkey, rkey + redisFailuresSuffix},
			ownerPrefix(token), reason, milliseconds(ttl), s.publish)
		n, _ = reply.(int64)
		return err
	})
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
	var values []any
	err := s.call(ctx, 0, func(ctx context.Context) error {
		var err error
		values, err = s.client.HMGet(ctx, s.redisKey(key)+redisFailuresSuffix, "attempts", "last_reason").Result()
		return err
	})
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

// redisRemove deletes a record with its recovery point and failure
// history, and wakes the waiters on it. ARGV: the publish command, empty
// for none.
var redisRemove = redis.NewScript(`
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[1] ~= '' then redis.pcall(ARGV[1], KEYS[1], 'r') end
return n`)

// Remove implements [Inspector] in one round trip.
func (s *RedisStore) Remove(ctx context.Context, key string) error {
	rkey := s.redisKey(key)
	err := s.call(ctx, 0, func(ctx context.Context) error {
		_, err := s.eval(ctx, redisRemove, false, 0, []string{rkey, rkey + redisRecoverySuffix, rkey + redisFailuresSuffix}, s.publish)
		return err
	})
	if err != nil {
		return fmt.Errorf("idempotency: redis remove: %w", err)
	}
	return nil
}

// redisFailuresSuffix names the hash that counts a key's failed attempts,
// after the record's own key, hash tag included.
const redisFailuresSuffix = ":failures"

// runOwned runs an owner-checked write script, which answers 1 (done) or
// 0 (the token does not own the key). Its KEYS are the record and, after
// it, the record's key with each of suffixes (same hash tag).
func (s *RedisStore) runOwned(ctx context.Context, op string, script *redis.Script, wait bool, key, token string, suffixes []string, args ...any) error {
	if token == "" {
		return ErrLeaseLost
	}
	argv := append([]any{ownerPrefix(token)}, args...)
	rkey := s.redisKey(key)
	keys := []string{rkey}
	for _, suffix := range suffixes {
		keys = append(keys, rkey+suffix)
	}
	budget := writeBudget(ctx)
	var n int64
	err := s.call(ctx, budget, func(ctx context.Context) error {
		reply, err := s.eval(ctx, script, wait, budget, keys, argv...)
		n, _ = reply.(int64)
		return err
	})
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

// call runs op by ctx's deadline, or extra later (room for a write's
// fallback, see eval): inline when the client honours deadlines, else in
// a goroutine that is left to finish on its own when that time comes (op
// then writes results nobody reads).
func (s *RedisStore) call(ctx context.Context, extra time.Duration, op func(context.Context) error) error {
	if s.honoursDeadlines || ctx.Done() == nil {
		return op(ctx)
	}
	wait := ctx
	if deadline, ok := ctx.Deadline(); ok && extra > 0 {
		var cancel context.CancelFunc
		wait, cancel = context.WithDeadline(context.WithoutCancel(ctx), deadline.Add(extra))
		defer cancel()
	}
	done := make(chan error, 1)
	go func() { done <- op(ctx) }()
	select {
	case err := <-done:
		return err
	case <-wait.Done():
		return fmt.Errorf("store call abandoned: %w", context.Cause(wait))
	}
}

// writeBudget is the time a write has left before ctx's deadline as it
// starts, 0 without one: its EVAL fallback after NOSCRIPT gets as long
// again, since the first round trip may have used all of it and a write
// must still land.
func writeBudget(ctx context.Context) time.Duration {
	if deadline, ok := ctx.Deadline(); ok {
		return max(time.Until(deadline), 0)
	}
	return 0
}

// eval runs script by its SHA and, if the server has lost it, by its
// body, then within fallback (when positive) instead of ctx's deadline.
// With wait, WAIT goes in the same pipeline and its count is checked.
func (s *RedisStore) eval(ctx context.Context, script *redis.Script, wait bool, fallback time.Duration, keys []string, args ...any) (any, error) {
	reply, err := s.evalOnce(ctx, script, false, wait, keys, args)
	if !redis.HasErrorPrefix(err, "NOSCRIPT") {
		return reply, err
	}
	if fallback > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), fallback)
		defer cancel()
	}
	return s.evalOnce(ctx, script, true, wait, keys, args)
}

func (s *RedisStore) evalOnce(ctx context.Context, script *redis.Script, body, wait bool, keys []string, args []any) (any, error) {
	if !wait {
		if body {
			return script.Eval(ctx, s.client, keys, args...).Result()
		}
		return script.EvalSha(ctx, s.client, keys, args...).Result()
	}
	pipe, err := s.pipeline(ctx, keys[0])
	if err != nil {
		return nil, err
	}
	var run *redis.Cmd
	if body {
		run = script.Eval(ctx, pipe, keys, args...)
	} else {
		run = script.EvalSha(ctx, pipe, keys, args...)
	}
	waitCmd := pipe.Do(ctx, "wait", s.waitReplicas, milliseconds(s.waitTimeout))
	_, _ = pipe.Exec(ctx) // each command's result is checked below
	reply, err := run.Result()
	if err != nil {
		return nil, err
	}
	n, err := waitCmd.Int64()
	switch {
	case err != nil:
		return nil, fmt.Errorf("wait: %w", err)
	case n < int64(s.waitReplicas):
		return nil, fmt.Errorf("acknowledged by %d of %d replicas within %v", n, s.waitReplicas, s.waitTimeout)
	}
	return reply, nil
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

// milliseconds rounds d up, so a sub-millisecond duration is not zero,
// which Redis would reject.
func milliseconds(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}

// watch implements waker with pub/sub: the write scripts publish on the
// record's channel (named as its key, so it hashes to the key's slot),
// and the store's hub delivers the message to the waiters on it.
func (s *RedisStore) watch(ctx context.Context, key string) (<-chan struct{}, func(), error) {
	if s.publish == "" {
		return nil, nil, errors.ErrUnsupported
	}
	channel := s.redisKey(key)
	var client *redis.Client
	var addr string
	switch c := s.client.(type) {
	case *redis.Client:
		client = c
	case *redis.ClusterClient:
		// Sharded pub/sub: the subscription goes to the master of the
		// channel's slot, where SPUBLISH delivers it.
		node, err := c.MasterForKey(ctx, channel)
		if err != nil {
			return nil, nil, err
		}
		client, addr = node, node.Options().Addr
	default:
		return nil, nil, errors.ErrUnsupported
	}
	return s.hub.watch(ctx, client, addr, channel)
}

// redisHub shares pub/sub connections among the waiters of one
// [RedisStore]: one connection per server (per master node on a Cluster)
// and one goroutine reading it, opened when the first waiter comes and
// closed when the last leaves, so an idle store holds neither. Channels
// are subscribed while someone waits on them.
type redisHub struct {
	store *RedisStore
	mu    sync.Mutex
	conns map[string]*hubConn // by node address; "" for a single server
}

// hubConn is one pub/sub connection and the waiters it serves. Its fields
// are guarded by the hub's mutex, except ps, which is safe on its own.
type hubConn struct {
	hub     *redisHub
	addr    string
	ps      *redis.PubSub
	sharded bool
	waiting waiters                  // by channel
	ready   map[string]chan struct{} // closed once the channel's subscription is confirmed
	n       int                      // waiters
	done    chan struct{}            // closed when the last waiter left
}

func (h *redisHub) watch(ctx context.Context, client *redis.Client, addr, channel string) (<-chan struct{}, func(), error) {
	h.mu.Lock()
	hc := h.conns[addr]
	if hc == nil {
		hc = &hubConn{hub: h, addr: addr, sharded: h.store.publish == "spublish", ready: make(map[string]chan struct{}), done: make(chan struct{})}
		// Neither call connects; the first subscription does.
		if hc.sharded {
			hc.ps = client.SSubscribe(context.WithoutCancel(ctx))
		} else {
			hc.ps = client.Subscribe(context.WithoutCancel(ctx))
		}
		if h.conns == nil {
			h.conns = make(map[string]*hubConn)
		}
		h.conns[addr] = hc
		go hc.receive()
	}
	hc.n++
	ch := hc.waiting.add(channel)
	ready, subscribed := hc.ready[channel]
	if !subscribed {
		ready = make(chan struct{})
		hc.ready[channel] = ready
	}
	h.mu.Unlock()

	stop := func() { h.leave(hc, channel, ch) }
	if !subscribed {
		if err := hc.subscribe(ctx, channel); err != nil {
			stop()
			return nil, nil, err
		}
	}
	// Only a confirmed subscription is sure to see a later publish.
	select {
	case <-ready:
		return ch, stop, nil
	case <-ctx.Done():
		stop()
		return nil, nil, context.Cause(ctx)
	}
}

// leave unregisters a waiter; the last one on a channel unsubscribes it,
// the last one on the connection closes it (which ends its goroutine).
func (h *redisHub) leave(hc *hubConn, channel string, ch chan struct{}) {
	h.mu.Lock()
	hc.n--
	last := hc.waiting.remove(channel, ch)
	if last {
		delete(hc.ready, channel)
	}
	idle := hc.n == 0
	if idle {
		delete(h.conns, hc.addr)
		close(hc.done)
	}
	h.mu.Unlock()
	switch {
	case idle:
		_ = hc.ps.Close()
	case last:
		// It may race with a new waiter's subscription to the same
		// channel; receive repairs that (see confirmed).
		if hc.sharded {
			_ = hc.ps.SUnsubscribe(context.Background(), channel)
		} else {
			_ = hc.ps.Unsubscribe(context.Background(), channel)
		}
	}
}

func (hc *hubConn) subscribe(ctx context.Context, channel string) error {
	if hc.sharded {
		return hc.ps.SSubscribe(ctx, channel)
	}
	return hc.ps.Subscribe(ctx, channel)
}

// Backoff of the receive loop while the connection fails; go-redis
// reconnects and subscribes again on the next receive.
const (
	hubMinBackoff = 10 * time.Millisecond
	hubMaxBackoff = time.Second
)

// receive reads the connection until the hub closes it, waking the
// waiters of each channel that a message arrives on.
func (hc *hubConn) receive() {
	ctx := context.Background()
	backoff := hubMinBackoff
	for {
		msg, err := hc.ps.Receive(ctx)
		if err != nil {
			select {
			case <-hc.done:
				return
			default:
			}
			t := time.NewTimer(backoff)
			select {
			case <-hc.done:
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, hubMaxBackoff)
			continue
		}
		backoff = hubMinBackoff
		switch m := msg.(type) {
		case *redis.Message:
			hc.hub.mu.Lock()
			hc.waiting.wake(m.Channel)
			hc.hub.mu.Unlock()
		case *redis.Subscription:
			hc.confirmed(m)
		}
	}
}

// confirmed handles the server's answer to a (un)subscription.
func (hc *hubConn) confirmed(m *redis.Subscription) {
	hc.hub.mu.Lock()
	ready, wanted := hc.ready[m.Channel]
	switch m.Kind {
	case "subscribe", "ssubscribe":
		if !wanted {
			break
		}
		select {
		case <-ready:
			// Subscribed again (go-redis reconnected, or a repair
			// below): a message may have been lost meanwhile, so the
			// waiters re-read.
			hc.waiting.wake(m.Channel)
		default:
			close(ready)
		}
		hc.hub.mu.Unlock()
		return
	}
	hc.hub.mu.Unlock()
	// An unsubscription (ours, or the server's after a slot moved) of a
	// channel someone waits on again: subscribe once more; its
	// confirmation wakes the waiters to re-read.
	if wanted {
		_ = hc.subscribe(context.Background(), m.Channel)
	}
}
