//! A runner's claim on the job it trains. The claim itself is one store operation
//! ([`super::backend::MetaStore::claim_job`]); this is the heartbeat that keeps it while the job
//! trains, next to the trainer on a thread of its own.
//!
//! Each beat extends the lease and reads the job's status in the same statement, which is how a
//! cancel, pause or resume sent to another replica reaches this one (within a beat, ≤ 1 s): a
//! terminal status cancels the trainer, `paused` pauses it, `running` lets it go on. A beat that
//! finds the job claimed by another runner, or no beat succeeding for a whole lease (the
//! database unreachable: another replica may take the job over meanwhile), means the lease is
//! lost: the trainer is stopped and the runner writes nothing more about the job, so a job is
//! never trained by two replicas at once beyond that one step.
//!
//! That step is closed by fencing: every row the runner writes about the job it trains goes
//! through [`Held`], whose writes are the store's fenced ones (they hold only while this
//! replica still owns the job). A write refused because the job was taken over stops the
//! trainer like a lost heartbeat does, and nothing more is written about the job here, so a
//! late terminal status, event or checkpoint row never lands on top of the new owner's state.
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;

use super::backend::{FenceError, FenceResult, Lease, MetaStore, NewEvent};
use super::store::{status, CheckpointRow};
use super::Inner;
use crate::train::TrainControl;

/// The longest time between two beats: a status change from another replica is seen within it.
const MAX_BEAT: Duration = Duration::from_secs(1);

/// The time between two beats for a lease of `lease`: at least three beats per lease.
pub(super) fn beat_interval(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(10), MAX_BEAT)
}

/// Keeps the lease on `job_id` until `stop` is dropped, applying the job's status to `control`.
pub(super) fn heartbeat(inner: &Inner, job_id: &str, control: &TrainControl, stop: Receiver<()>) {
    let lease = inner.cfg.job_lease;
    let owner = inner.cfg.replica_id.as_str();
    let mut renewed = Instant::now();
    loop {
        match stop.recv_timeout(beat_interval(lease)) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let started = Instant::now();
        let beat = inner
            .rt
            .block_on(inner.store.renew_lease(job_id, owner, lease));
        crate::metrics::global().lease_op("renew", started.elapsed().as_secs_f64());
        match beat {
            Ok(Some(now)) => {
                renewed = Instant::now();
                if status::is_terminal(&now) {
                    control.cancel.store(true, Ordering::SeqCst);
                } else {
                    control.pause.store(now == status::PAUSED, Ordering::SeqCst);
                }
            }
            Ok(None) => {
                tracing::warn!(job = %job_id, "lease lost: another replica claimed the job");
                lose(inner, control);
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job_id, "jobs database: lease heartbeat: {e}");
                if renewed.elapsed() >= lease {
                    tracing::warn!(job = %job_id, "lease expired without a heartbeat; stopping the job here");
                    lose(inner, control);
                    return;
                }
            }
        }
    }
}

fn lose(inner: &Inner, control: &TrainControl) {
    // Counted once per job, whichever of the heartbeat and a fenced write finds it first.
    if !inner.lease_lost.swap(true, Ordering::SeqCst) {
        crate::metrics::global().lease_lost();
    }
    control.cancel.store(true, Ordering::SeqCst);
}

/// The job this runner trains under its lease, and the writes it makes about it: each one
/// fenced by the lease. Once the lease is lost (found by the heartbeat or by a refused write)
/// every write is skipped and the trainer is told to stop.
pub(super) struct Held<'a> {
    inner: &'a Inner,
    lease: Lease<'a>,
    control: &'a TrainControl,
}

impl<'a> Held<'a> {
    pub(super) fn new(inner: &'a Inner, job_id: &'a str, control: &'a TrainControl) -> Self {
        Self {
            inner,
            lease: Lease {
                job_id,
                owner: inner.cfg.replica_id.as_str(),
            },
            control,
        }
    }

