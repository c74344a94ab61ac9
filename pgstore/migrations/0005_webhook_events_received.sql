-- pgstore migration 0005: the newest events of an inbox, by index.
--
-- Listing an inbox's events newest first without a status (the inbox's
-- List with an empty Filter.Status, the operator API's GET /events, the
-- operator console's events page) read every event of the inbox and
-- sorted them. This index serves that order (a
-- backward scan, then an incremental sort on event_id among equal times)
-- and the paging of Filter.Before. Building it holds the table's write
-- lock for a moment: about a second for a few hundred thousand events.

CREATE INDEX webhook_events_received ON webhook_events (scope, provider, received_at);

INSERT INTO idempotency_schema_migrations (version) VALUES ('0005_webhook_events_received')
