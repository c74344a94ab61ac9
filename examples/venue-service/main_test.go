package main

// End-to-end tests: build the real binary, start it on a free port, drive
// it over HTTP, stop it with SIGTERM.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/seed70ea8305/idempotency/internal/redistest"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "venue-service-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "venue-service")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building venue-service:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// process is one running venue-service.
type process struct {
	t     *testing.T
	cmd   *exec.Cmd
	url   string
	done  chan error
	stdin io.WriteCloser // what CHAOS_HOLD reads
	holds int            // the CHAOS_HOLD holds asked for

	mu     sync.Mutex
	log    bytes.Buffer
	logged chan struct{} // closed and replaced at each line of the log
}

var listeningLine = regexp.MustCompile(`msg="venue-service listening" addr=(http://\S+)`)

// start runs the binary with env added to the test's environment, on a free
// port, and waits for its startup line.
func start(t *testing.T, env ...string) *process {
	t.Helper()
	cmd := exec.Command(binary, "-addr", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &process{t: t, cmd: cmd, done: make(chan error, 1), stdin: stdin, logged: make(chan struct{})}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.log.WriteString(line + "\n")
			close(p.logged)
			p.logged = make(chan struct{})
			p.mu.Unlock()
			if m := listeningLine.FindStringSubmatch(line); m != nil {
				found <- m[1]
			}
		}
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		stdin.Close()
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("venue-service log:\n%s", p.logText())
		}
	})
	select {
	case p.url = <-found:
	case err := <-p.done:
		t.Fatalf("venue-service exited before listening: %v\n%s", err, p.logText())
	case <-time.After(20 * time.Second):
		t.Fatalf("venue-service did not start:\n%s", p.logText())
	}
	return p
}

func (p *process) logText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// awaitLog returns once the log holds text n times, and fails the test
// after a bound that only a bug reaches.
func (p *process) awaitLog(text string, n int) {
	p.t.Helper()
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	for {
		p.mu.Lock()
		seen, logged := strings.Count(p.log.String(), text), p.logged
		p.mu.Unlock()
		if seen >= n {
			return
		}
		select {
		case <-logged:
		case <-timeout.C:
			p.t.Fatalf("the log shows %q %d times, want %d:\n%s", text, seen, n, p.logText())
		}
	}
}

// hold arms CHAOS_HOLD (the process runs with it) and returns once the
// service has read the line: the next venue creation to reach its Stripe
// call waits there.
func (p *process) hold() {
	p.t.Helper()
	p.holds++
	_, err := io.WriteString(p.stdin, "hold\n")
	require.NoError(p.t, err)
	p.awaitLog("chaos: hold armed", p.holds)
}

// awaitHeld returns once the nth held creation (counting from 1) waits
// before its Stripe call.
func (p *process) awaitHeld(n int) {
	p.t.Helper()
	p.awaitLog("chaos: holding the request", n)
}

// release lets the held creation go on.
func (p *process) release() {
	p.t.Helper()
	_, err := io.WriteString(p.stdin, "release\n")
	require.NoError(p.t, err)
}

