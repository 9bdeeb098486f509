//! The SQLite database of files, jobs, job events and checkpoints (`<data>/itamae.db`, through
//! `sqlx`). Schema changes are the numbered scripts in `daemon/migrations/`, applied in order at
//! open and recorded in `PRAGMA user_version`.
//!
//! Listings are newest first and page with `after` = the id of the last item seen, as OpenAI's
//! do; the order is the insertion order (`seq`), never the random ids.
//!
//! The runner's fenced writes are in [`super::store_fenced`], the mapping of rows in
//! [`super::store_rows`].
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::backend::{
    lease_ms, Claimed, FenceResult, FileQuery, Lease, MetaStore, NewEvent, StoreError, StoreResult,
};
use super::storage::{new_id, now, EVENT_PREFIX};
use super::store_rows::{checkpoint_of, event_of, file_of, job_of, json_str, page};

/// `(version, script)`, applied in order to a database whose `user_version` is lower.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_jobs.sql")),
    (2, include_str!("../../migrations/0002_leases.sql")),
    (3, include_str!("../../migrations/0003_adapters.sql")),
];

pub type Result<T> = std::result::Result<T, sqlx::Error>;

/// Job statuses (OpenAI's, plus `paused`).
pub mod status {
    pub const VALIDATING: &str = "validating_files";
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";

    pub fn is_terminal(s: &str) -> bool {
        matches!(s, SUCCEEDED | FAILED | CANCELLED)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: String,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub created_at: i64,
    pub status: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<Value>,
    /// The parsed request ([`super::spec::JobSpec`]) the runner trains from.
    pub spec: Value,
    /// As requested ("auto" or numbers) until the run resolves them to numbers.
    pub hyperparameters: Value,
    /// The `method` object echoed to clients.
    pub method: Value,
    /// The name the result is served under once the job succeeds.
    pub variant: String,
    pub error: Option<Value>,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<i64>,
    pub trained_tokens: Option<i64>,
    pub estimated_finish: Option<i64>,
    pub result_files: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub id: String,
    pub job_id: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    /// `message` or `metrics`.
    pub kind: String,
    pub data: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub id: String,
    pub job_id: String,
    pub created_at: i64,
    pub step: i64,
    pub metrics: Value,
    /// The served name, `…:ckpt-step-N`.
    pub model: String,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

/// The SQLite [`MetaStore`].
#[derive(Clone)]
pub struct Store {
    pub(super) pool: SqlitePool,
    /// Bumped after every event and job status write: live event streams wait on it instead
    /// of polling the database.
    changes: std::sync::Arc<tokio::sync::watch::Sender<()>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        // No idle timeout, lifetime or minimum: sqlx would otherwise spawn maintenance tasks on
        // the runtime that opened the pool, and the pool is shared by several runtimes (the HTTP
        // workers' and the job runner's).
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        let store = Self {
            pool,
            changes: std::sync::Arc::new(tokio::sync::watch::channel(()).0),
        };
        store.migrate().await?;
        // One daemon owns a SQLite file (it lives in its data directory): a lease found here
        // was taken by an earlier run of this daemon, which is gone, so its job is free now
        // rather than after the lease's expiry.
        sqlx::query(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE owner IS NOT NULL",
        )
        .execute(&store.pool)
        .await?;
        Ok(store)
    }

    /// The pool, for the adapter registry's queries on the same file
    /// ([`super::registry_sqlite`]).
    pub fn pool(&self) -> SqlitePool {
        self.pool.clone()
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        for (version, script) in MIGRATIONS {
            if *version > current {
                sqlx::raw_sql(script).execute(&mut *tx).await?;
                sqlx::raw_sql(&format!("PRAGMA user_version = {version}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await
    }

    // ---- files ----

    pub async fn insert_file(&self, f: &FileRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&f.id)
        .bind(f.bytes)
        .bind(f.created_at)
        .bind(&f.filename)
        .bind(&f.purpose)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>> {
        sqlx::query("SELECT * FROM files WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(file_of)
            .transpose()
    }

    /// Newest first (or oldest first with `ascending`), after the file `after`.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileRow>> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT * FROM files WHERE (?1 IS NULL OR purpose = ?1) \
             AND (?2 IS NULL OR seq {cmp} (SELECT seq FROM files WHERE id = ?2)) \
             ORDER BY seq {order} LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(purpose)
            .bind(after)
            .bind(limit as i64 + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page(
            rows.iter().map(file_of).collect::<Result<_>>()?,
            limit,
        ))
    }

    pub async fn delete_file(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM files WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- jobs ----

    pub async fn insert_job(&self, j: &JobRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, \
             suffix, seed, metadata, spec, hyperparameters, method, variant, error, \
             fine_tuned_model, finished_at, trained_tokens, estimated_finish, result_files) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&j.id)
        .bind(j.created_at)
        .bind(&j.status)
        .bind(&j.model)
        .bind(&j.training_file)
        .bind(&j.validation_file)
        .bind(&j.suffix)
        .bind(j.seed)
        .bind(j.metadata.as_ref().map(json_str))
        .bind(json_str(&j.spec))
        .bind(json_str(&j.hyperparameters))
        .bind(json_str(&j.method))
        .bind(&j.variant)
        .bind(j.error.as_ref().map(json_str))
        .bind(&j.fine_tuned_model)
        .bind(j.finished_at)
        .bind(j.trained_tokens)
        .bind(j.estimated_finish)
        .bind(json_str(&j.result_files))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>> {
        sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_of)
            .transpose()
    }

    /// Newest first, after the job `after`.
    pub async fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Page<JobRow>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?1)) \
             ORDER BY seq DESC LIMIT ?2",
        )
        .bind(after)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(page(rows.iter().map(job_of).collect::<Result<_>>()?, limit))
    }

