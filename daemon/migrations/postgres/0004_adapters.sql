-- The adapter registry (daemon/src/jobs/registry_pg.rs), shared by every replica: one row per
-- name ever imported or deleted. `generation` only grows (kept after a delete, so a re-created
-- name never reuses a number); `stored` = false marks a deleted adapter, or a deleted
-- fine-tuning variant (`ft:…`, a tombstone other replicas drop it by). `load` = serve it at start
-- (false after an unload). Changes are announced on the channel `itamae_variants` by the
-- transaction that makes them (payload: {"name","generation","op"}).
CREATE TABLE adapters (
    name       TEXT PRIMARY KEY,
    generation BIGINT NOT NULL,
    stored     BOOLEAN NOT NULL,
    type       TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    load       BOOLEAN NOT NULL
);
