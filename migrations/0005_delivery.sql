-- Exactly-once delivery and restarts that do not cost attempts.

-- Restarts that interrupted the request while it ran. Counted apart from `attempts`: a
-- restart is not the backend's failure, and must not use up MAX_ATTEMPTS.
ALTER TABLE requests ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;

-- `settings.require_ack`: the final answer counts as delivered only when the client
-- acknowledges it (an `ack` action); until then it is sent again to the next connection.
ALTER TABLE requests ADD COLUMN ack_required INTEGER NOT NULL DEFAULT 0 CHECK (ack_required IN (0, 1));
ALTER TABLE requests ADD COLUMN acked_at REAL;

-- `service_info.request_id` as JSON text: a client's idempotency key, unique per service. A
-- repeated request with the same key gets the original request back instead of a new one.
ALTER TABLE requests ADD COLUMN request_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS requests_request_key_idx
    ON requests (service, request_key) WHERE request_key IS NOT NULL;

-- Finals still owed to a connection: never sent, or sent and not yet acknowledged.
DROP INDEX IF EXISTS requests_undelivered_idx;
CREATE INDEX IF NOT EXISTS requests_owed_idx
    ON requests (service, seq)
    WHERE status IN ('ok', 'error') AND (delivered_at IS NULL OR (ack_required = 1 AND acked_at IS NULL));
