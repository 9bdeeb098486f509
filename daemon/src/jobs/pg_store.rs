//! The PostgreSQL [`MetaStore`] (`storage.database_url = "postgres://…"`): the same rows and
//! semantics as the SQLite store ([`super::store`]), in a database several replicas share.
//!
//! - Schema changes are the numbered scripts in `daemon/migrations/postgres/`, applied at open
//!   inside one transaction that holds an advisory lock, and recorded in `itamae_migrations`:
//!   replicas starting together apply each script once, the others wait and find it applied.
//! - Job leases ([`MetaStore::claim_job`]) pick the candidate row `FOR UPDATE SKIP LOCKED` and
//!   time them by the database's clock (`itamae_now_ms()`), so replicas' clocks may disagree.
//! - [`MetaStore::subscribe`] is fed by `LISTEN itamae_jobs`: triggers NOTIFY it on every event
//!   and job status written by any replica (live SSE streams work from every replica). The
//!   listener reconnects on its own; a tick every [`RECONCILE`] marks a change anyway, so a
//!   notification lost while reconnecting delays a stream by at most that.
//!
//! The runner's fenced writes are in [`super::pg_fenced`], the mapping of rows in
//! [`super::pg_rows`].
//!
//! Every query runs on the jobs runtime given at open (spawned there and awaited): a Postgres
//! connection is a socket bound to the runtime that opened it, and the pool is shared by the
//! HTTP workers' runtimes and the runner's.
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Row;

use super::backend::{
    lease_ms, redact_url, Claimed, FenceError, FenceResult, FileQuery, Lease, MetaStore, NewEvent,
    StoreError, StoreResult,
};
use super::pg_rows::{
    checkpoint_of, event_of, file_of, job_of, json_str, owned, owned_lease, page,
};
use super::storage::{new_id, now, EVENT_PREFIX};
use super::store::{status, CheckpointRow, EventRow, FileRow, JobRow, Page};

type Result<T> = std::result::Result<T, sqlx::Error>;

/// `(version, script)`, applied in order to a database that has not recorded them.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_jobs.sql")),
    (2, include_str!("../../migrations/postgres/0002_leases.sql")),
    (3, include_str!("../../migrations/postgres/0003_notify.sql")),
    (
        4,
        include_str!("../../migrations/postgres/0004_adapters.sql"),
    ),
];

/// The advisory lock key migrations hold (any constant; this one spells "itamae" in ASCII).
const MIGRATION_LOCK: i64 = 0x6974_616d_6165;
/// The channel the triggers of migration 3 notify.
const JOBS_CHANNEL: &str = "itamae_jobs";
/// How often live streams look again even without a notification.
const RECONCILE: Duration = Duration::from_secs(2);
const NOW_MS: &str = "itamae_now_ms()";

/// The PostgreSQL [`MetaStore`].
#[derive(Clone)]
pub struct PgStore {
    db: Db,
    rt: tokio::runtime::Handle,
    changes: Arc<tokio::sync::watch::Sender<()>>,
}

/// The pool and the queries; cheap to clone into the tasks spawned on the jobs runtime.
#[derive(Clone)]
pub(super) struct Db {
    pub(super) pool: PgPool,
}

/// A failure to open the database; shows the URL without its password.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {source}")]
pub struct OpenError {
    url: String,
    source: sqlx::Error,
}

impl PgStore {
    /// Connects to `url`, brings the schema up to date and starts listening for other
    /// replicas' changes. Must be called on `rt` (the runtime every query will run on).
    pub async fn open(
        url: &str,
        rt: tokio::runtime::Handle,
    ) -> std::result::Result<Self, OpenError> {
        let fail = |source| OpenError {
            url: redact_url(url),
            source,
        };
        let opts = PgConnectOptions::from_str(url).map_err(fail)?;
        // No idle timeout or lifetime: sqlx would run maintenance on whichever runtime the pool
        // was first used on; the pool lives as long as the process.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await
            .map_err(fail)?;
        let db = Db { pool };
        db.migrate().await.map_err(fail)?;
        let changes = Arc::new(tokio::sync::watch::channel(()).0);
        let listener = PgListener::connect_with(&db.pool).await.map_err(fail)?;
        rt.spawn(listen(listener, Arc::downgrade(&changes)));
        Ok(Self { db, rt, changes })
    }

    /// The pool, for the adapter registry's queries on the same database
    /// ([`super::registry_pg`]).
    pub fn pool(&self) -> PgPool {
        self.db.pool.clone()
    }

