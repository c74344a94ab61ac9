package idempotency_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/seed70ea8305/idempotency"
)

func FuzzParseKey(f *testing.F) {
	for _, seed := range []string{
		"abc", `"abc"`, `"a\"b\\c"`, "", `""`, `"`, `"abc`, `"ab"c`, "a,b", "a b",
		"8e03978e-40d5-43e8-bc93-6894a57f9324", strings.Repeat("k", 256), "clé", "\x00", `"\`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, value string) {
		key, err := idempotency.ParseKey(value)
		if err != nil {
			return
		}
		if len(key) == 0 || len(key) > idempotency.MaxKeyLength {
			t.Fatalf("ParseKey(%q) = %q: length %d out of range", value, key, len(key))
		}
		for i := 0; i < len(key); i++ {
			if key[i] < 0x20 || key[i] > 0x7e {
				t.Fatalf("ParseKey(%q) = %q: byte %#x not printable ASCII", value, key, key[i])
			}
		}
		// The sf-string form of a key names the same key.
		quoted := `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(key) + `"`
		again, err := idempotency.ParseKey(quoted)
		if err != nil || again != key {
			t.Fatalf("ParseKey(%q) = %q, %v; want %q", quoted, again, err, key)
		}
	})
}

func FuzzFingerprint(f *testing.F) {
	f.Add("POST", "/venues", "a=1&b=2", "application/json", "acct_1", []byte(`{"name":"Hall","n":[1,2.0]}`))
	f.Add("PATCH", "/venues/%7Bid%7D", "", "application/merge-patch+json", "", []byte(`{"b":{},"a":null}`))
	f.Add("POST", "/", "%zz", "text/plain", "x", []byte("not json"))
	f.Add("POST", "/", "", "application/json", "", []byte(`{"a":1} trailing`))
	f.Fuzz(func(t *testing.T, method, path, query, contentType, account string, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		r.Method = method
		r.URL.Path, r.URL.RawPath, r.URL.RawQuery = path, "", query
		r.Header.Set("Content-Type", contentType)
		r.Header.Set("Stripe-Account", account)
		for _, fp := range []idempotency.Fingerprinter{
			{},
			{Headers: []string{"stripe-account", "Stripe-Account"}, CanonicalJSON: true},
		} {
			a, errA := fp.Fingerprint(r, body)
			b, errB := fp.Fingerprint(r, append([]byte(nil), body...))
			if a != b || (errA == nil) != (errB == nil) {
				t.Fatalf("not deterministic: %q %v / %q %v", a, errA, b, errB)
			}
			if errA != nil {
				continue
			}
			if len(a) != 64 {
				t.Fatalf("fingerprint %q is not 64 hex digits", a)
			}
			if _, err := strconv.ParseUint(a[:16], 16, 64); err != nil {
				t.Fatalf("fingerprint %q is not hex", a)
			}
		}
	})
}
