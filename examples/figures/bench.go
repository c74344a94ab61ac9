package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// benchLine is one line of `go test -bench` output: the benchmark's
// name with its -GOMAXPROCS suffix, the iterations, then value-unit pairs
// (ns/op, allocs/op, and the benchmarks' own metrics such as
// first-over-bare-µs).
var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.+)$`)

// parseBench returns every benchmark's results, in order of appearance
// (one per -count run).
func parseBench(out string) map[string][]map[string]float64 {
	res := map[string][]map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		fields := strings.Fields(m[3])
		metrics := map[string]float64{}
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				break
			}
			metrics[fields[i+1]] = v
		}
		res[m[1]] = append(res[m[1]], metrics)
	}
	return res
}

// goTest runs `go test args...` in the repository's root with extra
// environment variables, and returns its standard output. A failure
// returns the output too, for the error message.
func goTest(ctx context.Context, root string, env []string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", append([]string{"test"}, args...)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), env...)
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("go test %s: %w\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// series is one figure over the -count runs.
type series []float64

// of returns the metric unit of every run of the named benchmark.
func of(res map[string][]map[string]float64, name, unit string) series {
	var s series
	for _, m := range res[name] {
		if v, ok := m[unit]; ok {
			s = append(s, v)
		}
	}
	return s
}

// zip applies f run by run to two series of the same length (the shorter
// one's length otherwise).
func zip(a, b series, f func(a, b float64) float64) series {
	out := make(series, min(len(a), len(b)))
	for i := range out {
		out[i] = f(a[i], b[i])
	}
	return out
}

func (s series) scale(k float64) series {
	out := make(series, len(s))
	for i, v := range s {
		out[i] = v * k
	}
	return out
}

func (s series) bounds() (lo, hi float64) {
	lo, hi = s[0], s[0]
	for _, v := range s[1:] {
		lo, hi = min(lo, v), max(hi, v)
	}
	return lo, hi
}

// format prints the series as one value, or as its median and its range
// over the runs, with the given number of decimals.
func (s series) format(decimals int, suffix string) string {
	if len(s) == 0 {
		return "—"
	}
	lo, hi := s.bounds()
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', decimals, 64) }
	if f(lo) == f(hi) {
		return f(lo) + suffix
	}
	return f(s.median()) + suffix + " (" + f(lo) + "–" + f(hi) + ")"
}

func (s series) median() float64 {
	c := slices.Clone(s)
	slices.Sort(c)
	if len(c)%2 == 1 {
		return c[len(c)/2]
	}
	return (c[len(c)/2-1] + c[len(c)/2]) / 2
}

func plus(a, b float64) float64  { return a + b }
func minus(a, b float64) float64 { return a - b }
func ratio(a, b float64) float64 { return a / b }