    /// Runs `f` on the jobs runtime.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let task = self.rt.spawn(f);
        Box::pin(async move {
            match task.await {
                Ok(r) => Ok(r?),
                Err(e) => Err(StoreError::new(e)),
            }
        })
    }

    /// Marks this replica's own receivers at once (the notification comes back later too).
    fn changed(&self) {
        self.changes.send_replace(());
    }
}

/// Feeds the change channel from the database's notifications and the reconciliation tick,
/// until the store is dropped.
async fn listen(
    mut listener: PgListener,
    changes: std::sync::Weak<tokio::sync::watch::Sender<()>>,
) {
    let mut listening = false;
    let mut tick = tokio::time::interval(RECONCILE);
    loop {
        if !listening {
            match listener.listen(JOBS_CHANNEL).await {
                Ok(()) => listening = true,
                Err(e) => tracing::warn!("jobs database: LISTEN {JOBS_CHANNEL}: {e}"),
            }
        }
        tokio::select! {
            n = listener.try_recv() => match n {
                Ok(Some(_)) => {}
                // The connection dropped: `try_recv` reconnects and re-listens next time; what
                // was missed meanwhile is made up by marking a change now.
                Ok(None) => {}
                // Once LISTEN succeeded the listener re-issues it on every reconnection.
                Err(e) => {
                    tracing::warn!("jobs database: notifications: {e}");
                    tokio::time::sleep(RECONCILE).await;
                }
            },
            _ = tick.tick() => {}
        }
        match changes.upgrade() {
            Some(c) => {
                c.send_replace(());
            }
            None => return,
        }
    }
}

impl Db {
    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Held until commit: a replica starting at the same time waits here, then finds every
        // script recorded.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS itamae_migrations (\
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM itamae_migrations")
            .fetch_one(&mut *tx)
            .await?;
        for (version, script) in MIGRATIONS {
            if *version > current.unwrap_or(0) {
                sqlx::raw_sql(script).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO itamae_migrations (version) VALUES ($1)")
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await
    }

    async fn insert_file(self, f: FileRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (id, bytes, created_at, filename, purpose) \
             VALUES ($1, $2, $3, $4, $5)",
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

    async fn get_file(self, id: String) -> Result<Option<FileRow>> {
        sqlx::query("SELECT * FROM files WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(file_of)
            .transpose()
    }

    async fn list_files(
        self,
        purpose: Option<String>,
        after: Option<String>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileRow>> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT * FROM files WHERE ($1::TEXT IS NULL OR purpose = $1) \
             AND ($2::TEXT IS NULL OR seq {cmp} (SELECT seq FROM files WHERE id = $2)) \
             ORDER BY seq {order} LIMIT $3"
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

    async fn delete_file(self, id: String) -> Result<bool> {
        let r = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn insert_job(self, j: JobRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, \
             suffix, seed, metadata, spec, hyperparameters, method, variant, error, \
             fine_tuned_model, finished_at, trained_tokens, estimated_finish, result_files) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19)",
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

    async fn get_job(self, id: String) -> Result<Option<JobRow>> {
        sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_of)
            .transpose()
    }

    async fn list_jobs(self, after: Option<String>, limit: usize) -> Result<Page<JobRow>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs \
             WHERE ($1::TEXT IS NULL OR seq < (SELECT seq FROM jobs WHERE id = $1)) \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(page(rows.iter().map(job_of).collect::<Result<_>>()?, limit))
    }

    async fn jobs_with_status(self, statuses: Vec<String>) -> Result<Vec<JobRow>> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE status = ANY($1) ORDER BY seq ASC")
            .bind(statuses)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_of).collect()
    }

    async fn transition(self, id: String, from: Vec<String>, to: String) -> Result<bool> {
        let r = sqlx::query("UPDATE jobs SET status = $1 WHERE id = $2 AND status = ANY($3)")
            .bind(to)
            .bind(id)
            .bind(from)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn finish_unsuccessfully(
        self,
        id: String,
        from: Vec<String>,
        to: String,
        error: Option<String>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = $1, error = $2, finished_at = $3, estimated_finish = NULL \
             WHERE id = $4 AND status = ANY($5)",
        )
        .bind(to)
        .bind(error)
        .bind(now())
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn succeed(
        self,
        id: String,
        fine_tuned_model: Option<String>,
        trained_tokens: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', fine_tuned_model = $1, trained_tokens = $2, \
             finished_at = $3, estimated_finish = NULL, error = NULL \
             WHERE id = $4 AND status IN ('running', 'paused')",
        )
        .bind(fine_tuned_model)
        .bind(trained_tokens)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn add_event(
        self,
        job_id: String,
        level: String,
        message: String,
        kind: String,
        data: Option<Value>,
    ) -> Result<EventRow> {
        let id = new_id(EVENT_PREFIX);
        let created_at = now();
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
        )
        .bind(&id)
        .bind(&job_id)
        .bind(created_at)
        .bind(&level)
        .bind(&message)
        .bind(&kind)
        .bind(data.as_ref().map(json_str))
        .fetch_one(&self.pool)
        .await?;
        Ok(EventRow {
            seq,
            id,
            job_id,
            created_at,
            level,
            message,
            kind,
            data,
        })
    }

