package idempotency

import (
	"strconv"
	"testing"
	"time"
)

// FuzzPreferWait feeds arbitrary Prefer header values to the parser: it
// never panics, a wait it accepts is whole seconds, and waitFor never
// grants more than its limit.
func FuzzPreferWait(f *testing.F) {
	for _, v := range []string{"wait=5", "respond-async, wait=10", `wait="3"`, "WAIT = 2; foo=bar", "wait=-1", "wait=", "handling=lenient", "wait=99999999999", ",,;=", ""} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, value string) {
		d, ok := preferWait([]string{value})
		if ok && (d < 0 || d%time.Second != 0) {
			t.Fatalf("preferWait(%q) = %v", value, d)
		}
		const limit = 10 * time.Second
		if got := waitFor(map[string][]string{"Prefer": {value}}, limit); got < 0 || got > limit {
			t.Fatalf("waitFor(%q) = %v, limit %v", value, got, limit)
		}
		if n, err := strconv.ParseUint(value, 10, 32); err == nil {
			if d, ok := preferWait([]string{"wait=" + value}); !ok || d != time.Duration(n)*time.Second {
				t.Fatalf("wait=%s parsed as %v, %v", value, d, ok)
			}
		}
	})
}
