package transporttest_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency/internal/transporttest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestHTTP plays the table against the middleware itself: the reference
// every other transport is held to.
func TestHTTP(t *testing.T) { transporttest.Run(t, transporttest.HTTP) }
