-- The adapter registry (daemon/src/jobs/registry_sqlite.rs): one row per name ever imported or
-- deleted. `generation` only grows (kept after a delete, so a re-created name never reuses a
-- number); `stored` = 0 marks a deleted adapter, or a deleted fine-tuning variant (`ft:…`, a
-- tombstone other replicas drop it by). `load` = serve it at start (0 after an unload).
CREATE TABLE adapters (
    name       TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    stored     INTEGER NOT NULL,
    type       TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    load       INTEGER NOT NULL
);
