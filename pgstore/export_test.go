package pgstore

import "time"

// SetOrphanGrace changes how long a claim's transaction may stay open
// after its handler's context ended; call it before the store is used.
func (s *Store) SetOrphanGrace(d time.Duration) { s.orphanGrace = d }

// OpenTxs returns how many claims' transactions the store has registered.
func (s *Store) OpenTxs() int {
	s.txMu.Lock()
	defer s.txMu.Unlock()
	return len(s.txs)
}

// CleanupStatements returns the statements DeleteExpired sends, each with
// its arguments for a batch of batch rows.
func (s *Store) CleanupStatements(batch int) map[string][]any {
	return map[string][]any{
		s.sql.deleteKeys:     {batch, cleanupGrace.Microseconds()},
		s.sql.deleteFailures: {batch},
	}
}

// ClaimStatement returns the claim statement Acquire sends first, for the
// tables of schema ("" for the search path).
func ClaimStatement(schema string) string { return newStatements(schema).claim }