// stop sends SIGTERM and waits for a clean exit.
func (p *process) stop() {
	p.t.Helper()
	require.NoError(p.t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-p.done:
		require.NoError(p.t, err, "venue-service exits 0 on SIGTERM")
	case <-time.After(20 * time.Second):
		p.t.Fatal("venue-service did not stop")
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t *testing.T, v any) {
	t.Helper()
	require.NoError(t, json.Unmarshal(r.body, v), "body: %s", r.body)
}

// do sends a request as tenant-a (its development API key) unless header
// sets another Authorization.
func do(t *testing.T, method, url, body string, header ...string) response {
	t.Helper()
	return doBare(t, method, url, body, append([]string{"Authorization", "Bearer dev-key-a"}, header...)...)
}

func (p *process) createVenue(key, body string, header ...string) response {
	return do(p.t, http.MethodPost, p.url+"/venues", body, append([]string{"Idempotency-Key", key}, header...)...)
}

type stats struct {
	VenuesCreated          int `json:"venues_created"`
	StripeAccountsCreated  int `json:"stripe_accounts_created"`
	WebhookEventsProcessed int `json:"webhook_events_processed"`
	WebhookEventsDuplicate int `json:"webhook_events_duplicate"`
	WebhookAttemptsFailed  int `json:"webhook_attempts_failed"`
	PartnerEventsProcessed int `json:"partner_events_processed"`
}

func (p *process) stats() stats {
	var s stats
	r := do(p.t, http.MethodGet, p.url+"/stats", "")
	require.Equal(p.t, http.StatusOK, r.status)
	r.json(p.t, &s)
	return s
}

func uniqueKey() string { return "key-" + rand.Text() }

func TestHealthAndStartupLine(t *testing.T) {
	p := start(t)
	assert.Equal(t, http.StatusOK, do(t, http.MethodGet, p.url+"/healthz", "").status)
	assert.Contains(t, p.logText(), "store=memory")
	assert.Contains(t, p.logText(), "in-process fake")
	assert.Contains(t, p.logText(), "whsec_dev_secret (development default)")
	p.stop()
}

func TestCreateRetryAndMismatch(t *testing.T) {
	p := start(t)
	key := uniqueKey()
	first := p.createVenue(key, `{"name":"Concert Hall","slug":"concert-hall"}`)
	require.Equal(t, http.StatusCreated, first.status, "%s", first.body)
	var venue Venue
	first.json(t, &venue)
	assert.Equal(t, "concert-hall", venue.Slug)
	assert.True(t, strings.HasPrefix(venue.StripeAccountID, "acct_"), venue.StripeAccountID)

	// Key order and whitespace do not matter: the example fingerprints
	// canonical JSON.
	retry := p.createVenue(key, `{ "slug": "concert-hall", "name": "Concert Hall" }`)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "true", retry.header.Get("X-Idempotent-Replayed"))
	assert.Equal(t, first.body, retry.body)

	other := p.createVenue(key, `{"name":"Other","slug":"other"}`)
	assert.Equal(t, http.StatusUnprocessableEntity, other.status)
	assert.Equal(t, "application/problem+json", other.header.Get("Content-Type"))

	var list []Venue
	do(t, http.MethodGet, p.url+"/venues", "").json(t, &list)
	assert.Equal(t, []Venue{venue}, list)
	assert.Equal(t, stats{VenuesCreated: 1, StripeAccountsCreated: 1}, p.stats())
	assert.Contains(t, p.logText(), "outcome=replayed", "replays are audit-logged")
	p.stop()
}

func TestBadInput(t *testing.T) {
	p := start(t)
	for name, tc := range map[string]struct {
		key, body string
		status    int
	}{
		"missing key":    {"", `{"name":"a","slug":"a"}`, http.StatusBadRequest},
		"malformed key":  {strings.Repeat("k", 300), `{"name":"a","slug":"a"}`, http.StatusBadRequest},
		"broken JSON":    {uniqueKey(), `{"name":`, http.StatusBadRequest},
		"missing field":  {uniqueKey(), `{"name":"a"}`, http.StatusBadRequest},
		"unknown field":  {uniqueKey(), `{"name":"a","slug":"a","x":1}`, http.StatusBadRequest},
		"oversized body": {uniqueKey(), `{"name":"` + strings.Repeat("a", 2<<20) + `"}`, http.StatusRequestEntityTooLarge},
	} {
		r := p.createVenue(tc.key, tc.body)
		assert.Equal(t, tc.status, r.status, "%s: %s", name, r.body)
		assert.Equal(t, "application/problem+json", r.header.Get("Content-Type"), name)
	}
	assert.Equal(t, stats{}, p.stats(), "bad input created nothing")
	p.stop()
}

func TestSlugTakenByAnotherVenue(t *testing.T) {
	p := start(t)
	require.Equal(t, http.StatusCreated, p.createVenue(uniqueKey(), `{"name":"A","slug":"hall"}`).status)
	r := p.createVenue(uniqueKey(), `{"name":"B","slug":"hall"}`)
	assert.Equal(t, http.StatusConflict, r.status)
	assert.Contains(t, string(r.body), "Slug taken")
	p.stop()
}

