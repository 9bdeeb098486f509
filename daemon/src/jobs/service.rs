//! What the HTTP handlers call: the jobs service's operations on files, jobs, events and
//! checkpoints. Each checks what only the service can check (the file exists, the job is in a
//! state that allows it), writes through the [`MetaStore`] and [`BlobStore`], and fails with a
//! [`ServiceError`]; request parsing and the response shapes stay in `api`.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::backend::{BlobStore, BlobWriter, FileQuery, MetaStore, NewEvent};
use super::spec::{continued_adapter, CreateJob, JobSpec};
use super::storage::{new_id, now, FILE_PREFIX, JOB_PREFIX};
use super::store::{status, CheckpointRow, EventRow, FileRow, JobRow, Page};
use super::{Jobs, ServiceError, ServiceResult};
use crate::adapters::AdapterConfig;

/// The one purpose of uploaded files this server accepts.
pub use itamae_client::FINE_TUNE;

/// A live event stream is woken by every event or status the store writes; it also looks
/// this often regardless (a missed wake-up costs at most this much).
const STREAM_POLL: Duration = Duration::from_millis(1000);

/// How long a live event stream keeps reading after it sees its job ended.
const CLOSE_GRACE: Duration = Duration::from_millis(1000);

/// Runs blocking storage work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ServiceResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("a worker thread failed: {e}")))
}

fn info<'a>(message: &'a str) -> NewEvent<'a> {
    NewEvent {
        level: "info",
        message,
        kind: "message",
        data: None,
    }
}

impl Jobs {
    fn meta(&self) -> &dyn MetaStore {
        &*self.inner.store
    }

    // ---- jobs ----

