// Package pg holds what pgstore and its inbox share about talking to
// PostgreSQL: re-sending a statement whose connection broke, naming the
// tables, and checking at construction that the schema is migrated.
package pg

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"time"

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
	// (a handler's, for pgstore's Tx and Phase), counted from the first
	// send.
	resendWindow = 5 * time.Second
)

// Resend runs op, and again while it failed because its connection broke
// (on another connection of pool, which op uses), until ctx ends or its
// deadline passes (resendWindow after the first send when it has none).
// It never sends after the deadline, nor waits past it: when the next
// wait would end after the deadline, it returns op's last error at once.
// op must be safe to repeat.
func Resend(ctx context.Context, pool *pgxpool.Pool, op func() error) error {
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
