//! The PostgreSQL store's fenced writes: what the runner writes about the job it trains (terminal
//! status, progress, resolved hyperparameters, events, checkpoint rows), each checking
//! `jobs.owner` in the statement that writes (a terminal status locks the row first, in the same
//! transaction), so a runner whose lease another replica took over writes nothing. The rules are
//! the fenced block of [`super::backend::MetaStore`]; each query returns `None` (or false) when
//! the job is no longer the owner's, which `pg_store.rs` turns into `FenceError::LeaseLost`.
use serde_json::Value;

use super::pg_rows::json_str;
use super::pg_store::Db;
use super::storage::{new_id, now, CHECKPOINT_PREFIX, EVENT_PREFIX};
use super::store::{CheckpointRow, EventRow};

type Result<T> = std::result::Result<T, sqlx::Error>;

impl Db {
    /// Locks the job's row in `tx` and says whether `owner` owns it, so that the status update
    /// that follows in the same transaction cannot race with a takeover.
    async fn lock_owned(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        id: &str,
        owner: &str,
    ) -> Result<bool> {
        let holder: Option<Option<String>> =
            sqlx::query_scalar("SELECT owner FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        Ok(holder.flatten().as_deref() == Some(owner))
    }

    /// `Some(moved)`, or None if the lease is lost.
    pub(super) async fn fenced_finish(
        self,
        (id, owner): (String, String),
        from: Vec<String>,
        to: String,
        error: Option<String>,
    ) -> Result<Option<bool>> {
        let mut tx = self.pool.begin().await?;
        if !Self::lock_owned(&mut tx, &id, &owner).await? {
            return Ok(None);
        }
        let r = sqlx::query(
            "UPDATE jobs SET status = $1, error = $2, finished_at = $3, estimated_finish = NULL \
             WHERE id = $4 AND status = ANY($5)",
        )
        .bind(to)
        .bind(error)
        .bind(now())
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(r.rows_affected() > 0))
    }

    /// `Some(moved)`, or None if the lease is lost.
    pub(super) async fn fenced_succeed(
        self,
        (id, owner): (String, String),
        fine_tuned_model: Option<String>,
        trained_tokens: i64,
    ) -> Result<Option<bool>> {
        let mut tx = self.pool.begin().await?;
        if !Self::lock_owned(&mut tx, &id, &owner).await? {
            return Ok(None);
        }
        let r = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', fine_tuned_model = $1, trained_tokens = $2, \
             finished_at = $3, estimated_finish = NULL, error = NULL \
             WHERE id = $4 AND status IN ('running', 'paused')",
        )
        .bind(fine_tuned_model)
        .bind(trained_tokens)
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(r.rows_affected() > 0))
    }

    /// False if the lease is lost.
    pub(super) async fn fenced_progress(
        self,
        (id, owner): (String, String),
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET trained_tokens = $1, estimated_finish = $2 \
             WHERE id = $3 AND owner = $4",
        )
        .bind(trained_tokens)
        .bind(estimated_finish)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// False if the lease is lost.
    pub(super) async fn fenced_hyperparameters(
        self,
        (id, owner): (String, String),
        hp: String,
        method: String,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET hyperparameters = $1, method = $2 WHERE id = $3 AND owner = $4",
        )
        .bind(hp)
        .bind(method)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub(super) async fn fenced_event(
        self,
        (job_id, owner): (String, String),
        level: String,
        message: String,
        kind: String,
        data: Option<Value>,
    ) -> Result<Option<EventRow>> {
        let id = new_id(EVENT_PREFIX);
        let created_at = now();
        let seq: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) \
             SELECT $1, $2, $3, $4, $5, $6, $7 \
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND owner = $8) RETURNING seq",
        )
        .bind(&id)
        .bind(&job_id)
        .bind(created_at)
        .bind(&level)
        .bind(&message)
        .bind(&kind)
        .bind(data.as_ref().map(json_str))
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(seq.map(|seq| EventRow {
            seq,
            id,
            job_id,
            created_at,
            level,
            message,
            kind,
            data,
        }))
    }

    pub(super) async fn fenced_checkpoint(
        self,
        (job_id, owner): (String, String),
        step: i64,
        metrics: Value,
        model: String,
    ) -> Result<Option<CheckpointRow>> {
        let row = CheckpointRow {
            id: new_id(CHECKPOINT_PREFIX),
            job_id,
            created_at: now(),
            step,
            metrics,
            model,
        };
        let r = sqlx::query(
            "INSERT INTO checkpoints (id, job_id, created_at, step, metrics, model) \
             SELECT $1, $2, $3, $4, $5, $6 \
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND owner = $7) \
             ON CONFLICT (job_id, step) DO UPDATE SET metrics = excluded.metrics, \
             created_at = excluded.created_at",
        )
        .bind(&row.id)
        .bind(&row.job_id)
        .bind(row.created_at)
        .bind(row.step)
        .bind(json_str(&row.metrics))
        .bind(&row.model)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok((r.rows_affected() > 0).then_some(row))
    }
}
