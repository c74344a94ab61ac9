package pgstore

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/recordkey"
)

// This file holds what commits a claim's outcome with the handler's own
// writes: the claim's transaction ([Store.Tx]), atomic phases with their
// recovery points ([Store.Phase], [Store.Checkpoint]), and reading a
// record ([Store.Get]).

// Limits on a recovery point, as [idempotency.Claim.Checkpoint] has them.
const (
	maxRecoveryPoint = 255
	maxRecoveryData  = 64 << 10
)

// orphanGrace is how long a claim's transaction may stay open after the
// handler's context ended before the store ends the claim and rolls it
// back ([Store.Tx]).
const orphanGrace = time.Minute

var (
	errCommitRefused = errors.New("pgstore: the claim's transaction is committed by the store, with the response, after the handler returns: do not call Commit")
	errPhaseEnds     = errors.New("pgstore: a phase's transaction is committed or rolled back by Phase: return an error from the phase to roll it back")
	errTxRolledBack  = errors.New("pgstore: the claim's transaction was rolled back")
	errTxEnded       = errors.New("pgstore: the claim's transaction has ended")
	errTxOpen        = errors.New("pgstore: the claim's transaction is open: its writes commit with the response, so a recovery point now could outlive them; record recovery points before calling Tx")
)

// claimOf returns the claim in ctx and the store key of its record.
func claimOf(ctx context.Context) (idempotency.Claim, string, bool) {
	claim, ok := idempotency.ClaimFromContext(ctx)
	if !ok || claim.Fence == 0 {
		return idempotency.Claim{}, "", false
	}
	return claim, recordkey.Name(claim.Kind, claim.Scope, claim.Key), true
}

// txState is where a claim's transaction is.
type txState uint8

const (
	txOpening    txState = iota
	txOpen               // the handler may use it
	txRolledBack         // by the handler: the response is stored alone
	txRevoked            // by the orphan watch, which also ended the claim
	txEnded              // committed or rolled back by the store, or never opened
)

// claimTx is the transaction of one claim, registered in its store under
// the claim's fence (fences are unique: one sequence hands them out).
type claimTx struct {
	key   string
	fence uint64

	// mu is held while the transaction opens and while it ends, so that
	// whoever takes it from the registry waits for the opening.
	mu     sync.Mutex
	state  txState
	tx     *connTx // the pool's transaction: ending it releases the connection
	handle *heldTx
	err    error         // why it did not open
	done   chan struct{} // closed when it leaves the registry normally
	stop   func() bool   // stops the orphan watch's context.AfterFunc
}

// heldTx is the claim's transaction as the handler sees it: Commit is
// refused, Rollback gives the writes up.
type heldTx struct {
	pgx.Tx
	t *claimTx
}

// Commit refuses: the store commits the transaction with the response.
func (h *heldTx) Commit(context.Context) error { return errCommitRefused }

// Rollback gives the handler's writes up; the response is then stored on
// its own, as without a transaction.
func (h *heldTx) Rollback(ctx context.Context) error {
	h.t.mu.Lock()
	defer h.t.mu.Unlock()
	if h.t.state != txOpen {
		return pgx.ErrTxClosed
	}
	h.t.state = txRolledBack
	return h.t.tx.Rollback(ctx)
}

