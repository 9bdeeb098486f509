//! The job runner: one thread that trains one job at a time on the engine's resident base model
//! (the very tensors the engine serves from, never a copy), records its progress as events,
//! writes checkpoints and serves each of them, and serves the result the moment it exists.
//!
//! At start (once the model is loaded) it restores what the data directory holds: every
//! succeeded job and every checkpoint is served again, files of jobs caught validating are
//! validated again, and a job caught running resumes from its newest checkpoint.
//!
//! Job status changes race with the API (cancel, pause, resume): every change is a conditional
//! update from the expected states ([`Store::transition`]), so the first writer wins. Jobs are
//! claimed under a lease ([`super::lease`]) so that several replicas sharing one database each
//! train different jobs, and take over a job whose replica died; every row written about the job
//! in training goes through [`Held`], fenced by that lease.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::backend::{MetaStore, NewEvent, StoreError};
use super::lease::Held;
use super::spec::JobSpec;
use super::store::{status, JobRow};
use super::Inner;
use crate::adapters::peft;
use crate::engine::BaseModel;
use crate::train::data::{self, DataError, DataOptions, Example};
use crate::train::{EvalMetrics, Finish, StepMetrics, TrainControl, TrainEvent, Trainer};

/// How long the idle runner sleeps between looks at the queue (a wake-up comes sooner).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Logs a failed database write of the runner; training goes on (the write is bookkeeping).
fn logged<T>(what: &str, r: Result<T, StoreError>) -> Option<T> {
    r.map_err(|e| tracing::warn!("jobs database: {what}: {e}"))
        .ok()
}

impl Inner {
    fn event(&self, job_id: &str, level: &str, message: &str) {
        logged(
            "add event",
            self.rt.block_on(self.store.add_event(
                job_id,
                NewEvent {
                    level,
                    message,
                    kind: "message",
                    data: None,
                },
            )),
        );
    }

    fn store(&self) -> &dyn MetaStore {
        &*self.store
    }
}

/// The runner thread's body.
pub(super) fn run(inner: Arc<Inner>) {
    /// Tells `Jobs::wait_stopped` however the runner returns.
    struct Stopped<'a>(&'a Inner);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.mark_stopped();
        }
    }
    let _stopped = Stopped(&inner);
    if let Err(e) = inner.engine.wait_loaded() {
        tracing::error!("the job runner stops: {e}");
        return;
    }
    recover(&inner);
    inner
        .recovered
        .store(true, std::sync::atomic::Ordering::SeqCst);
    loop {
        if inner.shutting_down() {
            tracing::info!("the job runner stopped for shutdown");
            return;
        }
        let seen = inner.wake_count();
        match next_job(&inner) {
            Some((job, interrupted)) => run_job(&inner, job, interrupted),
            None => {
                inner.wait(seen, IDLE_POLL);
            }
        }
    }
}

