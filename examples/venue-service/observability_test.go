package main

// The dashboard and the alert rules beside the example, checked against
// what its GET /metrics really exposes, and the traffic that makes it
// expose every series they read.

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"go.yaml.in/yaml/v3"
)

// The API key driveTraffic's service knows (API_KEYS), and its tenant.
const (
	trafficAPIKey = "obs-test-api-key-4b1d"
	trafficTenant = "obs-tenant"
)

// traffic is what driveTraffic sent to a running venue-service: the raw
// Idempotency-Keys and the markers inside request bodies, which must never
// show in its logs or its metrics.
type traffic struct {
	p       *process
	keys    []string
	markers []string
}

// driveTraffic starts a venue-service on a miniredis store and sends it
// one of each outcome the dashboard and the alert rules read: creates,
// replays, a 422, concurrent duplicates (409), a webhook processed, a
// duplicate delivery and a failed one, a lease lost (the record vanishes
// while its request runs) and, last, store failures (the store stops: a
// request and a delivery are refused).
// It returns with the process still running, its store down.
func driveTraffic(t *testing.T) traffic {
	t.Helper()
	mr := miniredis.NewMiniRedis()
	require.NoError(t, mr.Start())
	t.Cleanup(mr.Close)
	p := start(t, "REDIS_URL=redis://"+mr.Addr()+"/0", "FAKE_STRIPE_LATENCY=300ms", "CHAOS_HOLD=1", "API_KEYS="+trafficAPIKey+":"+trafficTenant)
	tr := traffic{p: p}
	newKey := func() string {
		k := "rawkey-" + rand.Text()
		tr.keys = append(tr.keys, k)
		return k
	}
	newMarker := func() string {
		m := "bodymarker" + strings.ToLower(rand.Text())
		tr.markers = append(tr.markers, m)
		return m
	}
	newVenue := func() string {
		m := newMarker()
		return fmt.Sprintf(`{"name":%q,"slug":%q}`, m, m)
	}
	tenant := []string{"Authorization", "Bearer " + trafficAPIKey}

	// Created, replayed twice, then the same key with another body: 422.
	key, venue := newKey(), newVenue()
	first := p.createVenue(key, venue, tenant...)
	require.Equal(t, http.StatusCreated, first.status, "%s", first.body)
	for range 2 {
		require.Equal(t, "true", p.createVenue(key, venue, tenant...).header.Get("X-Idempotent-Replayed"))
	}
	require.Equal(t, http.StatusUnprocessableEntity, p.createVenue(key, newVenue(), tenant...).status)

	// Concurrent duplicates that ask not to wait (Prefer: wait=0): one
	// 201, the others 409 while it runs (held before its Stripe call
	// until they are answered).
	key, venue = newKey(), newVenue()
	p.hold()
	statuses := make(chan int, 3)
	for range cap(statuses) {
		go func() {
			statuses <- p.createVenue(key, venue, append([]string{"Prefer", "wait=0"}, tenant...)...).status
		}()
	}
	p.awaitHeld(1)
	for range cap(statuses) - 1 {
		require.Equal(t, http.StatusConflict, receive(t, statuses, "a duplicate got no answer"))
	}
	p.release()
	require.Equal(t, http.StatusCreated, receive(t, statuses, "the held request got no answer"))

	// Webhooks: processed, a duplicate, and one whose function fails (an
	// account.updated whose account does not decode), released for
	// Stripe's retry.
	for _, tc := range []struct {
		object string
		status int
		times  int
	}{
		{`{"id":"acct_1","object":"account","charges_enabled":true}`, http.StatusOK, 2},
		{`{"id":"acct_2","object":"account","charges_enabled":"` + newMarker() + `"}`, http.StatusInternalServerError, 1},
	} {
		payload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"account.updated","api_version":%q,"created":%d,"data":{"object":%s}}`,
			rand.Text(), stripe.APIVersion, time.Now().Unix(), tc.object)
		signature := signWithBinary(t, payload)
		for range tc.times {
			r := do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signature)
			require.Equal(t, tc.status, r.status, "%s", r.body)
		}
	}

	// A lease lost: the record disappears from the store while its
	// request is held before its Stripe call, so its response cannot be
	// stored.
	done := make(chan response, 1)
	key, venue = newKey(), newVenue()
	p.hold()
	go func() { done <- p.createVenue(key, venue, tenant...) }()
	p.awaitHeld(2)
	mr.FlushAll()
	p.release()
	receive(t, done, "the request whose record vanished got no answer")

	// The store goes away: requests and deliveries are refused (503).
	mr.Close()
	require.Equal(t, http.StatusServiceUnavailable, p.createVenue(newKey(), newVenue(), tenant...).status)
	payload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"customer.created","api_version":%q,"created":%d,"data":{"object":{"note":%q}}}`,
		rand.Text(), stripe.APIVersion, time.Now().Unix(), newMarker())
	r := do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signWithBinary(t, payload))
	require.Equal(t, http.StatusServiceUnavailable, r.status, "%s", r.body)
	return tr
}