    /// Creates a job from a parsed request: its files must exist and be fine-tuning files, and
    /// its model must be the base model or a model fine-tuned from it here (a job's result or
    /// checkpoint), which the job continues from ([`Self::continue_from`]). The job starts
    /// `validating_files`; its files are validated in the background.
    pub async fn create_job(&self, mut c: CreateJob) -> ServiceResult<JobRow> {
        let base = self.engine().base()?;
        if c.model != base.name {
            let Some(adapter) = self.continue_from(&c).await? else {
                return Err(ServiceError::ModelNotFound {
                    message: format!(
                        "The model `{}` cannot be fine-tuned here: the base model is `{}`, \
                         and no fine-tuned model of that name exists",
                        c.model, base.name
                    ),
                    model: c.model,
                });
            };
            c.spec.adapter = adapter;
            c.spec.parent = Some(c.model.clone());
        }
        for (file, param) in std::iter::once((&c.training_file, "training_file"))
            .chain(c.validation_file.iter().map(|f| (f, "validation_file")))
        {
            match self.meta().get_file(file).await? {
                None => {
                    return Err(ServiceError::invalid(
                        param,
                        format!("The file `{file}` does not exist"),
                    ))
                }
                Some(f) if f.purpose != FINE_TUNE => {
                    return Err(ServiceError::invalid(
                        param,
                        format!(
                            "The file `{file}` has purpose `{}`, not `fine-tune`",
                            f.purpose
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let id = new_id(JOB_PREFIX);
        let spec_json = serde_json::to_value(&c.spec)
            .map_err(|e| ServiceError::Internal(format!("Cannot store the job: {e}")))?;
        let row = JobRow {
            id: id.clone(),
            created_at: now(),
            status: status::VALIDATING.into(),
            model: c.model.clone(),
            training_file: c.training_file.clone(),
            validation_file: c.validation_file.clone(),
            suffix: c.suffix.clone(),
            seed: c.spec.seed as i64,
            metadata: c.metadata.clone(),
            hyperparameters: c.spec.hyperparameters_json(None),
            method: c.spec.method_json(None),
            spec: spec_json,
            variant: self.variant_name(&base.name, c.suffix.as_deref(), &id),
            error: None,
            fine_tuned_model: None,
            finished_at: None,
            trained_tokens: None,
            estimated_finish: None,
            result_files: json!([]),
        };
        self.meta().insert_job(&row).await?;
        self.meta()
            .add_event(&id, info(&format!("Created fine-tuning job: {id}")))
            .await?;
        tracing::info!(job = %id, "fine-tuning job created");
        self.validate_in_background(id);
        Ok(row)
    }

    /// Continued fine-tuning: when `c.model` is a fine-tuned model of a job here (its result or
    /// a checkpoint), the adapter the new job trains, which starts from that model's weights
    /// (the parent's method and shape, see [`continued_adapter`]); None when there is no such
    /// model.
    async fn continue_from(&self, c: &CreateJob) -> ServiceResult<Option<AdapterConfig>> {
        let Some((parent_job, _)) = self.variant_files(&c.model).await else {
            return Ok(None);
        };
        let Some(row) = self.meta().get_job(&parent_job).await? else {
            return Ok(None);
        };
        let parent: JobSpec = serde_json::from_value(row.spec).map_err(|e| {
            ServiceError::Internal(format!("The job {parent_job} cannot be read: {e}"))
        })?;
        continued_adapter(&parent.adapter, c.adapter_given.then_some(&c.spec.adapter))
            .map(Some)
            .map_err(|e| ServiceError::invalid(e.param, e.message))
    }

    /// The model each continued job's fine-tuned models (result and checkpoints) were trained
    /// from, by model name: what `/v1/models` reports as their `parent`.
    pub async fn model_parents(&self) -> ServiceResult<std::collections::HashMap<String, String>> {
        let mut parents = std::collections::HashMap::new();
        let mut by_job = std::collections::HashMap::new();
        for j in self.meta().jobs_with_status(&[status::SUCCEEDED]).await? {
            let parent = serde_json::from_value::<JobSpec>(j.spec)
                .ok()
                .and_then(|s| s.parent);
            if let Some(p) = parent {
                if let Some(m) = j.fine_tuned_model {
                    parents.insert(m, p.clone());
                }
                by_job.insert(j.id, p);
            }
        }
        for c in self.meta().all_checkpoints().await? {
            let parent = match by_job.get(&c.job_id) {
                Some(p) => Some(p.clone()),
                // A checkpoint of a job still running (or stopped early) here.
                None => match self.meta().get_job(&c.job_id).await? {
                    Some(j) => serde_json::from_value::<JobSpec>(j.spec)
                        .ok()
                        .and_then(|s| s.parent),
                    None => None,
                },
            };
            if let Some(p) = parent {
                by_job.insert(c.job_id.clone(), p.clone());
                parents.insert(c.model, p);
            }
        }
        Ok(parents)
    }

    /// Newest first, after the job `after`.
    pub async fn list_jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> ServiceResult<Page<JobRow>> {
        Ok(self.meta().list_jobs(after, limit).await?)
    }

    /// The job `id` (a validated id).
    pub async fn job(&self, id: &str) -> ServiceResult<JobRow> {
        self.meta()
            .get_job(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("No fine-tuning job with id `{id}`")))
    }

    /// A queued job never starts, a running one stops between two steps (its status says
    /// `cancelled` at once). Returns the job as it is now.
    pub async fn cancel_job(&self, id: &str) -> ServiceResult<JobRow> {
        let j = self.job(id).await?;
        if status::is_terminal(&j.status) {
            return Err(ServiceError::bad_request(format!(
                "Job {} has already {}: it cannot be cancelled",
                j.id,
                if j.status == status::SUCCEEDED {
                    "succeeded"
                } else {
                    j.status.as_str()
                }
            )));
        }
        let from = [
            status::VALIDATING,
            status::QUEUED,
            status::RUNNING,
            status::PAUSED,
        ];
        let changed = self
            .meta()
            .finish_unsuccessfully(&j.id, &from, status::CANCELLED, None)
            .await?;
        // Status first, then the switch: the runner publishes the switch first and reads the
        // status after, so one of the two sides sees the other.
        if let Some(c) = self.control(&j.id) {
            c.cancel.store(true, Ordering::SeqCst);
        }
        if changed {
            self.meta()
                .add_event(&j.id, info("Fine-tuning job cancelled"))
                .await?;
            self.wake();
        }
        self.job(&j.id).await
    }

    /// Pauses a running job between two steps (`pause`), or lets a paused one go on. Returns
    /// the job as it is now.
    pub async fn pause_job(&self, id: &str, pause: bool) -> ServiceResult<JobRow> {
        let j = self.job(id).await?;
        let (from, to, verb) = if pause {
            (status::RUNNING, status::PAUSED, "paused")
        } else {
            (status::PAUSED, status::RUNNING, "resumed")
        };
        if j.status == to {
            return Ok(j);
        }
        if j.status != from {
            return Err(ServiceError::bad_request(format!(
                "Job {} is {}: only a {from} job can be {verb}",
                j.id, j.status
            )));
        }
        let changed = self.meta().transition(&j.id, &[from], to).await?;
        if let Some(c) = self.control(&j.id) {
            c.pause.store(pause, Ordering::SeqCst);
        }
        if changed {
            let msg = if pause {
                "Fine-tuning job paused"
            } else {
                "Fine-tuning job resumed"
            };
            self.meta().add_event(&j.id, info(msg)).await?;
        }
        self.job(&j.id).await
    }

    /// A job's events, newest first, older than the event `after`.
    pub async fn job_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ServiceResult<Page<EventRow>> {
        Ok(self.meta().list_events(job_id, after, limit).await?)
    }

    /// Every event of the job oldest first, then live ones as they are written, until the job
    /// has ended and its closing events are read (or the store fails).
    pub fn watch_events(&self, job_id: String) -> impl futures::Stream<Item = EventRow> {
        let st = StreamState {
            changes: self.meta().subscribe(),
            jobs: self.clone(),
            job_id,
            last_seq: 0,
            pending: VecDeque::new(),
            terminal_seen: None,
            done: false,
        };
        futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.pending.pop_front() {
                    st.last_seq = e.seq;
                    return Some((e, st));
                }
                if st.done {
                    return None;
                }
                // Marked seen before reading: whatever is written from here on wakes the wait
                // below.
                st.changes.borrow_and_update();
                let store = st.jobs.meta();
                // The status is read before the events, so that every event written before the
                // job ended is fetched after it is seen ended.
                let terminal = match store.get_job(&st.job_id).await {
                    Ok(Some(j)) => status::is_terminal(&j.status),
                    _ => true,
                };
                match store.events_since(&st.job_id, st.last_seq).await {
                    Ok(evs) => st.pending.extend(evs),
                    Err(e) => {
                        tracing::warn!("event stream: {e}");
                        st.done = true;
                        continue;
                    }
                }
                if !st.pending.is_empty() {
                    continue;
                }
                if terminal {
                    // The runner writes its closing events just after the final status: keep
                    // reading what arrives for a moment after the job is seen ended, then close.
                    let since = *st.terminal_seen.get_or_insert_with(std::time::Instant::now);
                    let left = CLOSE_GRACE.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        st.done = true;
                        continue;
                    }
                    let _ = tokio::time::timeout(left, st.changes.changed()).await;
                } else {
                    // A closed channel (the store is gone) falls back to the timeout.
                    let _ = tokio::time::timeout(STREAM_POLL, st.changes.changed()).await;
                }
            }
        })
    }

    /// A job's checkpoints, newest step first.
    pub async fn job_checkpoints(&self, job_id: &str) -> ServiceResult<Vec<CheckpointRow>> {
        Ok(self.meta().list_checkpoints(job_id).await?)
    }

    /// How many jobs are in each of `statuses`.
    pub async fn count_jobs<'a>(
        &self,
        statuses: &[&'a str],
    ) -> ServiceResult<Vec<(&'a str, usize)>> {
        let mut counts = Vec::with_capacity(statuses.len());
        for s in statuses {
            counts.push((*s, self.meta().jobs_with_status(&[s]).await?.len()));
        }
        Ok(counts)
    }

    /// Which job a servable variant `name` belongs to: `(job id, checkpoint step)`, the step
    /// None for the job's result.
    async fn variant_place(&self, name: &str) -> Option<(String, Option<usize>)> {
        variant_place_in(self.meta(), name).await
    }

    /// Where the PEFT files of a fine-tuning job's servable variant `name` (its result or one
    /// of its checkpoints) are locally, whether or not they are there yet: `(job id, directory)`.
    pub async fn variant_files(&self, name: &str) -> Option<(String, PathBuf)> {
        variant_files_in(self.meta(), &*self.inner.blobs, name).await
    }

    /// As [`Self::variant_files`], with the files materialised from the blob store (another
    /// replica may have written them): None if the variant has no stored files.
    pub async fn materialise_variant(
        &self,
        name: &str,
    ) -> ServiceResult<Option<(String, PathBuf)>> {
        let Some((job_id, step)) = self.variant_place(name).await else {
            return Ok(None);
        };
        let (blobs, id) = (self.inner.blobs.clone(), job_id.clone());
        let dir = blocking(move || match step {
            Some(s) => blobs.materialise_checkpoint(&id, s),
            None => blobs.materialise_result(&id),
        })
        .await?
        .map_err(|e| ServiceError::Internal(format!("Cannot fetch the files of `{name}`: {e}")))?;
        Ok(dir.map(|d| (job_id, d)))
    }

    /// Deletes the stored files of the job variant `name` (locally and in the blob store).
    /// False if it had none.
    pub async fn delete_variant_files(&self, name: &str) -> ServiceResult<bool> {
        let Some((job_id, step)) = self.variant_place(name).await else {
            return Ok(false);
        };
        let blobs = self.inner.blobs.clone();
        blocking(move || blobs.delete_job_dir(&job_id, step))
            .await?
            .map_err(|e| {
                ServiceError::Internal(format!("Cannot remove the files of `{name}`: {e}"))
            })
    }

    // ---- files ----

    /// Starts an upload (blocking): write the bytes to it, then [`Self::add_file`].
    pub fn begin_upload(&self) -> ServiceResult<Box<dyn BlobWriter>> {
        self.inner
            .blobs
            .begin_upload()
            .map_err(|e| ServiceError::Internal(format!("Cannot store the upload: {e}")))
    }

    /// Commits an upload of `bytes` bytes as a new fine-tuning file.
    pub async fn add_file(
        &self,
        upload: Box<dyn BlobWriter>,
        bytes: u64,
        filename: String,
        purpose: String,
    ) -> ServiceResult<FileRow> {
        let id = new_id(FILE_PREFIX);
        {
            let id = id.clone();
            blocking(move || upload.commit(&id))
                .await?
                .map_err(|e| ServiceError::Internal(format!("Cannot store the upload: {e}")))?;
        }
        let row = FileRow {
            id: id.clone(),
            bytes: bytes as i64,
            created_at: now(),
            filename,
            purpose,
        };
        if let Err(e) = self.meta().insert_file(&row).await {
            let _ = self.inner.blobs.delete_file(&id);
            return Err(e.into());
        }
        tracing::info!(file = %id, bytes, "file uploaded");
        Ok(row)
    }

    /// Newest first unless `q.ascending`.
    pub async fn list_files(&self, q: FileQuery<'_>) -> ServiceResult<Page<FileRow>> {
        Ok(self.meta().list_files(q).await?)
    }

    /// The file `id` (a validated id).
    pub async fn file(&self, id: &str) -> ServiceResult<FileRow> {
        self.meta()
            .get_file(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("No such File object: {id}")))
    }

