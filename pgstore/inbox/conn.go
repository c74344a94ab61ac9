package inbox

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// withConn runs f on a connection of pool, bounded by ctx: by its
// deadline, and by its end.
//
// pgx bounds a statement by its context by watching the context in a
// goroutine that it starts for every statement and wakes when the
// statement returns: on a loaded machine that costs about a tenth of a
// delivery's acknowledgement. So f gets a context that pgx need not
// watch, and the connection's own deadline bounds the statement instead:
// ctx's deadline from the start, and the present moment once ctx ends,
// as pgx's default handling of an ended context sets it. A statement
// that runs into the deadline fails with a timeout and closes its
// connection, which asks the server to cancel it; the error then wraps
// ctx's.
func withConn(ctx context.Context, pool *pgxpool.Pool, f func(ctx context.Context, conn *pgx.Conn) error) error {
	pc, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer pc.Release()
	conn := pc.Conn()
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
	err = f(context.WithoutCancel(ctx), conn)
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
