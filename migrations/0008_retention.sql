-- Retention: a finished request older than RETENTION_S keeps a summary row (ids, type, status,
-- times, backend, settings, service_info); its payload, its image result and its local image
-- file are deleted. `pruned_at` says when; a pruned request's final is no longer owed.
ALTER TABLE requests ADD COLUMN pruned_at REAL;
CREATE INDEX IF NOT EXISTS requests_prunable_idx
    ON requests (finished_at) WHERE status IN ('ok', 'error') AND pruned_at IS NULL;
-- Summaries older than SUMMARY_RETENTION_S are deleted, oldest first.
CREATE INDEX IF NOT EXISTS requests_pruned_idx ON requests (finished_at) WHERE pruned_at IS NOT NULL;
