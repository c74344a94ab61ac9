package idempotency

import (
	"bytes"
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
	"unsafe"

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

	// hashed remembers the keys hashed last (see appendRedisKey).
	hashed keyMemo
	// onHash, when set (by tests), is called for each key hashed.
	onHash func()
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
	var buf [64]byte
	return string(s.appendRedisKey(buf[:0], key))
}

func (s *RedisStore) appendRedisKey(b []byte, key string) []byte {
	b = append(b, s.prefix...)
	if tagged, ok := s.hashed.find(b, key); ok {
		return tagged
	}
	if s.onHash != nil {
		s.onHash()
	}
	sum := sha256.Sum256([]byte(key))
	start := len(b)
	b = append(b, '{')
	b = hex.AppendEncode(b, sum[:2])
	b = append(b, '}')
	b = hex.AppendEncode(b, sum[2:16])
	s.hashed.keep(key, b[start:])
	return b
}

// keyMemo remembers the hashed part of the Redis keys of the record keys
// hashed last, so that a request hashes its key once: the engine passes
// its Acquire, and then its Complete (or Release, Extend...), the same
// string. A key's slot is picked by the address of its bytes, which costs
// nothing to compute, and a slot answers only for a key of the same
// content, so that the memo never changes a key's mapping; another key
// that takes the slot meanwhile costs a hash again, nothing more.
type keyMemo struct {
	slots [64]keySlot
}

type keySlot struct {
	mu     sync.Mutex
	key    string
	tagged [redisTaggedLen]byte // "{tag}" and the rest of the hash
}

// redisTaggedLen is the length of a Redis key after the prefix.
const redisTaggedLen = 1 + 4 + 1 + 28

func (m *keyMemo) slot(key string) *keySlot {
	return &m.slots[uintptr(unsafe.Pointer(unsafe.StringData(key)))>>4%uintptr(len(m.slots))]
}

// find appends the hashed part of key's Redis key to b if remembered.
func (m *keyMemo) find(b []byte, key string) ([]byte, bool) {
	sl := m.slot(key)
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.key != key || key == "" {
		return b, false
	}
	return append(b, sl.tagged[:]...), true
}

func (m *keyMemo) keep(key string, tagged []byte) {
	sl := m.slot(key)
	sl.mu.Lock()
	sl.key = key
	copy(sl.tagged[:], tagged)
	sl.mu.Unlock()
}

// fenceKey is the counter of the fences of every key sharing rkey's tag.
func fenceKey(rkey string) string {
	return rkey[:strings.IndexByte(rkey, '}')+1] + "fence"
}

