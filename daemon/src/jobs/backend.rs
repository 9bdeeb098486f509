//! The two storage interfaces the jobs layer runs on, so that where state lives is a choice made
//! at start-up rather than in every caller:
//!
//! - [`MetaStore`]: rows (uploaded files' metadata, jobs, job events, checkpoints). Today the
//!   SQLite database under the data directory ([`super::store::Store`]); a PostgreSQL
//!   implementation shared by several daemons fits the same methods (every status change is a
//!   conditional update, listings page by id, ids are made by the caller's side).
//! - [`BlobStore`]: bytes (uploaded files, job results and checkpoints). Today the local data
//!   directory ([`super::storage::Storage`]); an object store (S3, GCS, Azure) fits the same
//!   methods. The trainer and the adapter loader read and write local directories, so the
//!   methods that hand one out say so (`local_*`, [`BlobStore::materialise_file`]): a remote
//!   implementation downloads there first and uploads what [`BlobStore::keep_checkpoint`] and
//!   [`BlobStore::publish_result`] are given.
//!
//! Neither trait names SQLite, `sqlx` or a data directory in its signatures: failures are
//! [`StoreError`] (rows) and `std::io::Error` (bytes), and everything is addressed by ids.
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use super::store::{CheckpointRow, EventRow, FileRow, JobRow, Page};

/// A failure of the row store, whatever the backend. Shown as the backend's own message.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(e))
    }
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// A listing of uploaded files: newest first unless `ascending`, after the file `after`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileQuery<'a> {
    pub purpose: Option<&'a str>,
    pub after: Option<&'a str>,
    pub limit: usize,
    pub ascending: bool,
}

/// A new job event; the store gives it its id, time and sequence number.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub level: &'a str,
    pub message: &'a str,
    /// `message` or `metrics`.
    pub kind: &'a str,
    pub data: Option<&'a Value>,
}

/// The rows of files, jobs, events and checkpoints. Every method is one atomic operation of the
/// backend; status changes are conditional (`from` the expected states), so that concurrent
/// writers (the API and the runner, or several daemons) never overwrite each other: the first
/// one wins and the others see `false`.
pub trait MetaStore: Send + Sync {
    fn insert_file<'a>(&'a self, f: &'a FileRow) -> BoxFuture<'a, StoreResult<()>>;
    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<FileRow>>>;
    fn list_files<'a>(&'a self, q: FileQuery<'a>) -> BoxFuture<'a, StoreResult<Page<FileRow>>>;
    /// False if there was no such file.
    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>>;

