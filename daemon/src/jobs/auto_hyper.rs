//! What `"auto"` stands for in a job's `n_epochs` and `batch_size`, given the dataset's size.
//!
//! Like OpenAI's rule, small datasets get more epochs and large ones fewer, but the bound is on
//! optimizer steps rather than on examples seen: an adapter learns per update, and a 20-example
//! persona set at 3 epochs of batch 4 gets only 15 updates, too few for prompt or prefix tuning
//! to take hold. So the epochs are raised until a run makes at least [`MIN_STEPS`] updates
//! (at most [`MAX_EPOCHS`] epochs) and lowered until it makes at most [`MAX_STEPS`] (at least
//! one epoch). The batch grows with the dataset so that large sets are not stepped one example
//! at a time, within what a CPU step holds comfortably.

/// Epochs when the dataset is neither small nor large.
pub const DEFAULT_EPOCHS: usize = 3;
/// A run makes at least this many optimizer steps (more epochs for small datasets)...
pub const MIN_STEPS: usize = 60;
/// ...but no more than this many epochs to get there.
pub const MAX_EPOCHS: usize = 25;
/// A run makes at most this many optimizer steps (fewer epochs for large datasets, never < 1).
pub const MAX_STEPS: usize = 3000;
/// Batch size bounds; between them, one example in [`EXAMPLES_PER_BATCH_UNIT`] per batch slot,
/// rounded up to a power of two.
pub const MIN_BATCH: usize = 4;
pub const MAX_BATCH: usize = 16;
pub const EXAMPLES_PER_BATCH_UNIT: usize = 50;

/// The batch size "auto" stands for with `n_train` examples.
pub fn batch_size(n_train: usize) -> usize {
    let by_size = n_train
        .div_ceil(EXAMPLES_PER_BATCH_UNIT)
        .next_power_of_two()
        .clamp(MIN_BATCH, MAX_BATCH);
    by_size.min(n_train.max(1))
}

/// The epochs "auto" stands for with `n_train` examples in batches of `batch_size`.
pub fn n_epochs(n_train: usize, batch_size: usize) -> usize {
    let per_epoch = n_train.max(1).div_ceil(batch_size.max(1));
    if DEFAULT_EPOCHS * per_epoch < MIN_STEPS {
        MIN_STEPS.div_ceil(per_epoch).min(MAX_EPOCHS)
    } else if DEFAULT_EPOCHS * per_epoch > MAX_STEPS {
        (MAX_STEPS / per_epoch).max(1)
    } else {
        DEFAULT_EPOCHS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(n: usize) -> (usize, usize, usize) {
        let b = batch_size(n);
        let e = n_epochs(n, b);
        (b, e, e * n.div_ceil(b))
    }

    #[test]
    fn small_datasets_get_more_epochs_up_to_the_bound() {
        // 20 examples: batch 4, 5 steps an epoch, 12 epochs for 60 steps.
        assert_eq!(steps(20), (4, 12, 60));
        // 3 examples: a batch of all three, 1 step an epoch; epochs stop at the bound.
        assert_eq!(steps(3), (3, MAX_EPOCHS, MAX_EPOCHS));
        assert_eq!(steps(1), (1, MAX_EPOCHS, MAX_EPOCHS));
        // 120 examples (the persona set): batch 4, 30 steps an epoch, the default 3 epochs.
        assert_eq!(steps(120), (4, 3, 90));
        // 60 examples: 15 steps an epoch, 4 epochs.
        assert_eq!(steps(60), (4, 4, 60));
    }

    #[test]
    fn large_datasets_get_bigger_batches_and_fewer_epochs() {
        assert_eq!(batch_size(400), 8);
        assert_eq!(batch_size(1_000), 16);
        assert_eq!(batch_size(1_000_000), MAX_BATCH);
        // 1000 examples: batch 16, 63 steps an epoch, 3 epochs.
        assert_eq!(steps(1_000), (16, 3, 189));
        // 100k examples: 6250 steps an epoch already exceed the bound: one epoch.
        assert_eq!(steps(100_000), (16, 1, 6250));
        // 30k examples: 1875 steps an epoch, 1 epoch (2 would pass 3000).
        assert_eq!(steps(30_000).1, 1);
    }

    #[test]
    fn bounds_hold_for_every_size() {
        for n in 1..5_000 {
            let (b, e, s) = steps(n);
            assert!((1..=MAX_BATCH).contains(&b) && b <= n, "n={n}");
            assert!((1..=MAX_EPOCHS).contains(&e), "n={n}");
            // at least MIN_STEPS unless the epoch bound stops it; at most MAX_STEPS unless one
            // epoch is already longer
            assert!(s >= MIN_STEPS || e == MAX_EPOCHS, "n={n}: {s} steps");
            assert!(s <= MAX_STEPS || e == 1, "n={n}: {s} steps");
        }
    }
}
