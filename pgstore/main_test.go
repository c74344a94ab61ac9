package pgstore_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every pool
// (and its health checker), proxy and cleanup loop must have stopped.
// Except the 500 ms nap that pgxpool takes, in a goroutine of its own that
// Close does not stop, before a health check after it destroyed a broken
// connection: a test that ends with one (TestTxCheckUnprepared) would
// otherwise fail the run.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).triggerHealthCheck.func1"))
}
