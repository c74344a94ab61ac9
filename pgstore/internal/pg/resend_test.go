package pg

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// idlePool returns a pool of at most maxConns connections that never
// dials: resend only reads its size.
func idlePool(t *testing.T, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig("postgres://nobody@127.0.0.1:1/none")
	require.NoError(t, err)
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// connectError returns the error of a connection refused: nothing
// listens on the port of a listener just closed.
func connectError(t *testing.T) error {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	_, err = pgconn.Connect(context.Background(), "postgres://nobody@"+addr+"/none?sslmode=disable")
	var connect *pgconn.ConnectError
	require.ErrorAs(t, err, &connect)
	require.True(t, brokenConnection(err), "%v", err)
	return err
}

// TestResendWait pins the policy: the first two re-sends go at once;
// after connections the pool held idle failed, so do the re-sends that
// get through every one of them; after a connection could not be made,
// and beyond those, re-sends wait, doubling from 5 ms up to 100 ms, with
// jitter down to half.
func TestResendWait(t *testing.T) {
	dead, refused := io.ErrUnexpectedEOF, connectError(t)
	const maxConns = 4
	for resends := 1; resends <= maxConns+1; resends++ {
		assert.Zero(t, resendWait(resends, 0, maxConns, dead), "re-send %d after a dead connection", resends)
	}
	for resends := 1; resends <= immediateResends; resends++ {
		assert.Zero(t, resendWait(resends, 0, maxConns, refused), "re-send %d after a refused connection", resends)
	}
	for waits := range 10 {
		want := min(firstBackoff<<waits, maxBackoff)
		for _, err := range []error{dead, refused} {
			for range 20 {
				d := resendWait(maxConns+2+waits, waits, maxConns, err)
				assert.GreaterOrEqual(t, d, want/2, "wait %d after %v", waits, err)
				assert.LessOrEqual(t, d, want, "wait %d after %v", waits, err)
			}
		}
		d := resendWait(immediateResends+1+waits, waits, maxConns, refused)
		assert.Positive(t, d, "re-send %d after a refused connection", immediateResends+1+waits)
	}
}

// TestResendUntilContextEnds: a statement whose connection keeps breaking
// is sent again more often than the pool has connections, until ctx ends,
// and never after.
func TestResendUntilContextEnds(t *testing.T) {
	pool := idlePool(t, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const sends = 8
	calls := 0
	err := Resend(ctx, pool, func() error {
		calls++
		if calls == sends {
			cancel()
		}
		return io.ErrUnexpectedEOF
	})
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.Equal(t, sends, calls)
}

// TestResendWaitsUntilTheDeadline: re-sends against a server that
// refuses connections wait between them, and stop by the deadline with
// the statement's error, not the context's.
func TestResendWaitsUntilTheDeadline(t *testing.T) {
	refused := connectError(t)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	calls := 0
	err := Resend(ctx, idlePool(t, 1), func() error {
		calls++
		return refused
	})
	require.ErrorIs(t, err, refused)
	assert.Greater(t, calls, immediateResends+1, "re-sent after waiting")
}

// TestResendOnlyBrokenConnections: an error of the statement itself, or
// of its context, is returned at once.
func TestResendOnlyBrokenConnections(t *testing.T) {
	pool := idlePool(t, 4)
	for _, failure := range []error{
		errors.New("some error"),
		&pgconn.PgError{Severity: "ERROR", Code: "55P03"}, // lock timeout
		&pgconn.PgError{Severity: "ERROR", Code: "23505"},
		context.DeadlineExceeded,
		context.Canceled,
	} {
		calls := 0
		err := Resend(context.Background(), pool, func() error {
			calls++
			return failure
		})
		assert.Equal(t, failure, err)
		assert.Equal(t, 1, calls, "%v", failure)
	}
	calls := 0
	err := Resend(context.Background(), pool, func() error {
		calls++
		if calls < 3 {
			return &pgconn.PgError{Severity: "FATAL", Code: "57P01"} // terminated
		}
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, 3, calls)
}
