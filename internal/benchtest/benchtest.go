// Package benchtest holds what the benchmarks of several packages share:
// keys made before the timer starts, and interleaved timing.
package benchtest

import (
	"strconv"
	"time"
)

// Keys returns n distinct keys starting with prefix, unique to this run,
// so that making them is not timed and runs do not collide in a store.
func Keys(prefix string, n int) []string {
	run := strconv.FormatInt(time.Now().UnixNano(), 36) + "-"
	keys := make([]string, n)
	for i := range keys {
		keys[i] = prefix + run + strconv.Itoa(i)
	}
	return keys
}

// Timed returns how long f took.
func Timed(f func()) time.Duration {
	start := time.Now()
	f()
	return time.Since(start)
}

// Micros is d in microseconds, for b.ReportMetric.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
