package lincheck_test

import (
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/pgtest"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// The tests here pin down, deterministically, what the histories of
// TestPGStore and TestPGStoreFaults find now and then on a busy server:
// a statement of the store that stalls at the wrong moment. The stall is
// made by a trigger of the test's own on the store's table, in the test's
// schema, that waits on an advisory lock the test holds; on a busy server
// it is CPU, or a wait for the row lock of the statement ahead.

// stall is a trigger on idempotency_keys that makes the statements it
// picks wait until the test lets them go.
type stall struct {
	pool   *pgxpool.Pool
	app    string // the application_name of the store's sessions
	holder *pgxpool.Conn
	lock   int64
	held   bool
}

// newStall returns a store's pool in a schema of the test's own, with a
// trigger (when: "BEFORE INSERT", "AFTER UPDATE"...) that, for a row
// where pick (a PL/pgSQL condition on NEW) holds, waits for release.
func newStall(t *testing.T, when, pick string) *stall {
	t.Helper()
	cfg := pgtest.Config(t)
	s := &stall{app: cfg.ConnConfig.RuntimeParams["application_name"], lock: mrand.Int64()}
	s.pool = pgtest.Pool(t, cfg, migrate)
	ctx := context.Background()
	for _, sql := range []string{
		`CREATE SEQUENCE lincheck_picked`,
		fmt.Sprintf(`CREATE FUNCTION lincheck_stall() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF %s THEN
        PERFORM pg_advisory_xact_lock(%d);
    END IF;
    RETURN NEW;
END $$`, pick, s.lock),
		`CREATE TRIGGER lincheck_stall ` + when + ` ON idempotency_keys FOR EACH ROW EXECUTE FUNCTION lincheck_stall()`,
	} {
		if _, err := s.pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if s.holder, err = s.pool.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.holder.Exec(ctx, `SELECT pg_advisory_lock($1)`, s.lock); err != nil {
		t.Fatal(err)
	}
	s.held = true
	t.Cleanup(func() {
		s.release()
		s.holder.Release()
	})
	return s
}

// waitFor returns once n of the store's sessions wait on a lock of the
// kind named by event ("advisory": in the trigger; "transactionid": for
// the row another statement holds).
func (s *stall) waitFor(t *testing.T, event string, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for waiting := 0; waiting < n; {
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock' AND wait_event = $2`, s.app, event).Scan(&waiting); err != nil {
			t.Fatalf("waiting for %d statements to wait on %s: %v", n, event, err)
		}
	}
}

// release lets the stalled statements go on.
func (s *stall) release() {
	if s.held {
		s.held = false
		s.holder.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, s.lock)
	}
}

// result is what a store call run in the background returned.
type result struct {
	fence uint64
	err   error
}

// TestPGFenceAfterSlowClaim: a claim whose statement took its fence from
// the sequence, then stalled before inserting its row, while another
// claim took the key with a later fence and released it, must not land
// with the earlier fence: fences grow for every new owner.
func TestPGFenceAfterSlowClaim(t *testing.T) {
	s := newStall(t, "BEFORE INSERT", `NEW.token = convert_to('stalled', 'UTF8')`)
	store := pgStore(t, s.pool)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stalled := make(chan result, 1)
	go func() {
		fence, _, err := store.Acquire(ctx, "k", idempotency.Record{Token: "stalled", Fingerprint: "fp", CreatedAt: time.Now()}, time.Minute)
		stalled <- result{fence, err}
	}()
	s.waitFor(t, "advisory", 1) // its fence taken

	other := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
	fence, existing, err := store.Acquire(ctx, "k", other, time.Minute)
	if err != nil || existing != nil {
		t.Fatalf("the other claim: fence %d, existing %+v, error %v", fence, existing, err)
	}
	if err := store.Release(ctx, "k", other.Token); err != nil {
		t.Fatal(err)
	}
	s.release()
	switch got := <-stalled; {
	case got.err != nil:
		t.Logf("the stalled claim failed (%v): no fence handed out", got.err)
	case got.fence <= fence:
		t.Errorf("the stalled claim landed with fence %d, after the key's previous owner had fence %d: "+
			"its statement takes the fence from the sequence (nextval in the INSERT's SELECT) before it inserts the row, and "+
			"inserts it whatever claims came and went in between (on a busy server: while it waits for the row locks of the "+
			"claims, renewals and releases ahead of it)", got.fence, fence)
	default:
		t.Logf("the stalled claim got fence %d, after %d", got.fence, fence)
	}
}