/// Serves every stored result and checkpoint again and re-validates interrupted validations.
fn recover(inner: &Inner) {
    let Ok(base) = inner.engine.base() else {
        return;
    };
    let cfg = base.model.cfg.clone();
    let device = base.model.device().clone();
    let serve = |name: &str, dir: &std::path::Path| match timed_load(name, dir, &cfg, &device) {
        Ok(a) => match inner.engine.add_adapter_from(name, a, dir) {
            Ok(()) => tracing::info!(model = %name, "serving stored variant"),
            Err(e) => tracing::warn!(model = %name, "cannot serve stored variant: {e}"),
        },
        Err(e) => {
            tracing::warn!(model = %name, dir = %dir.display(), "cannot load stored variant: {e}")
        }
    };
    if let Some(jobs) = logged(
        "list succeeded jobs",
        inner
            .rt
            .block_on(inner.store().jobs_with_status(&[status::SUCCEEDED])),
    ) {
        for j in jobs {
            let Some(name) = &j.fine_tuned_model else {
                continue;
            };
            // None: the model was deleted (DELETE /v1/models); the job still names it. In an
            // object store, this replica may be the first to fetch it.
            match inner.blobs.materialise_result(&j.id) {
                Ok(Some(dir)) => serve(name, &dir),
                Ok(None) => {}
                Err(e) => tracing::warn!(model = %name, "cannot fetch stored variant: {e}"),
            }
        }
    }
    if let Some(cks) = logged(
        "list checkpoints",
        inner.rt.block_on(inner.store().all_checkpoints()),
    ) {
        for c in cks {
            match inner
                .blobs
                .materialise_checkpoint(&c.job_id, c.step.max(0) as usize)
            {
                Ok(Some(dir)) => serve(&c.model, &dir),
                Ok(None) => {}
                Err(e) => tracing::warn!(model = %c.model, "cannot fetch stored checkpoint: {e}"),
            }
        }
    }
    if let Some(jobs) = logged(
        "list validating jobs",
        inner
            .rt
            .block_on(inner.store().jobs_with_status(&[status::VALIDATING])),
    ) {
        for j in jobs {
            validate(inner, &j.id);
        }
    }
}

/// The next job to train, claimed under this runner's lease: one interrupted by a restart (or
/// whose replica died) first, else the oldest queued one (moved to `running`). The flag says
/// whether it was interrupted.
fn next_job(inner: &Inner) -> Option<(JobRow, bool)> {
    let started = std::time::Instant::now();
    let claimed = inner.rt.block_on(
        inner
            .store()
            .claim_job(&inner.cfg.replica_id, inner.cfg.job_lease),
    );
    crate::metrics::global().lease_op("claim", started.elapsed().as_secs_f64());
    let claimed = logged("claim job", claimed)??;
    crate::metrics::global().lease_claimed(claimed.interrupted);
    Some((claimed.job, claimed.interrupted))
}

fn error_json(code: &str, message: &str, param: Option<&str>) -> Value {
    json!({"code": code, "message": message, "param": param})
}

fn run_job(inner: &Inner, job: JobRow, interrupted: bool) {
    crate::metrics::global().set_jobs_owned(1);
    let control = Arc::new(TrainControl {
        throttle: Some(Box::new(throttle(
            inner.engine.clone(),
            inner.cfg.training_max_share,
            job.id.clone(),
        ))),
        ..Default::default()
    });
    if job.status == status::PAUSED {
        control.pause.store(true, Ordering::SeqCst);
    }
    *inner.current.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((job.id.clone(), control.clone()));
    // Published before the flag is read, as `begin_shutdown` sets the flag before it reads
    // `current`: a shutdown racing with this start is seen by one side.
    if inner.shutting_down() {
        control.cancel.store(true, Ordering::SeqCst);
    }
    // The API writes the status and then looks for the control; here the control is published
    // first and the status read after, so a cancel that raced with the start is seen by one side.
    let now_status = logged(
        "reload job",
        inner.rt.block_on(inner.store().get_job(&job.id)),
    )
    .flatten()
    .map(|j| j.status);
    if now_status.as_deref() == Some(status::PAUSED) {
        control.pause.store(true, Ordering::SeqCst);
    }
    let still_active = matches!(
        now_status.as_deref(),
        Some(status::RUNNING) | Some(status::PAUSED)
    );
    inner.lease_lost.store(false, Ordering::SeqCst);
    let held = Held::new(inner, &job.id, &control);
    let trained = std::thread::scope(|scope| {
        // Dropping the sender stops the heartbeat at once.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let beat = std::thread::Builder::new()
            .name("itamae-lease".into())
            .spawn_scoped(scope, || {
                super::lease::heartbeat(inner, &job.id, &control, stopped)
            });
        if let Err(e) = beat {
            return Err(format!("cannot start the lease heartbeat: {e}"));
        }
        let r = if still_active {
            train_job(inner, &held, &job, &control, interrupted)
        } else {
            Ok(())
        };
        drop(stop);
        r
    });
    // The allocator keeps a step's freed pages for the next step; between jobs they go back.
    crate::alloc::release_free_memory();
    if let Err(message) = &trained {
        if !held.lost() {
            tracing::warn!(job = %job.id, "job failed: {message}");
        }
        let failed = held.finish(
            &[status::RUNNING, status::PAUSED],
            status::FAILED,
            Some(&error_json("training_failed", message, None)),
        );
        if failed == Some(true) {
            held.event("error", &format!("Fine-tuning failed: {message}"));
        }
    }
    if held.lost() {
        // Another replica owns the job now; whatever happened here is not its outcome.
        tracing::warn!(job = %job.id, "stopped training: the lease went to another replica");
    } else {
        // A job left active (stopped for shutdown) is claimable by any replica at once.
        let started = std::time::Instant::now();
        let released = inner
            .rt
            .block_on(inner.store().release_lease(&job.id, &inner.cfg.replica_id));
        crate::metrics::global().lease_op("release", started.elapsed().as_secs_f64());
        logged("release lease", released);
    }
    crate::metrics::global().set_jobs_owned(0);
    *inner.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    crate::metrics::global().training_finished(&job.id);
}

