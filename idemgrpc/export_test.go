package idemgrpc

import (
	"context"
	"time"
)

// SetSleep replaces the wait between a client's attempts, so that tests
// wait for events instead of durations.
func SetSleep(c *ClientInterceptor, sleep func(ctx context.Context, d time.Duration) error) {
	c.sleep = sleep
}
