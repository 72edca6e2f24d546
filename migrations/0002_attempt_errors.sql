-- Why the last backend attempt of a request failed (it is retried elsewhere, or ends with it).
ALTER TABLE requests ADD COLUMN last_error TEXT;

-- A backend's learned speed is rebuilt from its own recent jobs at start-up.
DROP INDEX IF EXISTS requests_recent_done_idx;
CREATE INDEX IF NOT EXISTS requests_backend_done_idx
    ON requests (backend, finished_at) WHERE status = 'ok';
