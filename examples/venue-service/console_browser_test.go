package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
)

// chromiumEnv names the browser the console's browser test drives. Set, it
// must be there (.ci/run sets it); unset, the test looks for chromium on
// the PATH and skips without it.
const chromiumEnv = "IDEMPOTENCY_TEST_CHROMIUM"

func chromiumPath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(chromiumEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s=%s: %v", chromiumEnv, p, err)
		}
		return p
	}
	p, err := exec.LookPath("chromium")
	if err != nil {
		t.Skipf("no chromium on the PATH and %s not set: skipping the browser test (apt-get install chromium)", chromiumEnv)
	}
	return p
}

// artifactsDir is where the browser test's screenshots go.
func artifactsDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("IDEMPOTENCY_TEST_ARTIFACTS")
	if dir == "" {
		return t.TempDir()
	}
	dir = filepath.Join(dir, "console")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	return dir
}

// TestConsoleBrowser drives the example's operator console in headless
// Chromium as an operator would: log in with the admin key, find the
// dead-lettered event among the dead letters, open it (its payload, which
// holds markup, shows as text), redrive it after the confirmation and see
// it processed; look up a request's idempotency record by its key, which
// the page never shows. Requests without a session, without the CSRF
// token, or from another origin are refused. Screenshots of each view go
// to $IDEMPOTENCY_TEST_ARTIFACTS/console.
func TestConsoleBrowser(t *testing.T) {
	chromium := chromiumPath(t)
	const adminKey = "console-admin-key-for-the-browser-test"
	// The function fails as often as the example's worker tries (5): the
	// Stripe event ends failed, and the redrive's attempt succeeds.
	p := start(t, databaseURLEnv(t), "ADMIN_KEY="+adminKey, "ADMIN_REDRIVE=1", "CHAOS_FAIL_WEBHOOK=5")
	base := p.url + "/admin/console"
	shots := artifactsDir(t)

	eventID := "evt_" + rand.Text()
	payload := fmt.Sprintf(`{"id":%q,"object":"event","type":"customer.updated","api_version":%q,"created":%d,`+
		`"data":{"object":{"id":"cus_42","object":"customer","description":"<script>alert('owned')</script>"}}}`,
		eventID, stripe.APIVersion, time.Now().Unix())
	require.Equal(t, http.StatusOK, do(t, http.MethodPost, p.url+"/webhooks/stripe", payload, "Stripe-Signature", signWithBinary(t, payload)).status)
	partnerID := "msg_" + rand.Text()
	partnerPayload := `{"type":"ticket.sold","data":{"ticket":7}}`
	require.Equal(t, http.StatusOK, do(t, http.MethodPost, p.url+"/webhooks/partner", partnerPayload, signPartner(partnerID, partnerPayload)...).status)
	venueKey := uniqueKey()
	require.Equal(t, http.StatusCreated, p.createVenue(venueKey, `{"name":"Hall","slug":"hall"}`).status)

	// The operator JSON API says when the event is a dead letter.
	require.Eventually(t, func() bool {
		r := doBare(t, http.MethodGet, p.url+"/admin/webhooks/events/"+eventID, "", "Authorization", "Bearer "+adminKey)
		return r.status == http.StatusOK && strings.Contains(string(r.body), `"status":"failed"`)
	}, 60*time.Second, 50*time.Millisecond, "the event ends failed after the worker's 5 attempts")

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	alloc, cancelAlloc := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.NoSandbox, chromedp.DisableGPU, // as root, in a container
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)...)
	defer cancelAlloc()
	browser, cancelBrowser := chromedp.NewContext(alloc)
	defer cancelBrowser()

	began := time.Now()
	// do runs one step of actions that return nothing; get, one that
	// returns a value. Each logs how long it took.
	timed := func(name string, start time.Time, err error) {
		t.Helper()
		require.NoError(t, err, name)
		t.Logf("step %-34s %6.0f ms", name, float64(time.Since(start).Microseconds())/1000)
	}
	do := func(name string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		start := time.Now()
		timed(name, start, chromedp.Do(browser, steps...))
	}
	get := func(a chromedp.Action[string]) string {
		t.Helper()
		v, err := chromedp.Run(browser, a)
		require.NoError(t, err)
		return v
	}
	shot := func(name string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, target *chromedp.Target) error {
			png, err := chromedp.FullScreenshot(100)(ctx, target)
			if err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644)
		})
	}
	eventLink := chromedp.CSS(`a[href*="` + eventID + `"]`)

	do("open the console: the login form",
		chromedp.Navigate(base+"/events?status=failed"),
		chromedp.WaitVisible(chromedp.ID("key")),
		shot("1-login"))
	assert.Contains(t, get(chromedp.Location()), "/admin/console/login?next=")

	do("log in with a wrong key: refused",
		chromedp.SendKeys(chromedp.ID("key"), "not-the-key"),
		chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(chromedp.CSS("p.error")))

	do("log in: the dead letters",
		chromedp.SendKeys(chromedp.ID("key"), adminKey),
		chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(eventLink),
		shot("2-dead-letters"))
	assert.Contains(t, get(chromedp.Title()), "Events")

	cookies, err := chromedp.Call(browser, network.GetCookies, network.GetCookiesParams{URLs: []string{base + "/"}})
	require.NoError(t, err)
	require.Len(t, cookies.Cookies, 1)
	session := cookies.Cookies[0]
	assert.True(t, session.HTTPOnly)
	assert.Equal(t, network.CookieSameSiteStrict, session.SameSite)

	do("open the event",
		chromedp.Click(eventLink),
		chromedp.WaitVisible(chromedp.ID("payload")),
		shot("3-event"))
	assert.Equal(t, "failed", get(chromedp.Text(chromedp.ID("status"))))
	assert.Contains(t, get(chromedp.Text(chromedp.ID("payload"))), `"description": "<script>alert('owned')</script>"`,
		"the payload, pretty-printed, as text")
	assert.Equal(t, "0", get(chromedp.Evaluate[string](`String(document.querySelectorAll("script").length)`)),
		"no script element on the page")

	do("confirm the redrive",
		chromedp.Click(chromedp.ID("redrive")),
		chromedp.WaitVisible(chromedp.ID("confirm")),
		shot("4-confirm-redrive"))
	csrf := get(chromedp.Value(chromedp.CSS(`form.confirm input[name="csrf"]`)))

	// What the browser may do, a request may not without its session, its
	// CSRF token, or from another origin.
	refusals(t, base, eventID, session, csrf)
	r := doBare(t, http.MethodGet, p.url+"/admin/webhooks/events/"+eventID, "", "Authorization", "Bearer "+adminKey)
	assert.Contains(t, string(r.body), `"status":"failed"`, "the refused requests redrove nothing")

	do("redrive",
		chromedp.Click(chromedp.ID("confirm")),
		chromedp.WaitVisible(chromedp.ID("redriven")))

	require.Eventually(t, func() bool { return p.stats().WebhookEventsProcessed == 1 }, 30*time.Second, 50*time.Millisecond,
		"the redriven event is processed")
	do("see it processed",
		chromedp.Reload(),
		chromedp.WaitVisible(chromedp.ID("status")),
		shot("5-event-processed"))
	assert.Equal(t, "processed", get(chromedp.Text(chromedp.ID("status"))))

	do("look up a request's record",
		chromedp.Click(chromedp.CSS(`nav a[href$="/records"]`)),
		chromedp.WaitVisible(chromedp.ID("lookup")),
		chromedp.SendKeys(chromedp.CSS(`input[name="scope"]`), "tenant-a"),
		chromedp.SendKeys(chromedp.CSS(`input[name="key"]`), venueKey),
		chromedp.Click(chromedp.ID("lookup")),
		chromedp.WaitVisible(chromedp.ID("state")),
		shot("6-record"))
	assert.Equal(t, "completed", get(chromedp.Text(chromedp.ID("state"))))
	assert.NotContains(t, get(chromedp.OuterHTML(chromedp.CSS("html"))), venueKey, "the key is never in the page")

	do("the overview",
		chromedp.Click(chromedp.CSS(`nav a[href$="/admin/console/"]`)),
		chromedp.WaitVisible(chromedp.CSS("figure.chart")),
		shot("7-overview"))

	t.Logf("browser steps took %v in all; screenshots in %s", time.Since(began).Round(time.Millisecond), shots)
}