// exposition is what a /metrics page in Prometheus' text format shows:
// each sample name and the label names its series carry.
type exposition map[string]map[string]bool

var sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? `)
var labelName = regexp.MustCompile(`(?:^|,)([a-zA-Z_][a-zA-Z0-9_]*)="`)

func parseExposition(text string) exposition {
	e := exposition{}
	for _, line := range strings.Split(text, "\n") {
		m := sampleLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if e[m[1]] == nil {
			e[m[1]] = map[string]bool{}
		}
		for _, l := range labelName.FindAllStringSubmatch(m[2], -1) {
			e[m[1]][l[1]] = true
		}
	}
	return e
}

// Labels a Prometheus server adds to every series it scrapes.
var targetLabels = []string{"job", "instance"}

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	promMatchers = regexp.MustCompile(`\{([^}]*)\}`)
	promMatcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	promRange    = regexp.MustCompile(`\[[^\]]*\]`)
	promNumber   = regexp.MustCompile(`\b\d+(?:\.\d+)?(?:[eE][+-]?\d+|ms|s|m|h|d|w|y)?\b`)
	promIdent    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
)

// promqlKeywords are the PromQL words that are neither metrics nor
// functions (functions are told by the parenthesis after them).
var promqlKeywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true, "inf": true, "nan": true}

// grafanaVariables turns a dashboard expression into PromQL, as Grafana
// does before sending it: every job, Grafana's rate interval.
var grafanaVariables = strings.NewReplacer("$__rate_interval", "1m", "$job", ".*")

// promqlNames returns the metric names expr selects and the label names
// it matches or groups by. It is no PromQL parser, but enough for the
// expressions of a dashboard and alert rules: strings, ranges, matchers
// and grouping clauses are taken out first, and what remains that is not
// followed by "(" nor a keyword is a metric name.
func promqlNames(expr string) (metrics, labels []string) {
	expr = grafanaVariables.Replace(expr)
	expr = promString.ReplaceAllString(expr, `""`)
	for _, m := range promGrouping.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(m[1], ",") {
			if l = strings.TrimSpace(l); l != "" {
				labels = append(labels, l)
			}
		}
	}
	expr = promGrouping.ReplaceAllString(expr, " ")
	for _, m := range promMatchers.FindAllStringSubmatch(expr, -1) {
		for _, l := range promMatcher.FindAllStringSubmatch(m[1], -1) {
			labels = append(labels, l[1])
		}
	}
	expr = promMatchers.ReplaceAllString(expr, " ")
	expr = promRange.ReplaceAllString(expr, " ")
	expr = promNumber.ReplaceAllString(expr, " ")
	for _, m := range promIdent.FindAllStringSubmatch(expr, -1) {
		word := strings.TrimSpace(m[0])
		if m[1] != "" || promqlKeywords[strings.ToLower(word)] {
			continue // a function, or a keyword
		}
		metrics = append(metrics, word)
	}
	return metrics, labels
}

