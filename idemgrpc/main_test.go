package idemgrpc_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: servers,
// connections, lease renewers and handlers must all have stopped.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
