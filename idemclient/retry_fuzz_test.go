package idemclient

import (
	"net/http"
	"testing"
	"time"
)

// FuzzRetryAfter feeds arbitrary Retry-After values to the parser: it
// never panics and never returns a negative wait.
func FuzzRetryAfter(f *testing.F) {
	for _, v := range []string{"1", "0", "-5", "120", "Fri, 27 Nov 2026 12:00:00 GMT", "soon", "99999999999999999999", ""} {
		f.Add(v)
	}
	now := time.Date(2026, 11, 27, 11, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, value string) {
		d, ok := retryAfter(http.Header{"Retry-After": {value}}, now)
		if ok && d < 0 {
			t.Fatalf("retryAfter(%q) = %v", value, d)
		}
	})
}
