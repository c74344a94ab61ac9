-- pgstore migration 0001: the tables of github.com/seed70ea8305/idempotency/pgstore.
--
-- pgstore.Migrate applies the files of this directory in name order, each
-- once, in one transaction under an advisory lock. A team with its own
-- migration tool can apply them instead, in the same order, each once; the
-- names below are unqualified, so they land in the schema first on the
-- search_path (give pgstore.WithSchema the same schema).

-- Fencing tokens. One sequence for every key: it only grows, so the fence
-- of each new owner of a key is greater than that of every owner before it,
-- whichever key those owners held. Gaps (claims that lost, rollbacks) are
-- harmless.
CREATE SEQUENCE idempotency_fence AS bigint;

-- One row per record key: claimed while the work runs (in_flight), then the
-- stored response (completed). Keys are opaque and may hold any byte, so
-- they are bytea; the primary key is their SHA-256, so a key of any length
-- fits in the index. A row is live while expires_at is in the future, by
-- the database's clock; a row that is not live counts as absent, and the
-- next claim of its key overwrites it.
CREATE TABLE idempotency_keys (
    key_hash         bytea       GENERATED ALWAYS AS (sha256(key)) STORED PRIMARY KEY,
    key              bytea       NOT NULL,
    -- The owner while in flight; once completed, the owner that completed
    -- it (so that a repeated completion by that owner succeeds).
    token            bytea       NOT NULL,
    fingerprint      bytea       NOT NULL,
    fence            bigint      NOT NULL,
    status           text        NOT NULL CHECK (status IN ('in_flight', 'completed')),
    -- In flight: when the lease lapses. NULL once completed.
    lease_expires_at timestamptz,
    -- When the row stops counting: the lease's end while in flight, the end
    -- of the record's TTL once completed.
    expires_at       timestamptz NOT NULL,
    -- When the key was claimed, as the claiming process stamped it.
    created_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    response_status  integer,
    -- The response's header: a compact binary encoding (see pgstore's
    -- header.go), since header values may hold bytes text cannot.
    response_headers bytea,
    response_body    bytea,
    body_omitted     boolean     NOT NULL DEFAULT false,
    CHECK ((status = 'in_flight') = (lease_expires_at IS NOT NULL)),
    CHECK ((status = 'completed') = (response_status IS NOT NULL))
);

-- For (*Store).DeleteExpired.
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- Failed attempts per key, for idempotency.FailureRecorder (the webhook
-- helper counts failed webhook functions here).
CREATE TABLE idempotency_failures (
    key_hash     bytea       GENERATED ALWAYS AS (sha256(key)) STORED PRIMARY KEY,
    key          bytea       NOT NULL,
    attempts     integer     NOT NULL,
    last_reason  text        NOT NULL,
    -- The owner whose failure was counted last, so that a repeated Fail by
    -- that owner (a lost reply) does not count twice.
    last_token   bytea       NOT NULL,
    failed_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);

CREATE INDEX idempotency_failures_expires_at ON idempotency_failures (expires_at);

-- The webhook inbox of the next issue: Stripe events persisted on receipt
-- and processed afterwards, with retries. Created now so that the inbox
-- needs no schema change of its own; NOT USED YET by this version of
-- pgstore, and not cleaned by DeleteExpired.
CREATE TABLE webhook_events (
    event_id        text        PRIMARY KEY,
    type            text        NOT NULL,
    object_id       text,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'processing', 'processed', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    -- The raw body as Stripe sent it (optional: an inbox may re-fetch).
    payload         bytea,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    next_attempt_at timestamptz,
    expires_at      timestamptz NOT NULL
);

CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at)
    WHERE status IN ('pending', 'failed');
