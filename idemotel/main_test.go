package idemotel_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: lease
// renewals, store calls and background releases must all have ended.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
