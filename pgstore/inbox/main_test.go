package inbox_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every pool
// (and its health checker), proxy and cleanup loop must have stopped.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
