package main

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The attacks, servers and Redis client must all be gone when the program
// ends; goleak catches a transport or server left behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// short keeps each test's run to about a second, -race included.
var short = []string{"-duration=300ms", "-rate=200", "-connections=8"}

func TestRunMemory(t *testing.T) {
	out := runOK(t, append(short, "-redis="))
	wantRows(t, out, "bare baseline", "memory unique", "memory replay", "memory conflict")
}

func TestRunRedis(t *testing.T) {
	u := os.Getenv("IDEMPOTENCY_TEST_REDIS_URL")
	if u == "" {
		t.Skip("IDEMPOTENCY_TEST_REDIS_URL is not set: no Redis rows tested")
	}
	out := runOK(t, append(short, "-redis="+u))
	if strings.Contains(out, "Redis rows skipped") {
		t.Fatalf("Redis at IDEMPOTENCY_TEST_REDIS_URL is unreachable:\n%s", out)
	}
	wantRows(t, out, "bare baseline", "memory unique", "memory replay", "memory conflict",
		"redis unique", "redis replay", "redis conflict")
	if !strings.Contains(out, "note: removed the run's") {
		t.Errorf("no line about removing the run's Redis keys:\n%s", out)
	}
}

func TestRunCluster(t *testing.T) {
	addrs := os.Getenv("IDEMPOTENCY_TEST_REDIS_CLUSTER")
	if addrs == "" {
		t.Skip("IDEMPOTENCY_TEST_REDIS_CLUSTER is not set: no Redis Cluster rows tested")
	}
	out := runOK(t, append(short, "-redis=", "-cluster="+addrs))
	wantRows(t, out, "bare baseline", "memory unique", "memory replay", "memory conflict",
		"cluster unique", "cluster replay", "cluster conflict")
	if !strings.Contains(out, "note: removed the run's") {
		t.Errorf("no line about removing the run's keys:\n%s", out)
	}
}

func TestRunPostgres(t *testing.T) {
	u := os.Getenv("IDEMPOTENCY_TEST_DATABASE_URL")
	if u == "" {
		t.Skip("IDEMPOTENCY_TEST_DATABASE_URL is not set: no PostgreSQL rows tested")
	}
	out := runOK(t, append(short, "-redis=", "-database="+u))
	wantRows(t, out, "bare baseline", "memory unique", "memory replay", "memory conflict",
		"postgres unique", "postgres replay", "postgres conflict")
}