fn load_data(
    inner: &Inner,
    base: &BaseModel,
    file_id: &str,
    opts: &DataOptions,
) -> Result<Vec<Example>, DataError> {
    let path = inner
        .blobs
        .materialise_file(file_id)
        .map_err(|source| DataError::Io {
            path: file_id.into(),
            source,
        })?;
    data::load_jsonl(&path, &base.text, base.template.as_deref(), opts).map(|(ex, _)| ex)
}

/// Continued fine-tuning: the trainer starts from the weights of the fine-tuned model
/// `parent` (a resumed job's checkpoint then replaces them).
fn continue_from(inner: &Inner, trainer: &mut Trainer, parent: &str) -> Result<(), String> {
    let (job_id, step) = inner
        .rt
        .block_on(super::service::variant_place_in(inner.store(), parent))
        .ok_or_else(|| format!("the parent model {parent} no longer exists"))?;
    // Another replica may have trained the parent: its files come from the blob store.
    let dir = match step {
        Some(s) => inner.blobs.materialise_checkpoint(&job_id, s),
        None => inner.blobs.materialise_result(&job_id),
    }
    .map_err(|e| format!("fetching the files of {parent}: {e}"))?
    .ok_or_else(|| format!("the parent model {parent} has no stored files"))?;
    trainer
        .init_from_dir(&dir)
        .map_err(|e| format!("starting from {parent}: {e}"))?;
    Ok(())
}