// TestPGCompleteRepeatedWhileCommitting: a Complete sent again while the
// first one is still committing (the client gave up on it, or its
// connection broke and pgstore re-sent it) must succeed: the record is
// completed by its token. Here the first one stalls after its update, in
// its transaction, until the second waits for its row lock.
func TestPGCompleteRepeatedWhileCommitting(t *testing.T) {
	// Only the first completion stalls: the sequence counts them.
	s := newStall(t, "AFTER UPDATE", `NEW.status = 'completed' AND nextval('lincheck_picked') = 1`)
	store := pgStore(t, s.pool)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
	if _, _, err := store.Acquire(ctx, "k", claim, time.Minute); err != nil {
		t.Fatal(err)
	}
	done := &idempotency.Record{Fingerprint: "fp", CreatedAt: claim.CreatedAt,
		Response: &idempotency.Response{StatusCode: 201, Body: []byte("done")}}
	complete := func(results chan<- result) {
		results <- result{err: store.Complete(ctx, "k", claim.Token, done, time.Hour)}
	}
	first, second := make(chan result, 1), make(chan result, 1)
	go complete(first)
	s.waitFor(t, "advisory", 1) // updated, not committed
	go complete(second)
	s.waitFor(t, "transactionid", 1) // waits for the first's row lock
	s.release()
	if got := <-first; got.err != nil {
		t.Fatalf("the first completion: %v", got.err)
	}
	if got := <-second; got.err != nil {
		t.Errorf("the repeated completion answered %q, although the record is completed by its token: "+
			"its statement's update waited for the first one's row lock and then found the row completed, and its check "+
			"for a record completed by the same token reads the statement's snapshot, taken before the first one committed", got.err)
	}
	rec, err := store.Get(ctx, "k")
	if err != nil || rec == nil || rec.Response == nil || string(rec.Response.Body) != "done" {
		t.Errorf("the record after both: %+v, error %v", rec, err)
	}
}

// TestPGReleaseRepeatedWhileCommitting: a Release sent again while the
// first one is still committing (as pgstore re-sends a statement whose
// connection broke) waits for the first one's row lock, then finds the
// key free: it must succeed, not report a lease lost (the first one
// released it). Likewise a repeated Fail must return the count the first
// one counted, although its statement's snapshot predates that count.
func TestPGReleaseRepeatedWhileCommitting(t *testing.T) {
	for _, op := range []string{"release", "fail"} {
		t.Run(op, func(t *testing.T) {
			// Only the first freeing of the claim stalls, after its update.
			s := newStall(t, "AFTER UPDATE", `NEW.status = 'in_flight' AND NEW.lease_expires_at <= clock_timestamp()
				AND nextval('lincheck_picked') = 1`)
			store := patientStore(t, s)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			claim := idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}
			if _, _, err := store.Acquire(ctx, "k", claim, time.Minute); err != nil {
				t.Fatal(err)
			}
			free := func(results chan<- result) {
				if op == "release" {
					results <- result{err: store.Release(ctx, "k", claim.Token)}
					return
				}
				n, err := store.Fail(ctx, "k", claim.Token, "boom", time.Hour)
				results <- result{fence: uint64(n), err: err}
			}
			first, second := make(chan result, 1), make(chan result, 1)
			go free(first)
			s.waitFor(t, "advisory", 1) // updated, not committed
			go free(second)
			s.waitFor(t, "transactionid", 1) // waits for the first's row lock
			s.release()
			if got := <-first; got.err != nil {
				t.Fatalf("the first %s: %v", op, got.err)
			}
			got := <-second
			switch {
			case got.err != nil:
				t.Errorf("the repeated %s answered %q, although the first one freed the key with the same token", op, got.err)
			case op == "fail" && got.fence != 1:
				t.Errorf("the repeated fail counted %d attempts; want the first one's count, 1", got.fence)
			}
			if attempts, _, err := store.Failures(ctx, "k"); err != nil || (op == "fail" && attempts != 1) {
				t.Errorf("failures after both: %d, error %v", attempts, err)
			}
			if rec, err := store.Get(ctx, "k"); err != nil || rec != nil {
				t.Errorf("the record after both: %+v, error %v", rec, err)
			}
		})
	}
}