// TestSaturate: the search reports, for each server, a rate it passed
// and its ratio to the bare handler's; -max-rate keeps it short, and a
// p99 bound of 10 s lets every step pass on a loaded machine.
func TestSaturate(t *testing.T) {
	out := runOK(t, append(short, "-redis=", "-saturate", "-p99=10s", "-max-rate=800"))
	var rows []string
	inTable := false
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		switch {
		case len(f) > 0 && f[0] == "server":
			inTable = true
		case inTable && (len(f) == 0 || strings.HasPrefix(line, "load at the end") || strings.HasPrefix(line, "failed steps")):
			inTable = false
		case inTable:
			rows = append(rows, f[0])
			// "bare 800/s 1.00 …" or "memory ≥ 800/s 0.50 …"
			// Every step passed: the search stopped at -max-rate.
			if len(f) < 3 || f[1] != "≥" || f[2] != "800/s" {
				t.Errorf("row %q: want ≥ 800/s", line)
			}
			if f[0] == "bare" && !strings.Contains(line, " 1.00 ") {
				t.Errorf("bare row %q: ratio to itself is not 1.00", line)
			}
		}
	}
	if strings.Join(rows, ",") != "bare,memory" {
		t.Errorf("rows %q, want bare and memory:\n%s", rows, out)
	}
	for _, want := range []string{"load: ", "bare     steps: 200✓ 400✓ 800✓\n", "memory   steps: 200✓ 400✓ 800✓\n", "-saturate -p99=10s -max-rate=800"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// TestNextRate: the search doubles until a step fails, halves while
// nothing passed, then bisects until the bounds are within 5 %.
func TestNextRate(t *testing.T) {
	for _, tc := range []struct{ lo, hi, want int }{
		{500, 0, 1000},     // doubling
		{1 << 20, 0, 0},    // past -max-rate: done
		{0, 500, 250},      // the first step failed: halving
		{0, 150, 0},        // below the fewest requests a step may send: done
		{1000, 2000, 1500}, // bisecting
		{1000, 1040, 0},    // within 5 %: done
		{1000, 1060, 1030}, // not yet
	} {
		if got := nextRate(tc.lo, tc.hi, 1<<20, 100); got != tc.want {
			t.Errorf("nextRate(%d, %d) = %d, want %d", tc.lo, tc.hi, got, tc.want)
		}
	}
}

func TestRedisUnreachable(t *testing.T) {
	// Port 1 on loopback refuses connections; the run goes on without Redis.
	out := runOK(t, append(short, "-redis=redis://127.0.0.1:1/0"))
	if !strings.Contains(out, "note: Redis rows skipped: 127.0.0.1:1 unreachable") {
		t.Errorf("no note about skipping Redis:\n%s", out)
	}
	wantRows(t, out, "bare baseline", "memory unique", "memory replay", "memory conflict")
}

// runOK runs the program with args and returns its output, failing the
// test unless every check passed.
func runOK(t *testing.T, args []string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := realMain(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit status %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{"go: go1.", "GOMAXPROCS=", "command: go run ./examples/loadtest -rate=200 -duration=300ms -connections=8"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "FAIL") {
		t.Errorf("a check failed:\n%s", out)
	}
	return out
}

// wantRows checks that the table has exactly these "server scenario" rows,
// in order, each with every request answered as expected, and a passing
// check per row.
func wantRows(t *testing.T, out string, rows ...string) {
	t.Helper()
	var got []string
	inTable := false
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		switch {
		case len(f) > 0 && f[0] == "server":
			inTable = true
		case len(f) == 0 || f[0] == "note:" || f[0] == "load":
			inTable = false
		case inTable && (f[0] == "errors" || len(f) < 10):
			t.Errorf("unexpected line in the table: %q", line)
		case inTable:
			got = append(got, f[0]+" "+f[1])
			if f[4] != "100.00%" {
				t.Errorf("row %s %s: success %s, want 100.00%%", f[0], f[1], f[4])
			}
			if f[0] == "bare" && f[8] != "1.00" {
				t.Errorf("bare row: p50×bare %s, want 1.00", f[8])
			}
		}
	}
	if strings.Join(got, ", ") != strings.Join(rows, ", ") {
		t.Errorf("table rows %q, want %q\n%s", got, rows, out)
	}
	for _, r := range rows {
		name := strings.Replace(r, " ", "/", 1)
		if !strings.Contains(out, "check "+name+" ") {
			t.Errorf("no check line for %s:\n%s", name, out)
		}
	}
	if n := strings.Count(out, "\ncheck "); n != len(rows) {
		t.Errorf("%d check lines, want %d:\n%s", n, len(rows), out)
	}
}

// The checks must be able to fail: without the middleware, "replay" and
// "conflict" run the handler for every request.
func TestChecksCatchMissingMiddleware(t *testing.T) {
	a := &app{}
	srv := httptest.NewServer(a)
	defer srv.Close()
	cfg := config{rate: 200, duration: 200 * time.Millisecond, connections: 4}
	s := server{name: "bare", url: srv.URL, app: a}
	for _, scenario := range []string{"replay", "conflict"} {
		_, ck, err := runScenario(context.Background(), cfg, s, scenario, "test")
		if err != nil {
			t.Fatalf("%s: %v", scenario, err)
		}
		if ck.ok {
			t.Errorf("%s on the bare handler passed its check: %s", scenario, ck.detail)
		}
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		code    int
		wantErr string
	}{
		{[]string{"-h"}, 0, "Usage: go run ./examples/loadtest"},
		{[]string{"-rate=abc"}, 2, `invalid value "abc" for flag -rate`},
		{[]string{"-rate=0"}, 2, "-rate 0: must be positive"},
		{[]string{"-duration=0s"}, 2, "-duration 0s: must be positive"},
		{[]string{"-duration=-1s"}, 2, "-duration -1s: must be positive"},
		{[]string{"-connections=0"}, 2, "-connections 0: must be positive"},
		{[]string{"-redis=::bad"}, 2, "-redis:"},
		{[]string{"-p99=0s"}, 2, "-p99 0s: must be positive"},
		{[]string{"-saturate", "-rate=100", "-max-rate=50"}, 2, "-max-rate 50: below -rate 100"},
		{[]string{"-database=postgres://a b"}, 2, "-database:"},
		{[]string{"-nosuchflag"}, 2, "flag provided but not defined"},
		{[]string{"extra"}, 2, `unexpected argument "extra"`},
	} {
		var stdout, stderr bytes.Buffer
		code := realMain(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.wantErr) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d, stderr containing %q", tc.args, code, stderr.String(), tc.code, tc.wantErr)
		}
		if stdout.Len() != 0 {
			t.Errorf("%q: wrote to stdout: %q", tc.args, stdout.String())
		}
	}
}
