package main

// TestWalkthrough runs the walk-through (docs/walkthrough.md), its
// commands exactly as printed there, against the built binary, and checks
// what the page says each one shows.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// walkStep is one command of the walk-through and what it must print.
type walkStep struct {
	cmd     string   // as in the README; the service is at localhost:8080
	want    []string // regular expressions the output must match
	notWant []string // regular expressions it must not match
	check   func(t *testing.T, out string)
}

// walkSession is one run of the service and the commands sent to it.
type walkSession struct {
	start string // the README's command that starts the service
	steps []walkStep
}

const (
	status201   = `(?m)^HTTP/1\.1 201 `
	replayed    = `(?mi)^X-Idempotent-Replayed: true\r?$`
	problemJSON = `(?mi)^Content-Type: application/problem\+json\r?$`
)

var walkthrough = []walkSession{
	{start: "go run ./examples/venue-service", steps: []walkStep{
		{cmd: `curl -i -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' -H 'Idempotency-Key: venue-1' \
  -H 'Content-Type: application/json' -d '{"name":"Concert Hall","slug":"concert-hall"}'`,
			want: []string{status201, `"slug":"concert-hall"`, `"tenant":"tenant-a"`}, notWant: []string{replayed}},
		{cmd: `curl -i -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' -H 'Idempotency-Key: venue-1' \
  -H 'Content-Type: application/json' -d '{ "slug": "concert-hall", "name": "Concert Hall" }'`,
			want: []string{status201, replayed}},
		{cmd: `curl -i -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' -H 'Idempotency-Key: venue-1' \
  -H 'Content-Type: application/json' -d '{"name":"Other","slug":"other"}'`,
			want: []string{`(?m)^HTTP/1\.1 422 `, problemJSON}},
		{cmd: `curl -i -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-b' -H 'Idempotency-Key: venue-1' \
  -H 'Content-Type: application/json' -d '{"name":"Barn","slug":"barn"}'`,
			want: []string{status201, `"tenant":"tenant-b"`}, notWant: []string{replayed}},
		{cmd: `curl -i -X POST localhost:8080/venues -H 'X-Tenant-ID: tenant-a' -H 'Idempotency-Key: venue-9' \
  -H 'Content-Type: application/json' -d '{"name":"Club","slug":"club"}'`,
			want: []string{`(?m)^HTTP/1\.1 401 `, problemJSON}},
		{cmd: `curl -s localhost:8080/stats`,
			want: []string{`^\{"partner_events_processed":0,"stripe_accounts_created":2,"venues_created":2,"webhook_attempts_failed":0,"webhook_events_duplicate":0,"webhook_events_processed":0\}\n$`}},
		{cmd: `curl -s localhost:8080/metrics | grep idempotency_requests_total`,
			want: []string{`idempotency_requests_total\{[^}]*outcome="executed"[^}]*\} 2\n`,
				`idempotency_requests_total\{[^}]*outcome="replayed"[^}]*\} 1\n`,
				`idempotency_requests_total\{[^}]*outcome="mismatch"[^}]*\} 1\n`}},

		{cmd: `ACCT=$(curl -s 'localhost:8080/venues?slug=concert-hall' -H 'Authorization: Bearer dev-key-a' \
  | grep -o '"stripe_account_id":"[^"]*"' | cut -d'"' -f4)`},
		{cmd: `echo "$ACCT"    # acct_...`, want: []string{`^acct_[0-9A-Za-z]+\n$`}},
		{cmd: `EVENT='{"id":"evt_1","object":"event","type":"account.updated","api_version":"2023-10-16","data":{"object":{"id":"'"$ACCT"'","object":"account","charges_enabled":true}}}'`},
		{cmd: `SIG=$(printf '%s' "$EVENT" | go run ./examples/venue-service sign)`},
		{cmd: `curl -i -X POST localhost:8080/webhooks/stripe -H "Stripe-Signature: $SIG" -d "$EVENT"   # 200: processed`,
			want: []string{`(?m)^HTTP/1\.1 200 `, `\{"received":true\}`}, notWant: []string{replayed}},
		{cmd: `curl -i -X POST localhost:8080/webhooks/stripe -H "Stripe-Signature: $SIG" -d "$EVENT"   # 200, X-Idempotent-Replayed: true`,
			want: []string{`(?m)^HTTP/1\.1 200 `, replayed}},
		{cmd: `curl -s 'localhost:8080/venues?slug=concert-hall' -H 'Authorization: Bearer dev-key-a'   # "charges_enabled":true`,
			want: []string{`"slug":"concert-hall"`, `"charges_enabled":true`}},
		{cmd: `curl -s localhost:8080/stats   # "webhook_events_duplicate":1,"webhook_events_processed":1`,
			want: []string{`"webhook_events_duplicate":1,"webhook_events_processed":1\}`}},
	}},
	{start: "FAKE_STRIPE_LATENCY=2s go run ./examples/venue-service", steps: []walkStep{
		{cmd: `for i in 1 2 3 4 5; do
  curl -s -o /dev/null -w '%{http_code}\n' -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
    -H 'Prefer: wait=0' -H 'Idempotency-Key: venue-2' -H 'Content-Type: application/json' -d '{"name":"Arena","slug":"arena"}' &
done; wait    # one 201, four 409`,
			check: func(t *testing.T, out string) {
				assert.Equal(t, 1, strings.Count(out, "201\n"), "one 201 in:\n%s", out)
				assert.Equal(t, 4, strings.Count(out, "409\n"), "four 409 in:\n%s", out)
			}},
		{cmd: `for i in 1 2 3 4 5; do
  curl -s -o /dev/null -w '%{http_code}\n' -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
    -H 'Idempotency-Key: venue-4' -H 'Content-Type: application/json' -d '{"name":"Dome","slug":"dome"}' &
done; wait    # five 201: one execution, four duplicates that waited for it`,
			check: func(t *testing.T, out string) {
				assert.Equal(t, 5, strings.Count(out, "201\n"), "five 201 in:\n%s", out)
			}},
		{cmd: `curl -s localhost:8080/stats   # "stripe_accounts_created":2,"venues_created":2`,
			want: []string{`"stripe_accounts_created":2,"venues_created":2`}},
	}},
	{start: "CHAOS_FAIL_AFTER_STRIPE=1 go run ./examples/venue-service", steps: []walkStep{
		{cmd: `curl -s -o /dev/null -w '%{http_code}\n' -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
  -H 'Idempotency-Key: venue-3' -H 'Content-Type: application/json' -d '{"name":"Club","slug":"club"}'   # 500`,
			want: []string{`^500\n$`}},
		{cmd: `curl -s -o /dev/null -w '%{http_code}\n' -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
  -H 'Idempotency-Key: venue-3' -H 'Content-Type: application/json' -d '{"name":"Club","slug":"club"}'   # 201`,
			want: []string{`^201\n$`}},
		{cmd: `curl -s localhost:8080/stats    # "stripe_accounts_created":1,"venues_created":1`,
			want: []string{`"stripe_accounts_created":1,"venues_created":1,`}},
	}},
	{start: "CHAOS_CRASH_AFTER=account_created go run ./examples/venue-service", steps: []walkStep{
		{cmd: `curl -s -o /dev/null -w '%{http_code}\n' -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
  -H 'Idempotency-Key: venue-5' -H 'Content-Type: application/json' -d '{"name":"Hall","slug":"hall"}'   # 000: no answer`,
			want: []string{`^000\n$`}},
		{cmd: `curl -s 'localhost:8080/venues?slug=hall' -H 'Authorization: Bearer dev-key-a'   # "status":"pending", with its account`,
			want: []string{`"status":"pending"`, `"stripe_account_id":"acct_`}},
		{cmd: `curl -s -X POST localhost:8080/venues -H 'Authorization: Bearer dev-key-a' \
  -H 'Idempotency-Key: venue-5' -H 'Content-Type: application/json' -d '{"name":"Hall","slug":"hall"}'   # "status":"active"`,
			want: []string{`"slug":"hall"`, `"status":"active"`}},
		{cmd: `curl -s localhost:8080/stats    # "stripe_accounts_created":1,"venues_created":1`,
			want: []string{`"stripe_accounts_created":1,"venues_created":1,`}},
	}},
}

