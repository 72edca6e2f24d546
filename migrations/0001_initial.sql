-- Every accepted generation request, from the moment it is queued until its final answer
-- has been sent to a connection of its service.
CREATE TABLE IF NOT EXISTS requests (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, used to rebuild queues
    object_id     TEXT    NOT NULL UNIQUE,            -- 24-hex ObjectId, _id in MongoDB
    service       TEXT    NOT NULL,
    executor      TEXT    NOT NULL CHECK (executor IN ('automatic1111', 'kandinsky')),
    gen_type      TEXT    NOT NULL CHECK (gen_type IN ('text2img', 'img2img', 'mix2img')),
    premium       INTEGER NOT NULL DEFAULT 0 CHECK (premium IN (0, 1)),
    settings      TEXT    NOT NULL DEFAULT '{}',      -- JSON, as sent
    service_info  TEXT    NOT NULL DEFAULT '{}',      -- JSON, as sent
    payload       TEXT    NOT NULL,                   -- JSON, as sent and as forwarded
    status        TEXT    NOT NULL DEFAULT 'queued'
                  CHECK (status IN ('queued', 'generating', 'ok', 'error')),
    attempts      INTEGER NOT NULL DEFAULT 0,         -- counted when a backend claims it
    backend       TEXT,                               -- name of the last backend that ran it
    result        TEXT,                               -- JSON result of the final message
    created_at    REAL    NOT NULL,                   -- unix seconds
    started_at    REAL,
    finished_at   REAL,
    generation_s  REAL,                               -- backend call duration of the final attempt
    delivered_at  REAL                                -- final message sent to a connection
);

CREATE INDEX IF NOT EXISTS requests_pending_idx
    ON requests (seq) WHERE status IN ('queued', 'generating');

CREATE INDEX IF NOT EXISTS requests_undelivered_idx
    ON requests (service, seq) WHERE delivered_at IS NULL AND status IN ('ok', 'error');

CREATE INDEX IF NOT EXISTS requests_recent_done_idx
    ON requests (executor, finished_at) WHERE status = 'ok';
