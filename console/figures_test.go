package console

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

// figuresEnv enables TestRenderFigures, which takes a minute.
const figuresEnv = "CONSOLE_FIGURES"

// seed100k stores 100,000 events in one statement: 90% Stripe's, 10%
// GitHub's, five types, 5,000 objects, one received every 6 seconds
// (about a week), 1% failed, 1% pending, the rest processed a second
// after they arrived.
const seed100k = `INSERT INTO webhook_events (scope, provider, event_id, type, object_id, status, attempts, last_error,
    payload, received_at, processed_at, next_attempt_at, expires_at, created)
SELECT '', CASE WHEN i % 10 = 0 THEN 'github' ELSE 'stripe' END, 'evt_' || lpad(i::text, 7, '0'),
    (ARRAY['invoice.paid', 'account.updated', 'customer.created', 'charge.succeeded', 'payment_intent.succeeded'])[1 + i % 5],
    'obj_' || (i % 5000),
    CASE WHEN i % 100 = 7 THEN 'failed' WHEN i % 100 = 8 THEN 'pending' ELSE 'processed' END,
    CASE WHEN i % 100 = 7 THEN 10 ELSE 1 END,
    CASE WHEN i % 100 = 7 THEN 'card_declined: <b>insufficient funds</b>' END,
    convert_to('{"id":"evt_' || i || '","object":"event","data":{"object":{"id":"obj_' || (i % 5000) || '","note":"<script>x</script>"}}}', 'UTF8'),
    now() - i * interval '6 seconds',
    CASE WHEN i % 100 NOT IN (7, 8) THEN now() - i * interval '6 seconds' + interval '1 second' END,
    CASE WHEN i % 100 = 8 THEN now() END,
    now() + interval '45 days', extract(epoch FROM now())::bigint - i * 6
FROM generate_series(1, 100000) AS i`

// TestRenderFigures measures, with 100,000 events in the inbox, how long
// the console takes to answer each page (through ServeHTTP, database
// included), p50 and p99 over interleaved rounds, beside a floor measured
// in the same rounds: one SELECT 1 round trip on the same pool. It logs
// the plans of the statements behind the list. Run it with
//
//	CONSOLE_FIGURES=1 IDEMPOTENCY_TEST_DATABASE_URL=... go test -run TestRenderFigures -v ./console/
func TestRenderFigures(t *testing.T) {
	if os.Getenv(figuresEnv) == "" {
		t.Skipf("%s not set: the render figures take a minute", figuresEnv)
	}
	ctx := context.Background()
	pool := newPool(t)
	start := time.Now()
	pgtest.Exec(t, pool, seed100k)
	pgtest.Exec(t, pool, "ANALYZE webhook_events")
	t.Logf("100,000 events stored in %v", time.Since(start).Round(time.Millisecond))

	for name, stmt := range map[string]string{
		"list, every status (inbox.List)": `EXPLAIN SELECT event_id FROM webhook_events WHERE scope = '' AND provider = 'stripe'
    AND ('' = '' OR status = '') AND ('' = '' OR type = '') AND (NULL::timestamptz IS NULL OR received_at < NULL)
    ORDER BY received_at DESC, event_id LIMIT 51`,
		"list, failed (inbox.List)": `EXPLAIN SELECT event_id FROM webhook_events WHERE scope = '' AND provider = 'stripe'
    AND ('failed' = '' OR status = 'failed') AND ('' = '' OR type = '') AND (NULL::timestamptz IS NULL OR received_at < NULL)
    ORDER BY received_at DESC, event_id LIMIT 51`,
		"event (inbox.Event)": `EXPLAIN SELECT payload FROM webhook_events WHERE scope = '' AND provider = 'stripe' AND event_id = 'evt_0050001'`,
	} {
		rows, err := pool.Query(ctx, stmt)
		require.NoError(t, err)
		var plan []string
		for rows.Next() {
			var line string
			require.NoError(t, rows.Scan(&line))
			plan = append(plan, strings.TrimSpace(line))
		}
		require.NoError(t, rows.Err())
		t.Logf("plan of %s: %s", name, strings.Join(plan, " | "))
	}

	c := newConsole(t, Options{Pool: pool})
	b := loggedIn(t, c)
	deep := time.Now().Add(-72 * time.Hour).UTC().Format(time.RFC3339Nano)
	pages := []struct{ name, path string }{
		{"events, every inbox, first page", "/events"},
		{"events, one inbox, first page", "/events?inbox=stripe:"},
		{"dead letters (status=failed)", "/events?status=failed"},
		{"events, a page 3 days back", "/events?inbox=stripe:&before=" + deep},
		{"events of one object", "/events?object=obj_42"},
		{"an event's detail", "/event?inbox=stripe:&id=evt_0050001"},
		{"overview (counts, chart)", "/"},
	}
	for _, p := range pages {
		r := b.get(testPrefix + p.path)
		require.Equal(t, http.StatusOK, r.status, p.path)
		require.NotContains(t, r.body, "<script>x", p.path)
	}
	const rounds = 100
	floor := make([]time.Duration, 0, rounds)
	took := make([][]time.Duration, len(pages))
	reqs := make([]*http.Request, len(pages))
	for i, p := range pages {
		reqs[i] = httptest.NewRequest(http.MethodGet, "http://127.0.0.1"+testPrefix+p.path, nil)
		reqs[i].AddCookie(b.cookie)
	}
	for range rounds {
		s := time.Now()
		var one int
		require.NoError(t, pool.QueryRow(ctx, "SELECT 1").Scan(&one))
		floor = append(floor, time.Since(s))
		for i, req := range reqs {
			rec := httptest.NewRecorder()
			s := time.Now()
			c.ServeHTTP(rec, req)
			took[i] = append(took[i], time.Since(s))
			require.Equal(t, http.StatusOK, rec.Code)
		}
	}
	f50, f99 := quantiles(floor)
	t.Logf("%-34s %9s %9s %8s", "page", "p50", "p99", "p50/floor")
	t.Logf("%-34s %9v %9v %8s", "floor: SELECT 1", f50, f99, "1")
	for i, p := range pages {
		p50, p99 := quantiles(took[i])
		t.Logf("%-34s %9v %9v %7.0fx", p.name, p50, p99, float64(p50)/float64(f50))
	}
}

// quantiles returns the median and the 99th percentile of d.
func quantiles(d []time.Duration) (p50, p99 time.Duration) {
	s := slices.Clone(d)
	slices.Sort(s)
	round := func(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
	return round(s[len(s)/2]), round(s[len(s)*99/100])
}
