-- pgstore migration 0002: the webhook inbox (pgstore.Inbox, pgstore.Worker).
--
-- webhook_events, created by 0001, gets what a worker needs: the event's
-- created time (per-object ordering), the owner token of the attempt that
-- holds it (owner-checked writes), and one partial index for "the next
-- due event". States:
--
--   pending    waiting; due when next_attempt_at <= now
--   processing an attempt holds it until next_attempt_at (its lease end);
--              when the lease lapses it is due again
--   processed  done; deleted after expires_at by (*Inbox).DeleteExpired
--   failed     dead letter after the maximum attempts, last_error kept,
--              until a redrive makes it pending again

-- Stripe's "created" of the event, seconds since the epoch.
ALTER TABLE webhook_events ADD COLUMN created bigint NOT NULL DEFAULT 0;
-- Random token of the attempt that holds the event (status processing).
ALTER TABLE webhook_events ADD COLUMN lease_token text;

-- 0001's index also covered failed events, which the worker never picks.
DROP INDEX webhook_events_due;
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at)
    WHERE status IN ('pending', 'processing');

-- Per-object ordering: the unfinished events of one object, oldest first.
CREATE INDEX webhook_events_object ON webhook_events (object_id, created, event_id)
    WHERE status IN ('pending', 'processing') AND object_id IS NOT NULL;

-- Operator listings by status and type, and DeleteExpired.
CREATE INDEX webhook_events_status_type ON webhook_events (status, type, received_at);
CREATE INDEX webhook_events_expires_at ON webhook_events (expires_at) WHERE status = 'processed';
