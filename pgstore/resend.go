package pgstore

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Re-sending a statement whose connection broke.
//
// A pool may hold many idle connections that a server restart or
// pg_terminate_backend closed; pgxpool finds one dead only when it is
// used (or pinged, after a second idle), and then destroys it. Once no
// idle one is left, the pool dials a new connection. So a statement is
// sent again until it reaches a live connection or the call's deadline
// passes: a fixed number of re-sends fails whenever the pool holds more
// dead connections than that.
const (
	// immediateResends: the first re-sends go without waiting, whatever
	// broke.
	immediateResends = 2

	// firstBackoff and maxBackoff bound the waits between later re-sends
	// (each wait is doubled, up to maxBackoff, then jittered down to half
	// of it), so that a server that is down or refuses sessions is not
	// dialled in a busy loop.
	firstBackoff = 5 * time.Millisecond
	maxBackoff   = 100 * time.Millisecond

	// resendWindow bounds re-sending under a context without a deadline
	// (a handler's, for [Store.Tx] and [Store.Phase]), counted from the
	// first send.
	resendWindow = 5 * time.Second
)

// resend runs op, and again while it failed because its connection broke
// (on another connection of pool, which op uses), until ctx ends or its
// deadline passes (resendWindow after the first send when it has none).
// It never sends after the deadline, nor waits past it: when the next
// wait would end after the deadline, it returns op's last error at once.
// op must be safe to repeat.
func resend(ctx context.Context, pool *pgxpool.Pool, op func() error) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(resendWindow)
	}
	maxConns := -1 // read from pool at the first failure
	for resends, waits := 1, 0; ; resends++ {
		err := op()
		if err == nil || ctx.Err() != nil || !brokenConnection(err) {
			return err
		}
		if maxConns < 0 {
			maxConns = int(pool.Stat().MaxConns())
		}
		wait := resendWait(resends, waits, maxConns, err)
		if !time.Now().Add(wait).Before(deadline) {
			return err
		}
		if wait > 0 {
			waits++
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return err
			case <-t.C:
			}
			if ctx.Err() != nil || !time.Now().Before(deadline) { // a late wake-up
				return err
			}
		}
	}
}

// resendWait is how long to wait before re-send number resends (from 1),
// after waits waits so far, when the last send failed with err on a pool
// of at most maxConns connections. A connection the pool held idle and
// found dead fails at once, without a round trip, and the pool may hold
// maxConns of them: up to maxConns+1 re-sends after such failures go at
// once: enough to get through every dead one to a new connection. After
// a new connection could not be made (the server is down, starting or
// full), and beyond those re-sends, it waits.
func resendWait(resends, waits, maxConns int, err error) time.Duration {
	var connect *pgconn.ConnectError
	if resends <= immediateResends || (resends <= maxConns+1 && !errors.As(err, &connect)) {
		return 0
	}
	d := min(firstBackoff<<min(waits, 5), maxBackoff) // 5 ms << 5 > 100 ms
	return d/2 + rand.N(d/2+1)
}

// brokenConnection reports whether err says the connection failed rather
// than the statement: the statement may or may not have run.
func brokenConnection(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		var connect *pgconn.ConnectError
		if errors.As(err, &connect) {
			// The server refused a new session. Only a server starting up,
			// shutting down (class 57P) or full (53300) may take the next
			// one; a wrong password or database name never will.
			return strings.HasPrefix(pgErr.Code, "57P") || pgErr.Code == "53300" || strings.HasPrefix(pgErr.Code, "08")
		}
		// FATAL: the server ends the session (57P01 after
		// pg_terminate_backend or a fast shutdown); class 08: connection
		// exceptions.
		return pgErr.Severity == "FATAL" || strings.HasPrefix(pgErr.Code, "08")
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) {
		return false
	}
	var netErr net.Error
	return pgconn.SafeToRetry(err) || errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// Handing back a connection whose statement was abandoned.
//
// When a statement is abandoned (its context ended) or its connection
// fails, pgx closes the connection in the background: it first sends the
// server a cancel request on a new connection and waits, up to 15 s, for
// the server to acknowledge it. pgxpool keeps the connection's slot until
// that ends. After a silent network partition every abandoned connection
// waits the whole 15 s, so the pool stays exhausted, and every call fails,
// for up to 15 s after the network healed. The store's statements run on
// connections they acquire themselves, and give such a connection back
// with giveBack: it waits closeWait for pgx to finish (a server that can
// be reached acknowledges a cancel request within a round trip), then
// takes the connection out of the pool (pgxpool's Hijack), which frees
// its slot at once; pgx goes on closing it on its own.

// closeWait is how long a broken connection keeps its pool slot while pgx
// closes it, before the store takes it out of the pool.
const closeWait = 250 * time.Millisecond

// queryRow runs one statement that returns one row, as pool.QueryRow does,
// on a connection acquired for it and given back with giveBack.
func (s *Store) queryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	return connRow{s: s, ctx: ctx, sql: sql, args: args}
}

type connRow struct {
	s    *Store
	ctx  context.Context
	sql  string
	args []any
}

func (r connRow) Scan(dest ...any) error {
	conn, err := r.s.pool.Acquire(r.ctx)
	if err != nil {
		return err
	}
	defer giveBack(conn)
	return conn.QueryRow(r.ctx, r.sql, r.args...).Scan(dest...)
}

// exec runs one statement, as pool.Exec does, on a connection acquired
// for it and given back with giveBack.
func (s *Store) exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return pgconn.CommandTag{}, err
	}
	defer giveBack(conn)
	return conn.Exec(ctx, sql, args...)
}

// begin begins a transaction, as pool.Begin does, on a connection that its
// Commit or Rollback gives back with giveBack.
func (s *Store) begin(ctx context.Context) (pgx.Tx, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		giveBack(conn)
		return nil, err
	}
	return &connTx{Tx: tx, conn: conn}, nil
}

// connTx is a transaction that gives its connection back when it ends.
type connTx struct {
	pgx.Tx
	conn *pgxpool.Conn // nil once given back
}

func (t *connTx) Commit(ctx context.Context) error {
	err := t.Tx.Commit(ctx)
	t.end()
	return err
}

func (t *connTx) Rollback(ctx context.Context) error {
	err := t.Tx.Rollback(ctx)
	t.end()
	return err
}

func (t *connTx) end() {
	if t.conn != nil {
		giveBack(t.conn)
		t.conn = nil
	}
}

// giveBack returns conn to its pool. A connection that pgx is still
// closing (see above) keeps its slot for at most closeWait, in the
// background, and is then taken out of the pool.
func giveBack(conn *pgxpool.Conn) {
	pg := conn.Conn().PgConn()
	if !pg.IsClosed() {
		conn.Release()
		return
	}
	select {
	case <-pg.CleanupDone():
		conn.Release() // destroyed at once
		return
	default:
	}
	go func() {
		t := time.NewTimer(closeWait)
		defer t.Stop()
		select {
		case <-pg.CleanupDone():
			conn.Release()
		case <-t.C:
			// The server has not acknowledged the cancel request: it is
			// unreachable or far behind. Free the slot; pgx closes the
			// connection when its request ends.
			conn.Hijack()
		}
	}()
}