    /// True once another replica owns the job (nothing more is written about it here).
    pub(super) fn lost(&self) -> bool {
        self.inner.lease_lost.load(Ordering::SeqCst)
    }

    /// Runs one fenced write unless the lease is already lost. A refusal loses the lease (and
    /// is `Ok(None)`); a database failure is logged and is the caller's to weigh.
    fn write<'b, T>(
        &'b self,
        what: &str,
        f: impl FnOnce(&'b dyn MetaStore, Lease<'b>) -> BoxFuture<'b, FenceResult<T>>,
    ) -> Result<Option<T>, String> {
        if self.lost() {
            return Ok(None);
        }
        match self.inner.rt.block_on(f(&*self.inner.store, self.lease)) {
            Ok(v) => Ok(Some(v)),
            Err(FenceError::LeaseLost { .. }) => {
                tracing::warn!(job = %self.lease.job_id, "{what} refused: another replica owns the job now");
                lose(self.inner, self.control);
                Ok(None)
            }
            Err(FenceError::Store(e)) => {
                tracing::warn!(job = %self.lease.job_id, "jobs database: {what}: {e}");
                Err(e.to_string())
            }
        }
    }

    /// A bookkeeping write: a database failure is logged and training goes on.
    fn note<'b, T>(
        &'b self,
        what: &str,
        f: impl FnOnce(&'b dyn MetaStore, Lease<'b>) -> BoxFuture<'b, FenceResult<T>>,
    ) -> Option<T> {
        self.write(what, f).ok().flatten()
    }

    pub(super) fn event(&self, level: &str, message: &str) {
        let e = NewEvent {
            level,
            message,
            kind: "message",
            data: None,
        };
        self.note("add event", |s, l| s.fenced_event(l, e));
    }

    pub(super) fn metrics_event(&self, message: &str, data: &Value) {
        let e = NewEvent {
            level: "info",
            message,
            kind: "metrics",
            data: Some(data),
        };
        self.note("add metrics event", |s, l| s.fenced_event(l, e));
    }

    pub(super) fn progress(&self, trained_tokens: i64, estimated_finish: Option<i64>) {
        self.note("store progress", |s, l| {
            s.fenced_progress(l, trained_tokens, estimated_finish)
        });
    }

    pub(super) fn hyperparameters(&self, hyperparameters: &Value, method: &Value) {
        self.note("store hyperparameters", |s, l| {
            s.fenced_hyperparameters(l, hyperparameters, method)
        });
    }

    pub(super) fn checkpoint(
        &self,
        step: i64,
        metrics: &Value,
        model: &str,
    ) -> Option<CheckpointRow> {
        self.note("add checkpoint", |s, l| {
            s.fenced_checkpoint(l, step, metrics, model)
        })
    }

    /// Ends the job as `to` if it is still in `from`: Some(true) if this did it, None if the
    /// lease is lost or the database failed (logged).
    pub(super) fn finish(&self, from: &[&str], to: &str, error: Option<&Value>) -> Option<bool> {
        self.note("end job", |s, l| s.fenced_finish(l, from, to, error))
    }

    /// Marks the job succeeded: `Ok(Some(false))` if it was cancelled meanwhile, `Ok(None)` if
    /// the lease is lost.
    pub(super) fn succeed(
        &self,
        fine_tuned_model: Option<&str>,
        trained_tokens: i64,
    ) -> Result<Option<bool>, String> {
        self.write("record success", |s, l| {
            s.fenced_succeed(l, fine_tuned_model, trained_tokens)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_come_three_times_a_lease_and_at_least_every_second() {
        assert_eq!(beat_interval(Duration::from_secs(30)), MAX_BEAT);
        assert_eq!(
            beat_interval(Duration::from_millis(1500)),
            Duration::from_millis(500)
        );
        assert_eq!(
            beat_interval(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }
}
