package pgstore

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

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
	return s.beginWith(ctx, func(*pgx.Conn) (pgx.TxOptions, error) { return pgx.TxOptions{}, nil })
}

// beginWith is begin with the options that opts returns for the
// connection acquired.
func (s *Store) beginWith(ctx context.Context, opts func(*pgx.Conn) (pgx.TxOptions, error)) (pgx.Tx, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	o, err := opts(conn.Conn())
	if err != nil {
		giveBack(conn)
		return nil, err
	}
	tx, err := conn.BeginTx(ctx, o)
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
