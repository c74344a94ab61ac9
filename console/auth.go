package console

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Sessions are stateless, so that every instance of a service that shares
// the admin key accepts the others' logins: the cookie holds a random
// session ID and its expiry, signed with a secret derived from the key
// (changing the key ends every session). The CSRF token is a MAC of the
// session ID under another derived secret, so it is valid for that
// session only; the login form's token, before there is a session, is a
// signed expiry.

const (
	cookieName = "idempotency_console"
	// loginTokenTTL bounds how long a login form stays usable.
	loginTokenTTL = time.Hour
	// maxFormBytes caps a form's body: the largest, a record lookup, holds
	// a scope and a key of at most a few hundred bytes.
	maxFormBytes = 16 << 10
)

var b64 = base64.RawURLEncoding

// authenticator checks the admin key and signs sessions and tokens.
type authenticator struct {
	master  []byte // HMAC-SHA256 of nothing but the key: the root of the derived secrets
	keyMAC  []byte // the key's MAC, compared in constant time
	ttl     time.Duration
	path    string // the cookie's Path
	now     func() time.Time
	randomN func([]byte)
}

func newAuthenticator(key string, o Options) authenticator {
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte("idempotency console v1"))
	a := authenticator{master: m.Sum(nil), ttl: o.SessionTTL, path: o.Prefix + "/", now: time.Now,
		randomN: func(b []byte) { _, _ = rand.Read(b) }}
	a.keyMAC = a.mac("admin key", []byte(key))
	return a
}

// derive returns the 32-byte secret for purpose.
func (a authenticator) derive(purpose string) []byte {
	return a.mac("derive", []byte(purpose))
}

func (a authenticator) mac(purpose string, msg ...[]byte) []byte {
	m := hmac.New(sha256.New, a.master)
	m.Write([]byte(purpose))
	m.Write([]byte{0})
	for _, b := range msg {
		m.Write(b)
	}
	return m.Sum(nil)
}

// keyMatches compares given with the admin key in constant time (their
// MACs, so the key's length does not show either).
func (a authenticator) keyMatches(given string) bool {
	return subtle.ConstantTimeCompare(a.mac("admin key", []byte(given)), a.keyMAC) == 1
}

// session is a verified login.
type session struct {
	id      []byte
	expires time.Time
}

// signedExpiry is a random ID and an expiry, and their MAC for purpose:
// "<id+expiry>.<mac>" in base64url.
func (a authenticator) signedExpiry(purpose string, expires time.Time) (string, []byte) {
	body := make([]byte, 16, 24)
	a.randomN(body)
	body = binary.BigEndian.AppendUint64(body, uint64(expires.Unix()))
	return b64.EncodeToString(body) + "." + b64.EncodeToString(a.mac(purpose, body)), body[:16]
}

// verifyExpiry checks a value that signedExpiry made for purpose and
// returns its ID while it has not expired.
func (a authenticator) verifyExpiry(purpose, value string) (session, bool) {
	bodyText, macText, ok := strings.Cut(value, ".")
	if !ok {
		return session{}, false
	}
	body, err1 := b64.DecodeString(bodyText)
	mac, err2 := b64.DecodeString(macText)
	if err1 != nil || err2 != nil || len(body) != 24 || !hmac.Equal(mac, a.mac(purpose, body)) {
		return session{}, false
	}
	expires := time.Unix(int64(binary.BigEndian.Uint64(body[16:])), 0)
	if !a.now().Before(expires) {
		return session{}, false
	}
	return session{id: body[:16], expires: expires}, true
}

// csrfToken is the token every form of the session s carries.
func (a authenticator) csrfToken(s session) string {
	return b64.EncodeToString(a.mac("csrf", s.id))
}

func (a authenticator) csrfMatches(s session, token string) bool {
	return subtle.ConstantTimeCompare([]byte(token), []byte(a.csrfToken(s))) == 1
}

type sessionKey struct{}

func sessionFrom(ctx context.Context) (session, bool) {
	s, ok := ctx.Value(sessionKey{}).(session)
	return s, ok
}

