package pgstore

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency/pgstore/internal/pg"
)

// The store's statements run on connections they acquire themselves
// (pg.WithConn, or begin), and give them back with pg.GiveBack, which
// frees the slot of a connection that pgx is still closing.

// queryRow runs one statement that returns one row, as pool.QueryRow does,
// on a connection acquired for it and given back with pg.GiveBack.
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
	return pg.WithConn(r.ctx, r.s.pool, func(ctx context.Context, conn *pgx.Conn) error {
		return conn.QueryRow(ctx, r.sql, r.args...).Scan(dest...)
	})
}

// exec runs one statement, as pool.Exec does, on a connection acquired
// for it and given back with pg.GiveBack.
func (s *Store) exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	var tag pgconn.CommandTag
	err := pg.WithConn(ctx, s.pool, func(ctx context.Context, conn *pgx.Conn) error {
		var err error
		tag, err = conn.Exec(ctx, sql, args...)
		return err
	})
	return tag, err
}

// begin begins a transaction, as pool.Begin does, on a connection that its
// Commit or Rollback gives back with pg.GiveBack.
func (s *Store) begin(ctx context.Context) (*connTx, error) {
	return s.beginWith(ctx, func(*pgx.Conn) (pgx.TxOptions, error) { return pgx.TxOptions{}, nil })
}

// beginWith is begin with the options that opts returns for the
// connection acquired.
func (s *Store) beginWith(ctx context.Context, opts func(*pgx.Conn) (pgx.TxOptions, error)) (*connTx, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	o, err := opts(conn.Conn())
	if err != nil {
		pg.GiveBack(conn)
		return nil, err
	}
	var tx pgx.Tx
	err = pg.Bound(ctx, conn.Conn(), func(ctx context.Context) error {
		var err error
		tx, err = conn.BeginTx(ctx, o)
		return err
	})
	if err != nil {
		pg.GiveBack(conn)
		return nil, err
	}
	return &connTx{Tx: tx, conn: conn}, nil
}

// connTx is a transaction that gives its connection back when it ends.
// The store's own statements in it (its BEGIN, Commit and Rollback, and
// those sent through bound) are bounded by the connection's deadline
// (pg.Bound); a handler's, by the context it passes to pgx.
type connTx struct {
	pgx.Tx
	conn *pgxpool.Conn // nil once given back
}

// bound runs f, which sends statements in t, as pg.Bound does.
func (t *connTx) bound(ctx context.Context, f func(ctx context.Context) error) error {
	if t.conn == nil { // ended: pgx refuses what f sends
		return f(ctx)
	}
	return pg.Bound(ctx, t.conn.Conn(), f)
}

func (t *connTx) Commit(ctx context.Context) error {
	err := t.bound(ctx, t.Tx.Commit)
	t.end()
	return err
}

func (t *connTx) Rollback(ctx context.Context) error {
	err := t.bound(ctx, t.Tx.Rollback)
	t.end()
	return err
}

func (t *connTx) end() {
	if t.conn != nil {
		pg.GiveBack(t.conn)
		t.conn = nil
	}
}
