package console

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

var eventLink = regexp.MustCompile(`<a href="/ops/console/event\?id=([^&"]+)&amp;inbox=[^"]+">`)

// listed returns the IDs of the events a list page links to, in order.
func listed(body string) []string {
	var ids []string
	for _, m := range eventLink.FindAllStringSubmatch(body, -1) {
		ids = append(ids, m[1])
	}
	return ids
}

// TestEventsFiltersAndPaging: the list filters by inbox, status, type and
// object, newest first, 50 to a page with a link to the next.
func TestEventsFiltersAndPaging(t *testing.T) {
	pool := newPool(t)
	for i := range 60 {
		insertEvent(t, pool, "stripe", fmt.Sprintf("evt_%02d", i), "invoice.paid", "", "processed", "", `{}`)
	}
	insertEvent(t, pool, "stripe", "evt_failed", "account.updated", "acct_1", "failed", "boom", `{}`)
	insertEvent(t, pool, "github", "gh_1", "push", "", "pending", "", `{}`)
	insertEvent(t, pool, "github", "gh_2", "push", "acct_1", "failed", "bad", `{}`)
	c := newConsole(t, Options{Pool: pool})
	b := loggedIn(t, c)

	for _, tc := range []struct {
		query string
		want  []string
	}{
		{"status=failed", []string{"gh_2", "evt_failed"}},
		{"status=failed&inbox=stripe:", []string{"evt_failed"}},
		{"type=push", []string{"gh_2", "gh_1"}},
		{"object=acct_1", []string{"gh_2", "evt_failed"}},
		{"object=acct_1&inbox=github:", []string{"gh_2"}},
		{"inbox=github:&status=pending", []string{"gh_1"}},
		{"age=24h", nil},
	} {
		r := b.get(testPrefix + "/events?" + tc.query)
		require.Equal(t, http.StatusOK, r.status, tc.query)
		assert.Equal(t, tc.want, listed(r.body), tc.query)
	}

	r := b.get(testPrefix + "/events")
	first := listed(r.body)
	require.Len(t, first, pageSize)
	assert.Equal(t, "gh_2", first[0], "newest first")
	next := regexp.MustCompile(`href="([^"]+)" id="next"`).FindStringSubmatch(r.body)
	require.NotNil(t, next, "a link to the next page")
	second := listed(b.get(strings.ReplaceAll(next[1], "&amp;", "&")).body)
	assert.Len(t, second, 63-pageSize)
	assert.NotContains(t, second, first[len(first)-1], "pages do not overlap")
	assert.NotContains(t, b.get(strings.ReplaceAll(next[1], "&amp;", "&")).body, `id="next"`, "the last page")

	for _, q := range []string{"status=lost", "inbox=nocolon", "age=3d", "before=yesterday"} {
		r := b.get(testPrefix + "/events?" + q)
		assert.Equal(t, http.StatusBadRequest, r.status, q)
	}
}

// TestEventEscapesPayload: a payload, an error and an event type with
// markup render as text.
func TestEventEscapesPayload(t *testing.T) {
	pool := newPool(t)
	insertEvent(t, pool, "standard-webhooks", "msg_x", `<img src=x onerror=alert(1)>`, "", "failed",
		`<script>alert("error")</script>`, `{"note":"<script>alert(1)</script>"}`)
	c := newConsole(t, Options{Pool: pool})
	b := loggedIn(t, c)
	for _, path := range []string{"/event?inbox=standard-webhooks:&id=msg_x", "/events", "/"} {
		r := b.get(testPrefix + path)
		require.Equal(t, http.StatusOK, r.status, path)
		assert.NotContains(t, r.body, "<script>", path)
		assert.NotContains(t, r.body, "<img", path)
	}
	r := b.get(testPrefix + "/event?inbox=standard-webhooks:&id=msg_x")
	assert.Contains(t, r.body, "&lt;script&gt;alert(1)&lt;/script&gt;", "the payload, as text")
	assert.Contains(t, r.body, `&#34;note&#34;: &#34;`, "pretty-printed")
	assert.Contains(t, r.body, "&lt;script&gt;alert(&#34;error&#34;)&lt;/script&gt;")

	assert.Equal(t, http.StatusNotFound, b.get(testPrefix+"/event?inbox=standard-webhooks:&id=nope").status)
}

