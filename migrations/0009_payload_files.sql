-- Large payloads (img2img and mix2img images) are files beside the database
-- (DATABASE_PATH.payloads/<object_id>.json), written and fsynced before the row is committed.
-- For such a request `payload_file` is 1 and `requests.payload` holds the payload's outline
-- (its long strings replaced by null), which the status page reads prompts from. The
-- `payloads` table keeps serving rows stored by earlier releases.
ALTER TABLE requests ADD COLUMN payload_file INTEGER NOT NULL DEFAULT 0 CHECK (payload_file IN (0, 1));
CREATE INDEX IF NOT EXISTS requests_payload_file_idx ON requests (object_id) WHERE payload_file = 1;
