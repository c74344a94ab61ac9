-- pgstore migration 0003: recovery points (idempotency.Checkpointer,
-- (*pgstore.Store).Phase).
--
-- An owner records a named recovery point, with a little data, on its
-- in-flight row. The row then outlives its owner: when the lease lapses, or
-- the owner releases or fails the key, the row is SUSPENDED rather than
-- deleted, until the recovery point's TTL ends; the next claim of the same
-- request (same fingerprint) takes it over and resumes from the point, a
-- claim of another request gets 422. A stored response drops the point.
--
-- No new status: a suspended row is an in_flight row whose lease has lapsed
-- (lease_expires_at <= now) and that holds a recovery point. A lapsed lease
-- needs no statement to happen, so that state exists in any case; Release
-- and Fail of a row with a point only end its lease at once. expires_at
-- keeps its meaning, "when the row stops counting": for a row with a point
-- it is the later of the lease's end and the point's TTL, so Acquire,
-- Get and DeleteExpired need no new column to tell a suspended row from an
-- expired one. For an in_flight row without a point it is still exactly
-- the lease's end (the third CHECK below).

-- The name of the last recovery point ("venue_created"), as the owner gave
-- it (valid UTF-8, no NUL, at most 255 bytes); NULL when none.
ALTER TABLE idempotency_keys ADD COLUMN recovery_point text;
-- What the rest of the work needs from it (an ID or two, at most 64 KiB);
-- NULL when none.
ALTER TABLE idempotency_keys ADD COLUMN recovery_data bytea;

-- The new columns are NULL in every existing row, and every in_flight row
-- written by migrations 0001-0002's statements has expires_at =
-- lease_expires_at, so existing rows satisfy these: NOT VALID spares the
-- table scan under the ALTER's lock (an operator may VALIDATE them later;
-- new and updated rows are checked either way).
ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_keys_point_in_flight
    CHECK (recovery_point IS NULL OR status = 'in_flight') NOT VALID,
    ADD CONSTRAINT idempotency_keys_data_with_point
    CHECK (recovery_data IS NULL OR recovery_point IS NOT NULL) NOT VALID,
    ADD CONSTRAINT idempotency_keys_lease_is_expiry
    CHECK (status <> 'in_flight' OR recovery_point IS NOT NULL OR expires_at = lease_expires_at) NOT VALID;
