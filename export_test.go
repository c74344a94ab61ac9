package idempotency

import (
	"time"

	"github.com/stripe/stripe-go/v76/webhook"
)

// What only the tests need.

// Defaults the tests compare against; the options' docs state them.
const (
	DefaultReplayHeader        = "X-Idempotent-Replayed"
	DefaultLease               = defaultLease
	DefaultStoreTimeout        = defaultStoreTimeout
	DefaultWebhookTolerance    = defaultWebhookTolerance
	DefaultWebhookTTL          = 7 * 24 * time.Hour
	DefaultWebhookMaxBodyBytes = 64 << 10
	MaxKeyLength               = maxKeyLength
)

// NewMemoryStoreWithClock returns a MemoryStore configured by opts that
// reads the time from now, as its monotonic clock and its wall clock, so
// tests move time forward without sleeping.
func NewMemoryStoreWithClock(now func() time.Time, opts ...MemoryOptions) *MemoryStore {
	return NewMemoryStoreWithClocks(now, now, opts...)
}

// NewMemoryStoreWithClocks returns a MemoryStore configured by opts whose
// monotonic clock reads the time passed since monotonic's first reading,
// and whose wall clock is wall: a test steps one without the other.
func NewMemoryStoreWithClocks(monotonic, wall func() time.Time, opts ...MemoryOptions) *MemoryStore {
	var o MemoryOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	s := NewMemoryStore(o)
	start := monotonic()
	s.clock = func() int64 { return int64(monotonic().Sub(start)) }
	s.wall = wall
	return s
}

// Len returns how many records the store holds, expired ones not yet
// purged included.
func (s *MemoryStore) Len() int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n += len(sh.records)
		sh.mu.Unlock()
	}
	return n
}

// The MemoryStore's accounting and purge constants.
const (
	MemoryEntryOverhead       = memoryEntryOverhead
	MemoryHeaderMapOverhead   = memoryHeaderMapOverhead
	MemoryHeaderValueOverhead = memoryHeaderValueOverhead
	MemoryPurgeBatch          = memoryPurgeBatch
)

// Bytes returns the bytes the store counts against its limits.
func (s *MemoryStore) Bytes() int64 { return s.bytes.Load() }

// OnPurge has f called after every purge batch, under the lock of the
// shard purged, with the expiry slots the batch took and how long it held
// the lock. The calls are serialized.
func (s *MemoryStore) OnPurge(f func(slots int, held time.Duration)) {
	s.onPurge.Store(&f)
}

// WaitPurge returns once no background purge runs.
func (s *MemoryStore) WaitPurge() {
	s.sweepMu.Lock()
	done := s.sweepDone
	s.sweepMu.Unlock()
	if done != nil {
		<-done
	}
}

// SetWebhookClock makes h read the time from now when it verifies a
// delivery and stamps a claim.
func SetWebhookClock(h *WebhookHandler, now func() time.Time) { h.s.now = now }

// SignWebhookPayload signs payload the way Stripe does, with stripe-go.
func SignWebhookPayload(payload []byte, secret string, t time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: t}).Header
}

// Subscriptions returns the pub/sub connections the store's waiters share
// and the channels subscribed on them.
func (s *RedisStore) Subscriptions() (conns, channels int) {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	for _, hc := range s.hub.conns {
		conns++
		channels += len(hc.ready)
	}
	return conns, channels
}

// Waiters returns how many requests wait on the store's keys.
func (s *MemoryStore) Waiters() int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for _, set := range sh.waiting.byKey {
			n += len(set)
		}
		sh.mu.Unlock()
	}
	return n
}
