package pg

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// WithConn runs f on a connection of pool, bounded by ctx as Bound
// bounds it, then gives the connection back with GiveBack.
func WithConn(ctx context.Context, pool *pgxpool.Pool, f func(ctx context.Context, conn *pgx.Conn) error) error {
	pc, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer GiveBack(pc)
	conn := pc.Conn()
	return Bound(ctx, conn, func(ctx context.Context) error { return f(ctx, conn) })
}

// Bound runs f, which sends statements on conn, bounded by ctx: by its
// deadline, and by its end.
//
// pgx bounds a statement by its context by watching the context in a
// goroutine that it starts for every statement and that must receive
// from the statement when it returns (pgconn/ctxwatch): on a loaded
// 2-core machine, where that goroutine waits for a core, this cost the
// middleware's first request on PostgreSQL about 100 µs in two
// statements (docs/performance.md). So f gets a context that pgx need
// not watch, and the connection's own deadline bounds the statements
// instead: ctx's deadline from the start, and the present moment once
// ctx ends, as pgx's default handling of an ended context sets it. A
// statement that runs into the deadline fails with a timeout and closes
// its connection, which asks the server to cancel it; the error then
// wraps ctx's.
func Bound(ctx context.Context, conn *pgx.Conn, f func(ctx context.Context) error) error {
	if ctx.Done() == nil { // nothing to bound the statements by
		return f(ctx)
	}
	nc := conn.PgConn().Conn()
	deadline, _ := ctx.Deadline() // the zero time: none
	// A connection whose deadline cannot be set is closed: its
	// statement fails, and pgx closes it, as without a deadline.
	_ = nc.SetDeadline(deadline)
	var mu sync.Mutex
	done := false
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			_ = nc.SetDeadline(time.Now())
		}
	})
	err := f(context.WithoutCancel(ctx))
	if !stop() { // the deadline may have been moved: no more
		mu.Lock()
		done = true
		mu.Unlock()
	}
	_ = nc.SetDeadline(time.Time{})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %w", ctx.Err(), err)
	case !deadline.IsZero() && !time.Now().Before(deadline):
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return err
}

// Handing back a connection whose statement was abandoned.
//
// When a statement is abandoned (its context ended, its deadline passed)
// or its connection fails, pgx closes the connection in the background:
// it first sends the server a cancel request on a new connection and
// waits, up to 15 s, for the server to acknowledge it. pgxpool keeps the
// connection's slot until that ends. After a silent network partition
// every abandoned connection waits the whole 15 s, so the pool stays
// exhausted, and every call fails, for up to 15 s after the network
// healed. So a connection is given back with GiveBack: it waits
// closeWait for pgx to finish (a server that can be reached acknowledges
// a cancel request within a round trip), then takes the connection out
// of the pool (pgxpool's Hijack), which frees its slot at once; pgx goes
// on closing it on its own.

// closeWait is how long a broken connection keeps its pool slot while pgx
// closes it, before it is taken out of the pool.
const closeWait = 250 * time.Millisecond

// GiveBack returns conn to its pool. A connection that pgx is still
// closing (see above) keeps its slot for at most closeWait, in the
// background, and is then taken out of the pool.
func GiveBack(conn *pgxpool.Conn) {
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
