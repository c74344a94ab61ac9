package idempotency_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: lease
// renewers, store calls given up on, proxies, servers and clients must all
// have stopped once every test (error paths included) has finished.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
