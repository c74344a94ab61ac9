package pgstore

import (
	"context"
	"fmt"
	"time"
)

// maxBatch bounds a cleanup batch, so that no single DELETE holds many row
// locks or writes much WAL in one transaction.
const maxBatch = 100_000

// cleanupGrace is how long a key's row stays after it stopped counting
// (its record's TTL ended, its lease lapsed, it was released) before
// [Store.DeleteExpired] may delete it. While the row is there, every claim
// of the key takes it over with ON CONFLICT DO UPDATE and draws its fence
// under the row's lock. Once it is deleted, a claim inserts a new row with
// a fence drawn before the insert, so a claim whose statement drew its
// fence and then stalled before inserting could land with a fence older
// than the row's last owner had. A minute is far beyond any statement's
// wait: a row lock waits at most the lock timeout ([Options].LockTimeout), and
// a claim is refused after its call's deadline.
const cleanupGrace = time.Minute

// DeleteExpired deletes the rows that no longer count: records past their
// TTL, claims whose lease lapsed or that were released (suspended ones,
// with a recovery point, once that is past its TTL), each a minute after
// it stopped counting (see below), and failure histories past their TTL.
// It never deletes a live claim or a suspended record, and skips rows that
// another transaction holds locked. It deletes in batches of at most batch
// rows (1 to 100,000), one statement and one transaction each, until a
// batch comes back short or ctx ends, and returns how many rows it
// deleted. The webhook_events table is not touched: the inbox cleans it.
//
// The minute keeps fences growing: a key's row, also a released one, is
// where the next claim draws its fence from the sequence under the row's
// lock; a row deleted too soon would let a claim that drew its fence
// before a stall land below the fence of the row's last owner.
func (s *Store) DeleteExpired(ctx context.Context, batch int) (deleted int, err error) {
	if batch < 1 || batch > maxBatch {
		return 0, fmt.Errorf("pgstore: batch %d is not between 1 and %d", batch, maxBatch)
	}
	for _, stmt := range []struct {
		sql  string
		args []any
	}{
		{s.sql.deleteKeys, []any{batch, cleanupGrace.Microseconds()}},
		{s.sql.deleteFailures, []any{batch}},
	} {
		for {
			tag, err := s.exec(ctx, stmt.sql, stmt.args...)
			if err != nil {
				return deleted, fmt.Errorf("pgstore: delete expired: %w", err)
			}
			n := int(tag.RowsAffected())
			deleted += n
			if n < batch {
				break
			}
		}
	}
	return deleted, nil
}

// RunCleanup calls [Store.DeleteExpired] with batch at once and then every
// interval, until ctx ends; run it in a goroutine of its own. A failed pass
// is logged ([Options].Logger) and the next one runs on time. It returns
// nil when ctx ends, and an error at once only when interval or batch is
// invalid. Several processes may run it at once: each skips the rows that
// another is deleting.
func (s *Store) RunCleanup(ctx context.Context, interval time.Duration, batch int) error {
	switch {
	case interval <= 0:
		return fmt.Errorf("pgstore: cleanup interval %v is not positive", interval)
	case batch < 1 || batch > maxBatch:
		return fmt.Errorf("pgstore: batch %d is not between 1 and %d", batch, maxBatch)
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		if _, err := s.DeleteExpired(ctx, batch); err != nil && ctx.Err() == nil && s.logger != nil {
			s.logger.WarnContext(ctx, "idempotency: pgstore: cleanup pass failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
	}
}
