package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// The benchmarks' own metrics and the standard ones are read from go
// test's output, one entry per -count run.
func TestParseBench(t *testing.T) {
	out := `goos: linux
BenchmarkMemoryOverhead-2   	   20000	     30123 ns/op	         9.870 bare-µs	        10.51 first-over-bare-µs	         2.820 replay-over-bare-µs	    4567 B/op	      60 allocs/op
BenchmarkMemoryOverhead-2   	   20000	     30000 ns/op	         9.000 bare-µs	        10.00 first-over-bare-µs	         3.000 replay-over-bare-µs	    4567 B/op	      60 allocs/op
BenchmarkMemory/first-parallel-2         	   20000	     10920 ns/op	    3000 B/op	      38 allocs/op
PASS
`
	res := parseBench(out)
	if got := of(res, "BenchmarkMemoryOverhead", "first-over-bare-µs"); len(got) != 2 || got[0] != 10.51 || got[1] != 10 {
		t.Errorf("first-over-bare-µs = %v", got)
	}
	if got := of(res, "BenchmarkMemory/first-parallel", "allocs/op"); len(got) != 1 || got[0] != 38 {
		t.Errorf("allocs = %v", got)
	}
	bare := of(res, "BenchmarkMemoryOverhead", "bare-µs")
	if got := zip(bare, of(res, "BenchmarkMemoryOverhead", "first-over-bare-µs"), plus).format(2, " µs"); got != "19.69 µs (19.00–20.38)" {
		t.Errorf("range = %q", got)
	}
	if got := (series{}).format(1, ""); got != "—" {
		t.Errorf("empty series = %q", got)
	}
}

// pgstore/inbox's result lines are picked out of go test -v's output.
func TestInboxFigureLine(t *testing.T) {
	out := `=== RUN   TestFiguresAckFloor
    figures_test.go:201: acknowledgement: inbox 1.2ms; floor, primary key alone 1ms (inbox 1.20 × it)
--- PASS: TestFiguresAckFloor (3.00s)
=== RUN   TestFiguresWorkerFloor
    figures_test.go:257: one worker 148 events/s, raw claim-and-complete loop 156 events/s: 0.95 × the loop
--- PASS: TestFiguresWorkerFloor (9.00s)
`
	m := inboxFigureLine.FindAllStringSubmatch(out, -1)
	if len(m) != 2 || m[0][1] != "acknowledgement: inbox 1.2ms; floor, primary key alone 1ms (inbox 1.20 × it)" ||
		!strings.HasPrefix(m[1][1], "one worker 148 events/s") {
		t.Errorf("matches %q", m)
	}
}

// The model's table follows from the measured inputs: 10k requests/s of
// 1,000-byte records kept 24 h are 805 GiB, 33 primaries of 25 GiB, and
// 10 µs of CPU each need 1 primary at half a thread.
func TestCapacityModel(t *testing.T) {
	var out bytes.Buffer
	r := &report{out: &out}
	c := &costs{
		redis: &redisCosts{storeFirst: redisCost{cpuMicros: 10, bytes: 1100, recordBytes: 1000, recordUsage: 900, roundTrips: 2}},
		pg:    &pgCosts{storeFirst: pgCost{cpuMicros: 100, walBytes: 1000, rows: 2, bytes: 800, roundTrips: 2}, local: true},
		shards: []shardRun{{shards: 3, requests: 3000, elapsed: time.Second,
			keys: []float64{1000, 1000, 1000}, cpu: []float64{20000, 20000, 20000}}},
	}
	r.capacity(c)
	text := out.String()
	for _, want := range []string{
		"| 10k | 8.64e+08 | 805 GiB | 33 | 1 | 33 | memory |",
		"20.0 µs of Redis CPU per first request (the 3-shard run)",
		"| 10k | 8.64e+08 | 644 GiB | 2 | 10 MB/s | 20000 | fits one primary |",
		"| 1M | 8.64e+10 | 64373 GiB | 200 | 1000 MB/s | 2000000 | storage: more than one primary |",
		"keys 1.00–1.00 of an even share",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
}