func TestWalkthrough(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not on PATH")
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not on PATH")
	}
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	for i, session := range walkthrough {
		env, ok := strings.CutSuffix(session.start, "go run ./examples/venue-service")
		require.True(t, ok, session.start)
		p := start(t, strings.Fields(env)...)
		addr := strings.TrimPrefix(p.url, "http://")

		// One shell for the session, so variables carry from step to step;
		// a marker after each step splits the output.
		var script strings.Builder
		for j, step := range session.steps {
			cmd := strings.ReplaceAll(step.cmd, "localhost:8080", addr)
			cmd = strings.ReplaceAll(cmd, "go run ./examples/venue-service", binary)
			fmt.Fprintf(&script, "%s\necho '@@@ step %d done'\n", cmd, j)
		}
		sh := exec.Command(bash, "-c", script.String())
		sh.Dir = root
		sh.Env = os.Environ()
		out, err := sh.CombinedOutput()
		require.NoError(t, err, "session %d:\n%s", i, out)
		parts := regexp.MustCompile(`@@@ step \d+ done\n`).Split(string(out), -1)
		require.Len(t, parts, len(session.steps)+1, "%s", out)
		for j, step := range session.steps {
			got := parts[j]
			for _, re := range step.want {
				assert.Regexp(t, re, got, "session %d step %d:\n%s", i, j, step.cmd)
			}
			for _, re := range step.notWant {
				assert.NotRegexp(t, re, got, "session %d step %d:\n%s", i, j, step.cmd)
			}
			if step.check != nil {
				step.check(t, got)
			}
		}
		p.stop()
	}
}

// TestWalkthroughIsTheREADMEs: every command TestWalkthrough runs is in the
// walk-through the README links to (docs/walkthrough.md), verbatim. It
// skips until the walk-through shows the authenticated service.
func TestWalkthroughIsTheREADMEs(t *testing.T) {
	readme, err := os.ReadFile("../../docs/walkthrough.md")
	require.NoError(t, err)
	if !strings.Contains(string(readme), "Authorization: Bearer dev-key-a") {
		t.Skip("docs/walkthrough.md does not show the authenticated walk-through yet")
	}
	for _, session := range walkthrough {
		assert.Contains(t, string(readme), session.start)
		for _, step := range session.steps {
			assert.Contains(t, string(readme), step.cmd)
		}
	}
}
