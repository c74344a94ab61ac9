package pgtest

// The floor of a PostgreSQL store's benchmarks (pgstore's
// BenchmarkPostgresOverhead and examples/figures): the raw statements a
// minimal correct store needs, on a table of the columns it needs (the key,
// its owner, the request's fingerprint, a state, an expiry and the
// response) with its primary key alone. A first request is a claim
// (INSERT … ON CONFLICT DO NOTHING: $1 key, $2 token, $3 fingerprint) and a
// completion (an owner-checked UPDATE that stores the response: $1 key, $2
// token, $3 status, $4 headers, $5 body); a replay is one SELECT of the
// live row ($1 key).
const (
	FloorTable = `CREATE TABLE floor_records (
    key bytea PRIMARY KEY, token bytea NOT NULL, fingerprint bytea NOT NULL, status text NOT NULL,
    expires_at timestamptz NOT NULL, response_status integer, response_headers bytea, response_body bytea)`
	FloorClaim = `INSERT INTO floor_records (key, token, fingerprint, status, expires_at)
VALUES ($1, $2, $3, 'in_flight', clock_timestamp() + interval '1 minute') ON CONFLICT (key) DO NOTHING`
	FloorComplete = `UPDATE floor_records SET status = 'completed', expires_at = clock_timestamp() + interval '1 day',
    response_status = $3, response_headers = $4, response_body = $5
WHERE key = $1 AND token = $2 AND status = 'in_flight'`
	FloorReplay = `SELECT status, token, fingerprint, response_status, response_headers, response_body
FROM floor_records WHERE key = $1 AND expires_at > clock_timestamp()`
)
