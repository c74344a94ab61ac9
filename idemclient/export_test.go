package idemclient

import (
	"context"
	"time"
)

// WithClock replaces the transport's clock and its sleep between
// attempts, so tests run without waiting.
func WithClock(now func() time.Time, sleep func(ctx context.Context, d time.Duration) error) Option {
	return func(c *config) error {
		c.now, c.sleep = now, sleep
		return nil
	}
}

// WithJitter replaces the random source of the backoff: fn(n) must return
// a value in [0, n).
func WithJitter(fn func(n int64) int64) Option {
	return func(c *config) error {
		c.jitter = fn
		return nil
	}
}