    /// Jobs in any of `statuses`, oldest first (the runner's queue order).
    pub async fn jobs_with_status(&self, statuses: &[&str]) -> Result<Vec<JobRow>> {
        let marks = vec!["?"; statuses.len()].join(", ");
        let sql = format!("SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq ASC");
        let mut q = sqlx::query(&sql);
        for s in statuses {
            q = q.bind(*s);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(job_of).collect()
    }

    /// A receiver that sees a change after each event or status written from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    pub(super) fn changed(&self) {
        // marks every receiver changed, whether or not any exists
        self.changes.send_replace(());
    }

    /// Moves a job to `to` if its status is one of `from`; false if it was not (a concurrent
    /// cancel, say, got there first).
    pub async fn transition(&self, id: &str, from: &[&str], to: &str) -> Result<bool> {
        let marks = vec!["?"; from.len()].join(", ");
        let sql = format!("UPDATE jobs SET status = ? WHERE id = ? AND status IN ({marks})");
        let mut q = sqlx::query(&sql).bind(to).bind(id);
        for s in from {
            q = q.bind(*s);
        }
        let moved = q.execute(&self.pool).await?.rows_affected() > 0;
        self.changed();
        Ok(moved)
    }

    /// Ends a job as `to` (failed or cancelled), with an OpenAI `error` object for failures.
    pub async fn finish_unsuccessfully(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&Value>,
    ) -> Result<bool> {
        let marks = vec!["?"; from.len()].join(", ");
        let sql = format!(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ?, estimated_finish = NULL \
             WHERE id = ? AND status IN ({marks})"
        );
        let mut q = sqlx::query(&sql)
            .bind(to)
            .bind(error.map(json_str))
            .bind(now())
            .bind(id);
        for s in from {
            q = q.bind(*s);
        }
        let moved = q.execute(&self.pool).await?.rows_affected() > 0;
        self.changed();
        Ok(moved)
    }