// Tx returns the transaction of the claim in ctx, the handler's context:
// the handler's writes in it commit together with the stored response,
// after the handler returns, or not at all. Tx opens the transaction on
// the store's pool at the first call, checks in it that the claim still
// holds its key (in flight, the claim's fence, the lease unexpired;
// without locking the row, so lease renewals go on; sent with BEGIN, in
// one round trip), and makes the
// middleware hold the response ([idempotency.Claim.HoldResponse]): the
// client gets it only once it committed, and otherwise 503, with the key
// freed for its retry. Later calls in the same attempt return the same
// transaction. Call it before writing the response.
//
// [Store.Complete] then commits the transaction with the response;
// [Store.Release] and [Store.Fail] (a 5xx, a panic, a handler cut short)
// roll it back. The transaction's Commit returns an error, without
// committing: the store commits. Its Rollback gives the writes up, and
// the response is then stored alone (use it to answer an error without
// the writes: a statement that failed aborts the transaction, and the
// response could not be stored in it); do not defer it. Savepoints (its
// Begin) work as in any pgx transaction. Never use it after the handler
// returned.
//
// A connection that breaks under the transaction is not replaced: the
// transaction is lost, and so is the attempt (503, key freed). A
// transaction still open a minute after the handler's context ended
// (the middleware called neither Complete nor Release on this store:
// give Tx the Store the middleware has) is rolled back, and the claim's
// lease ended, so that its response cannot be stored without it.
//
// The error wraps [idempotency.ErrNoClaim] when ctx carries no claim, and
// [idempotency.ErrLeaseLost] when the claim no longer holds its key.
func (s *Store) Tx(ctx context.Context) (pgx.Tx, error) {
	claim, key, ok := claimOf(ctx)
	if !ok {
		return nil, fmt.Errorf("%w: pgstore: no claim to open a transaction for", idempotency.ErrNoClaim)
	}
	s.txMu.Lock()
	if t := s.txs[claim.Fence]; t != nil {
		s.txMu.Unlock()
		t.mu.Lock()
		defer t.mu.Unlock()
		switch {
		case t.key != key:
			return nil, errors.New("pgstore: tx: the claim's fence is registered for another key")
		case t.state == txOpen:
			return t.handle, nil
		case t.state == txRolledBack:
			return nil, errTxRolledBack
		case t.err != nil:
			return nil, t.err
		}
		return nil, errTxEnded
	}
	t := &claimTx{key: key, fence: claim.Fence}
	t.mu.Lock()
	defer t.mu.Unlock()
	s.txs[claim.Fence] = t
	s.txMu.Unlock()

	if err := s.open(ctx, t); err != nil {
		t.state, t.err = txEnded, err
		s.unregister(t)
		return nil, err
	}
	claim.HoldResponse()
	t.state = txOpen
	return t.handle, nil
}

// open begins t's transaction and checks in it that the claim holds its
// key. It is called with t registered: if the attempt already ended (its
// context is done before the middleware's Complete), opening fails, so a
// transaction is never registered after Complete looked for it.
func (s *Store) open(ctx context.Context, t *claimTx) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("pgstore: tx: %w", err)
	}
	// Nothing is written yet: on a broken connection, begin again on
	// another one.
	var tx *connTx
	err := s.retry(ctx, func() error {
		var err error
		tx, err = s.beginHolding(ctx, t.key, t.fence)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "26000" {
			// invalid_sql_statement_name: the connection lost its
			// prepared statements (a pooler between, say): BEGIN, then
			// the check, in two round trips.
			if tx, err = s.begin(ctx); err == nil {
				if _, err = tx.Exec(ctx, s.sql.holds, []byte(t.key), int64(t.fence)); err != nil {
					tx.Rollback(ctx)
				}
			}
		}
		return err
	})
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == notHoldingCode:
		return fmt.Errorf("pgstore: tx: %w", idempotency.ErrLeaseLost)
	case err != nil:
		return fmt.Errorf("pgstore: tx: %w", err)
	}
	t.tx, t.handle = tx, &heldTx{Tx: tx, t: t}
	t.done = make(chan struct{})
	t.stop = context.AfterFunc(ctx, func() { s.watch(context.WithoutCancel(ctx), t) })
	return nil
}

// notHoldingCode is the SQLSTATE of the holds check when the claim no
// longer holds its key (invalid_text_representation: its message cast to
// an integer).
const notHoldingCode = "22P02"

