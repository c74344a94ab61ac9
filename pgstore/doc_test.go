package pgstore_test

import (
	"testing"

	"github.com/seed70ea8305/idempotency/pgstore/internal/doctest"
)

// TestDocSnippets: the package documentation's code compiles, in
// example_test.go.
func TestDocSnippets(t *testing.T) { doctest.Check(t, ".") }
