package console

import (
	"context"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

const testKey = "console-test-admin-key"

// testPrefix is where the tests mount the console.
const testPrefix = "/ops/console"

// migrate creates pgstore's tables: a setup for pgtest.Pool.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
}

// newPool is a migrated schema of the test's own, or a skip.
func newPool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	return pgtest.Pool(t, pgtest.Config(t), migrate)
}

// newConsole returns a console on opts, mounted at testPrefix.
func newConsole(t testing.TB, opts Options) *Console {
	t.Helper()
	opts.Prefix = testPrefix
	c, err := New(context.Background(), testKey, opts)
	require.NoError(t, err)
	return c
}

// browser is a client of one console through ServeHTTP: it keeps the
// session cookie and the last page's CSRF token, as a browser would.
type browser struct {
	t      testing.TB
	h      http.Handler
	cookie *http.Cookie
	csrf   string
}

// answer is one response, its body read.
type answer struct {
	status int
	header http.Header
	body   string
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func (b *browser) do(req *http.Request) answer {
	b.t.Helper()
	req.Header.Set("Accept", "text/html")
	if b.cookie != nil {
		req.AddCookie(b.cookie)
	}
	rec := httptest.NewRecorder()
	b.h.ServeHTTP(rec, req)
	res := rec.Result()
	body, err := io.ReadAll(res.Body)
	require.NoError(b.t, err)
	for _, c := range res.Cookies() {
		if c.Name == cookieName {
			b.cookie = c
		}
	}
	if m := csrfField.FindStringSubmatch(string(body)); m != nil {
		b.csrf = m[1]
	}
	return answer{status: res.StatusCode, header: res.Header, body: string(body)}
}

func (b *browser) get(path string) answer {
	b.t.Helper()
	return b.do(httptest.NewRequest(http.MethodGet, "http://127.0.0.1"+path, nil))
}

// post sends form, with the session's CSRF token unless form has one.
func (b *browser) post(path string, form url.Values) answer {
	b.t.Helper()
	form = maps.Clone(form)
	if form == nil {
		form = url.Values{}
	}
	if _, ok := form["csrf"]; !ok && b.csrf != "" {
		form.Set("csrf", b.csrf)
	}
	req := httptest.NewRequest(http.MethodPost, "http://127.0.0.1"+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return b.do(req)
}

var loginToken = regexp.MustCompile(`name="login_token" value="([^"]+)"`)

// login logs in with key through the form and returns the answer.
func (b *browser) login(key string) answer {
	b.t.Helper()
	page := b.get(testPrefix + "/login")
	require.Equal(b.t, http.StatusOK, page.status)
	m := loginToken.FindStringSubmatch(page.body)
	require.NotNil(b.t, m, "the login form has a token")
	return b.post(testPrefix+"/login", url.Values{"login_token": {m[1]}, "key": {key}, "next": {testPrefix + "/"}})
}

// loggedIn returns a browser logged in to h.
func loggedIn(t testing.TB, h http.Handler) *browser {
	t.Helper()
	b := &browser{t: t, h: h}
	r := b.login(testKey)
	require.Equal(t, http.StatusSeeOther, r.status, r.body)
	require.NotNil(t, b.cookie)
	b.get(testPrefix + "/") // a page, for the CSRF token
	require.NotEmpty(t, b.csrf)
	return b
}

// insertEvent stores an event as the inbox would, in the given status.
func insertEvent(t testing.TB, pool *pgxpool.Pool, provider, id, typ, object, status, lastError, payload string) {
	t.Helper()
	var obj any
	if object != "" {
		obj = object
	}
	pgtest.Exec(t, pool, `INSERT INTO webhook_events (scope, provider, event_id, type, object_id, status, attempts, last_error,
    payload, received_at, processed_at, next_attempt_at, expires_at, created)
VALUES ('', $1, $2, $3, $4, $5, CASE WHEN $5 = 'failed' THEN 5 ELSE 1 END, nullif($6, ''), $7::bytea,
    clock_timestamp(), CASE WHEN $5 = 'processed' THEN clock_timestamp() END,
    CASE WHEN $5 IN ('pending', 'processing') THEN clock_timestamp() END, clock_timestamp() + interval '1 day', 0)`,
		provider, id, typ, obj, status, lastError, []byte(payload))
}
