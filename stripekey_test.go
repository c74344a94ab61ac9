package idempotency_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

var stripeKeyPattern = regexp.MustCompile(`^idem_[0-9a-f]{64}$`)

// stripeClaimContext serves one request through the middleware and returns the
// context its handler saw.
func stripeClaimContext(t *testing.T, scope, key string) context.Context {
	t.Helper()
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Scope: func(*http.Request) string { return scope }})
	require.NoError(t, err)
	var ctx context.Context
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx = r.Context()
	}))
	req := httptest.NewRequest(http.MethodPost, "/venues/42/connect", strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", key)
	h.ServeHTTP(httptest.NewRecorder(), req)
	require.NotNil(t, ctx, "the handler did not run")
	return ctx
}

func TestStripeKeyInsideARequest(t *testing.T) {
	ctx := stripeClaimContext(t, "tenant-a", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	key, err := idempotency.StripeKey(ctx, "accounts.create")
	require.NoError(t, err)
	assert.Regexp(t, stripeKeyPattern, key)
	assert.LessOrEqual(t, len(key), 255)
	assert.NotContains(t, key, "8e03978e", "the client's key must not show")
	assert.Equal(t, idempotency.StripeKeyFrom("http", "tenant-a", "8e03978e-40d5-43e8-bc93-6894a57f9324", "accounts.create"), key)

	// A retry of the request, served anew, derives the same key.
	again, err := idempotency.StripeKey(stripeClaimContext(t, "tenant-a", "8e03978e-40d5-43e8-bc93-6894a57f9324"), "accounts.create")
	require.NoError(t, err)
	assert.Equal(t, key, again)

	// Other operation, scope or client key: other Stripe key.
	others := map[string]context.Context{
		"operation": ctx,
		"scope":     stripeClaimContext(t, "tenant-b", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
		"key":       stripeClaimContext(t, "tenant-a", "another-key"),
	}
	for name, c := range others {
		op := "accounts.create"
		if name == "operation" {
			op = "transfer:1"
		}
		k, err := idempotency.StripeKey(c, op)
		require.NoError(t, err)
		assert.NotEqual(t, key, k, name)
	}
}

func TestStripeKeyOutsideARequest(t *testing.T) {
	key, err := idempotency.StripeKey(context.Background(), "accounts.create")
	assert.ErrorIs(t, err, idempotency.ErrNoClaim)
	assert.Empty(t, key)

	_, err = idempotency.StripeKey(stripeClaimContext(t, "", "k"), "")
	assert.Error(t, err)
	assert.False(t, errors.Is(err, idempotency.ErrNoClaim))
}

func TestStripeKeyFrom(t *testing.T) {
	k := idempotency.StripeKeyFrom("payout-job", "job-7", "transfer:3")
	assert.Regexp(t, stripeKeyPattern, k)
	assert.Equal(t, k, idempotency.StripeKeyFrom("payout-job", "job-7", "transfer:3"))

	distinct := [][]string{
		{},
		{""},
		{"", ""},
		{"a", "bc"},
		{"ab", "c"},
		{"abc"},
		{"a", "b", "c"},
		{"payout-job", "job-7", "transfer:3"},
		{"payout-job", "job-7", "transfer:30"},
		{"payout-job", "job-7transfer:3"},
		{"http", `"scope"`, "key", "op"},
	}
	seen := map[string][]string{}
	for _, parts := range distinct {
		key := idempotency.StripeKeyFrom(parts...)
		if prev, dup := seen[key]; dup {
			t.Errorf("StripeKeyFrom(%q) == StripeKeyFrom(%q)", parts, prev)
		}
		seen[key] = parts
		assert.Regexp(t, stripeKeyPattern, key)
	}

	long := strings.Repeat("x", 10_000)
	assert.Len(t, idempotency.StripeKeyFrom(long, long), 69)
}

func FuzzStripeKeyFrom(f *testing.F) {
	f.Add("a", "bc", uint(1))
	f.Add("ab", "c", uint(2))
	f.Add("", "", uint(0))
	f.Add("http", "\x00tenant", uint(4))
	f.Add("connect:venue-42", "1700000000000", uint(7))
	f.Fuzz(func(t *testing.T, a, b string, cut uint) {
		key := idempotency.StripeKeyFrom(a, b)
		if key != idempotency.StripeKeyFrom(a, b) {
			t.Fatal("not deterministic")
		}
		if len(key) > 255 || !stripeKeyPattern.MatchString(key) {
			t.Fatalf("bad key %q", key)
		}
		// Another split of the same bytes is another key.
		joined := a + b
		i := int(cut % uint(len(joined)+1))
		if joined[:i] != a && key == idempotency.StripeKeyFrom(joined[:i], joined[i:]) {
			t.Fatalf("(%q, %q) and (%q, %q) share a key", a, b, joined[:i], joined[i:])
		}
		if key == idempotency.StripeKeyFrom(joined) || key == idempotency.StripeKeyFrom(a, b, "") {
			t.Fatalf("(%q, %q) shares a key with a different number of parts", a, b)
		}
	})
}