    async fn list_events(
        self,
        job_id: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<Page<EventRow>> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE job_id = $1 \
             AND ($2::TEXT IS NULL OR seq < (SELECT seq FROM events WHERE id = $2)) \
             ORDER BY seq DESC LIMIT $3",
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

    async fn events_since(self, job_id: String, since: i64) -> Result<Vec<EventRow>> {
        let rows =
            sqlx::query("SELECT * FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq ASC")
                .bind(job_id)
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(event_of).collect()
    }

    async fn list_checkpoints(self, job_id: String) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query("SELECT * FROM checkpoints WHERE job_id = $1 ORDER BY step DESC")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(checkpoint_of).collect()
    }

    async fn all_checkpoints(self) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq ASC")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(checkpoint_of).collect()
    }

    /// The row is locked while it is moved, and rows other runners hold are skipped, so
    /// racing runners each get a different job (or none).
    async fn claim_job(self, owner: String, lease: i64) -> Result<Option<Claimed>> {
        let row = sqlx::query(&format!(
            "WITH c AS (\
               SELECT seq, status AS prior FROM jobs \
               WHERE status = 'queued' OR (status IN ('running', 'paused') \
                 AND (lease_expires_at IS NULL OR lease_expires_at < {NOW_MS})) \
               ORDER BY status = 'queued', seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
             UPDATE jobs SET owner = $1, lease_expires_at = {NOW_MS} + $2, \
               status = CASE jobs.status WHEN 'queued' THEN 'running' ELSE jobs.status END \
             FROM c WHERE jobs.seq = c.seq RETURNING jobs.*, c.prior"
        ))
        .bind(owner)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let prior: String = r.try_get("prior")?;
            Ok(Claimed {
                job: job_of(&r)?,
                interrupted: prior != status::QUEUED,
            })
        })
        .transpose()
    }

    async fn renew_lease(self, id: String, owner: String, lease: i64) -> Result<Option<String>> {
        sqlx::query_scalar(&format!(
            "UPDATE jobs SET lease_expires_at = {NOW_MS} + $1 \
             WHERE id = $2 AND owner = $3 RETURNING status"
        ))
        .bind(lease)
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await
    }

    async fn release_lease(self, id: String, owner: String) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Each method owns its arguments and runs on the jobs runtime ([`PgStore::run`]); writes that
/// streams wait for also mark this replica's change channel at once.
impl MetaStore for PgStore {
    fn insert_file<'a>(&'a self, f: &'a FileRow) -> BoxFuture<'a, StoreResult<()>> {
        self.run(self.db.clone().insert_file(f.clone()))
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<FileRow>>> {
        self.run(self.db.clone().get_file(id.into()))
    }

    fn list_files<'a>(&'a self, q: FileQuery<'a>) -> BoxFuture<'a, StoreResult<Page<FileRow>>> {
        self.run(self.db.clone().list_files(
            q.purpose.map(Into::into),
            q.after.map(Into::into),
            q.limit,
            q.ascending,
        ))
    }

    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        self.run(self.db.clone().delete_file(id.into()))
    }

    fn insert_job<'a>(&'a self, j: &'a JobRow) -> BoxFuture<'a, StoreResult<()>> {
        self.run(self.db.clone().insert_job(j.clone()))
    }

    fn get_job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<JobRow>>> {
        self.run(self.db.clone().get_job(id.into()))
    }

    fn list_jobs<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<JobRow>>> {
        self.run(self.db.clone().list_jobs(after.map(Into::into), limit))
    }

