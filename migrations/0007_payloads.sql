-- Large payloads (img2img and mix2img images) live in a table of their own. In `requests` they
-- sat before every column added later, so reading a queued request's header meant following
-- the megabyte's overflow pages; the queue rebuild now reads headers only from `requests`.
-- `requests.payload` is '' for a request whose payload is here.
CREATE TABLE IF NOT EXISTS payloads (
    object_id  TEXT PRIMARY KEY,
    payload    TEXT NOT NULL   -- JSON, as sent
);
