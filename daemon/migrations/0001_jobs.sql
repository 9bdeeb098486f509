-- Files, fine-tuning jobs, their events and checkpoints (daemon/src/jobs/store.rs).
-- `seq` columns give the creation order that listings page over (ids are random).
CREATE TABLE files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL
);

CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    created_at       INTEGER NOT NULL,
    status           TEXT NOT NULL,
    model            TEXT NOT NULL,
    training_file    TEXT NOT NULL,
    validation_file  TEXT,
    suffix           TEXT,
    seed             INTEGER NOT NULL,
    metadata         TEXT,
    spec             TEXT NOT NULL,
    hyperparameters  TEXT NOT NULL,
    method           TEXT NOT NULL,
    variant          TEXT NOT NULL,
    error            TEXT,
    fine_tuned_model TEXT,
    finished_at      INTEGER,
    trained_tokens   INTEGER,
    estimated_finish INTEGER,
    result_files     TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX jobs_status ON jobs (status, seq);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    job_id     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level      TEXT NOT NULL,
    message    TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT
);
CREATE INDEX events_job ON events (job_id, seq);

CREATE TABLE checkpoints (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    job_id      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    metrics     TEXT NOT NULL,
    model       TEXT NOT NULL,
    UNIQUE (job_id, step)
);