fn train_job(
    inner: &Inner,
    held: &Held,
    job: &JobRow,
    control: &TrainControl,
    interrupted: bool,
) -> Result<(), String> {
    let spec: JobSpec = serde_json::from_value(job.spec.clone())
        .map_err(|e| format!("the stored job request cannot be read: {e}"))?;
    let base = inner.engine.base().map_err(|e| e.to_string())?;
    let opts = DataOptions {
        max_seq_len: spec.max_seq_len(),
        ..Default::default()
    };
    let train = load_data(inner, &base, &job.training_file, &opts)
        .map_err(|e| format!("training file {}: {e}", job.training_file))?;
    let valid = match &job.validation_file {
        Some(f) => {
            load_data(inner, &base, f, &opts).map_err(|e| format!("validation file {f}: {e}"))?
        }
        None => Vec::new(),
    };
    let has_valid = !valid.is_empty();
    let config = spec
        .train_config(
            train.len(),
            base.model.cfg.kv_dim(),
            base.model.cfg.hidden_size,
        )
        .map_err(|e| format!("{}: {}", e.param, e.message))?;
    let resolved = spec.resolve(train.len());
    let train_len = train.len();
    held.hyperparameters(
        &spec.hyperparameters_json(Some(resolved)),
        &spec.method_json(Some(resolved)),
    );
    let init_ids: Vec<u32> = match spec.adapter.init_text() {
        Some(t) => base
            .text
            .tokenizer
            .encode(t, false)
            .map_err(|e| format!("tokenizing init_text: {e}"))?
            .get_ids()
            .to_vec(),
        None => Vec::new(),
    };
    let base_id = inner
        .cfg
        .base_model_id
        .clone()
        .or_else(|| base.hub_id.clone())
        .unwrap_or_else(|| base.name.clone());
    let mut trainer = Trainer::new(
        &base.model,
        Some(&*base.text),
        &base_id,
        config,
        train,
        valid,
        &init_ids,
    )
    .map_err(|e| e.to_string())?;
    let total = trainer.total_steps();
    let every = spec.checkpoint_every(total);
    trainer.config.checkpoint_every = every;
    if has_valid {
        trainer.config.eval_every = every;
    }
    if let Some(parent) = &spec.parent {
        continue_from(inner, &mut trainer, parent)?;
        held.event("info", &format!("Continuing from the weights of {parent}"));
    }
    if interrupted {
        match inner.blobs.latest_checkpoint(&job.id) {
            Some((step, path)) => {
                trainer.resume_from(&path).map_err(|e| e.to_string())?;
                held.event(
                    "info",
                    &format!("Resumed from checkpoint step {step} after restart"),
                );
            }
            None => held.event(
                "info",
                "Restarted from the beginning after restart (no checkpoint had been written)",
            ),
        }
    } else {
        held.event("info", "Fine-tuning job started");
    }
    held.event(
        "info",
        &format!(
            "Hyperparameters for {} training examples: n_epochs {}, batch_size {}, \
             learning_rate_multiplier {} (learning rate {:.1e}), {total} steps",
            train_len,
            resolved.n_epochs,
            resolved.batch_size,
            resolved.learning_rate_multiplier,
            trainer.config.learning_rate
        ),
    );
    let out_dir = inner.blobs.local_result_dir(&job.id);
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let cfg = base.model.cfg.clone();
    let device = base.model.device().clone();
    let mut last_step: Option<StepMetrics> = None;
    let mut last_eval: Option<EvalMetrics> = None;
    let outcome = trainer
        .run(Some(&out_dir), control, &mut |e| match e {
            TrainEvent::Step(s) => {
                let data = json!({
                    "step": s.step, "total_steps": s.total_steps,
                    "train_loss": s.loss, "train_mean_token_accuracy": s.mean_token_accuracy,
                    "learning_rate": s.learning_rate, "tokens_per_sec": s.tokens_per_sec,
                    "trained_tokens": s.trained_tokens,
                });
                held.metrics_event(
                    &format!(
                        "Step {}/{}: training loss={:.4}",
                        s.step, s.total_steps, s.loss
                    ),
                    &data,
                );
                let eta = s
                    .eta_secs
                    .is_finite()
                    .then(|| super::storage::now() + s.eta_secs.round() as i64);
                held.progress(s.trained_tokens as i64, eta);
                crate::metrics::global().training_step(
                    &job.id,
                    s.step,
                    s.loss,
                    s.learning_rate,
                    s.tokens_per_sec,
                );
                last_step = Some(s.clone());
            }
            TrainEvent::Eval(m) => {
                let mut data = json!({
                    "step": m.step, "valid_loss": m.valid_loss,
                    "valid_mean_token_accuracy": m.valid_mean_token_accuracy,
                });
                if let Some(s) = last_step.as_ref().filter(|s| s.step == m.step) {
                    data["total_steps"] = json!(s.total_steps);
                    data["train_loss"] = json!(s.loss);
                    data["train_mean_token_accuracy"] = json!(s.mean_token_accuracy);
                    data["learning_rate"] = json!(s.learning_rate);
                    data["tokens_per_sec"] = json!(s.tokens_per_sec);
                }
                held.metrics_event(
                    &format!("Step {}: validation loss={:.4}", m.step, m.valid_loss),
                    &data,
                );
                crate::metrics::global().training_eval(&job.id, m.valid_loss);
                last_eval = Some(*m);
            }
            // Taken over: the new owner's checkpoints are not to be overwritten.
            TrainEvent::Checkpoint { .. } if held.lost() => {}
            TrainEvent::Checkpoint { step, path } => {
                let name = format!("{}:ckpt-step-{step}", job.variant);
                // Out of the trainer's out_dir, which saving the final result replaces whole.
                let kept = match inner.blobs.keep_checkpoint(&job.id, *step, path) {
                    Ok(dir) => dir,
                    Err(e) => {
                        tracing::warn!(job = %job.id, "cannot keep checkpoint {}: {e}", path.display());
                        // Moved but not uploaded (object store): the local copy still serves.
                        let local = inner.blobs.local_checkpoint_dir(&job.id, *step);
                        if path.is_dir() { path.clone() } else { local }
                    }
                };
                let path = &kept;
                let s = last_step.as_ref().filter(|s| s.step == *step);
                let v = last_eval.as_ref().filter(|v| v.step == *step);
                let metrics = json!({
                    "step": step,
                    "train_loss": s.map(|s| s.loss),
                    "train_mean_token_accuracy": s.map(|s| s.mean_token_accuracy),
                    "valid_loss": v.map(|v| v.valid_loss),
                    "valid_mean_token_accuracy": v.map(|v| v.valid_mean_token_accuracy),
                });
                match timed_load(&name, path, &cfg, &device)
                    .map_err(|e| e.to_string())
                    .and_then(|a| {
                        inner
                            .engine
                            .add_adapter_from(&name, a, path)
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(()) => {
                        if held.checkpoint(*step as i64, &metrics, &name).is_none()
                            && held.lost()
                        {
                            // The new owner writes and serves this step from its own run.
                            let _ = inner.engine.remove_adapter(&name);
                            return;
                        }
                        held.event(
                            "info",
                            &format!("Checkpoint created at step {step}: {name}"),
                        );
                    }
                    Err(e) => held.event(
                        "warn",
                        &format!("Checkpoint at step {step} was written but cannot be served: {e}"),
                    ),
                }
            }
            TrainEvent::Message(m) => held.event("info", m),
        })
        .map_err(|e| e.to_string())?;
    if held.lost() {
        return Ok(());
    }
    if outcome.finish == Finish::Cancelled && inner.shutting_down() {
        let status = logged(
            "reload job",
            inner.rt.block_on(inner.store().get_job(&job.id)),
        )
        .flatten()
        .map(|j| j.status);
        // Unless the client cancelled it too, the job stays active for the next start.
        if matches!(
            status.as_deref(),
            Some(status::RUNNING) | Some(status::PAUSED)
        ) {
            checkpoint_for_shutdown(
                inner,
                held,
                job,
                &trainer,
                outcome.steps,
                last_step.as_ref(),
            );
            return Ok(());
        }
    }
    match outcome.finish {
        Finish::Cancelled => {
            let changed = held.finish(&[status::RUNNING, status::PAUSED], status::CANCELLED, None);
            if changed == Some(true) {
                held.event("info", "Fine-tuning job cancelled");
            }
            Ok(())
        }
        Finish::Completed | Finish::EarlyStopped => {
            if outcome.finish == Finish::EarlyStopped {
                held.event(
                    "info",
                    "Stopped early: the validation loss stopped improving",
                );
            }
            inner
                .blobs
                .publish_result(&job.id)
                .map_err(|e| format!("storing the result: {e}"))?;
            let adapter = trainer.adapter().map_err(|e| e.to_string())?;
            let served = match adapter {
                Some(a) => {
                    // Served before the job says succeeded: a client that sees `succeeded` can
                    // use `fine_tuned_model` at once.
                    inner
                        .engine
                        .add_adapter_from(&job.variant, a, &out_dir)
                        .map_err(|e| format!("serving the result: {e}"))?;
                    Some(job.variant.as_str())
                }
                None => None,
            };
            let done = held
                .succeed(served, outcome.trained_tokens as i64)
                .map_err(|e| format!("recording success: {e}"))?;
            if done != Some(true) {
                // Cancelled while the last step ran, or taken over by another replica (whose
                // outcome this is not): the result is not served here.
                if let Some(name) = served {
                    let _ = inner.engine.remove_adapter(name);
                }
                return Ok(());
            }
            match served {
                Some(name) => held.event("info", &format!("New fine-tuned model created: {name}")),
                None => held.event(
                    "warn",
                    "The result is stored in the job directory but cannot be served as a variant",
                ),
            }
            held.event("info", "The job has successfully completed");
            Ok(())
        }
    }
}

/// Saves the trainer's state at `step` (unless a checkpoint of that step exists) where restart
/// recovery looks for it, records it as a checkpoint of the job and says so in an event.
fn checkpoint_for_shutdown(
    inner: &Inner,
    held: &Held,
    job: &JobRow,
    trainer: &Trainer,
    step: usize,
    last: Option<&StepMetrics>,
) {
    let latest = inner.blobs.latest_checkpoint(&job.id).map(|(s, _)| s);
    if step == 0 {
        held.event(
            "info",
            "Stopped for shutdown before the first step; the job restarts on the next start",
        );
        return;
    }
    if latest == Some(step) {
        held.event(
            "info",
            &format!("Stopped for shutdown; the job resumes from checkpoint step {step} on the next start"),
        );
        return;
    }
    // Written beside its place and then kept like any other checkpoint, so that an object
    // store gets it too (the next start may be on another replica).
    let dir = inner.blobs.local_checkpoint_dir(&job.id, step);
    let stage = dir.with_file_name(format!(".shutdown-step-{step}"));
    let saved = trainer
        .save_checkpoint(&stage)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            inner
                .blobs
                .keep_checkpoint(&job.id, step, &stage)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = saved {
        let _ = std::fs::remove_dir_all(&stage);
        tracing::warn!(job = %job.id, "shutdown checkpoint failed: {e}");
        let from = latest.map_or("the beginning".to_string(), |s| {
            format!("checkpoint step {s}")
        });
        held.event(
            "warn",
            &format!("Stopped for shutdown; saving a checkpoint at step {step} failed ({e}), the job resumes from {from}"),
        );
        return;
    }
    let name = format!("{}:ckpt-step-{step}", job.variant);
    let s = last.filter(|s| s.step == step);
    let metrics = json!({
        "step": step,
        "train_loss": s.map(|s| s.loss),
        "train_mean_token_accuracy": s.map(|s| s.mean_token_accuracy),
        "valid_loss": null,
        "valid_mean_token_accuracy": null,
    });
    held.checkpoint(step as i64, &metrics, &name);
    held.event(
        "info",
        &format!("Checkpoint created at step {step} for shutdown: {name}; the job resumes from it on the next start"),
    );
    tracing::info!(job = %job.id, step, "checkpointed for shutdown");
}

/// The trainer's hook before each micro-batch, which gives serving priority: while the engine
/// has generations running or waiting, the trainer pauses after each micro-batch of `t`
/// seconds for `t·(1−share)/share` seconds (less if serving goes idle first), so training keeps
/// `share` of the time when both compete and all of it otherwise. The engine runs its own
/// thread, so during a pause every core is serving's.
fn throttle(
    engine: crate::engine::EngineHandle,
    share: f64,
    job_id: String,
) -> impl Fn(&TrainControl) + Send + Sync {
    // Polled this often while paused: a request arriving or leaving is seen within it.
    const POLL: Duration = Duration::from_millis(5);
    const MAX_WORK: Duration = Duration::from_secs(10);
    let ratio = (1.0 - share) / share;
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    move |control: &TrainControl| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        // The micro-batch that just ran (none before the first one of a run); capped, since
        // the interval also holds evaluations and time spent paused by the client.
        let worked = last.map_or(Duration::ZERO, |t| now - t).min(MAX_WORK);
        let owed = worked.mul_f64(ratio);
        let mut paused = Duration::ZERO;
        while paused < owed && engine.load() > 0 && !control.cancel.load(Ordering::Relaxed) {
            let nap = POLL.min(owed - paused);
            std::thread::sleep(nap);
            paused += nap;
        }
        if !paused.is_zero() {
            crate::metrics::global().training_yielded(&job_id, paused.as_secs_f64());
        }
        *last = Some(std::time::Instant::now());
    }
}

