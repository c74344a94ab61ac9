package console

import (
	"net/url"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// FuzzSessionCookie: the cookie parser never panics, and accepts only
// what the console signed for that purpose and has not expired.
func FuzzSessionCookie(f *testing.F) {
	c := newConsole(f, Options{})
	valid, _ := c.auth.signedExpiry("session", c.auth.now().Add(time.Hour))
	login, _ := c.auth.signedExpiry("login", c.auth.now().Add(time.Hour))
	for _, s := range []string{valid, login, "", ".", "a.b", valid + "x", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAA"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		s, ok := c.auth.verifyExpiry("session", value)
		if value == valid && !ok {
			t.Fatal("the console's own session refused")
		}
		if value == login && ok {
			t.Fatal("a login form's token accepted as a session")
		}
		if ok && (len(s.id) != 16 || !s.expires.After(c.auth.now())) {
			t.Fatalf("accepted %q: %+v", value, s)
		}
	})
}

// FuzzFilter: the events filter's parser never panics and yields only a
// filter the queries accept.
func FuzzFilter(f *testing.F) {
	c := newConsole(f, Options{})
	for _, q := range []string{"", "status=failed&inbox=stripe:&type=a.b&object=acct_1&age=1h",
		"before=2026-01-02T03:04:05.123456789Z", "inbox=:", "inbox=github:scope:with:colons", "age=5m&before=2000-01-01T00:00:00Z",
		"status=%00", "age=-1h"} {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		_, lf, err := c.parseFilter(v)
		if err != nil {
			return
		}
		if lf.Status != "" && !inbox.ValidStatus(lf.Status) {
			t.Fatalf("status %q accepted", lf.Status)
		}
		if (lf.Inbox != inboxRef{}) && lf.Inbox.Provider == "" {
			t.Fatalf("an inbox without a provider accepted: %q", raw)
		}
		if lf.Inbox != (inboxRef{}) {
			if back, ok := parseInboxRef(lf.Inbox.ID()); !ok || back != lf.Inbox {
				t.Fatalf("inbox %q does not round-trip", lf.Inbox.ID())
			}
		}
	})
}

// FuzzRecordHandle: the removal form's handle opens only for the session
// that sealed it, and never panics.
func FuzzRecordHandle(f *testing.F) {
	c := newConsole(f, Options{})
	s := session{id: []byte("0123456789abcdef")}
	valid := c.sealQuery(s, recordQuery{Kind: "http", Scope: "t", Key: "k"})
	for _, h := range []string{valid, "", "AAAA", valid[:len(valid)-2]} {
		f.Add(h)
	}
	f.Fuzz(func(t *testing.T, handle string) {
		q, ok := c.openQuery(s, handle)
		if handle == valid && (!ok || q != (recordQuery{Kind: "http", Scope: "t", Key: "k"})) {
			t.Fatalf("the session's own handle: %+v %v", q, ok)
		}
		if _, ok := c.openQuery(session{id: []byte("another session!")}, handle); ok {
			t.Fatal("another session opened a handle")
		}
	})
}