// beginHolding begins a claim's transaction and checks in it that the
// claim (its fence) holds key: in flight, its lease unexpired, read
// without locking, so lease renewals go on. The check travels with BEGIN
// in one round trip: pgx sends a BeginQuery without arguments in the
// simple protocol, which returns no rows, so the check reports a claim
// that no longer holds by failing, with an error whose message says so
// (notHoldingCode). It runs as EXECUTE of the holds statement, prepared
// on the connection once (a query of its own in the simple protocol would
// be planned at every call); the key goes in hex-encoded and the fence as
// a number, so no byte of either is read as SQL.
func (s *Store) beginHolding(ctx context.Context, key string, fence uint64) (*connTx, error) {
	return s.beginWith(ctx, func(conn *pgx.Conn) (pgx.TxOptions, error) {
		if _, err := conn.Prepare(ctx, s.sql.holdsName, s.sql.holds); err != nil {
			return pgx.TxOptions{}, err
		}
		return pgx.TxOptions{BeginQuery: "BEGIN; EXECUTE " + s.sql.holdsName + "(decode('" + hex.EncodeToString([]byte(key)) + "', 'hex'), " +
			strconv.FormatInt(int64(fence), 10) + ")"}, nil
	})
}

// watch runs once the handler's context ended (ctx keeps its values):
// unless the claim's transaction leaves the registry within orphanGrace,
// it revokes it.
func (s *Store) watch(ctx context.Context, t *claimTx) {
	timer := time.NewTimer(s.orphanGrace)
	defer timer.Stop()
	select {
	case <-t.done:
	case <-timer.C:
		s.revoke(ctx, t)
	}
}

// revoke ends the claim of an orphaned transaction, then rolls it back.
// The claim is ended first (its row freed, or suspended if it holds a
// recovery point), so that no Complete can store the response without the
// transaction's writes; a Complete waiting for t meanwhile fails with
// ErrLeaseLost.
func (s *Store) revoke(ctx context.Context, t *claimTx) {
	s.txMu.Lock()
	registered := s.txs[t.fence] == t
	s.txMu.Unlock()
	if !registered {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch t.state {
	case txRolledBack: // by the handler: nothing is held but the entry
		s.unregister(t)
		return
	case txOpen:
	default:
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.lockTimeout+5*time.Second)
	defer cancel()
	var (
		n    int64
		held bool // by another claim or a completed record: nothing to end
	)
	err := s.retry(ctx, func() error {
		return s.queryRow(ctx, s.sql.releaseByFence, []byte(t.key), int64(t.fence), s.lockTimeoutParam(ctx)).Scan(&n, &held)
	})
	t.tx.Rollback(ctx)
	t.state = txRevoked
	if s.logger != nil {
		s.logger.Warn("idempotency: pgstore: rolled back a claim's transaction still open a minute after its handler's context ended, and ended the claim; is the middleware using another Store than the one Tx was called on?",
			"fence", t.fence, "claims_ended", n, "held_by_another", held, "error", err)
	}
	if err != nil {
		// The claim may still hold: leave t registered, so that a late
		// Complete fails instead of storing the response alone.
		return
	}
	s.unregister(t)
}

// unregister takes t out of the registry, if it is still there.
func (s *Store) unregister(t *claimTx) {
	s.txMu.Lock()
	if s.txs[t.fence] == t {
		delete(s.txs, t.fence)
	}
	s.txMu.Unlock()
}

// takeTx takes the transaction of the claim in ctx out of the registry, if
// it has one and it belongs to key, and returns it locked (the caller ends
// it and unlocks it); nil otherwise.
func (s *Store) takeTx(ctx context.Context, key string) *claimTx {
	claim, ok := idempotency.ClaimFromContext(ctx)
	if !ok || claim.Fence == 0 {
		return nil
	}
	s.txMu.Lock()
	t := s.txs[claim.Fence]
	if t == nil || t.key != key {
		s.txMu.Unlock()
		return nil
	}
	delete(s.txs, claim.Fence)
	s.txMu.Unlock()
	t.mu.Lock()
	if t.done != nil {
		t.stop()
		close(t.done)
	}
	return t
}

// abandonTx rolls back the transaction of the claim in ctx, if it has one
// open for key: Release and Fail give its writes up.
func (s *Store) abandonTx(ctx context.Context, key string) {
	t := s.takeTx(ctx, key)
	if t == nil {
		return
	}
	defer t.mu.Unlock()
	if t.state == txOpen {
		t.tx.Rollback(ctx)
	}
	t.state = txEnded
}

// completeInTx runs the completion (args as for s.sql.complete) in t's
// transaction and commits it, or rolls it back and fails. It unlocks t.
func (s *Store) completeInTx(ctx context.Context, t *claimTx, token string, args []any) error {
	defer t.mu.Unlock()
	state := t.state
	t.state = txEnded
	switch state {
	case txRevoked:
		return idempotency.ErrLeaseLost
	case txOpen:
	default: // rolled back by the handler: the response alone
		return s.owned(ctx, "complete", token, func() (bool, error) {
			var done bool
			err := s.queryRow(ctx, s.sql.complete, args...).Scan(&done)
			return done, err
		})
	}
	if token == "" {
		t.tx.Rollback(ctx)
		return idempotency.ErrLeaseLost
	}
	var done bool
	err := t.tx.bound(ctx, func(ctx context.Context) error {
		return t.tx.QueryRow(ctx, s.sql.complete, args...).Scan(&done)
	})
	switch {
	case err != nil:
		t.tx.Rollback(ctx)
		return fmt.Errorf("pgstore: complete in the claim's transaction: %w", err)
	case !done:
		t.tx.Rollback(ctx)
		return idempotency.ErrLeaseLost
	}
	if err := t.tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgstore: complete in the claim's transaction: commit: %w", err)
	}
	return nil
}

