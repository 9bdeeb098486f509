-- Files, fine-tuning jobs, their events and checkpoints (daemon/src/jobs/pg_store.rs): the
-- SQLite schema (../0001_jobs.sql) in PostgreSQL's types. `seq` columns give the creation order
-- that listings page over (ids are random). JSON values are kept as text, as in SQLite.
CREATE TABLE files (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    bytes      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL
);

CREATE TABLE jobs (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    created_at       BIGINT NOT NULL,
    status           TEXT NOT NULL,
    model            TEXT NOT NULL,
    training_file    TEXT NOT NULL,
    validation_file  TEXT,
    suffix           TEXT,
    seed             BIGINT NOT NULL,
    metadata         TEXT,
    spec             TEXT NOT NULL,
    hyperparameters  TEXT NOT NULL,
    method           TEXT NOT NULL,
    variant          TEXT NOT NULL,
    error            TEXT,
    fine_tuned_model TEXT,
    finished_at      BIGINT,
    trained_tokens   BIGINT,
    estimated_finish BIGINT,
    result_files     TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX jobs_status ON jobs (status, seq);

CREATE TABLE events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    job_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    level      TEXT NOT NULL,
    message    TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT
);
CREATE INDEX events_job ON events (job_id, seq);

CREATE TABLE checkpoints (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    job_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    step        BIGINT NOT NULL,
    metrics     TEXT NOT NULL,
    model       TEXT NOT NULL,
    UNIQUE (job_id, step)
);