func TestConcurrentDuplicates(t *testing.T) {
	p := start(t, "FAKE_STRIPE_LATENCY=300ms", "CHAOS_HOLD=1")
	// Ten at once, asking not to wait: one runs, and is held before its
	// Stripe call until the nine others are answered: 409.
	p.hold()
	key := uniqueKey()
	statuses := make(chan int, 10)
	for range 10 {
		go func() {
			statuses <- p.createVenue(key, `{"name":"Hall","slug":"hall"}`, "Prefer", "wait=0").status
		}()
	}
	p.awaitHeld(1)
	count := map[int]int{}
	for range 9 {
		count[receive(t, statuses, "a duplicate got no answer")]++
	}
	p.release()
	count[receive(t, statuses, "the held request got no answer")]++
	assert.Equal(t, map[int]int{http.StatusCreated: 1, http.StatusConflict: 9}, count)
	// Ten at once that may wait (the example waits up to 10 s): one runs,
	// nine wait for its outcome and get the replay.
	count = sendConcurrently(p, 10, `{"name":"Arena","slug":"arena"}`)
	assert.Equal(t, map[int]int{http.StatusCreated: 10}, count)
	assert.Equal(t, stats{VenuesCreated: 2, StripeAccountsCreated: 2}, p.stats())
	p.stop()
}

// sendConcurrently sends n creations with one new key at once and counts
// their statuses.
func sendConcurrently(p *process, n int, body string, header ...string) map[int]int {
	key := uniqueKey()
	var wg sync.WaitGroup
	statuses := make(chan int, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses <- p.createVenue(key, body, header...).status
		}()
	}
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for s := range statuses {
		count[s]++
	}
	return count
}

// TestChaosRetryReusesStripeAccount: the first creation fails with 500
// after Stripe created the account; the client's retry with the same key
// gets that same account back from Stripe, so there is one, not two.
func TestChaosRetryReusesStripeAccount(t *testing.T) {
	p := start(t, "CHAOS_FAIL_AFTER_STRIPE=2")
	key := uniqueKey()
	body := `{"name":"Hall","slug":"hall"}`
	assert.Equal(t, http.StatusInternalServerError, p.createVenue(key, body).status)
	assert.Equal(t, http.StatusInternalServerError, p.createVenue(key, body).status)
	r := p.createVenue(key, body)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	assert.Equal(t, stats{VenuesCreated: 1, StripeAccountsCreated: 1}, p.stats())
	p.stop()
}