// requireSession lets through requests of a logged-in browser, and, for
// any method but GET and HEAD, only with the session's CSRF token in the
// form. A GET without a session is sent to the login form; anything else
// without one gets 401, and without the token 403.
func (c *Console) requireSession(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var s session
		ok := false
		if ck, err := r.Cookie(cookieName); err == nil {
			s, ok = c.auth.verifyExpiry("session", ck.Value)
		}
		safe := r.Method == http.MethodGet || r.Method == http.MethodHead
		switch {
		case !ok && safe:
			http.Redirect(w, r, c.o.Prefix+"/login?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		case !ok:
			c.log(r.Context(), slog.LevelWarn, "console: request without a session refused", "method", r.Method, "path", r.URL.Path)
			c.fail(w, r, http.StatusUnauthorized, "Not logged in", "Log in with the admin key first.")
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), sessionKey{}, s))
		if !safe {
			r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
			if err := r.ParseForm(); err != nil {
				c.fail(w, r, http.StatusBadRequest, "Bad request", "The form could not be read.")
				return
			}
			if !c.auth.csrfMatches(s, r.PostForm.Get("csrf")) {
				c.log(r.Context(), slog.LevelWarn, "console: request without a valid CSRF token refused", "method", r.Method, "path", r.URL.Path)
				c.fail(w, r, http.StatusForbidden, "Forbidden", "The form's CSRF token is missing or wrong: reload the page and try again.")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

type loginData struct {
	Token, Next, Message string
}

func (c *Console) loginPage(w http.ResponseWriter, r *http.Request) {
	token, _ := c.auth.signedExpiry("login", c.auth.now().Add(loginTokenTTL))
	c.render(w, r, http.StatusOK, "login", "Log in", "", loginData{Token: token, Next: c.next(r.URL.Query().Get("next"))})
}

// login checks the key and starts a session.
func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if err := r.ParseForm(); err != nil {
		c.fail(w, r, http.StatusBadRequest, "Bad request", "The form could not be read.")
		return
	}
	next := c.next(r.PostForm.Get("next"))
	if _, ok := c.auth.verifyExpiry("login", r.PostForm.Get("login_token")); !ok {
		c.log(r.Context(), slog.LevelWarn, "console: login without a valid form token refused", "remote", r.RemoteAddr)
		c.fail(w, r, http.StatusForbidden, "Forbidden", "The login form expired or did not come from this console: reload it.")
		return
	}
	if !c.auth.keyMatches(r.PostForm.Get("key")) {
		c.log(r.Context(), slog.LevelWarn, "console: login with a wrong key", "remote", r.RemoteAddr)
		token, _ := c.auth.signedExpiry("login", c.auth.now().Add(loginTokenTTL))
		c.render(w, r, http.StatusUnauthorized, "login", "Log in", "", loginData{Token: token, Next: next, Message: "That is not the admin key."})
		return
	}
	expires := c.auth.now().Add(c.auth.ttl)
	value, _ := c.auth.signedExpiry("session", expires)
	http.SetCookie(w, &http.Cookie{
		Name: cookieName, Value: value, Path: c.auth.path, Expires: expires, MaxAge: int(c.auth.ttl / time.Second),
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: secureCookie(r),
	})
	c.log(r.Context(), slog.LevelInfo, "console: login", "remote", r.RemoteAddr)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: c.auth.path, MaxAge: -1,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: secureCookie(r)})
	http.Redirect(w, r, c.o.Prefix+"/login", http.StatusSeeOther)
}

// next is where a login goes on to: a path of the console's, else its
// overview.
func (c *Console) next(v string) string {
	if strings.HasPrefix(v, c.o.Prefix+"/") && !strings.HasPrefix(v, "//") && !strings.ContainsAny(v, "\\\r\n") &&
		!strings.HasPrefix(v, c.o.Prefix+"/login") {
		return v
	}
	return c.o.Prefix + "/"
}

// secureCookie reports whether the session cookie gets Secure: always,
// but when the browser talks to a loopback address over plain HTTP
// (development), where a browser would not send it back.
func secureCookie(r *http.Request) bool {
	if r.TLS != nil {
		return true
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else {
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]") // an IPv6 literal without a port
	}
	if host == "localhost" {
		return false
	}
	ip := net.ParseIP(host)
	return ip == nil || !ip.IsLoopback()
}
