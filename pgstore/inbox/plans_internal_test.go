package inbox

import (
	"context"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// TestQueryPlans runs EXPLAIN for every statement of the inbox, its
// worker and its operator API, on a table of 40,000 events (mostly
// processed, as an inbox that has run for a while holds them, over two
// scopes and two providers, 1% of them expired), and asserts the index each one uses, with
// the plans PostgreSQL makes for given values (custom) and for any values
// (generic: what a prepared statement settles on). Every index of
// webhook_events is used by one of them: a delivery pays for no index
// that nothing reads.
func TestQueryPlans(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t, pgtest.Config(t), func(ctx context.Context, pool *pgxpool.Pool) error {
		return pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{})
	})
	pgtest.Exec(t, pool, `INSERT INTO webhook_events (scope, provider, event_id, type, object_id, status, attempts, last_error,
    payload, created, received_at, processed_at, next_attempt_at, expires_at)
SELECT sc, pr, 'evt_' || i, 'type.' || (i % 20), 'obj_' || (i % 5000), st, 1, CASE WHEN st = 'failed' THEN 'boom' END,
    '{}', i, now() - i * interval '1 second', CASE WHEN st = 'processed' THEN now() END,
    CASE WHEN st IN ('pending', 'processing') THEN now() + (i % 100) * interval '1 second' END,
    now() + (i % 1000 - 10) * interval '1 hour'
FROM generate_series(1, 40000) AS i,
    LATERAL (SELECT CASE WHEN i % 4 < 2 THEN '' ELSE 'other' END AS sc, CASE WHEN i % 2 = 0 THEN 'stripe' ELSE 'github' END AS pr,
        CASE WHEN i % 100 < 2 THEN 'pending' WHEN i % 100 < 3 THEN 'processing' WHEN i % 100 < 4 THEN 'failed'
             ELSE 'processed' END AS st) AS x`)
	pgtest.Exec(t, pool, "ANALYZE webhook_events")

	in, w, ordered := newInboxStatements(""), newWorkerStatements("", false), newWorkerStatements("", true)
	event := []string{"''", "'stripe'", "'evt_2'", "'tok'"} // $1 to $4 of the worker's writes
	indexes := map[string]bool{}
	rows, err := pool.Query(ctx, "SELECT indexname FROM pg_indexes WHERE tablename = 'webhook_events' AND schemaname = current_schema()")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			t.Fatal(err)
		}
		indexes[name] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	// received is the listing's index, of migration 0005
	// (webhook_events_received); without it, List and Stats read the
	// inbox's events whole and are not asserted.
	const received = "webhook_events_received"
	cases := []struct {
		name, sql string
		args      []string
		index     string // an index the plan reads
	}{
		{"delivery", in.insertOne, []string{"''", "'stripe'", "'evt_new'", "'t'", "'obj'", "''", "NULL", "'{}'", "1000"}, "webhook_events_pkey"},
		{"backfill", in.insert, []string{"''", "'stripe'", "'{evt_new}'", "'{t}'", "'{obj}'", "'{\"\"}'", "'{NULL}'", `'{"\\x7b7d"}'`, "1000"}, "webhook_events_pkey"},
		{"List", in.list, []string{"''", "'stripe'", "''", "''", "NULL", "100"}, received},
		{"List, a page", in.list, []string{"''", "'stripe'", "''", "''", "now() - interval '1 hour'", "100"}, received},
		{"Stats", in.stats, []string{"''", "'stripe'"}, received},
		{"Event", in.event, []string{"''", "'stripe'", "'evt_2'"}, "webhook_events_pkey"},
		{"Redrive", in.redrive, []string{"''", "'stripe'", "'evt_2'"}, "webhook_events_pkey"},
		{"Redrive's status", in.status, []string{"''", "'stripe'", "'evt_2'"}, "webhook_events_pkey"},
		{"RedriveType", in.redriveType, []string{"''", "'stripe'", "'type.2'"}, "webhook_events_failed"},
		{"RedriveType, every type", in.redriveType, []string{"''", "'stripe'", "''"}, "webhook_events_failed"},
		{"DeleteExpired", in.expire, []string{"1000"}, "webhook_events_expires_at"},
		{"worker claim", w.claim, []string{"''", "1", "'tok'", "30000"}, "webhook_events_due"},
		{"worker claim, ordered", ordered.claim, []string{"''", "1", "'tok'", "30000"}, "webhook_events_object"},
		{"worker claim, ordered (due)", ordered.claim, []string{"''", "1", "'tok'", "30000"}, "webhook_events_due"},
		{"worker extend", w.extend, append(event, "30000"), "webhook_events_pkey"},
		{"worker complete", w.complete, event, "webhook_events_pkey"},
		{"worker fail", w.fail, append(event, "10", "'boom'", "1000"), "webhook_events_pkey"},
		{"worker release", w.release, append(event, "'stopped'"), "webhook_events_pkey"},
		{"worker dead letter", w.deadLetter, append(event, "'bad'"), "webhook_events_pkey"},
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	used := map[string]bool{}
	indexName := regexp.MustCompile(`(?:using|on|Indexes:) (webhook_events_\w+)`)
	for _, c := range cases {
		if c.index == received && !indexes[received] {
			continue
		}
		for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
			var plan strings.Builder
			for _, q := range []string{"SET plan_cache_mode = " + mode, "PREPARE q AS " + c.sql} {
				if _, err := conn.Exec(ctx, q); err != nil {
					t.Fatalf("%s: %s: %v", c.name, q, err)
				}
			}
			rows, err := conn.Query(ctx, "EXPLAIN EXECUTE q("+strings.Join(c.args, ", ")+")")
			if err != nil {
				t.Fatalf("%s (%s): %v", c.name, mode, err)
			}
			for rows.Next() {
				var line string
				if err := rows.Scan(&line); err != nil {
					t.Fatal(err)
				}
				plan.WriteString(line + "\n")
			}
			if err := rows.Err(); err != nil {
				t.Fatalf("%s (%s): %v", c.name, mode, err)
			}
			if _, err := conn.Exec(ctx, "DEALLOCATE q"); err != nil {
				t.Fatal(err)
			}
			var indexes []string
			for _, m := range indexName.FindAllStringSubmatch(plan.String(), -1) {
				indexes = append(indexes, m[1])
				used[m[1]] = true
			}
			if !slices.Contains(indexes, c.index) {
				t.Errorf("%s (%s): the plan does not use %s:\n%s", c.name, mode, c.index, plan.String())
			}
		}
	}
	for name := range indexes {
		if !used[name] {
			t.Errorf("index %s is used by no statement of the inbox", name)
		}
	}
}
