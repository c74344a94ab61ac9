// Package pgstore is an [idempotency.Store] in PostgreSQL (12 or later),
// on pgx v5's connection pool, whose claims can commit with the handler's
// own rows ([Store.Tx], [Store.Phase]). [Migrate] creates its tables;
// [Store.RunCleanup] deletes expired records. It is a module of its own,
// so that programs on the memory or Redis store never link a PostgreSQL
// driver. The webhook inbox, which stores deliveries to process them
// later, is package [github.com/seed70ea8305/idempotency/pgstore/inbox],
// on the same tables.
//
// Create the tables at deploy or at start-up ([Migrate] is idempotent and
// safe to call from several processes at once), then hand the store to the
// middleware or the webhook handler. [New] checks, in one round trip, that
// the tables are there at the migration this version needs, and otherwise
// fails with an error wrapping [ErrNotMigrated] that says what it found:
//
//	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
//	if err != nil {
//		return err
//	}
//	if err := pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{}); err != nil {
//		return err
//	}
//	store, err := pgstore.New(ctx, pool, pgstore.Options{})
//	if err != nil {
//		return err
//	}
//	go store.RunCleanup(ctx, time.Minute, 1000) // deletes expired records
//	m, err := idempotency.New(store, idempotency.Options{})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /venues", m.Handler(http.HandlerFunc(createVenue)))
//
// Teams with a migration tool of their own apply the SQL files of
// [Migrations] instead of calling Migrate, in name order, each once.
//
// # Tables
//
// idempotency_keys holds one row per record key: the claim while the work
// runs (status in_flight, the owner's token, the lease's end), then the
// stored response (status completed); a claim may carry a recovery point
// (migration 0003), which keeps the row, suspended, after its owner
// stopped. idempotency_failures counts the failed attempts of
// [idempotency.FailureRecorder]. webhook_events is the webhook inbox's
// (package pgstore/inbox). idempotency_schema_migrations records the
// migrations applied. Keys are opaque bytes (bytea); the primary key is
// their SHA-256, so keys of any length fit.
//
// # Protocol
//
// Every call is one statement, one round trip, in its own implicit
// transaction; nothing on the request path takes a table or advisory lock.
// [Store.Acquire] is one INSERT … ON CONFLICT DO NOTHING that claims a
// free key, and otherwise returns the row it found without touching it;
// only a key whose row expired (and was not deleted yet), or a suspended
// row of the same request, needs a second statement, an INSERT … ON
// CONFLICT DO UPDATE that takes the row over (keeping a suspended row's
// recovery point). The
// later writes ([Store.Extend], [Store.Checkpoint], [Store.Complete],
// [Store.Release], [Store.Fail]) lock the key's row, then change it only
// when the caller's token owns it, in flight, with its lease unexpired,
// checked on the row as locked (a check made before waiting for the lock
// could be overtaken by the transaction it waited for). They return
// [idempotency.ErrLeaseLost] when the token does not own it; except that
// Complete and Fail repeated by the same token find their own outcome and
// succeed again, and Release refuses only when another owner or a
// completed record holds the key (see [idempotency.Store]). [Store.Get]
// locks the row for a moment too (FOR SHARE), so that it waits for a write
// in progress. A first request through the middleware thus costs two
// statements (claim, then complete), three when it takes a row over; a
// replay, a 409 or a 422 one, which locks and writes nothing. Leases and expiry use the database's clock
// (clock_timestamp()), never the client's.
//
// Release and Fail free a row in place, ending its lease and its life at
// once (or suspending it, when it holds a recovery point): no statement
// of the request path deletes a row, and a row keeps its fence. Fences
// come from one sequence for every key (idempotency_fence), which only
// grows, and a claim that takes over a key's row (ON CONFLICT DO UPDATE)
// draws its fence once it holds the row's lock, so every new owner of a
// key gets a greater fence than the owners before it. Only a claim of a
// key without a row draws its fence before it inserts, and may then wait
// for another claim's insert of the same key; that is why rows stay.
// [Store.DeleteExpired] deletes a row a minute after it stopped counting,
// far beyond any statement's wait; [Store.Remove], the operator's way out
// of a record, deletes it at once.
//
// # Deadlines and failures
//
// Each call honours its context: its statements run under their
// connection's deadline, set to the context's deadline and moved to the
// present when the context ends (rather than under pgx's watcher of the
// context, a goroutine per statement). When the deadline passes, the
// statement is abandoned and its connection closed, so a call returns by
// its deadline, also when the server or the network stalls. A handler's
// own statements in the claim's transaction ([Store.Tx]) are bounded by
// the context the handler gives pgx. A claim whose
// statement reaches the server only after the deadline (by the server's
// clock) is refused by the statement itself, so it cannot land after the
// middleware answered 503. Each statement waits at most
// [Options].LockTimeout for a row lock. A statement whose connection broke (the server
// terminated the backend, a reset) is sent again on another connection,
// as often as it takes to reach a live one before the call's deadline (a
// call without one: for 5 s), never after it: every statement is safe to
// repeat (a repeated claim finds the caller's own claim and counts as
// acquired; a repeated completion or failure finds its own outcome). The
// pool may hold many idle connections that a restart killed, each found
// dead only when used and then dropped; those re-sends go at once, until
// the pool dials a new connection. When a new connection cannot be made
// (the server is down or starting), re-sends wait a little longer each
// time, up to 100 ms.
//
// A connection whose statement was abandoned at its deadline is closed
// by pgx in the background, after a cancel request that pgx sends the
// server on a new connection and waits up to 15 s for; pgxpool keeps the
// connection's slot until then. A server that can be reached answers the
// request at once, but a silent network partition swallows it, and the
// pool would stay exhausted, every call failing, for up to 15 s after the
// network healed. So the store gives such a connection back itself: when
// pgx has not finished closing it within 250 ms, the store takes it out
// of the pool (pgxpool's Hijack) and its slot is free at once, while pgx
// goes on closing it. For those seconds the pool may have more
// connections open than its MaxConns, the extra ones waiting for the
// server to acknowledge that their statement is cancelled. The pool's
// configuration is left as the caller made it. The inbox gives its
// connections back the same way.
//
// A live record that cannot be decoded (a stored status outside 200 to
// 999, a corrupt header, a row no version of the store writes) makes
// [Store.Acquire] and [Store.Get] return an error wrapping
// [idempotency.ErrRecordUnreadable], which the middleware answers with
// 500: retrying changes nothing. [Store.Remove] deletes it. Every other
// error except [idempotency.ErrLeaseLost] — a lock timeout (SQLSTATE
// 55P03), a statement_timeout or cancellation (57014), a pool that had no
// free connection before the deadline, a connection that could not be
// made — is a store failure, which the middleware wraps in
// [idempotency.ErrStoreUnavailable] and answers with 503 and Retry-After
// (or runs the handler unprotected under [idempotency.Options].FailOpen).
// The statements assume READ COMMITTED, PostgreSQL's default: under a
// serializable default_transaction_isolation, racing claims fail with
// SQLSTATE 40001, also a store failure.
//
// A Store is safe for concurrent use, also from several processes sharing
// one database; create it with [New].
//
// # Transactions and recovery points
//
// A handler can write its business rows in the claim's transaction,
// [Store.Tx]: the middleware stores the response in the same transaction
// and commits it after the handler returns, so the rows and the stored
// response commit together or not at all. The response is held until the
// commit succeeded; when it fails (a lost lease, a broken connection),
// the client gets 503 and the key is free for its retry, with nothing
// committed. The transaction locks no row of the store, so lease renewals
// and duplicates (409) are never blocked by it.
//
//	func createVenue(w http.ResponseWriter, r *http.Request) {
//		tx, err := store.Tx(r.Context()) // the store commits it
//		if err != nil {
//			http.Error(w, "unavailable", idempotency.StatusCode(err))
//			return
//		}
//		var id int64
//		if err := tx.QueryRow(r.Context(), "INSERT INTO venues (name) VALUES ($1) RETURNING id", "Hall").Scan(&id); err != nil {
//			http.Error(w, "unavailable", http.StatusServiceUnavailable) // 5xx: rolled back, key freed
//			return
//		}
//		w.WriteHeader(http.StatusCreated)
//		fmt.Fprintf(w, `{"id":%d}`, id)
//	}
//
// Work with several phases (a foreign call between two sets of writes)
// records recovery points, as in Brandur Leach's atomic phases:
// [Store.Phase] commits a phase's writes together with its recovery point,
// and a retry after a crash, a lost lease or a failure resumes from the
// last one ([idempotency.Claim.RecoveryPoint]); the claim's transaction is
// then the last phase. Until the retry comes, the key is bound to that
// request: another request under it gets 422. The store implements
// [idempotency.Checkpointer] ([Store.Checkpoint], a recovery point on its
// own, which [idempotency.Claim.Checkpoint] calls) and
// [idempotency.Inspector] ([Store.Get], [Store.Remove]).
package pgstore