    /// Deletes a file: its row at once, its bytes best effort.
    pub async fn delete_file(&self, id: &str) -> ServiceResult<FileRow> {
        let f = self.file(id).await?;
        self.meta().delete_file(&f.id).await?;
        let (blobs, fid) = (self.inner.blobs.clone(), f.id.clone());
        blocking(move || {
            if let Err(e) = blobs.delete_file(&fid) {
                tracing::warn!(file = %fid, "cannot remove a deleted file's bytes: {e}")
            }
        })
        .await?;
        Ok(f)
    }

    /// A file and a reader of its bytes as uploaded.
    pub async fn file_content(
        &self,
        id: &str,
    ) -> ServiceResult<(FileRow, Box<dyn std::io::Read + Send>)> {
        let f = self.file(id).await?;
        let (blobs, fid) = (self.inner.blobs.clone(), f.id.clone());
        let read = blocking(move || blobs.open_file(&fid))
            .await?
            .map_err(|e| ServiceError::NotFound(format!("The content of {} is gone: {e}", f.id)))?;
        Ok((f, read))
    }
}

struct StreamState {
    jobs: Jobs,
    job_id: String,
    last_seq: i64,
    changes: tokio::sync::watch::Receiver<()>,
    pending: VecDeque<EventRow>,
    /// When the job was first seen finished: its closing events are read until
    /// [`CLOSE_GRACE`] after that.
    terminal_seen: Option<std::time::Instant>,
    done: bool,
}

