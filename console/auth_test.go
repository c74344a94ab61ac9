package console

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

func TestNewRefuses(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name, key string
		opts      Options
		want      string
	}{
		{"empty key", "", Options{}, "admin key is empty"},
		{"prefix with a trailing slash", "k", Options{Prefix: "/admin/"}, "prefix"},
		{"prefix without a leading slash", "k", Options{Prefix: "admin"}, "prefix"},
		{"schema", "k", Options{Schema: "Bad-Schema"}, "schema"},
		{"session TTL", "k", Options{SessionTTL: time.Second}, "shorter than a minute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(ctx, tc.key, tc.opts)
			assert.ErrorContains(t, err, tc.want)
		})
	}
}

// TestAuthRefusals: without a session a page redirects to the login
// form and a POST gets 401; a wrong key gets 401 and no cookie; a POST
// without the session's CSRF token, or from another origin, gets 403;
// every answer carries the Content-Security-Policy.
func TestAuthRefusals(t *testing.T) {
	c := newConsole(t, Options{Records: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), ReadWrite: true})
	anon := &browser{t: t, h: c}

	r := anon.get(testPrefix + "/records")
	assert.Equal(t, http.StatusSeeOther, r.status)
	assert.Equal(t, testPrefix+"/login?next="+url.QueryEscape(testPrefix+"/records"), r.header.Get("Location"))
	assertSecurityHeaders(t, r)

	r = anon.post(testPrefix+"/records", url.Values{"kind": {"http"}, "key": {"k"}})
	assert.Equal(t, http.StatusUnauthorized, r.status)
	assertSecurityHeaders(t, r)

	r = anon.login("not-the-key")
	assert.Equal(t, http.StatusUnauthorized, r.status)
	assert.Contains(t, r.body, "That is not the admin key.")
	assert.Nil(t, anon.cookie, "no session for a wrong key")

	forged := anon.post(testPrefix+"/login", url.Values{"login_token": {"x.y"}, "key": {testKey}})
	assert.Equal(t, http.StatusForbidden, forged.status, "a login needs the form's token")
	assert.Nil(t, anon.cookie)

	b := &browser{t: t, h: c}
	r = b.login(testKey)
	require.Equal(t, http.StatusSeeOther, r.status)
	assert.Equal(t, testPrefix+"/", r.header.Get("Location"))
	require.NotNil(t, b.cookie)
	assert.True(t, b.cookie.HttpOnly)
	assert.Equal(t, http.SameSiteStrictMode, b.cookie.SameSite)
	assert.Equal(t, testPrefix+"/", b.cookie.Path)
	assert.False(t, b.cookie.Secure, "plain HTTP on a loopback address: development")
	assert.Equal(t, 8*60*60, b.cookie.MaxAge, "8 hours by default")

	page := b.get(testPrefix + "/records")
	require.Equal(t, http.StatusOK, page.status)
	assertSecurityHeaders(t, page)

	for name, form := range map[string]url.Values{
		"no token":          {"kind": {"http"}, "key": {"k"}, "csrf": {""}},
		"a wrong token":     {"kind": {"http"}, "key": {"k"}, "csrf": {"AAAA"}},
		"another session's": {"kind": {"http"}, "key": {"k"}, "csrf": {otherSessionCSRF(t, c)}},
	} {
		r := b.post(testPrefix+"/records", form)
		assert.Equal(t, http.StatusForbidden, r.status, name)
		assert.Contains(t, r.body, "CSRF token", name)
	}

	cross := httptest.NewRequest(http.MethodPost, "http://127.0.0.1"+testPrefix+"/records",
		strings.NewReader(url.Values{"kind": {"http"}, "key": {"k"}, "csrf": {b.csrf}}.Encode()))
	cross.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	cross.Header.Set("Sec-Fetch-Site", "cross-site")
	r = b.do(cross)
	assert.Equal(t, http.StatusForbidden, r.status, "a cross-origin POST, even with the cookie and token")
	assertSecurityHeaders(t, r)

	cross = httptest.NewRequest(http.MethodPost, "http://127.0.0.1"+testPrefix+"/logout", nil)
	cross.Header.Set("Origin", "https://evil.example")
	assert.Equal(t, http.StatusForbidden, b.do(cross).status, "an Origin of another host")

	r = b.post(testPrefix+"/records", url.Values{"kind": {"http"}, "key": {"k"}})
	assert.Equal(t, http.StatusOK, r.status, "the same request with the token, same-origin")

	r = b.post(testPrefix+"/logout", nil)
	assert.Equal(t, http.StatusSeeOther, r.status)
	assert.Equal(t, -1, b.cookie.MaxAge, "logout clears the cookie")
}

// otherSessionCSRF is the CSRF token of another login.
func otherSessionCSRF(t *testing.T, c *Console) string {
	other := loggedIn(t, c)
	return other.csrf
}

func assertSecurityHeaders(t *testing.T, r answer) {
	t.Helper()
	csp := r.header.Get("Content-Security-Policy")
	assert.Contains(t, csp, "default-src 'none'")
	assert.Contains(t, csp, "frame-ancestors 'none'")
	assert.NotContains(t, csp, "script-src", "no script is allowed at all")
	assert.Equal(t, "nosniff", r.header.Get("X-Content-Type-Options"))
	assert.Equal(t, "no-store", r.header.Get("Cache-Control"))
	assert.Equal(t, "no-referrer", r.header.Get("Referrer-Policy"))
	assert.Contains(t, csp, "style-src 'self'")
}

// TestSessionExpires: a session cookie stops working at its expiry, and
// a cookie signed with another key never works.
func TestSessionExpires(t *testing.T) {
	c := newConsole(t, Options{Records: idempotency.NewMemoryStore(idempotency.MemoryOptions{}), SessionTTL: time.Minute})
	b := loggedIn(t, c)
	now := time.Now()
	c.auth.now = func() time.Time { return now.Add(2 * time.Minute) }
	assert.Equal(t, http.StatusSeeOther, b.get(testPrefix+"/records").status, "expired: back to the login form")

	other, err := New(context.Background(), "another key", Options{Prefix: testPrefix})
	require.NoError(t, err)
	b2 := &browser{t: t, h: other}
	require.Equal(t, http.StatusSeeOther, b2.login("another key").status)
	b2.h = newConsole(t, Options{})
	assert.Equal(t, http.StatusSeeOther, b2.get(testPrefix+"/").status, "another key's cookie")
}

// TestSecureCookie: the session cookie is Secure but over plain HTTP to
// a loopback address, where a browser would not send it back.
func TestSecureCookie(t *testing.T) {
	for target, want := range map[string]bool{
		"http://127.0.0.1:8080/":  false,
		"http://localhost:8080/":  false,
		"http://[::1]/":           false,
		"http://ops.example.com/": true,
		"http://10.0.0.5:8080/":   true,
		"https://127.0.0.1:8443/": true,
	} {
		assert.Equal(t, want, secureCookie(httptest.NewRequest(http.MethodPost, target, nil)), target)
	}
}

// TestLoginNext: a login goes on to the page asked for, only if it is
// the console's.
func TestLoginNext(t *testing.T) {
	c := newConsole(t, Options{})
	for next, want := range map[string]string{
		testPrefix + "/events?status=failed": testPrefix + "/events?status=failed",
		"https://evil.example/":              testPrefix + "/",
		"//evil.example/x":                   testPrefix + "/",
		testPrefix + "/login":                testPrefix + "/",
		"/elsewhere":                         testPrefix + "/",
	} {
		assert.Equal(t, want, c.next(next), next)
	}
}