    /// Marks a running (or paused) job succeeded; false if it was cancelled meanwhile.
    pub async fn succeed(
        &self,
        id: &str,
        fine_tuned_model: Option<&str>,
        trained_tokens: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?, trained_tokens = ?, \
             finished_at = ?, estimated_finish = NULL, error = NULL \
             WHERE id = ? AND status IN ('running', 'paused')",
        )
        .bind(fine_tuned_model)
        .bind(trained_tokens)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.changed();
        Ok(r.rows_affected() > 0)
    }

    // ---- events ----

    pub async fn add_event(
        &self,
        job_id: &str,
        level: &str,
        message: &str,
        kind: &str,
        data: Option<&Value>,
    ) -> Result<EventRow> {
        let id = new_id(EVENT_PREFIX);
        let created_at = now();
        let r = sqlx::query(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(job_id)
        .bind(created_at)
        .bind(level)
        .bind(message)
        .bind(kind)
        .bind(data.map(json_str))
        .execute(&self.pool)
        .await?;
        self.changed();
        Ok(EventRow {
            seq: r.last_insert_rowid(),
            id,
            job_id: job_id.into(),
            created_at,
            level: level.into(),
            message: message.into(),
            kind: kind.into(),
            data: data.cloned(),
        })
    }

    /// A job's events, newest first, older than the event `after`.
    pub async fn list_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EventRow>> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE job_id = ?1 \
             AND (?2 IS NULL OR seq < (SELECT seq FROM events WHERE id = ?2)) \
             ORDER BY seq DESC LIMIT ?3",
        )
        .bind(job_id)
        .bind(after)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(page(
            rows.iter().map(event_of).collect::<Result<_>>()?,
            limit,
        ))
    }

    /// A job's events with `seq` above `since`, oldest first (the live stream's feed).
    pub async fn events_since(&self, job_id: &str, since: i64) -> Result<Vec<EventRow>> {
        let rows =
            sqlx::query("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq ASC")
                .bind(job_id)
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(event_of).collect()
    }

    // ---- checkpoints ----

    /// A job's checkpoints, newest step first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(checkpoint_of).collect()
    }

    /// Every checkpoint of every job (to serve them again after a restart).
    pub async fn all_checkpoints(&self) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq ASC")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(checkpoint_of).collect()
    }

    // ---- leases ----

    /// See [`MetaStore::claim_job`]: the candidate is read, then moved by an update that holds
    /// only if it is still claimable (SQLite serialises writers, so one of two racing runners
    /// sees no row changed and looks again).
    pub async fn claim_job(&self, owner: &str, lease: Duration) -> Result<Option<Claimed>> {
        const CLAIMABLE: &str = "(status = 'queued' OR (status IN ('running', 'paused') \
             AND (lease_expires_at IS NULL OR lease_expires_at < ?1)))";
        loop {
            let now = now_ms();
            let candidate: Option<(i64, String)> = sqlx::query_as(&format!(
                "SELECT seq, status FROM jobs WHERE {CLAIMABLE} \
                 ORDER BY status = 'queued', seq LIMIT 1"
            ))
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            let Some((seq, prior)) = candidate else {
                return Ok(None);
            };
            let moved = sqlx::query(&format!(
                "UPDATE jobs SET owner = ?2, lease_expires_at = ?3, \
                 status = CASE status WHEN 'queued' THEN 'running' ELSE status END \
                 WHERE seq = ?4 AND status = ?5 AND {CLAIMABLE}"
            ))
            .bind(now)
            .bind(owner)
            .bind(now + lease_ms(lease))
            .bind(seq)
            .bind(&prior)
            .execute(&self.pool)
            .await?
            .rows_affected()
                > 0;
            if moved {
                self.changed();
                let row = sqlx::query("SELECT * FROM jobs WHERE seq = ?")
                    .bind(seq)
                    .fetch_one(&self.pool)
                    .await?;
                return Ok(Some(Claimed {
                    job: job_of(&row)?,
                    interrupted: prior != status::QUEUED,
                }));
            }
        }
    }

    /// See [`MetaStore::renew_lease`].
    pub async fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<String>> {
        sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND owner = ? RETURNING status",
        )
        .bind(now_ms() + lease_ms(lease))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await
    }

    /// See [`MetaStore::release_lease`].
    pub async fn release_lease(&self, id: &str, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE id = ? AND owner = ?",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Milliseconds since the epoch, the unit of `lease_expires_at`.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::new(e)
    }
}

/// The interface, over the methods above (which tests call directly).
impl MetaStore for Store {
    fn insert_file<'a>(&'a self, f: &'a FileRow) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move { Ok(Store::insert_file(self, f).await?) })
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<FileRow>>> {
        Box::pin(async move { Ok(Store::get_file(self, id).await?) })
    }

