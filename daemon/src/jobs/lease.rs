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
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::store::status;
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
        let beat = inner
            .rt
            .block_on(inner.store.renew_lease(job_id, owner, lease));
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
    inner.lease_lost.store(true, Ordering::SeqCst);
    control.cancel.store(true, Ordering::SeqCst);
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