func TestPromqlNames(t *testing.T) {
	metrics, labels := promqlNames(`histogram_quantile(0.99, sum by (le, operation) (rate(a_bucket{job=~"$job",x!="by (y)"}[$__rate_interval]))) / on (job) b_total offset 5m > bool 1e-3 and c`)
	assert.Equal(t, []string{"a_bucket", "b_total", "c"}, metrics)
	assert.ElementsMatch(t, []string{"le", "operation", "job", "job", "x"}, labels)
}

// checkExpr fails t when expr reads a metric that the exposition does not
// show, or a label that none of its metrics carries.
func checkExpr(t *testing.T, where, expr string, exposed exposition) []string {
	t.Helper()
	metrics, labels := promqlNames(expr)
	assert.NotEmpty(t, metrics, "%s: no metric in %s", where, expr)
	known := map[string]bool{}
	for _, l := range targetLabels {
		known[l] = true
	}
	for _, m := range metrics {
		if _, ok := exposed[m]; !assert.True(t, ok, "%s: %s is not on /metrics (%s)", where, m, expr) {
			continue
		}
		for l := range exposed[m] {
			known[l] = true
		}
	}
	for _, l := range labels {
		assert.True(t, known[l], "%s: no series of %v carries the label %s (%s)", where, metrics, l, expr)
	}
	return metrics
}

type dashboard struct {
	Title         string         `json:"title"`
	UID           string         `json:"uid"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []dashPanel    `json:"panels"`
	Templating    dashTemplating `json:"templating"`
}

type dashTemplating struct {
	List []struct {
		Name       string          `json:"name"`
		Type       string          `json:"type"`
		Query      json.RawMessage `json:"query"`
		Definition string          `json:"definition"`
	} `json:"list"`
}

type dashPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	GridPos    map[string]int  `json:"gridPos"`
	Datasource *dashDatasource `json:"datasource"`
	Targets    []dashTarget    `json:"targets"`
	Panels     []dashPanel     `json:"panels"`
}

type dashDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashTarget struct {
	RefID string `json:"refId"`
	Expr  string `json:"expr"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile("grafana-dashboard.json")
	require.NoError(t, err)
	var d dashboard
	dec := json.NewDecoder(strings.NewReader(string(b)))
	require.NoError(t, dec.Decode(&d), "grafana-dashboard.json is JSON")
	return d
}

// alertRules is the part of a Prometheus rule file the tests read.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func loadAlertRules(t *testing.T) alertRules {
	t.Helper()
	b, err := os.ReadFile("alerts.yml")
	require.NoError(t, err)
	var r alertRules
	require.NoError(t, yaml.Unmarshal(b, &r), "alerts.yml is YAML")
	return r
}