    fn jobs_with_status<'a>(
        &'a self,
        statuses: &'a [&'a str],
    ) -> BoxFuture<'a, StoreResult<Vec<JobRow>>> {
        self.run(self.db.clone().jobs_with_status(owned(statuses)))
    }

    fn transition<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let f = self.run(
            self.db
                .clone()
                .transition(id.into(), owned(from), to.into()),
        );
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r
        })
    }

    fn finish_unsuccessfully<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let f = self.run(self.db.clone().finish_unsuccessfully(
            id.into(),
            owned(from),
            to.into(),
            error.map(json_str),
        ));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r
        })
    }

    fn succeed<'a>(
        &'a self,
        id: &'a str,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let f = self.run(self.db.clone().succeed(
            id.into(),
            fine_tuned_model.map(Into::into),
            trained_tokens,
        ));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r
        })
    }

    fn add_event<'a>(
        &'a self,
        job_id: &'a str,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, StoreResult<EventRow>> {
        let f = self.run(self.db.clone().add_event(
            job_id.into(),
            e.level.into(),
            e.message.into(),
            e.kind.into(),
            e.data.cloned(),
        ));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r
        })
    }

    fn list_events<'a>(
        &'a self,
        job_id: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<EventRow>>> {
        self.run(
            self.db
                .clone()
                .list_events(job_id.into(), after.map(Into::into), limit),
        )
    }

    fn events_since<'a>(
        &'a self,
        job_id: &'a str,
        since: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<EventRow>>> {
        self.run(self.db.clone().events_since(job_id.into(), since))
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn list_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<CheckpointRow>>> {
        self.run(self.db.clone().list_checkpoints(job_id.into()))
    }

    fn all_checkpoints(&self) -> BoxFuture<'_, StoreResult<Vec<CheckpointRow>>> {
        self.run(self.db.clone().all_checkpoints())
    }

    fn claim_job<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<Claimed>>> {
        let f = self.run(self.db.clone().claim_job(owner.into(), lease_ms(lease)));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r
        })
    }

    fn renew_lease<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<String>>> {
        self.run(
            self.db
                .clone()
                .renew_lease(id.into(), owner.into(), lease_ms(lease)),
        )
    }

    fn release_lease<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        self.run(self.db.clone().release_lease(id.into(), owner.into()))
    }

    fn fenced_finish<'a>(
        &'a self,
        lease: Lease<'a>,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, FenceResult<bool>> {
        let f = self.run(self.db.clone().fenced_finish(
            owned_lease(lease),
            owned(from),
            to.into(),
            error.map(json_str),
        ));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r?.ok_or_else(|| FenceError::lost(lease))
        })
    }

    fn fenced_succeed<'a>(
        &'a self,
        lease: Lease<'a>,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, FenceResult<bool>> {
        let f = self.run(self.db.clone().fenced_succeed(
            owned_lease(lease),
            fine_tuned_model.map(Into::into),
            trained_tokens,
        ));
        Box::pin(async move {
            let r = f.await;
            self.changed();
            r?.ok_or_else(|| FenceError::lost(lease))
        })
    }

    fn fenced_progress<'a>(
        &'a self,
        lease: Lease<'a>,
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> BoxFuture<'a, FenceResult<()>> {
        let f = self.run(self.db.clone().fenced_progress(
            owned_lease(lease),
            trained_tokens,
            estimated_finish,
        ));
        Box::pin(async move {
            f.await?
                .then_some(())
                .ok_or_else(|| FenceError::lost(lease))
        })
    }

    fn fenced_hyperparameters<'a>(
        &'a self,
        lease: Lease<'a>,
        hyperparameters: &'a Value,
        method: &'a Value,
    ) -> BoxFuture<'a, FenceResult<()>> {
        let f = self.run(self.db.clone().fenced_hyperparameters(
            owned_lease(lease),
            json_str(hyperparameters),
            json_str(method),
        ));
        Box::pin(async move {
            f.await?
                .then_some(())
                .ok_or_else(|| FenceError::lost(lease))
        })
    }

    fn fenced_event<'a>(
        &'a self,
        lease: Lease<'a>,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, FenceResult<EventRow>> {
        let f = self.run(self.db.clone().fenced_event(
            owned_lease(lease),
            e.level.into(),
            e.message.into(),
            e.kind.into(),
            e.data.cloned(),
        ));
        Box::pin(async move {
            let r = f.await?.ok_or_else(|| FenceError::lost(lease))?;
            self.changed();
            Ok(r)
        })
    }

    fn fenced_checkpoint<'a>(
        &'a self,
        lease: Lease<'a>,
        step: i64,
        metrics: &'a Value,
        model: &'a str,
    ) -> BoxFuture<'a, FenceResult<CheckpointRow>> {
        let f = self.run(self.db.clone().fenced_checkpoint(
            owned_lease(lease),
            step,
            metrics.clone(),
            model.into(),
        ));
        Box::pin(async move { f.await?.ok_or_else(|| FenceError::lost(lease)) })
    }
}