// Scripts. Each compares the stored value's owner prefix (see ownerPrefix)
// with the caller's, so it acts only for the token that holds the key.
//
// The acquire and get scripts answer one string (see decodeRedisReply),
// the others an integer, so that go-redis reads a reply without boxing
// it. A free key's path takes five commands; a replay's, one GET.
var (
	// KEYS: record, fence counter, recovery point. ARGV: the claim, and
	// the lease and the not-after time (Unix ms by the caller's clock; 0:
	// none) as "lease notAfter". The owner prefix and the encoded
	// fingerprint are read from the claim: every argument costs the
	// server time, on replays too. Returns the fence (acquired), -1 (too
	// late), the completed record already there, or an envelope: 'P' for
	// a record in flight (with its PTTL: the 409's Retry-After and a
	// waiter's timer), 'R' when a recovery point is kept under the key
	// (see redisCheckpoint): the fence, its fingerprint, point and data;
	// the fence is 0 when the point belongs to another request and
	// nothing was claimed.
	//
	// A new fence is the greater of the counter plus one and the server's
	// clock: SET ... GET writes the clock and reads the counter in one
	// command, and a second SET corrects it in the rare case that the
	// counter was ahead.
	redisAcquire = newRedisScript(`
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 2) ~= 70 then
  return v
end
local claim = ARGV[1]
local function after(i)
  local n, shift = 0, 1
  while true do
    local b = string.byte(claim, i)
    n, i = n + (b % 128) * shift, i + 1
    if b < 128 then return i + n end
    shift = shift * 128
  end
end
local fpAt = after(3)
local owner = string.sub(claim, 1, fpAt - 1)
local fp = string.sub(claim, fpAt, after(fpAt) - 1)
if v then
  if string.sub(v, 1, #owner) ~= owner then
    local pttl = tostring(redis.call('PTTL', KEYS[1]))
    return 'P' .. #pttl .. ':' .. pttl .. #v .. ':' .. v .. '0:0:'
  end
  local f = redis.call('GET', KEYS[2]) or '0'
  if redis.call('EXISTS', KEYS[3]) == 1 then
    local rp = redis.call('HMGET', KEYS[3], 'fp', 'point', 'data')
    if rp[1] and string.sub(rp[1], 1, #fp) == fp then
      local point, data = rp[2] or '', rp[3] or ''
      return 'R' .. #f .. ':' .. f .. #rp[1] .. ':' .. rp[1] .. #point .. ':' .. point .. #data .. ':' .. data
    end
  end
  return f
end
local rp
if redis.call('EXISTS', KEYS[3]) == 1 then
  rp = redis.call('HMGET', KEYS[3], 'fp', 'point', 'data')
  if not rp[1] then
    rp = nil
  elseif string.sub(rp[1], 1, #fp) ~= fp then
    local point, data = rp[2] or '', rp[3] or ''
    return 'R1:0' .. #rp[1] .. ':' .. rp[1] .. #point .. ':' .. point .. #data .. ':' .. data
  end
end
local lease, notAfter = string.match(ARGV[2], '^(%d+) (-?%d+)$')
local t = redis.call('TIME')
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
if notAfter ~= '0' and math.floor(us / 1000) > tonumber(notAfter) then
  return -1
end
local f = us
local last = tonumber(redis.call('SET', KEYS[2], string.format('%.0f', us), 'GET') or '0')
if last >= us then
  f = last + 1
  redis.call('SET', KEYS[2], string.format('%.0f', f))
end
redis.call('SET', KEYS[1], claim, 'PX', lease)
if rp then
  local fs, point, data = string.format('%.0f', f), rp[2] or '', rp[3] or ''
  return 'R' .. #fs .. ':' .. fs .. #rp[1] .. ':' .. rp[1] .. #point .. ':' .. point .. #data .. ':' .. data
end
return f`)

	// Checkpoint keeps the recovery point in a hash beside the record
	// (KEYS[2], same hash tag), so that it outlives the record's lease and
	// a release: Release and Fail delete only the record, which leaves the
	// key suspended. Its 'fp' is the in-flight value after the owner
	// prefix, which starts with the length-prefixed fingerprint that
	// Acquire compares. ARGV: owner prefix, point, data, keep ms.
	redisCheckpoint = newRedisScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'fp', string.sub(v, #ARGV[1] + 1), 'point', ARGV[2], 'data', ARGV[3])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
  return 1
end
return 0`)

	// Get reads a record without claiming it: the value, as the acquire
	// script answers it ('P' with the PTTL and the recovery point when in
	// flight), or 'R' with fence 0 for a suspended key.
	redisGet = newRedisScript(`
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 2) ~= 70 then
    return v
  end
  local pttl = tostring(redis.call('PTTL', KEYS[1]))
  local rp = redis.call('HMGET', KEYS[2], 'point', 'data')
  local point, data = rp[1] or '', rp[2] or ''
  return 'P' .. #pttl .. ':' .. pttl .. #v .. ':' .. v .. #point .. ':' .. point .. #data .. ':' .. data
end
local rp = redis.call('HMGET', KEYS[2], 'fp', 'point', 'data')
if rp[1] then
  local point, data = rp[2] or '', rp[3] or ''
  return 'R1:0' .. #rp[1] .. ':' .. rp[1] .. #point .. ':' .. point .. #data .. ':' .. data
end
return false`)

	redisExtend = newRedisScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0`)

	// Complete drops the recovery point (KEYS[2]) with the in-flight
	// state. ARGV: the completed value, its TTL ms. The value starts with
	// the token's completedPrefix, from which the script makes the owner
	// prefix; it also succeeds when this token already completed the
	// record: go-redis re-sent the script after the first run's reply was
	// lost. Complete, Release and Fail publish on the record's channel
	// (its own key name, so the same hash slot), which wakes waiting
	// duplicates in the same round trip; through pcall, since a failed
	// wake-up must not fail the write (waiters re-read at their deadline).
	// Release and Fail take the command in their last ARGV ('' for none);
	// Complete, on every first request, has a script for each
	// (redisPublishing), which saves the server an argument.
	redisComplete = redisPublishing(`
local value = ARGV[1]
local n, shift, i = 0, 1, 3
while true do
  local b = string.byte(value, i)
  n, i = n + (b % 128) * shift, i + 1
  if b < 128 then break end
  shift = shift * 128
end
local done = string.sub(value, 1, i + n - 1)
local owner = '\1F' .. string.sub(done, 3)
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #owner) == owner then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  PUBLISH(KEYS[1], 'c')
  return 1
end
if v and string.sub(v, 1, #done) == done then
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
	redisRelease = newRedisScript(`
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
	redisFail = newRedisScript(`
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
	c := newScriptCall(redisAcquire, true, s.waitReplicas > 0)
	c.keys(s, key, fenceSuffix, redisRecoverySuffix)
	start := len(c.buf)
	c.buf = appendClaim(c.buf, &claim, claim.Token)
	c.spanArg(start, len(c.buf))
	start = len(c.buf)
	c.buf = strconv.AppendInt(c.buf, milliseconds(lease), 10)
	c.buf = append(c.buf, ' ')
	c.buf = strconv.AppendInt(c.buf, notAfter, 10)
	c.spanArg(start, len(c.buf))
	reply, err := s.run(ctx, c, 0)
	if err != nil {
		return 0, nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	}
	fence, existing, err := decodeRedisReply(reply.str)
	if err != nil {
		return 0, nil, fmt.Errorf("idempotency: redis acquire: %w", err)
	}
	return fence, existing, nil
}

// decodeRedisReply decodes what the acquire and get scripts answer: a
// fence (acquired), -1 (too late), a stored value, or an envelope of four
// length-prefixed fields ("3:abc"): 'P' a record in flight, with its PTTL,
// value, recovery point and data; 'R' a recovery point, with the fence,
// its fingerprint, point and data.
func decodeRedisReply(reply string) (uint64, *Record, error) {
	if reply == "" {
		return 0, nil, fmt.Errorf("%w: empty reply", errCorruptRecord)
	}
	switch c := reply[0]; {
	case c == '-':
		if reply == "-1" {
			return 0, nil, errTooLate
		}
	case c >= '0' && c <= '9':
		fence, err := strconv.ParseUint(reply, 10, 64)
		if err == nil {
			return fence, nil, nil
		}
	case c == 'P' || c == 'R':
		var fields [4]string
		rest := reply[1:]
		for i := range fields {
			colon := strings.IndexByte(rest, ':')
			n, err := strconv.Atoi(rest[:max(colon, 0)])
			if colon < 0 || err != nil || n < 0 || n > len(rest)-colon-1 {
				return 0, nil, fmt.Errorf("%w: reply envelope", errCorruptRecord)
			}
			fields[i], rest = rest[colon+1:colon+1+n], rest[colon+1+n:]
		}
		if rest != "" {
			break
		}
		return decodeEnvelope(c, fields)
	default:
		rec, _, err := decodeRecord(reply)
		return 0, rec, err
	}
	return 0, nil, fmt.Errorf("%w: reply %.20q", errCorruptRecord, reply)
}

func decodeEnvelope(kind byte, f [4]string) (uint64, *Record, error) {
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil || n < -2 {
		return 0, nil, fmt.Errorf("%w: reply envelope", errCorruptRecord)
	}
	var rec *Record
	if kind == 'P' { // in flight: PTTL, value
		if rec, _, err = decodeRecord(f[1]); err != nil {
			return 0, nil, err
		}
		if rec.Response != nil {
			return 0, nil, fmt.Errorf("%w: completed record with a lease", errCorruptRecord)
		}
		if n > 0 {
			rec.LeaseLeft = time.Duration(n) * time.Millisecond
		}
		n = 0
	} else { // a recovery point: fence, the fingerprint it belongs to
		d := wire.Decoder{B: f[1]}
		rec = &Record{Fingerprint: d.String()}
		if d.Err != nil || n < 0 || f[2] == "" {
			return 0, nil, fmt.Errorf("%w: recovery point", errCorruptRecord)
		}
	}
	rec.RecoveryPoint = f[2]
	if f[3] != "" {
		rec.RecoveryData = []byte(f[3])
	}
	return uint64(n), rec, nil
}

// redisRecoverySuffix names the hash that keeps a key's recovery point,
// after the record's own key, hash tag included.
const redisRecoverySuffix = ":recovery"

// Checkpoint implements [Checkpointer] in one round trip.
func (s *RedisStore) Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error {
	if ttl <= 0 {
		return fmt.Errorf("idempotency: recovery point TTL %v is not positive", ttl)
	}
	if token == "" {
		return ErrLeaseLost
	}
	c := newScriptCall(redisCheckpoint, false, false)
	c.keys(s, key, redisRecoverySuffix)
	c.ownerArg(token)
	c.str(point)
	c.str(string(data))
	c.int(milliseconds(ttl))
	return s.runOwned(ctx, "checkpoint", c)
}

// Get implements [Inspector] in one round trip.
func (s *RedisStore) Get(ctx context.Context, key string) (*Record, error) {
	c := newScriptCall(redisGet, true, false)
	c.keys(s, key, redisRecoverySuffix)
	reply, err := s.run(ctx, c, 0)
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	var rec *Record
	if err == nil {
		_, rec, err = decodeRedisReply(reply.str)
	}
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
	if token == "" {
		return ErrLeaseLost
	}
	c := newScriptCall(redisExtend, false, false)
	c.keys(s, key)
	c.ownerArg(token)
	c.int(milliseconds(lease))
	return s.runOwned(ctx, "extend", c)
}

// Complete implements [Store].
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := validateCompletion(rec, ttl); err != nil {
		return err
	}
	if token == "" {
		return ErrLeaseLost
	}
	c := newScriptCall(redisComplete[s.publish], false, s.waitReplicas > 0)
	c.keys(s, key, redisRecoverySuffix)
	start := len(c.buf)
	c.buf = appendRecord(c.buf, rec, token)
	c.spanArg(start, len(c.buf))
	c.int(milliseconds(ttl))
	return s.runOwned(ctx, "complete", c)
}

// Release implements [Store] in one round trip. A key that nothing holds
// (no value under it: free, suspended or the caller's lapsed claim) is
// released already: the call succeeds and changes nothing. The call has
// an ID of its own, which the release leaves beside the record for a
// minute, so that go-redis re-sending it after its reply was lost
// succeeds also when another claim took the key in between.
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	if token == "" {
		return ErrLeaseLost
	}
	c := newScriptCall(redisRelease, false, false)
	c.keys(s, key, redisReleasedSuffix)
	c.ownerArg(token)
	c.str(s.publish)
	c.str(rand.Text())
	c.int(milliseconds(redisReleaseMemory))
	return s.runOwned(ctx, "release", c)
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
	c := newScriptCall(redisFail, false, false)
	c.keys(s, key, redisFailuresSuffix)
	c.ownerArg(token)
	c.str(reason)
	c.int(milliseconds(ttl))
	c.str(s.publish)
	reply, err := s.run(ctx, c, writeBudget(ctx))
	switch {
	case err != nil:
		return 0, fmt.Errorf("idempotency: redis fail: %w", err)
	case reply.n == 0:
		return 0, ErrLeaseLost
	}
	return int(reply.n), nil
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
var redisRemove = newRedisScript(`
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[1] ~= '' then redis.pcall(ARGV[1], KEYS[1], 'r') end
return n`)

// redisPublishing returns a script for each publish command a store may
// use (see RedisStore.publish): src with PUBLISH(channel, message)
// replaced by a pcall of it, or by nothing for "".
func redisPublishing(src string) map[string]*redisScript {
	scripts := make(map[string]*redisScript, 3)
	for _, command := range []string{"", "publish", "spublish"} {
		call := ""
		if command != "" {
			call = "redis.pcall('" + command + "', "
		}
		body := src
		for {
			at := strings.Index(body, "PUBLISH(")
			if at < 0 {
				break
			}
			end := at + strings.IndexByte(body[at:], ')') + 1
			if call == "" {
				body = body[:at] + body[end:]
			} else {
				body = body[:at] + call + body[at+len("PUBLISH("):]
			}
		}
		scripts[command] = newRedisScript(body)
	}
	return scripts
}

// Remove implements [Inspector] in one round trip.
func (s *RedisStore) Remove(ctx context.Context, key string) error {
	c := newScriptCall(redisRemove, false, false)
	c.keys(s, key, redisRecoverySuffix, redisFailuresSuffix)
	c.str(s.publish)
	if _, err := s.run(ctx, c, 0); err != nil {
		return fmt.Errorf("idempotency: redis remove: %w", err)
	}
	return nil
}

// redisFailuresSuffix names the hash that counts a key's failed attempts,
// after the record's own key, hash tag included.
const redisFailuresSuffix = ":failures"

// runOwned runs an owner-checked write script, which answers 1 (done) or
// 0 (the token does not own the key).
func (s *RedisStore) runOwned(ctx context.Context, op string, c *scriptCall) error {
	reply, err := s.run(ctx, c, writeBudget(ctx))
	switch {
	case err != nil:
		return fmt.Errorf("idempotency: redis %s: %w", op, err)
	case reply.n == 0:
		return ErrLeaseLost
	case reply.n == 1:
		return nil
	default:
		return fmt.Errorf("idempotency: redis %s: unexpected reply %d", op, reply.n)
	}
}

// redisScript is a script with the arguments that name it, boxed once,
// so that no call boxes them again.
type redisScript struct {
	*redis.Script
	sha, src any
}

func newRedisScript(src string) *redisScript {
	script := redis.NewScript(src)
	return &redisScript{Script: script, sha: script.Hash(), src: src}
}

// The command names, boxed once.
var (
	argEvalSha any = "evalsha"
	argEval    any = "eval"
)

// scriptCall is one call of a script: its keys and arguments, and the
// command's argument list, which points at them. A pointer boxes without
// allocating, and go-redis writes a *string, an *int64 or an
// encoding.BinaryMarshaler (a *bytesArg: the keys and encoded arguments,
// cut from buf, which starts in the call's own space) as what it stands
// for, so that a call costs one allocation for all of them.
type scriptCall struct {
	script *redisScript
	str1   bool // the script answers a string, else an integer
	wait   bool // WAIT for replicas in the same round trip
	nkeys  int
	parts  [6]bytesArg
	strs   [3]string
	ints   [2]int64
	nparts int
	nstr   int
	nint   int
	args   [3 + 3 + 6]any
	n      int

	buf   []byte
	space [512]byte
}

// bytesArg is a key or an argument: the bytes from start to end of its
// call's buf, which may move while the call is built.
type bytesArg struct {
	call       *scriptCall
	start, end int
}

// MarshalBinary is how go-redis writes it.
func (a *bytesArg) MarshalBinary() ([]byte, error) { return a.call.buf[a.start:a.end], nil }

// String is how go-redis reads a key to route the command on a Cluster.
func (a *bytesArg) String() string { return string(a.call.buf[a.start:a.end]) }

func newScriptCall(script *redisScript, str, wait bool) *scriptCall {
	c := &scriptCall{script: script, str1: str, wait: wait, n: 3}
	c.buf = c.space[:0]
	return c
}

// keys sets the keys: the record's, mapped from the record key by s, then
// the record's followed by each suffix, or the counter of the record's
// hash tag for fenceSuffix (same tag, so the same slot on a Cluster).
// They come before any argument.
func (c *scriptCall) keys(s *RedisStore, key string, suffixes ...string) {
	c.buf = s.appendRedisKey(c.buf, key)
	n := len(c.buf)
	c.spanArg(0, n)
	for _, suffix := range suffixes {
		start := len(c.buf)
		if suffix == fenceSuffix {
			c.buf = append(c.buf, c.buf[:bytes.IndexByte(c.buf, '}')+1]...)
			c.buf = append(c.buf, "fence"...)
		} else {
			c.buf = append(append(c.buf, c.buf[:n]...), suffix...)
		}
		c.spanArg(start, len(c.buf))
	}
	c.nkeys = 1 + len(suffixes)
	c.args[2] = c.nkeys
}

// fenceSuffix in scriptCall.keys stands for the fence counter of the
// record's hash tag (see fenceKey).
const fenceSuffix = "\x00fence"

// spanArg adds the next key or argument: buf from start to end.
func (c *scriptCall) spanArg(start, end int) {
	c.parts[c.nparts] = bytesArg{call: c, start: start, end: end}
	c.args[c.n] = &c.parts[c.nparts]
	c.nparts++
	c.n++
}

// ownerArg adds the next argument: the owner prefix of token.
func (c *scriptCall) ownerArg(token string) {
	start := len(c.buf)
	c.buf = appendTokenPrefix(c.buf, stateInFlight, token)
	c.spanArg(start, len(c.buf))
}

func (c *scriptCall) str(v string) {
	c.strs[c.nstr] = v
	c.args[c.n] = &c.strs[c.nstr]
	c.nstr++
	c.n++
}

func (c *scriptCall) int(v int64) {
	c.ints[c.nint] = v
	c.args[c.n] = &c.ints[c.nint]
	c.nint++
	c.n++
}

// key returns the record's key.
func (c *scriptCall) key() string { return c.parts[0].String() }

// scriptReply is a script's answer: str for the scripts that answer a
// string, n for those that answer an integer.
type scriptReply struct {
	str string
	n   int64
}

// run runs c by ctx's deadline, or extra later (room for a write's
// fallback, see eval): inline when the client honours deadlines, else in
// a goroutine (see call).
func (s *RedisStore) run(ctx context.Context, c *scriptCall, extra time.Duration) (scriptReply, error) {
	if s.honoursDeadlines || ctx.Done() == nil {
		return s.eval(ctx, c, extra)
	}
	var reply scriptReply
	err := s.call(ctx, extra, func(ctx context.Context) error {
		var err error
		reply, err = s.eval(ctx, c, extra)
		return err
	})
	if err != nil {
		return scriptReply{}, err
	}
	return reply, nil
}

// call runs op by ctx's deadline, or extra later: inline when the client
// honours deadlines, else in a goroutine that is left to finish on its
// own when that time comes (op then writes results nobody reads).
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

// eval runs c's script by its SHA and, if the server has lost it, by its
// body, then within fallback (when positive) instead of ctx's deadline.
func (s *RedisStore) eval(ctx context.Context, c *scriptCall, fallback time.Duration) (scriptReply, error) {
	reply, err := s.evalOnce(ctx, c, false)
	if err == nil || !redis.HasErrorPrefix(err, "NOSCRIPT") {
		return reply, err
	}
	if fallback > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), fallback)
		defer cancel()
	}
	return s.evalOnce(ctx, c, true)
}

// cmdProcessor is what every go-redis client and pipeline has, through
// which the store sends its own commands.
type cmdProcessor interface {
	Process(ctx context.Context, cmd redis.Cmder) error
}

// evalOnce sends EVALSHA, or EVAL with body. With c.wait, WAIT goes in
// the same pipeline and its count is checked.
func (s *RedisStore) evalOnce(ctx context.Context, c *scriptCall, body bool) (scriptReply, error) {
	proc, ok := s.client.(cmdProcessor)
	if !ok {
		return s.evalScripter(ctx, c, body)
	}
	if body {
		c.args[0], c.args[1] = argEval, c.script.src
	} else {
		c.args[0], c.args[1] = argEvalSha, c.script.sha
	}
	var pipe redis.Pipeliner
	if c.wait {
		var err error
		if pipe, err = s.pipeline(ctx, c.key()); err != nil {
			return scriptReply{}, err
		}
		proc = pipe
	}
	var cmd redis.Cmder
	var strCmd *redis.StringCmd
	var intCmd *redis.IntCmd
	if c.str1 {
		strCmd = redis.NewStringCmd(ctx, c.args[:c.n]...)
		strCmd.SetFirstKeyPos(3)
		cmd = strCmd
	} else {
		intCmd = redis.NewIntCmd(ctx, c.args[:c.n]...)
		intCmd.SetFirstKeyPos(3)
		cmd = intCmd
	}
	_ = proc.Process(ctx, cmd) // the error is the command's, read below
	if pipe != nil {
		if err := s.waitFor(ctx, pipe); err != nil {
			return scriptReply{}, err
		}
	}
	if c.str1 {
		str, err := strCmd.Result()
		return scriptReply{str: str}, err
	}
	n, err := intCmd.Result()
	return scriptReply{n: n}, err
}

// waitFor adds WAIT to pipe after the write in it, sends both, and checks
// the count of replicas, unless the write failed.
func (s *RedisStore) waitFor(ctx context.Context, pipe redis.Pipeliner) error {
	waitCmd := pipe.Do(ctx, "wait", s.waitReplicas, milliseconds(s.waitTimeout))
	cmds, _ := pipe.Exec(ctx) // each command's result is checked
	if len(cmds) == 0 || cmds[0].Err() != nil {
		return nil // the write's own error is its caller's to read
	}
	n, err := waitCmd.Int64()
	switch {
	case err != nil:
		return fmt.Errorf("wait: %w", err)
	case n < int64(s.waitReplicas):
		return fmt.Errorf("acknowledged by %d of %d replicas within %v", n, s.waitReplicas, s.waitTimeout)
	}
	return nil
}

// evalScripter runs c through the Scripter methods, for a client that
// is not one of go-redis' own.
func (s *RedisStore) evalScripter(ctx context.Context, c *scriptCall, body bool) (scriptReply, error) {
	keys := make([]string, c.nkeys)
	for i := range keys {
		keys[i] = c.parts[i].String()
	}
	args := make([]any, 0, c.n-3-c.nkeys)
	for _, arg := range c.args[3+c.nkeys : c.n] {
		switch v := arg.(type) {
		case *bytesArg:
			args = append(args, v.String())
		case *string:
			args = append(args, *v)
		case *int64:
			args = append(args, *v)
		}
	}
	var cmd *redis.Cmd
	if body {
		cmd = c.script.Eval(ctx, s.client, keys, args...)
	} else {
		cmd = c.script.EvalSha(ctx, s.client, keys, args...)
	}
	reply, err := cmd.Result()
	if err != nil {
		return scriptReply{}, err
	}
	switch v := reply.(type) {
	case string:
		return scriptReply{str: v}, nil
	case int64:
		if c.str1 {
			return scriptReply{str: strconv.FormatInt(v, 10)}, nil
		}
		return scriptReply{n: v}, nil
	}
	return scriptReply{}, fmt.Errorf("unexpected reply %T", reply)
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