    fn insert_job<'a>(&'a self, j: &'a JobRow) -> BoxFuture<'a, StoreResult<()>>;
    fn get_job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<JobRow>>>;
    /// Newest first, after the job `after`.
    fn list_jobs<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<JobRow>>>;
    /// Jobs in any of `statuses`, oldest first (the runner's queue order).
    fn jobs_with_status<'a>(
        &'a self,
        statuses: &'a [&'a str],
    ) -> BoxFuture<'a, StoreResult<Vec<JobRow>>>;
    /// Moves a job to `to` if its status is one of `from`; false if it was not.
    fn transition<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
    ) -> BoxFuture<'a, StoreResult<bool>>;
    /// Ends a job as `to` (failed or cancelled) if its status is one of `from`, with an OpenAI
    /// `error` object for failures.
    fn finish_unsuccessfully<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, StoreResult<bool>>;
    /// Marks a running (or paused) job succeeded; false if it was cancelled meanwhile.
    fn succeed<'a>(
        &'a self,
        id: &'a str,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, StoreResult<bool>>;

    fn add_event<'a>(
        &'a self,
        job_id: &'a str,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, StoreResult<EventRow>>;
    /// A job's events, newest first, older than the event `after`.
    fn list_events<'a>(
        &'a self,
        job_id: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StoreResult<Page<EventRow>>>;
    /// A job's events with `seq` above `since`, oldest first (the live stream's feed).
    fn events_since<'a>(
        &'a self,
        job_id: &'a str,
        since: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<EventRow>>>;
    /// A receiver that sees a change after each event or status written from now on (live
    /// streams wait on it instead of polling; a shared backend feeds it from its notifications).
    fn subscribe(&self) -> tokio::sync::watch::Receiver<()>;

    /// A job's checkpoints, newest step first.
    fn list_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<CheckpointRow>>>;
    /// Every checkpoint of every job (to serve them again after a restart).
    fn all_checkpoints(&self) -> BoxFuture<'_, StoreResult<Vec<CheckpointRow>>>;

    /// Claims the next job for the runner `owner` under a lease of `lease`: a `running` or
    /// `paused` job whose lease expired (its owner died) or that has none first, else the
    /// oldest queued one (moved to `running`). Two runners never get the same job while its
    /// lease runs: Postgres locks the candidate row `FOR UPDATE SKIP LOCKED`, SQLite moves it
    /// with a conditional update.
    fn claim_job<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<Claimed>>>;
    /// The heartbeat: extends `owner`'s lease on the job and returns its status, or None if the
    /// job is no longer `owner`'s (another runner claimed it after the lease expired).
    fn renew_lease<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, StoreResult<Option<String>>>;
    /// Gives the lease up (an orderly stop): the job is claimable again at once.
    fn release_lease<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, StoreResult<()>>;

    // ---- fenced writes: the runner's writes about a job it trains ----
    // Each holds only while `lease.owner` still owns the job (one statement checks and writes),
    // so a runner that lost its lease (another replica took the job over) cannot write over the
    // new owner's state; it gets `FenceError::LeaseLost` and stops. An expired lease nobody took
    // over yet still fences nothing out: the job is this runner's until someone claims it.
    // Progress, resolved hyperparameters and checkpoint rows have no unfenced writer: only the
    // runner that owns a job writes them.

    /// [`Self::finish_unsuccessfully`] for the lease holder; false if the job left `from`
    /// meanwhile (a client cancelled it).
    fn fenced_finish<'a>(
        &'a self,
        lease: Lease<'a>,
        from: &'a [&'a str],
        to: &'a str,
        error: Option<&'a Value>,
    ) -> BoxFuture<'a, FenceResult<bool>>;
    /// [`Self::succeed`] for the lease holder; false if the job was cancelled meanwhile.
    fn fenced_succeed<'a>(
        &'a self,
        lease: Lease<'a>,
        fine_tuned_model: Option<&'a str>,
        trained_tokens: i64,
    ) -> BoxFuture<'a, FenceResult<bool>>;
    /// Records the tokens trained so far and the estimated finish time (epoch seconds).
    fn fenced_progress<'a>(
        &'a self,
        lease: Lease<'a>,
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> BoxFuture<'a, FenceResult<()>>;
    /// Records the hyperparameters and `method` object the run resolved ("auto" made numbers).
    fn fenced_hyperparameters<'a>(
        &'a self,
        lease: Lease<'a>,
        hyperparameters: &'a Value,
        method: &'a Value,
    ) -> BoxFuture<'a, FenceResult<()>>;
    /// [`Self::add_event`] for the lease holder.
    fn fenced_event<'a>(
        &'a self,
        lease: Lease<'a>,
        e: NewEvent<'a>,
    ) -> BoxFuture<'a, FenceResult<EventRow>>;
    /// Records a checkpoint (once per job and step: a resumed run may write a step again, which
    /// replaces the row's metrics and time).
    fn fenced_checkpoint<'a>(
        &'a self,
        lease: Lease<'a>,
        step: i64,
        metrics: &'a Value,
        model: &'a str,
    ) -> BoxFuture<'a, FenceResult<CheckpointRow>>;
}

/// The claim a fenced write is made under: the job and the runner ([`MetaStore::claim_job`]'s
/// `owner`, the replica id) that must still own it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    pub job_id: &'a str,
    pub owner: &'a str,
}

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The job is no longer `owner`'s: another runner claimed it after the lease expired (or it
    /// was released). Nothing was written.
    #[error("job {job_id}: the lease is no longer {owner}'s")]
    LeaseLost { job_id: String, owner: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FenceError {
    pub(crate) fn lost(lease: Lease<'_>) -> Self {
        Self::LeaseLost {
            job_id: lease.job_id.into(),
            owner: lease.owner.into(),
        }
    }
}

pub type FenceResult<T> = std::result::Result<T, FenceError>;

/// A job [`MetaStore::claim_job`] gave a runner.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub job: JobRow,
    /// It was `running` or `paused` already (a runner stopped or died while training it), so
    /// training resumes from its newest checkpoint.
    pub interrupted: bool,
}

/// A lease length as the stores keep it (milliseconds), never zero.
pub(crate) fn lease_ms(lease: Duration) -> i64 {
    (lease.as_millis() as i64).max(1)
}

/// An upload being written: nothing is visible under an id until [`BlobWriter::commit`], and a
/// writer dropped without committing leaves nothing behind. Blocking, like `std::io::Write`.
pub trait BlobWriter: Send {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Makes the bytes written durable under the file id `id`.
    fn commit(self: Box<Self>, id: &str) -> std::io::Result<()>;
}

/// The bytes of uploaded files and of jobs' results and checkpoints, addressed by ids the
/// caller validated. Blocking, like `std::fs`: async callers run it on a blocking thread.
pub trait BlobStore: Send + Sync {
    /// Starts writing a new uploaded file.
    fn begin_upload(&self) -> std::io::Result<Box<dyn BlobWriter>>;
    /// Reads an uploaded file.
    fn open_file(&self, id: &str) -> std::io::Result<Box<dyn std::io::Read + Send>>;
    /// Deletes an uploaded file's bytes; a file already gone is not an error.
    fn delete_file(&self, id: &str) -> std::io::Result<()>;
    /// Removes what uploads a crash interrupted left behind. Called once at start, before any
    /// upload can be in flight.
    fn clean_interrupted_uploads(&self);
    /// A local path holding the uploaded file's bytes, for readers that need one (the JSONL
    /// loader).
    fn materialise_file(&self, id: &str) -> std::io::Result<PathBuf>;