// refusals checks the console's refusals over plain HTTP.
func refusals(t *testing.T, base, eventID string, session *network.Cookie, csrf string) {
	t.Helper()
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	send := func(method, path string, form url.Values, header ...string) int {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(form.Encode()))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		res, err := client.Do(req)
		require.NoError(t, err)
		res.Body.Close()
		return res.StatusCode
	}
	redrive := url.Values{"inbox": {"stripe:"}, "id": {eventID}}
	withToken := url.Values{"inbox": {"stripe:"}, "id": {eventID}, "csrf": {csrf}}
	cookie := session.Name + "=" + session.Value

	assert.Equal(t, http.StatusSeeOther, send(http.MethodGet, "/events?status=failed", nil), "a page without a session: the login form")
	assert.Equal(t, http.StatusUnauthorized, send(http.MethodPost, "/event/redrive", withToken), "no session")
	assert.Equal(t, http.StatusUnauthorized, send(http.MethodPost, "/event/redrive", withToken, "Authorization", "Bearer dev-key-a"),
		"a tenant's API key is no session")
	assert.Equal(t, http.StatusForbidden, send(http.MethodPost, "/event/redrive", redrive, "Cookie", cookie), "no CSRF token")
	assert.Equal(t, http.StatusForbidden, send(http.MethodPost, "/event/redrive", withToken, "Cookie", cookie, "Origin", "https://evil.example"),
		"another origin")
}
