-- pgstore migration 0004: webhooks from any provider, any Stripe API version
-- (package pgstore/inbox).
--
-- An event is now keyed by the inbox's scope, its provider (the verifier's
-- name: "stripe", "github", "standard-webhooks", ...) and the provider's
-- event ID, so two providers' IDs, or two endpoints', never collide. Rows
-- stored before this migration are Stripe's, in the default scope: the
-- defaults below keep them valid and their keys unchanged. The event's API
-- version (Stripe's api_version) is kept for operators; rows from before
-- have none recorded.
--
-- The primary key changes, which rebuilds its index under the ALTER's
-- lock: a moment for an inbox of a few hundred thousand events. An inbox of
-- an older pgstore still running meanwhile fails its inserts (its ON
-- CONFLICT names the old key) and answers 503, so the provider delivers
-- again: deploy the new version with this migration.

ALTER TABLE webhook_events ADD COLUMN provider text NOT NULL DEFAULT 'stripe';
ALTER TABLE webhook_events ADD COLUMN scope text NOT NULL DEFAULT '';
ALTER TABLE webhook_events ADD COLUMN api_version text NOT NULL DEFAULT '';

ALTER TABLE webhook_events DROP CONSTRAINT webhook_events_pkey;
ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_pkey PRIMARY KEY (scope, provider, event_id);

-- The worker's "next due event", per scope.
DROP INDEX webhook_events_due;
CREATE INDEX webhook_events_due ON webhook_events (scope, next_attempt_at)
    WHERE status IN ('pending', 'processing');

-- Per-object ordering: the unfinished events of one object of one provider,
-- oldest first (the provider's created time, then arrival).
DROP INDEX webhook_events_object;
CREATE INDEX webhook_events_object ON webhook_events (scope, provider, object_id, created, received_at, event_id)
    WHERE status IN ('pending', 'processing') AND object_id IS NOT NULL;

-- Operator listings by status and type.
DROP INDEX webhook_events_status_type;
CREATE INDEX webhook_events_status_type ON webhook_events (scope, provider, status, type, received_at);

-- The migrations applied, which pgstore.New and the inbox's constructors
-- read. Migrate creates this table itself; a team that applies these files
-- with a tool of its own gets it here, with every migration so far (this
-- one can only follow the three before it). Later files record themselves.
CREATE TABLE IF NOT EXISTS idempotency_schema_migrations (
    version    text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO idempotency_schema_migrations (version)
VALUES ('0001_tables'), ('0002_webhook_inbox'), ('0003_recovery_points'), ('0004_webhook_providers')
ON CONFLICT DO NOTHING;
