-- pgstore migration 0006: only the indexes the inbox's statements use
-- (package pgstore/inbox; TestQueryPlans runs EXPLAIN for each statement
-- and asserts its index).
--
-- Every delivery inserts one row, and pays for every index whose
-- predicate the new row meets. webhook_events_status_type (scope,
-- provider, status, type, received_at) held every event, so each delivery
-- wrote to it, and no statement of the inbox needs it: an event is found
-- by its primary key, the worker's next due event by webhook_events_due,
-- an object's earlier events by webhook_events_object, the newest events
-- by webhook_events_received (0005), the events to delete by
-- webhook_events_expires_at. It goes. Redrives by type look for failed
-- events, which webhook_events_failed holds alone: a delivery (a pending
-- event) never writes to it.

DROP INDEX IF EXISTS webhook_events_status_type;
CREATE INDEX webhook_events_failed ON webhook_events (scope, provider, type) WHERE status = 'failed';

INSERT INTO idempotency_schema_migrations (version) VALUES ('0006_inbox_indexes')
ON CONFLICT DO NOTHING;
