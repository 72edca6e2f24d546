-- The queue is rebuilt at start-up from headers alone: a request's cost and payload size are
-- stored with it, so its payload (megabytes for img2img) is read only when it is dispatched.
-- NULL on rows of earlier releases: those are costed from their payload once, at rebuild.
ALTER TABLE requests ADD COLUMN cost_units REAL;
ALTER TABLE requests ADD COLUMN payload_chars INTEGER;
