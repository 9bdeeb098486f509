//! The SQLite store's fenced writes: what the runner writes about the job it trains (terminal
//! status, progress, resolved hyperparameters, events, checkpoint rows), each conditional on
//! `jobs.owner` still being the runner in the statement that writes, so a runner whose lease
//! another replica took over writes nothing ([`FenceError::LeaseLost`]). The rules are the
//! fenced block of [`super::backend::MetaStore`]; `store.rs` holds every other query.
use serde_json::Value;

use super::backend::{FenceError, FenceResult, Lease, NewEvent, StoreError};
use super::storage::{new_id, now, CHECKPOINT_PREFIX, EVENT_PREFIX};
use super::store::{CheckpointRow, EventRow, Result, Store};
use super::store_rows::json_str;

impl Store {
    /// Whether `lease.owner` owns the job now: after a conditional update changed nothing, this
    /// tells a lost lease from a status that moved on.
    async fn owns(&self, lease: Lease<'_>) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE id = ? AND owner = ?")
            .bind(lease.job_id)
            .bind(lease.owner)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// The outcome of a fenced status change that moved `moved` rows.
    async fn fenced_moved(&self, lease: Lease<'_>, moved: bool) -> FenceResult<bool> {
        self.changed();
        if moved || self.owns(lease).await.map_err(StoreError::from)? {
            Ok(moved)
        } else {
            Err(FenceError::lost(lease))
        }
    }

    /// See [`MetaStore::fenced_finish`].
    pub async fn fenced_finish(
        &self,
        lease: Lease<'_>,
        from: &[&str],
        to: &str,
        error: Option<&Value>,
    ) -> FenceResult<bool> {
        let marks = vec!["?"; from.len()].join(", ");
        let sql = format!(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ?, estimated_finish = NULL \
             WHERE id = ? AND owner = ? AND status IN ({marks})"
        );
        let mut q = sqlx::query(&sql)
            .bind(to)
            .bind(error.map(json_str))
            .bind(now())
            .bind(lease.job_id)
            .bind(lease.owner);
        for s in from {
            q = q.bind(*s);
        }
        let moved = q.execute(&self.pool).await.map_err(StoreError::from)?;
        self.fenced_moved(lease, moved.rows_affected() > 0).await
    }

    /// See [`MetaStore::fenced_succeed`].
    pub async fn fenced_succeed(
        &self,
        lease: Lease<'_>,
        fine_tuned_model: Option<&str>,
        trained_tokens: i64,
    ) -> FenceResult<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?, trained_tokens = ?, \
             finished_at = ?, estimated_finish = NULL, error = NULL \
             WHERE id = ? AND owner = ? AND status IN ('running', 'paused')",
        )
        .bind(fine_tuned_model)
        .bind(trained_tokens)
        .bind(now())
        .bind(lease.job_id)
        .bind(lease.owner)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        self.fenced_moved(lease, r.rows_affected() > 0).await
    }

    /// See [`MetaStore::fenced_progress`].
    pub async fn fenced_progress(
        &self,
        lease: Lease<'_>,
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> FenceResult<()> {
        let r = sqlx::query(
            "UPDATE jobs SET trained_tokens = ?, estimated_finish = ? WHERE id = ? AND owner = ?",
        )
        .bind(trained_tokens)
        .bind(estimated_finish)
        .bind(lease.job_id)
        .bind(lease.owner)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        fenced_write(lease, r.rows_affected())
    }

    /// See [`MetaStore::fenced_hyperparameters`].
    pub async fn fenced_hyperparameters(
        &self,
        lease: Lease<'_>,
        hp: &Value,
        method: &Value,
    ) -> FenceResult<()> {
        let r = sqlx::query(
            "UPDATE jobs SET hyperparameters = ?, method = ? WHERE id = ? AND owner = ?",
        )
        .bind(json_str(hp))
        .bind(json_str(method))
        .bind(lease.job_id)
        .bind(lease.owner)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        fenced_write(lease, r.rows_affected())
    }

    /// See [`MetaStore::fenced_event`]: the row is inserted only if the lease holds, in one
    /// statement.
    pub async fn fenced_event(&self, lease: Lease<'_>, e: NewEvent<'_>) -> FenceResult<EventRow> {
        let id = new_id(EVENT_PREFIX);
        let created_at = now();
        let r = sqlx::query(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 \
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?2 AND owner = ?8)",
        )
        .bind(&id)
        .bind(lease.job_id)
        .bind(created_at)
        .bind(e.level)
        .bind(e.message)
        .bind(e.kind)
        .bind(e.data.map(json_str))
        .bind(lease.owner)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        fenced_write(lease, r.rows_affected())?;
        self.changed();
        Ok(EventRow {
            seq: r.last_insert_rowid(),
            id,
            job_id: lease.job_id.into(),
            created_at,
            level: e.level.into(),
            message: e.message.into(),
            kind: e.kind.into(),
            data: e.data.cloned(),
        })
    }

    /// See [`MetaStore::fenced_checkpoint`].
    pub async fn fenced_checkpoint(
        &self,
        lease: Lease<'_>,
        step: i64,
        metrics: &Value,
        model: &str,
    ) -> FenceResult<CheckpointRow> {
        let row = CheckpointRow {
            id: new_id(CHECKPOINT_PREFIX),
            job_id: lease.job_id.into(),
            created_at: now(),
            step,
            metrics: metrics.clone(),
            model: model.into(),
        };
        // `WHERE` before `ON CONFLICT` also settles SQLite's parse of an upsert from a SELECT.
        let r = sqlx::query(
            "INSERT INTO checkpoints (id, job_id, created_at, step, metrics, model) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 \
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?2 AND owner = ?7) \
             ON CONFLICT (job_id, step) DO UPDATE SET metrics = excluded.metrics, \
             created_at = excluded.created_at",
        )
        .bind(&row.id)
        .bind(&row.job_id)
        .bind(row.created_at)
        .bind(row.step)
        .bind(json_str(&row.metrics))
        .bind(&row.model)
        .bind(lease.owner)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        fenced_write(lease, r.rows_affected())?;
        Ok(row)
    }
}

/// A fenced write that changed no row found no job owned by `lease.owner`.
fn fenced_write(lease: Lease<'_>, rows: u64) -> FenceResult<()> {
    if rows > 0 {
        Ok(())
    } else {
        Err(FenceError::lost(lease))
    }
}