// TestDashboardAndAlertsMatchMetrics: the Grafana dashboard is a dashboard
// Grafana imports as it is (a schema version, a data source variable,
// panels with PromQL targets), and every expression of it and of the
// alert rules reads only metrics and labels that the example's /metrics
// shows after traffic of every kind. With promtool on PATH, the dashboard's
// expressions are also checked as PromQL, and the rule file with
// promtool check rules.
func TestDashboardAndAlertsMatchMetrics(t *testing.T) {
	d := loadDashboard(t)
	rules := loadAlertRules(t)

	tr := driveTraffic(t)
	r := do(t, http.MethodGet, tr.p.url+"/metrics", "")
	require.Equal(t, http.StatusOK, r.status)
	exposed := parseExposition(string(r.body))
	// The traffic made every family the dashboard is meant to show.
	// (Not idempotency_lease_renewals_total: a renewal needs a request
	// that outlives a third of the lease, and no panel reads it.)
	for _, name := range []string{"idempotency_requests_total", "idempotency_handler_duration_seconds_bucket",
		"idempotency_webhook_deliveries_total", "idempotency_webhook_duration_seconds_bucket",
		"idempotency_lease_lost_total", "idempotency_store_duration_seconds_bucket",
		"idempotency_store_errors_total"} {
		require.Contains(t, exposed, name, "the traffic shows %s on:\n%s", name, r.body)
	}
	tr.p.stop()

	// Importable as it is.
	assert.NotEmpty(t, d.Title)
	assert.NotEmpty(t, d.UID)
	assert.GreaterOrEqual(t, d.SchemaVersion, 36, "schemaVersion")
	var dsVar bool
	for _, v := range d.Templating.List {
		switch v.Type {
		case "datasource":
			dsVar = v.Name == "datasource" && strings.Contains(string(v.Query), "prometheus")
		case "query":
			checkExpr(t, "variable "+v.Name, strings.TrimSuffix(strings.TrimPrefix(v.Definition, "label_values("), ", job)"), exposed)
		}
	}
	assert.True(t, dsVar, "a data source variable named datasource, so the import asks for none")

	var panels []dashPanel
	for _, p := range d.Panels {
		panels = append(panels, p)
		panels = append(panels, p.Panels...) // a collapsed row's
	}
	ids := map[int]bool{}
	used := map[string]bool{}
	var exprs []string
	for _, p := range panels {
		assert.False(t, ids[p.ID], "panel id %d twice", p.ID)
		ids[p.ID] = true
		for _, k := range []string{"h", "w"} {
			assert.Positive(t, p.GridPos[k], "panel %q: gridPos.%s", p.Title, k)
		}
		if p.Type == "row" {
			continue
		}
		assert.NotEmpty(t, p.Title)
		if assert.NotNil(t, p.Datasource, "panel %q: datasource", p.Title) {
			assert.Equal(t, dashDatasource{"prometheus", "${datasource}"}, *p.Datasource, "panel %q", p.Title)
		}
		if !assert.NotEmpty(t, p.Targets, "panel %q has no targets", p.Title) {
			continue
		}
		for _, target := range p.Targets {
			assert.NotEmpty(t, target.RefID)
			if assert.NotEmpty(t, target.Expr, "panel %q: target %s has no expr", p.Title, target.RefID) {
				for _, m := range checkExpr(t, "panel "+p.Title, target.Expr, exposed) {
					used[m] = true
				}
				exprs = append(exprs, grafanaVariables.Replace(target.Expr))
			}
		}
	}
	for _, name := range []string{"idempotency_requests_total", "idempotency_handler_duration_seconds_bucket",
		"idempotency_store_duration_seconds_bucket", "idempotency_store_errors_total",
		"idempotency_lease_lost_total", "idempotency_webhook_deliveries_total"} {
		assert.True(t, used[name], "no panel reads %s", name)
	}

	var alerts []string
	for _, g := range rules.Groups {
		for _, rule := range g.Rules {
			alerts = append(alerts, rule.Alert)
			checkExpr(t, "alert "+rule.Alert, rule.Expr, exposed)
			assert.NotEmpty(t, rule.Labels["severity"], "alert %s: severity", rule.Alert)
			assert.NotEmpty(t, rule.Annotations["summary"], "alert %s: summary", rule.Alert)
		}
	}
	sort.Strings(alerts)
	assert.Equal(t, []string{"IdempotencyFailOpen", "IdempotencyLeaseLost", "IdempotencyReplayRatioChanged",
		"IdempotencyRequestsRefused", "IdempotencyStoreErrors", "IdempotencyWebhookFailures"}, alerts)

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not on PATH: PromQL syntax not checked (apt-get install -y prometheus provides it)")
		return
	}
	out, err := exec.Command(promtool, "check", "rules", "alerts.yml").CombinedOutput()
	assert.NoError(t, err, "promtool check rules alerts.yml:\n%s", out)
	// The dashboard's expressions, as recording rules, so promtool parses
	// them.
	var b strings.Builder
	b.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, expr := range exprs {
		q, _ := json.Marshal(expr) // a JSON string is a YAML double-quoted scalar
		fmt.Fprintf(&b, "      - record: dashboard:expr_%d\n        expr: %s\n", i, q)
	}
	file := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	require.NoError(t, os.WriteFile(file, []byte(b.String()), 0o644))
	out, err = exec.Command(promtool, "check", "rules", file).CombinedOutput()
	assert.NoError(t, err, "the dashboard's expressions as PromQL:\n%s\n%s", out, b.String())
}
