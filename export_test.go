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
	DefaultWebhookTolerance    = 300 * time.Second
	DefaultWebhookTTL          = 7 * 24 * time.Hour
	DefaultWebhookMaxBodyBytes = 64 << 10
	MaxKeyLength               = maxKeyLength
)

// NewMemoryStoreWithClock returns a MemoryStore that reads the time from
// now, so tests move time forward without sleeping.
func NewMemoryStoreWithClock(now func() time.Time) *MemoryStore {
	s := NewMemoryStore()
	s.now = now
	return s
}

// Len returns how many records the store holds, expired ones not yet
// purged included.
func (s *MemoryStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.records)
}

// WithWebhookClock makes a WebhookHandler read the time from now when it
// checks a signature's age and stamps a claim.
func WithWebhookClock(now func() time.Time) Option {
	return option("WithWebhookClock", forWebhook, func(s *settings) error {
		s.now = now
		return notNil("clock", now == nil)
	})
}

// SignWebhookPayload signs payload the way Stripe does, with stripe-go.
func SignWebhookPayload(payload []byte, secret string, t time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: t}).Header
}