    fn list_files<'a>(&'a self, q: FileQuery<'a>) -> BoxFuture<'a, StoreResult<Page<FileRow>>> {
        Box::pin(async move {
            Ok(Store::list_files(self, q.purpose, q.after, q.limit, q.ascending).await?)
        })
    }

    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move { Ok(Store::delete_file(self, id).await?) })
    }

    fn insert_job<'a>(&'a self, j: &'a JobRow) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move { Ok(Store::insert_job(self, j).await?) })
    }

    fn get_job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<JobRow>>> {
        Box::pin(async move { Ok(Store::get_job(self, id).await?) })
    }

    fn list_jobs<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<JobRow>>> {
        Box::pin(async move { Ok(Store::list_jobs(self, after, limit).await?) })
    }

    fn jobs_with_status<'a>(
        &'a self,
        statuses: &'a [&'a str],
    ) -> BoxFuture<'a, StoreResult<Vec<JobRow>>> {
        Box::pin(async move { Ok(Store::jobs_with_status(self, statuses).await?) })
    }

    fn transition<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move { Ok(Store::transition(self, id, from, to).await?) })
    }

    fn finish_unsuccessfully<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move { Ok(Store::finish_unsuccessfully(self, id, from, to, error).await?) })
    }

    fn succeed<'a>(
        &'a self,
        id: &'a str,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(
            async move { Ok(Store::succeed(self, id, fine_tuned_model, trained_tokens).await?) },
        )
    }

    fn add_event<'a>(
        &'a self,
        job_id: &'a str,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, StoreResult<EventRow>> {
        Box::pin(async move {
            Ok(Store::add_event(self, job_id, e.level, e.message, e.kind, e.data).await?)
        })
    }

    fn list_events<'a>(
        &'a self,
        job_id: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<EventRow>>> {
        Box::pin(async move { Ok(Store::list_events(self, job_id, after, limit).await?) })
    }

    fn events_since<'a>(
        &'a self,
        job_id: &'a str,
        since: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<EventRow>>> {
        Box::pin(async move { Ok(Store::events_since(self, job_id, since).await?) })
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        Store::subscribe(self)
    }

    fn list_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<CheckpointRow>>> {
        Box::pin(async move { Ok(Store::list_checkpoints(self, job_id).await?) })
    }

    fn all_checkpoints(&self) -> BoxFuture<'_, StoreResult<Vec<CheckpointRow>>> {
        Box::pin(async move { Ok(Store::all_checkpoints(self).await?) })
    }

    fn claim_job<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<Claimed>>> {
        Box::pin(async move { Ok(Store::claim_job(self, owner, lease).await?) })
    }

    fn renew_lease<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<String>>> {
        Box::pin(async move { Ok(Store::renew_lease(self, id, owner, lease).await?) })
    }

    fn release_lease<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move { Ok(Store::release_lease(self, id, owner).await?) })
    }

    fn fenced_finish<'a>(
        &'a self,
        lease: Lease<'a>,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, FenceResult<bool>> {
        Box::pin(Store::fenced_finish(self, lease, from, to, error))
    }

    fn fenced_succeed<'a>(
        &'a self,
        lease: Lease<'a>,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, FenceResult<bool>> {
        Box::pin(Store::fenced_succeed(
            self,
            lease,
            fine_tuned_model,
            trained_tokens,
        ))
    }

    fn fenced_progress<'a>(
        &'a self,
        lease: Lease<'a>,
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> BoxFuture<'a, FenceResult<()>> {
        Box::pin(Store::fenced_progress(
            self,
            lease,
            trained_tokens,
            estimated_finish,
        ))
    }

    fn fenced_hyperparameters<'a>(
        &'a self,
        lease: Lease<'a>,
        hyperparameters: &'a Value,
        method: &'a Value,
    ) -> BoxFuture<'a, FenceResult<()>> {
        Box::pin(Store::fenced_hyperparameters(
            self,
            lease,
            hyperparameters,
            method,
        ))
    }

    fn fenced_event<'a>(
        &'a self,
        lease: Lease<'a>,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, FenceResult<EventRow>> {
        Box::pin(Store::fenced_event(self, lease, e))
    }

    fn fenced_checkpoint<'a>(
        &'a self,
        lease: Lease<'a>,
        step: i64,
        metrics: &'a Value,
        model: &'a str,
    ) -> BoxFuture<'a, FenceResult<CheckpointRow>> {
        Box::pin(Store::fenced_checkpoint(self, lease, step, metrics, model))
    }
}

// The tests are the backend-generic contract in `store_contract.rs`, run on SQLite and PostgreSQL.
