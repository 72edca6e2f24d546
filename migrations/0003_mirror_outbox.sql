-- Work for the mirrors (MongoDB records, S3 uploads), committed in the same transaction as
-- the change it mirrors and deleted once the mirror has it. Drained in id order.
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    target      TEXT    NOT NULL CHECK (target IN ('mongodb', 's3')),
    object_id   TEXT    NOT NULL,
    revision    INTEGER NOT NULL DEFAULT 0,   -- the request's revision this row carries
    document    TEXT    NOT NULL,             -- JSON: the record, or what to upload
    created_at  REAL    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);

CREATE INDEX IF NOT EXISTS outbox_target_idx ON outbox (target, id);

-- Bumped at every status change; MongoDB keeps only the highest it has seen, so a retried
-- older write can never move a record backwards.
ALTER TABLE requests ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