// TestRedrive: on a read-write console a failed event is redriven after a
// confirmation, and a filtered set too; a read-only console offers
// neither and refuses the POSTs.
func TestRedrive(t *testing.T) {
	pool := newPool(t)
	insertEvent(t, pool, "stripe", "evt_a", "account.updated", "acct_1", "failed", "boom", `{}`)
	insertEvent(t, pool, "stripe", "evt_b", "account.updated", "acct_2", "failed", "boom", `{}`)
	insertEvent(t, pool, "stripe", "evt_c", "invoice.paid", "acct_1", "failed", "boom", `{}`)
	insertEvent(t, pool, "github", "gh_1", "push", "", "failed", "bad", `{}`)
	status := func(provider, id string) string {
		var s string
		require.NoError(t, pool.QueryRow(context.Background(),
			`SELECT status FROM webhook_events WHERE provider = $1 AND event_id = $2`, provider, id).Scan(&s))
		return s
	}

	t.Run("read-only", func(t *testing.T) {
		c := newConsole(t, Options{Pool: pool})
		b := loggedIn(t, c)
		r := b.get(testPrefix + "/event?inbox=stripe:&id=evt_a")
		assert.NotContains(t, r.body, `id="redrive"`)
		assert.NotContains(t, b.get(testPrefix+"/events?status=failed").body, `id="redrive-set"`)
		assert.Equal(t, http.StatusForbidden, b.get(testPrefix+"/event/redrive?inbox=stripe:&id=evt_a").status)
		r = b.post(testPrefix+"/event/redrive", url.Values{"inbox": {"stripe:"}, "id": {"evt_a"}})
		assert.Equal(t, http.StatusForbidden, r.status)
		assert.Contains(t, r.body, "read-only")
		assert.Equal(t, http.StatusForbidden, b.post(testPrefix+"/events/redrive", url.Values{}).status)
		assert.Equal(t, "failed", status("stripe", "evt_a"))
		assert.Equal(t, 4, pgtest.Count(t, pool, `SELECT count(*) FROM webhook_events WHERE status = 'failed'`))
	})

	c := newConsole(t, Options{Pool: pool, ReadWrite: true})
	b := loggedIn(t, c)

	t.Run("one", func(t *testing.T) {
		r := b.get(testPrefix + "/event?inbox=stripe:&id=evt_a")
		require.Contains(t, r.body, `id="redrive"`)
		confirm := b.get(testPrefix + "/event/redrive?inbox=stripe:&id=evt_a")
		require.Equal(t, http.StatusOK, confirm.status)
		assert.Equal(t, "failed", status("stripe", "evt_a"), "a GET changes nothing")
		r = b.post(testPrefix+"/event/redrive", url.Values{"inbox": {"stripe:"}, "id": {"evt_a"}})
		require.Equal(t, http.StatusSeeOther, r.status)
		assert.Equal(t, "pending", status("stripe", "evt_a"))
		assert.Contains(t, b.get(r.header.Get("Location")).body, `id="redriven"`)
		r = b.post(testPrefix+"/event/redrive", url.Values{"inbox": {"stripe:"}, "id": {"evt_a"}})
		assert.Equal(t, http.StatusConflict, r.status, "no longer failed")
	})

	t.Run("a filtered set", func(t *testing.T) {
		confirm := b.get(testPrefix + "/events/redrive?object=acct_1")
		require.Equal(t, http.StatusOK, confirm.status)
		assert.Contains(t, confirm.body, "<strong>1</strong>", "evt_c; evt_a is pending already")
		r := b.post(testPrefix+"/events/redrive", url.Values{"object": {"acct_1"}})
		require.Equal(t, http.StatusSeeOther, r.status)
		assert.Contains(t, r.header.Get("Location"), "redriven=1")
		assert.Equal(t, "pending", status("stripe", "evt_c"))
		assert.Equal(t, "failed", status("stripe", "evt_b"))

		r = b.post(testPrefix+"/events/redrive", url.Values{"inbox": {"stripe:"}})
		require.Equal(t, http.StatusSeeOther, r.status)
		assert.Contains(t, r.header.Get("Location"), "redriven=1")
		assert.Equal(t, "pending", status("stripe", "evt_b"))
		assert.Equal(t, "failed", status("github", "gh_1"), "another inbox's")
	})
}

// TestOverview: counts per inbox and per type, and the chart of events
// processed per minute, as inline SVG.
func TestOverview(t *testing.T) {
	pool := newPool(t)
	insertEvent(t, pool, "stripe", "evt_1", "invoice.paid", "", "processed", "", `{}`)
	insertEvent(t, pool, "stripe", "evt_2", "invoice.paid", "", "processed", "", `{}`)
	insertEvent(t, pool, "stripe", "evt_3", "account.updated", "", "failed", "x", `{}`)
	insertEvent(t, pool, "github", "gh_1", "push", "", "pending", "", `{}`)
	act := NewActivity()
	c := newConsole(t, Options{Pool: pool, Activity: act})
	b := loggedIn(t, c)
	r := b.get(testPrefix + "/")
	require.Equal(t, http.StatusOK, r.status)
	assert.Contains(t, r.body, "<svg")
	assert.Contains(t, r.body, "processed (database: every worker): 2 in 24 h")
	assert.Regexp(t, `stripe</a></td>\s*<td class="n"><a [^>]+>0</a></td>\s*<td class="n">0</td>\s*<td class="n bad"><a [^>]+>1</a></td>\s*<td class="n"><a [^>]+>2</a>`, r.body)
	assert.Contains(t, r.body, ">account.updated</a>")
	assert.Contains(t, r.body, ">push</a>")
	assert.Contains(t, r.body, "Requests per minute by outcome")
}