func TestWebhookProcessedOnce(t *testing.T) {
	p := start(t)
	created := p.createVenue(uniqueKey(), `{"name":"Hall","slug":"hall"}`)
	require.Equal(t, http.StatusCreated, created.status)
	var venue Venue
	created.json(t, &venue)

	payload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"account.updated","api_version":%q,"created":%d,`+
		`"data":{"object":{"id":%q,"object":"account","charges_enabled":true}}}`,
		rand.Text(), stripe.APIVersion, time.Now().Unix(), venue.StripeAccountID)
	signature := signWithBinary(t, payload)
	send := func(sig string) response {
		return do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", sig)
	}
	first := send(signature)
	assert.Equal(t, http.StatusOK, first.status, "%s", first.body)
	second := send(signature)
	assert.Equal(t, http.StatusOK, second.status)
	assert.Equal(t, "true", second.header.Get("X-Idempotent-Replayed"))
	bad := send(webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: []byte(payload), Secret: "whsec_wrong", Timestamp: time.Now()}).Header)
	assert.Equal(t, http.StatusBadRequest, bad.status)
	assert.Equal(t, "application/problem+json", bad.header.Get("Content-Type"))

	var list []Venue
	do(t, http.MethodGet, p.url+"/venues", "").json(t, &list)
	require.Len(t, list, 1)
	assert.True(t, list[0].ChargesEnabled, "account.updated enabled charges on the venue")
	assert.Equal(t, stats{VenuesCreated: 1, StripeAccountsCreated: 1, WebhookEventsProcessed: 1, WebhookEventsDuplicate: 1}, p.stats())
	p.stop()
}

// signWithBinary signs payload with the binary's sign subcommand, as the
// README shows.
func signWithBinary(t *testing.T, payload string) string {
	t.Helper()
	cmd := exec.Command(binary, "sign")
	cmd.Stdin = strings.NewReader(payload)
	out, err := cmd.Output()
	require.NoError(t, err)
	return strings.TrimSpace(string(out))
}

func TestGracefulShutdownFinishesInFlight(t *testing.T) {
	// The request is held before its Stripe call until the shutdown has
	// begun, so it is in flight then however slow the machine; the Stripe
	// call's latency keeps it in flight while the server shuts down.
	p := start(t, "CHAOS_HOLD=1", "FAKE_STRIPE_LATENCY=300ms")
	p.hold()
	result := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, p.url+"/venues", strings.NewReader(`{"name":"Hall","slug":"hall"}`))
		req.Header.Set("Idempotency-Key", uniqueKey())
		req.Header.Set("Authorization", "Bearer dev-key-a")
		resp, err := http.DefaultClient.Do(req)
		assert.NoError(t, err)
		result <- resp
	}()
	p.awaitHeld(1)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	p.awaitLog("shutting down: finishing in-flight requests", 1)
	p.release()
	resp := receive(t, result, "the in-flight request got no answer")
	require.NotNil(t, resp)
	resp.Body.Close()
	assert.Equal(t, http.StatusCreated, resp.StatusCode, "the in-flight request finished")
	require.NoError(t, receive(t, p.done, "venue-service did not stop"))
	assert.Contains(t, p.logText(), "stopped cleanly")
}

// receive receives from ch, failing t after a bound that only a bug
// reaches.
func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(30 * time.Second):
		t.Fatal(what)
		var zero T
		return zero
	}
}

func TestBadConfiguration(t *testing.T) {
	for _, env := range []string{"FAKE_STRIPE_LATENCY=soon", "CHAOS_FAIL_AFTER_STRIPE=-1", "REDIS_URL=ftp://nowhere"} {
		cmd := exec.Command(binary, "-addr", "127.0.0.1:0")
		cmd.Env = append(os.Environ(), env)
		out, err := cmd.CombinedOutput()
		assert.Error(t, err, env)
		assert.NotContains(t, string(out), "listening", env)
	}
}

// redisURL returns the real Redis for the tests that need one.
func redisURL(t *testing.T) string {
	opt := redistest.Options(t) // skips when the variable is unset
	return fmt.Sprintf("redis://%s/%d", opt.Addr, opt.DB)
}

func TestTwoProcessesShareRedis(t *testing.T) {
	url := redisURL(t)
	a := start(t, "REDIS_URL="+url)
	b := start(t, "REDIS_URL="+url)
	assert.Contains(t, a.logText(), "store=\"redis ")
	key := uniqueKey()
	first := a.createVenue(key, `{"name":"Hall","slug":"hall"}`)
	require.Equal(t, http.StatusCreated, first.status)
	retry := b.createVenue(key, `{"name":"Hall","slug":"hall"}`)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "true", retry.header.Get("X-Idempotent-Replayed"), "the other instance replays the first's response")
	assert.Equal(t, first.body, retry.body)
	assert.Equal(t, 0, b.stats().VenuesCreated, "the second instance did no work")
	a.stop()
	b.stop()
}

func TestRestartStillReplays(t *testing.T) {
	url := redisURL(t)
	key := uniqueKey()
	a := start(t, "REDIS_URL="+url)
	first := a.createVenue(key, `{"name":"Hall","slug":"hall"}`)
	require.Equal(t, http.StatusCreated, first.status)
	a.stop()

	again := start(t, "REDIS_URL="+url)
	retry := again.createVenue(key, `{"name":"Hall","slug":"hall"}`)
	assert.Equal(t, "true", retry.header.Get("X-Idempotent-Replayed"))
	assert.Equal(t, first.body, retry.body)
	again.stop()
}

// metricValue returns the value of the series of name whose labels
// include every one of labels (name="value" pairs), and how many series
// matched.
func metricValue(text, name string, labels ...string) (value string, matches int) {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		end := strings.LastIndexByte(line, '}')
		if end < 0 {
			continue
		}
		set := line[len(name)+1 : end]
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(","+set+",", ","+l+",")
		}
		if ok {
			value, matches = strings.TrimSpace(line[end+1:]), matches+1
		}
	}
	return value, matches
}

// TestMetricsEndpoint: GET /metrics, in Prometheus' text format, counts
// the requests and webhook deliveries by outcome and route, and never
// shows a key, a tenant or an event ID.
func TestMetricsEndpoint(t *testing.T) {
	p := start(t)
	key, tenant := uniqueKey(), "tenant-"+rand.Text()
	venue := `{"name":"Hall","slug":"hall"}`
	require.Equal(t, http.StatusCreated, p.createVenue(key, venue, "X-Tenant-ID", tenant).status)
	for range 2 {
		assert.Equal(t, "true", p.createVenue(key, venue, "X-Tenant-ID", tenant).header.Get("X-Idempotent-Replayed"))
	}
	assert.Equal(t, http.StatusUnprocessableEntity, p.createVenue(key, `{"name":"Other","slug":"other"}`, "X-Tenant-ID", tenant).status)
	assert.Equal(t, http.StatusBadRequest, p.createVenue("", venue).status) // an empty key
	eventID := "evt_" + rand.Text()
	payload := fmt.Sprintf(`{"id":%q,"object":"event","type":"customer.created","api_version":%q,"data":{"object":{}}}`, eventID, stripe.APIVersion)
	signature := signWithBinary(t, payload)
	for range 2 {
		require.Equal(t, http.StatusOK, do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signature).status)
	}

	r := do(t, http.MethodGet, p.url+"/metrics", "")
	require.Equal(t, http.StatusOK, r.status)
	assert.Contains(t, r.header.Get("Content-Type"), "text/plain")
	text := string(r.body)

	route := `http_route="POST /venues"`
	for _, tc := range []struct {
		name   string
		labels []string
		want   string
	}{
		{"idempotency_requests_total", []string{`outcome="executed"`, route, `http_request_method="POST"`, `http_response_status_code="201"`}, "1"},
		{"idempotency_requests_total", []string{`outcome="replayed"`, route, `http_request_method="POST"`, `http_response_status_code="201"`}, "2"},
		{"idempotency_requests_total", []string{`outcome="mismatch"`, route, `error_type="fingerprint_mismatch"`}, "1"},
		{"idempotency_requests_total", []string{`outcome="rejected"`, route, `error_type="key_invalid"`}, "1"},
		{"idempotency_handler_duration_seconds_count", []string{`outcome="executed"`, route}, "1"},
		{"idempotency_webhook_deliveries_total", []string{`outcome="executed"`}, "1"},
		{"idempotency_webhook_deliveries_total", []string{`outcome="replayed"`}, "1"},
		{"idempotency_store_duration_seconds_count", []string{`operation="acquire"`, `store="memory"`}, "6"},
		{"idempotency_store_duration_seconds_count", []string{`operation="complete"`, `store="memory"`}, "2"},
	} {
		got, n := metricValue(text, tc.name, tc.labels...)
		assert.Equal(t, 1, n, "one series %s%v in:\n%s", tc.name, tc.labels, text)
		assert.Equal(t, tc.want, got, "%s%v", tc.name, tc.labels)
	}
	for _, secret := range []string{key, tenant, eventID} {
		assert.NotContains(t, text, secret, "a key, tenant or event ID in a label")
	}
	p.stop()
}

// TestMetricsPromtool lints GET /metrics with promtool check metrics, when
// promtool is on PATH (Debian: apt-get install prometheus).
func TestMetricsPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not on PATH; apt-get install -y prometheus provides it")
	}
	p := start(t)
	require.Equal(t, http.StatusCreated, p.createVenue(uniqueKey(), `{"name":"Hall","slug":"hall"}`).status)
	require.Equal(t, http.StatusBadRequest, p.createVenue("", `{"name":"Hall","slug":"hall"}`).status)
	r := do(t, http.MethodGet, p.url+"/metrics", "")
	require.Equal(t, http.StatusOK, r.status)

	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(r.body)
	out, err := cmd.CombinedOutput()
	assert.NoError(t, err, "promtool check metrics:\n%s\n/metrics:\n%s", out, r.body)
	assert.Empty(t, strings.TrimSpace(string(out)), "promtool check metrics has findings")
	p.stop()
}

// TestLogsNeverShowKeys: whatever happens (replays, a 422, 409s, failed
// webhooks, a lost lease, a store outage), the service's log names keys by
// key_hash only and never prints a raw Idempotency-Key, a request body or
// an API key.
func TestLogsNeverShowKeys(t *testing.T) {
	tr := driveTraffic(t)
	tr.p.stop()
	log := tr.p.logText()
	// The log did report the events, so their absence below means
	// something.
	for _, want := range []string{"outcome=replayed", "outcome=mismatch", "outcome=in_flight",
		"webhook processing failed", "lease lost", "store failed, request refused",
		"webhook store failed", "key_hash="} {
		assert.Contains(t, log, want)
	}
	for _, key := range tr.keys {
		assert.NotContains(t, log, key, "a raw Idempotency-Key in the log")
	}
	for _, marker := range tr.markers {
		assert.NotContains(t, log, marker, "a request body in the log")
	}
	assert.NotContains(t, log, trafficAPIKey, "an API key in the log")
}