/// Which job a servable variant `name` belongs to: `(job id, checkpoint step)`, the step None
/// for the job's result.
pub(super) async fn variant_place_in(
    meta: &dyn MetaStore,
    name: &str,
) -> Option<(String, Option<usize>)> {
    // Checkpoints first: their names extend the job's result name.
    if let Ok(cks) = meta.all_checkpoints().await {
        if let Some(c) = cks.into_iter().find(|c| c.model == name) {
            return Some((c.job_id, Some(c.step.max(0) as usize)));
        }
    }
    let done = meta.jobs_with_status(&[status::SUCCEEDED]).await.ok()?;
    let j = done
        .into_iter()
        .find(|j| j.fine_tuned_model.as_deref() == Some(name))?;
    Some((j.id, None))
}

/// Where the PEFT files of the variant `name` are locally, whether or not they are there yet:
/// `(job id, directory)`.
pub(super) async fn variant_files_in(
    meta: &dyn MetaStore,
    blobs: &dyn BlobStore,
    name: &str,
) -> Option<(String, PathBuf)> {
    let (job_id, step) = variant_place_in(meta, name).await?;
    let dir = match step {
        Some(s) => blobs.local_checkpoint_dir(&job_id, s),
        None => blobs.local_result_dir(&job_id),
    };
    Some((job_id, dir))
}
