-- Where a request came from: 'ws' requests get their answers pushed over the websocket;
-- 'http' requests are fetched with GET /api/v1/requests/{object_id}.
ALTER TABLE requests ADD COLUMN channel TEXT NOT NULL DEFAULT 'ws' CHECK (channel IN ('ws', 'http'));

-- GET /health proves the database takes writes by updating this row.
CREATE TABLE IF NOT EXISTS heartbeat (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    at  REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS requests_recent_idx ON requests (created_at);