/// `peft::load`, recorded in the adapter load metrics.
fn timed_load(
    name: &str,
    dir: &std::path::Path,
    cfg: &crate::model::ModelConfig,
    device: &candle_core::Device,
) -> Result<crate::adapters::Adapter, peft::PeftError> {
    let started = std::time::Instant::now();
    let a = peft::load(dir, cfg, device)?;
    crate::metrics::global().adapter_loaded(name, started.elapsed().as_secs_f64());
    Ok(a)
}

/// Validates a `validating_files` job's files line by line, then queues it, or fails it with
/// the bad lines in `error.message`.
pub(super) fn validate(inner: &Inner, job_id: &str) {
    let Some(job) = logged("load job", inner.rt.block_on(inner.store().get_job(job_id))).flatten()
    else {
        return;
    };
    if job.status != status::VALIDATING {
        return;
    }
    let fail = |code: &str, param: &str, message: &str| {
        let changed = logged(
            "fail job",
            inner.rt.block_on(inner.store().finish_unsuccessfully(
                job_id,
                &[status::VALIDATING],
                status::FAILED,
                Some(&error_json(code, message, Some(param))),
            )),
        );
        if changed == Some(true) {
            inner.event(job_id, "error", message);
        }
    };
    if let Err(e) = inner.engine.wait_loaded() {
        fail(
            "server_error",
            "model",
            &format!("The base model is not available: {e}"),
        );
        return;
    }
    let base = match inner.engine.base() {
        Ok(b) => b,
        Err(e) => {
            fail(
                "server_error",
                "model",
                &format!("The base model is not available: {e}"),
            );
            return;
        }
    };
    let spec: Option<JobSpec> = serde_json::from_value(job.spec.clone()).ok();
    let opts = DataOptions {
        max_seq_len: spec
            .as_ref()
            .map_or(super::spec::DEFAULT_MAX_SEQ_LEN, JobSpec::max_seq_len),
        ..Default::default()
    };
    let files = std::iter::once((&job.training_file, "training_file", "invalid_training_file"))
        .chain(
            job.validation_file
                .iter()
                .map(|f| (f, "validation_file", "invalid_validation_file")),
        );
    for (file, param, code) in files {
        inner.event(
            job_id,
            "info",
            &format!("Validating {}: {file}", param.replace('_', " ")),
        );
        if let Err(e) = load_data(inner, &base, file, &opts) {
            let message = match e {
                DataError::Io { .. } => format!("File {file} cannot be read: {e}"),
                e => format!("{}: {e}", param.replace('_', " ")),
            };
            fail(code, param, &message);
            return;
        }
    }
    let queued = logged(
        "queue job",
        inner.rt.block_on(
            inner
                .store()
                .transition(job_id, &[status::VALIDATING], status::QUEUED),
        ),
    );
    if queued == Some(true) {
        inner.event(
            job_id,
            "info",
            "Files validated, moving job to queued state",
        );
        inner.wake();
    }
}
