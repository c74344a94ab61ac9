// Command figures prints the performance tables of the README and
// docs/performance.md and the inputs of docs/capacity.md, each as a ratio
// to a floor measured in the same run, with the machine's load beside
// them. scripts/figures.sh runs it:
//
//	bash scripts/figures.sh          # the published figures (several minutes)
//	bash scripts/figures.sh -short   # every row once, briefly (CI)
//
// It runs the repository's own interleaved benchmarks (the root's
// BenchmarkMemoryOverhead and BenchmarkRedisOverhead, pgstore's
// BenchmarkPostgresOverhead) through `go test`, and measures what those
// do not: the Redis server's commands, CPU and memory per request on a
// redis-server of its own, PostgreSQL's statements, backend CPU, rows and
// WAL per request, the inbox's acknowledgement against a single INSERT,
// and the spread of keys and work over the shards of a 3- and a 6-shard
// Redis Cluster (scripts/cluster.sh). From those it prints the capacity
// table of docs/capacity.md.
//
// Servers come from the tests' variables: IDEMPOTENCY_TEST_REDIS_URL (the
// Redis benchmarks), IDEMPOTENCY_TEST_REDIS_SERVER (a redis-server binary:
// the server-side costs and the clusters), IDEMPOTENCY_TEST_DATABASE_URL
// (PostgreSQL). A row whose server is missing is skipped with a line
// saying so. It exits 1 when a measurement failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"
)

type config struct {
	root    string // the repository's root
	short   bool
	count   int       // runs of each benchmark
	bench   [3]string // -benchtime of the memory, Redis and PostgreSQL benchmarks
	n       int       // requests per server-side measurement
	shards  []int     // cluster sizes to check
	cluster time.Duration
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := realMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func realMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("figures", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg config
	fs.StringVar(&cfg.root, "root", ".", "the repository's root directory")
	fs.BoolVar(&cfg.short, "short", false, "every row once and briefly, to check that it runs (CI); the figures are not meant to be published")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "figures: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	cfg.count, cfg.bench, cfg.n, cfg.shards, cfg.cluster = 3, [3]string{"20000x", "5000x", "1000x"}, 5000, []int{3, 6}, 10*time.Second
	if cfg.short {
		cfg.count, cfg.bench, cfg.n, cfg.cluster = 1, [3]string{"200x", "200x", "100x"}, 300, time.Second
	}
	r := &report{cfg: cfg, out: stdout}
	r.header(ctx)
	r.memory(ctx)
	r.redisBench(ctx)
	r.postgresBench(ctx)
	costs := r.serverCosts(ctx)
	r.inbox(ctx)
	r.clusters(ctx, costs)
	r.capacity(costs)
	fmt.Fprintf(stdout, "\nload at the end: %s\n", loadavg())
	if len(r.failed) > 0 {
		fmt.Fprintf(stderr, "figures: failed: %s\n", strings.Join(r.failed, "; "))
		return 1
	}
	return 0
}

// report prints the sections in order and remembers what failed.
type report struct {
	cfg    config
	out    io.Writer
	failed []string
}

func (r *report) fail(section string, err error) {
	fmt.Fprintf(r.out, "FAILED: %s: %v\n", section, err)
	r.failed = append(r.failed, section)
}

func (r *report) skip(what, why string) {
	fmt.Fprintf(r.out, "skipped: %s: %s\n", what, why)
}

// section starts a section with its title and the machine's load now.
func (r *report) section(title string) {
	fmt.Fprintf(r.out, "\n## %s\n\nload: %s\n\n", title, loadavg())
}

// table prints a Markdown table.
func (r *report) table(head []string, rows [][]string) {
	fmt.Fprintf(r.out, "| %s |\n|", strings.Join(head, " | "))
	for range head {
		fmt.Fprint(r.out, "---|")
	}
	fmt.Fprintln(r.out)
	for _, row := range rows {
		fmt.Fprintf(r.out, "| %s |\n", strings.Join(row, " | "))
	}
}

func (r *report) header(ctx context.Context) {
	fmt.Fprintf(r.out, "# figures, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	commit := strings.TrimSpace(output(ctx, r.cfg.root, "git", "rev-parse", "--short", "HEAD"))
	if output(ctx, r.cfg.root, "git", "status", "--porcelain", "--untracked-files=no") != "" {
		commit += " with uncommitted changes"
	}
	fmt.Fprintf(r.out, "commit: %s\n", commit)
	fmt.Fprintf(r.out, "machine: %s, %d CPUs (nproc %s), %s %s/%s\n", cpuModel(), runtime.NumCPU(),
		strings.TrimSpace(output(ctx, r.cfg.root, "nproc")), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(r.out, "load: %s\n", loadavg())
	mode := "full"
	if r.cfg.short {
		mode = "short (checks that every row runs; not figures to publish)"
	}
	fmt.Fprintf(r.out, "mode: %s: benchmarks -count %d; %d requests per server-side measurement\n",
		mode, r.cfg.count, r.cfg.n)
}

// output runs a command and returns its standard output, empty when it
// fails: for the header's details only.
func output(ctx context.Context, dir, name string, args ...string) string {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	b, err := cmd.Output()
	if err != nil {
		return ""
	}
	return string(b)
}

// loadavg is /proc/loadavg's 1-, 5- and 15-minute load and the CPU count,
// the context every figure is printed with.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return fmt.Sprintf("unknown (%v), %d CPUs", err, runtime.NumCPU())
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return fmt.Sprintf("%s %s %s (1/5/15 min) on %d CPUs", f[0], f[1], f[2], runtime.NumCPU())
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func (r *report) note(s string) { fmt.Fprint(r.out, s) }

func itoa(n int) string { return fmt.Sprint(n) }

// join quotes the arguments that a shell would split or expand.
func join(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " ^$|()*?[]'\"") {
			a = "'" + a + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}
