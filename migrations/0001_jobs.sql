-- Every image request is a job. Timestamps are unix milliseconds (UTC).
CREATE TABLE jobs (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    model       TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    params      TEXT NOT NULL,            -- the full request as received (JSON)
    seed        INTEGER,                  -- the seed actually used
    status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    error_code  TEXT,                     -- stable machine-readable reason when failed
    error       TEXT,                     -- human-readable reason when failed
    request_id  TEXT,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    duration_ms INTEGER
);
CREATE INDEX jobs_by_user ON jobs (user_id, created_at DESC);
CREATE INDEX jobs_by_status ON jobs (status);

CREATE TABLE job_images (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    image_key  TEXT NOT NULL,             -- content address in the image store: <sha256>.<ext>
    format     TEXT NOT NULL,
    width      INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX job_images_by_key ON job_images (image_key);