// txOpenFor reports whether the claim in ctx has its transaction open (or
// opening) for key.
func (s *Store) txOpenFor(ctx context.Context, key string) bool {
	claim, ok := idempotency.ClaimFromContext(ctx)
	if !ok || claim.Fence == 0 {
		return false
	}
	s.txMu.Lock()
	t := s.txs[claim.Fence]
	s.txMu.Unlock()
	if t == nil || t.key != key {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state == txOpen
}

// validPoint checks a recovery point's name and data.
func validPoint(point string, data []byte) error {
	switch {
	case point == "" || len(point) > maxRecoveryPoint:
		return fmt.Errorf("pgstore: recovery point name must be 1 to %d bytes", maxRecoveryPoint)
	case !utf8.ValidString(point) || strings.IndexByte(point, 0) >= 0:
		return fmt.Errorf("pgstore: recovery point name %q is not valid UTF-8 without NUL", point)
	case len(data) > maxRecoveryData:
		return fmt.Errorf("pgstore: recovery data of %d bytes exceeds %d", len(data), maxRecoveryData)
	}
	return nil
}

// Checkpoint implements [idempotency.Checkpointer] in one statement, on
// its own connection and transaction: it records point and data on the
// in-flight record that token owns, and keeps the record at least ttl from
// now. The name must be valid UTF-8 without NUL (it is stored as text).
// It refuses while the claim in ctx has its transaction open ([Store.Tx]):
// the transaction's writes might yet be rolled back, and the recovery
// point would claim them done. To commit a recovery point with the writes
// of its phase, use [Store.Phase].
func (s *Store) Checkpoint(ctx context.Context, key, token, point string, data []byte, ttl time.Duration) error {
	if ttl <= 0 {
		return fmt.Errorf("pgstore: recovery point TTL %v is not positive", ttl)
	}
	if err := validPoint(point, data); err != nil {
		return err
	}
	if s.txOpenFor(ctx, key) {
		return errTxOpen
	}
	return s.owned(ctx, "checkpoint", token, func() (bool, error) {
		tag, err := s.exec(ctx, s.sql.checkpoint, []byte(key), []byte(token), point, data,
			ttl.Microseconds(), s.lockTimeoutParam(ctx))
		return tag.RowsAffected() == 1, err
	})
}

// Phase runs one atomic phase of the work of the claim in ctx (the
// handler's or the webhook function's context): fn's writes, in a
// transaction on the store's pool, and the recovery point named point,
// with data (at most 64 KiB: an ID or two, as for
// [idempotency.Claim.Checkpoint]), commit together, or neither does. fn
// must not commit or roll back the transaction (both are refused): it
// returns an error to roll it back, and Phase returns that error as it
// is. The recovery point is recorded last, owner-checked (the claim's
// fence, its lease unexpired): when the claim no longer holds its key the
// phase is rolled back and the error wraps [idempotency.ErrLeaseLost].
//
// A later attempt at the same request, after this one failed, crashed or
// lost its lease, starts with [idempotency.Claim.RecoveryPoint] and
// RecoveryData set to the last phase that committed, and skips what was
// done. IDs the phase creates are best made before it, so that they can
// be its data:
//
//	claim, _ := idempotency.ClaimFromContext(ctx)
//	venueID := string(claim.RecoveryData)
//	if claim.RecoveryPoint == "" {
//		venueID = newID()
//		err := store.Phase(ctx, "venue_created", []byte(venueID), func(tx pgx.Tx) error {
//			_, err := tx.Exec(ctx, "INSERT INTO venues (id, name) VALUES ($1, $2)", venueID, name)
//			return err
//		})
//		...
//	}
//
// The record then stays, suspended after a failed or crashed attempt,
// for [Options].RecoveryTTL after the phase. A phase costs fn's statements and
// three round trips (begin, the recovery point, commit). It refuses while
// the claim's transaction is open ([Store.Tx]): run phases first; the
// claim's transaction, which commits with the response, is the last phase.
// The error wraps [idempotency.ErrNoClaim] when ctx carries no claim.
func (s *Store) Phase(ctx context.Context, point string, data []byte, fn func(tx pgx.Tx) error) error {
	claim, key, ok := claimOf(ctx)
	if !ok {
		return fmt.Errorf("%w: pgstore: no claim to run a phase for", idempotency.ErrNoClaim)
	}
	if err := validPoint(point, data); err != nil {
		return err
	}
	if s.txOpenFor(ctx, key) {
		return errTxOpen
	}
	var tx *connTx
	err := s.retry(ctx, func() error { // nothing is written yet
		var err error
		tx, err = s.begin(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("pgstore: phase %q: begin: %w", point, err)
	}
	if err := fn(phaseTx{tx}); err != nil {
		tx.Rollback(ctx)
		return err
	}
	tag, err := tx.Exec(ctx, s.sql.checkpointByFence, []byte(key), int64(claim.Fence), point, data,
		s.recoveryTTL.Microseconds(), s.lockTimeoutParam(ctx))
	switch {
	case err != nil:
		tx.Rollback(ctx)
		return fmt.Errorf("pgstore: phase %q: recovery point: %w", point, err)
	case tag.RowsAffected() != 1:
		tx.Rollback(ctx)
		return fmt.Errorf("pgstore: phase %q: %w", point, idempotency.ErrLeaseLost)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgstore: phase %q: commit: %w", point, err)
	}
	return nil
}

// phaseTx is a phase's transaction as fn sees it: Phase ends it.
type phaseTx struct{ pgx.Tx }

func (phaseTx) Commit(context.Context) error   { return errPhaseEnds }
func (phaseTx) Rollback(context.Context) error { return errPhaseEnds }

// Get implements [idempotency.Inspector] in one statement: the live record
// under key (completed, in flight with its owner's token and lease left,
// or suspended with its recovery point and no token), or nil. A record
// that cannot be decoded is an error wrapping
// [idempotency.ErrRecordUnreadable].
//
// Get locks the key's row for a moment (FOR SHARE, at most
// [Options].LockTimeout): a write to it in progress, a lease renewal say, is
// waited for, and Get returns the row as that write left it. Without the
// wait it would answer from before the write, and could report a claim
// whose lease had just run out although its owner's renewal, which
// checked the lease in time, was committing. Get is for operators and
// event lookups, not the request path, which never waits for it: a
// renewal or completion waits at most for the Get's own statement.
func (s *Store) Get(ctx context.Context, key string) (*idempotency.Record, error) {
	var row storedRow
	err := s.retry(ctx, func() error {
		return s.queryRow(ctx, s.sql.get, []byte(key), s.lockTimeoutParam(ctx)).Scan(&row.status, &row.token, &row.fingerprint, &row.created,
			&row.respStatus, &row.respHeader, &row.respBody, &row.bodyOmitted, &row.suspended, &row.point, &row.data, &row.leaseLeft)
	})
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("pgstore: get: %w", err)
	}
	rec, err := row.record()
	if err != nil {
		return nil, fmt.Errorf("pgstore: get: %w", err)
	}
	return rec, nil
}