// TestPGGetWhileRenewing: Get must not answer "no record" for a claim
// whose owner's renewal then succeeds. Here the renewal checks the lease
// while it runs, updates the row, then stalls before it commits, until
// the lease it renewed has ended by the database's clock; then a Get
// comes. It must wait for the renewal and answer the renewed claim (or
// fail), not read the lapsed lease from its snapshot.
func TestPGGetWhileRenewing(t *testing.T) {
	s := newStall(t, "AFTER UPDATE", `NEW.token = convert_to('renewing', 'UTF8') AND NEW.status = 'in_flight'`)
	store := patientStore(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key, renewed := s.stalledRenewal(t, store, ctx)

	type read struct {
		rec *idempotency.Record
		err error
	}
	got := make(chan read, 1)
	go func() {
		rec, err := store.Get(ctx, key)
		got <- read{rec, err}
	}()
	var g read
	answered := func() bool {
		select {
		case g = <-got:
			return true
		default:
			return false
		}
	}
	if s.waitForUnless(t, "transactionid", 1, answered) { // Get waits for the renewal's row lock
		s.release()
		g = <-got
	} else {
		t.Log("Get answered without waiting for the renewal in progress")
		s.release()
	}
	renewal := <-renewed
	switch {
	case g.err != nil:
		t.Fatalf("Get: %v", g.err)
	case renewal.err == nil && g.rec == nil:
		t.Errorf("Get answered no record, then the owner's renewal succeeded and the claim is in flight again: " +
			"the renewal checked the lease before it ended and committed after, and Get read a snapshot without waiting for " +
			"the row's lock, so a reader saw the claim lapse although its owner kept it")
	case renewal.err == nil && g.rec.Token != "renewing":
		t.Errorf("Get answered %+v, not the renewed claim", g.rec)
	default:
		t.Logf("renewal: %v; Get: %+v", renewal.err, g.rec)
	}
}

// TestPGAcquireWhileRenewing: Acquire is not fooled the same way. Its
// snapshot shows the lease ended, so its INSERT runs, finds the row and
// waits for the renewal's lock; ON CONFLICT DO UPDATE then checks the
// expiry on the renewed row, claims nothing, and Acquire sends the
// statement again (errRaced), whose snapshot shows the renewed claim.
func TestPGAcquireWhileRenewing(t *testing.T) {
	s := newStall(t, "AFTER UPDATE", `NEW.token = convert_to('renewing', 'UTF8') AND NEW.status = 'in_flight'`)
	store := patientStore(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key, renewed := s.stalledRenewal(t, store, ctx)

	type claimed struct {
		fence    uint64
		existing *idempotency.Record
		err      error
	}
	got := make(chan claimed, 1)
	go func() {
		fence, existing, err := store.Acquire(ctx, key, idempotency.Record{Token: rand.Text(), Fingerprint: "fp", CreatedAt: time.Now()}, time.Minute)
		got <- claimed{fence, existing, err}
	}()
	var c claimed
	answered := func() bool {
		select {
		case c = <-got:
			return true
		default:
			return false
		}
	}
	if s.waitForUnless(t, "transactionid", 1, answered) {
		s.release()
		c = <-got
	} else {
		s.release()
	}
	renewal := <-renewed
	switch {
	case c.err != nil:
		t.Fatalf("Acquire: %v", c.err)
	case renewal.err == nil && c.fence != 0:
		t.Errorf("Acquire claimed the key (fence %d) although its owner's renewal succeeded", c.fence)
	case renewal.err == nil && (c.existing == nil || c.existing.Token != "renewing"):
		t.Errorf("Acquire answered %+v, not the renewed claim", c.existing)
	default:
		t.Logf("renewal: %v; Acquire found %+v", renewal.err, c.existing)
	}
}

// patientStore returns a store on the stall's pool whose statements wait
// for row locks as long as the test may take: a statement waiting for the
// stalled one must not time out before the test lets it go.
func patientStore(t *testing.T, s *stall) *pgstore.Store {
	t.Helper()
	store, err := pgstore.New(context.Background(), s.pool, pgstore.Options{LockTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return store
}

// stalledRenewal claims a key for the token "renewing" with a short
// lease and renews it in the background; the renewal updates the row,
// stalls before it commits (the trigger must pick it), and stays stalled
// until the test releases it. It returns when the claim's first lease has
// ended by the database's clock, as a snapshot shows the row: the key and
// the channel the renewal's result will come on. On a busy machine the
// renewal may only run once the lease has lapsed (and is refused): then
// it tries again, on another key, with a lease twice as long.
func (s *stall) stalledRenewal(t *testing.T, store *pgstore.Store, ctx context.Context) (string, <-chan result) {
	t.Helper()
	for lease := 100 * time.Millisecond; lease < 10*time.Second; lease *= 2 {
		key := "k-" + lease.String()
		claim := idempotency.Record{Token: "renewing", Fingerprint: "fp", CreatedAt: time.Now()}
		if _, _, err := store.Acquire(ctx, key, claim, lease); err != nil {
			t.Fatal(err)
		}
		renewed := make(chan result, 1)
		go func() { renewed <- result{err: store.Extend(ctx, key, claim.Token, time.Minute)} }()
		var early result
		ended := func() bool {
			select {
			case early = <-renewed:
				return true
			default:
				return false
			}
		}
		if !s.waitForUnless(t, "advisory", 1, ended) { // updated, not committed
			t.Logf("the renewal of a %v lease ended before it stalled (%v): again with a longer lease", lease, early.err)
			continue
		}
		s.waitUntil(t, `SELECT lease_expires_at <= clock_timestamp() FROM idempotency_keys WHERE key = convert_to('`+key+`', 'UTF8')`)
		return key, renewed
	}
	t.Fatal("no renewal stalled in time")
	return "", nil
}

// waitUntil returns once query, which returns one boolean, returns true.
func (s *stall) waitUntil(t *testing.T, query string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for done := false; !done; {
		if err := s.pool.QueryRow(ctx, query).Scan(&done); err != nil {
			t.Fatalf("waiting for %s: %v", query, err)
		}
	}
}

// waitForUnless is waitFor, except that it returns false at once when
// answered reports that the call expected to wait has answered already.
func (s *stall) waitForUnless(t *testing.T, event string, n int, answered func() bool) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for waiting := 0; waiting < n; {
		if answered() {
			return false
		}
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock' AND wait_event = $2`, s.app, event).Scan(&waiting); err != nil {
			t.Fatalf("waiting for %d statements to wait on %s: %v", n, event, err)
		}
	}
	return true
}