    /// The local directory the trainer writes a job's result into (its out_dir).
    fn local_result_dir(&self, job_id: &str) -> PathBuf;
    /// Makes the result the trainer wrote into [`Self::local_result_dir`] durable in the store.
    fn publish_result(&self, job_id: &str) -> std::io::Result<()>;
    /// The local directory of a job's checkpoint `step` (servable PEFT files plus the trainer
    /// state to resume from), once kept or materialised.
    fn local_checkpoint_dir(&self, job_id: &str, step: usize) -> PathBuf;
    /// Keeps the checkpoint the trainer wrote at `written` as the job's checkpoint `step`
    /// (replacing an older copy of the same step, which a resumed run writes again); returns
    /// its local directory.
    fn keep_checkpoint(
        &self,
        job_id: &str,
        step: usize,
        written: &Path,
    ) -> std::io::Result<PathBuf>;
    /// The newest complete checkpoint of a job, materialised locally.
    fn latest_checkpoint(&self, job_id: &str) -> Option<(usize, PathBuf)>;
    /// A job's published result, materialised at [`Self::local_result_dir`]; None if there is
    /// none (never published, or deleted).
    fn materialise_result(&self, job_id: &str) -> std::io::Result<Option<PathBuf>>;
    /// A job's kept checkpoint `step`, materialised at [`Self::local_checkpoint_dir`]; None if
    /// it is not complete in the store.
    fn materialise_checkpoint(&self, job_id: &str, step: usize)
        -> std::io::Result<Option<PathBuf>>;
    /// Deletes a job's result, or its checkpoint `step`, locally and in the store (a crash
    /// leaves it whole or gone). False if there was none.
    fn delete_job_dir(&self, job_id: &str, step: Option<usize>) -> std::io::Result<bool>;

    /// The local directory of the imported adapter `name` (a validated name): where an import
    /// installs its files before [`Self::publish_adapter`], and where they are materialised.
    fn local_adapter_dir(&self, name: &str) -> PathBuf;
    /// Makes the adapter files installed at [`Self::local_adapter_dir`] durable in the store as
    /// generation `generation` of `name`, before the registry commits that generation. A store
    /// replicas share keeps every generation apart, so an import that dies before its commit
    /// leaves the bytes of the generation the registry names as they were.
    fn publish_adapter(&self, name: &str, generation: u64) -> std::io::Result<()>;
    /// Generation `generation` of the stored adapter `name`, materialised locally; None if the
    /// store has none. A store replicas share never hands out another generation's bytes.
    fn materialise_adapter(&self, name: &str, generation: u64) -> std::io::Result<Option<PathBuf>>;
    /// Deletes the adapter's files (every generation) locally and in the store; one already
    /// gone is not an error.
    fn delete_adapter(&self, name: &str) -> std::io::Result<()>;
    /// True when other daemons may write to the same store (an object store), so a variant
    /// this one never served may exist in it.
    fn shared(&self) -> bool {
        false
    }
}

/// Where the rows live (`storage.database_url`): the SQLite file of one daemon, or a PostgreSQL
/// database several replicas share. Its `Debug` and `Display` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH` (`sqlite:///abs/path` for an absolute one).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`, as given (libpq's URL syntax, through sqlx).
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a `storage.database_url`; the error says what is accepted (without echoing a
    /// password).
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("`sqlite://` needs a file path, as in sqlite://data/itamae.db".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_string()));
        }
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        Err(format!(
            "unsupported scheme `{scheme}` (expected sqlite://PATH or postgres://USER@HOST/DB)"
        ))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// The URL with any password replaced by `***`: in the user info (`user:secret@host`) and in a
/// `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Self::Postgres(u) => f.write_str(&redact_url(u)),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_a_password() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/x.db").unwrap(),
            DatabaseUrl::Sqlite("/var/x.db".into())
        );
        assert!(DatabaseUrl::parse("sqlite://").is_err());
        let e = DatabaseUrl::parse("mysql://u:hunter2@h/db").unwrap_err();
        assert!(e.contains("mysql") && !e.contains("hunter2"), "{e}");
        let u = DatabaseUrl::parse("postgres://app:hunter2@db.example:5432/itamae?sslmode=require")
            .unwrap();
        assert!(u.is_shared());
        for shown in [u.to_string(), format!("{u:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("app:***@db.example:5432/itamae?sslmode=require"));
        }
        assert_eq!(
            redact_url("postgresql://h/db?user=a&password=p%40ss"),
            "postgresql://h/db?user=a&password=***"
        );
        assert_eq!(redact_url("postgres://a@h/db"), "postgres://a@h/db");
        // an `@` in the password (percent-encoding forgotten) does not leak its start
        assert_eq!(redact_url("postgres://a:x@y@h/db"), "postgres://a:***@h/db");
    }
}
