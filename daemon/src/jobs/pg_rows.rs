//! The PostgreSQL store's row mapping: its columns into the row types ([`super::store`]'s
//! `FileRow`, `JobRow`, `EventRow`, `CheckpointRow`), JSON columns (stored as text) both ways,
//! pages of a listing, and the owned copies of borrowed arguments that the queries, spawned on
//! the jobs runtime, need. Kept apart from the queries in `pg_store.rs`.
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::backend::Lease;
use super::store::{CheckpointRow, EventRow, FileRow, JobRow, Page};

type Result<T> = std::result::Result<T, sqlx::Error>;

pub(super) fn json_col(row: &PgRow, col: &str) -> Result<Option<Value>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

pub(super) fn json_str(v: &Value) -> String {
    v.to_string()
}

pub(super) fn file_of(r: &PgRow) -> Result<FileRow> {
    Ok(FileRow {
        id: r.try_get("id")?,
        bytes: r.try_get("bytes")?,
        created_at: r.try_get("created_at")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
    })
}

pub(super) fn job_of(r: &PgRow) -> Result<JobRow> {
    Ok(JobRow {
        id: r.try_get("id")?,
        created_at: r.try_get("created_at")?,
        status: r.try_get("status")?,
        model: r.try_get("model")?,
        training_file: r.try_get("training_file")?,
        validation_file: r.try_get("validation_file")?,
        suffix: r.try_get("suffix")?,
        seed: r.try_get("seed")?,
        metadata: json_col(r, "metadata")?,
        spec: json_col(r, "spec")?.unwrap_or(Value::Null),
        hyperparameters: json_col(r, "hyperparameters")?.unwrap_or(Value::Null),
        method: json_col(r, "method")?.unwrap_or(Value::Null),
        variant: r.try_get("variant")?,
        error: json_col(r, "error")?,
        fine_tuned_model: r.try_get("fine_tuned_model")?,
        finished_at: r.try_get("finished_at")?,
        trained_tokens: r.try_get("trained_tokens")?,
        estimated_finish: r.try_get("estimated_finish")?,
        result_files: json_col(r, "result_files")?.unwrap_or(Value::Array(vec![])),
    })
}

pub(super) fn event_of(r: &PgRow) -> Result<EventRow> {
    Ok(EventRow {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        job_id: r.try_get("job_id")?,
        created_at: r.try_get("created_at")?,
        level: r.try_get("level")?,
        message: r.try_get("message")?,
        kind: r.try_get("type")?,
        data: json_col(r, "data")?,
    })
}

pub(super) fn checkpoint_of(r: &PgRow) -> Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: r.try_get("id")?,
        job_id: r.try_get("job_id")?,
        created_at: r.try_get("created_at")?,
        step: r.try_get("step")?,
        metrics: json_col(r, "metrics")?.unwrap_or(Value::Null),
        model: r.try_get("model")?,
    })
}

/// Splits `limit + 1` fetched rows into a page.
pub(super) fn page<T>(mut rows: Vec<T>, limit: usize) -> Page<T> {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    Page {
        data: rows,
        has_more,
    }
}

pub(super) fn owned(statuses: &[&str]) -> Vec<String> {
    statuses.iter().map(|s| s.to_string()).collect()
}

/// A lease's job id and owner, owned (for the tasks [`PgStore::run`] spawns).
pub(super) fn owned_lease(lease: Lease<'_>) -> (String, String) {
    (lease.job_id.into(), lease.owner.into())
}
