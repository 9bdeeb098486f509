//! Batches for next-token prediction: shifted, right-padded, optionally packed several examples
//! per row (first fit), in an order that depends only on `(seed, epoch)`, so that a run resumed
//! at a saved [`BatchCursor`] produces exactly the batches the interrupted run would have.
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::jsonl::{DataError, DataOptions};
use super::masks::Example;
use crate::model::layers::Packed;

/// Shaping of the batches a [`Batcher`] produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest row in tokens (inputs after the shift); longer examples are cut.
    pub max_seq_len: usize,
    /// Fill each row with several examples (first fit) instead of one example per row.
    pub pack: bool,
    pub seed: u64,
}

impl BatchOptions {
    pub fn from_data(opts: &DataOptions, batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            max_seq_len: opts.max_seq_len,
            pack: opts.pack,
            seed,
        }
    }
}

/// Where a [`Batcher`] stands: the batch `index` of `epoch` is the next one produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCursor {
    pub epoch: u64,
    pub index: u64,
}

/// Batches shifted for next-token prediction: for a row made of example tokens `x` with weights
/// `w`, `inputs = x[..n-1]`, `targets = x[1..]`, `weights = w[1..]`. Rows are right-padded to the
/// longest with id 0 and weight 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
    /// Packed batches only: each token's example index within its row; padding gets the next id,
    /// so ids never decrease along a row (what [`Packed::from_segments`] expects).
    pub segments: Option<Vec<Vec<u32>>>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Tokens with a non-zero weight.
    pub trainable: usize,
}

impl Batch {
    /// `(inputs u32 (b, l), targets u32 (b, l), weights f32 (b, l), packing)`.
    pub fn to_tensors(
        &self,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor, Option<Packed>)> {
        let b = self.inputs.len();
        let l = self.inputs.first().map_or(0, Vec::len);
        let flat_u32 = |rows: &[Vec<u32>]| rows.concat();
        let inputs = Tensor::from_vec(flat_u32(&self.inputs), (b, l), device)?;
        let targets = Tensor::from_vec(flat_u32(&self.targets), (b, l), device)?;
        let weights = Tensor::from_vec(self.weights.concat(), (b, l), device)?;
        let packed = self
            .segments
            .as_ref()
            .map(|s| Packed::from_segments(s, device))
            .transpose()?;
        Ok((inputs, targets, weights, packed))
    }
}

/// Deterministic, resumable batches over a fixed set of examples.
///
/// Each epoch visits every example exactly once, in an order shuffled by `(seed, epoch)`; the
/// order depends on nothing else, so a run resumed with [`seek`](Self::seek) at a saved
/// [`cursor`](Self::cursor) produces exactly the batches the interrupted run would have.
pub struct Batcher {
    examples: Arc<Vec<Example>>,
    opts: BatchOptions,
    cursor: BatchCursor,
    /// Example indices of each row of the cursor's epoch, in batch order.
    rows: Vec<Vec<usize>>,
}

impl Batcher {
    pub fn new(
        examples: impl Into<Arc<Vec<Example>>>,
        opts: BatchOptions,
    ) -> Result<Self, DataError> {
        let examples = examples.into();
        if examples.is_empty() {
            return Err(DataError::Empty);
        }
        if opts.batch_size == 0 {
            return Err(DataError::Options("batch_size must be at least 1".into()));
        }
        if opts.max_seq_len == 0 {
            return Err(DataError::Options("max_seq_len must be at least 1".into()));
        }
        for (i, ex) in examples.iter().enumerate() {
            if ex.ids.len() < 2 || ex.ids.len() != ex.weights.len() {
                return Err(DataError::Options(format!(
                    "example {i} has {} ids and {} weights (need equal counts, at least 2)",
                    ex.ids.len(),
                    ex.weights.len()
                )));
            }
        }
        let rows = plan_rows(&examples, &opts, 0);
        Ok(Self {
            examples,
            opts,
            cursor: BatchCursor::default(),
            rows,
        })
    }

    pub fn num_examples(&self) -> usize {
        self.examples.len()
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    /// Batches in the cursor's epoch. Without packing every epoch has the same count; with
    /// packing the count depends on how the epoch's order happens to pack.
    pub fn steps_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.opts.batch_size)
    }

    /// Batches in `epoch`.
    pub fn steps_in_epoch(&self, epoch: u64) -> usize {
        if epoch == self.cursor.epoch {
            return self.steps_per_epoch();
        }
        let rows = if self.opts.pack {
            plan_rows(&self.examples, &self.opts, epoch).len()
        } else {
            self.examples.len()
        };
        rows.div_ceil(self.opts.batch_size)
    }

    /// Batches in epochs `0..epochs` (for learning-rate schedules).
    pub fn total_steps(&self, epochs: u64) -> u64 {
        (0..epochs).map(|e| self.steps_in_epoch(e) as u64).sum()
    }

    pub fn cursor(&self) -> BatchCursor {
        self.cursor
    }

    /// Moves to `cursor`, as saved by [`cursor`](Self::cursor) in a run over the same examples
    /// and options. The end of an epoch is accepted as the start of the next.
    pub fn seek(&mut self, cursor: BatchCursor) -> Result<(), DataError> {
        if cursor.epoch != self.cursor.epoch {
            self.rows = plan_rows(&self.examples, &self.opts, cursor.epoch);
        }
        self.cursor = cursor;
        let steps = self.steps_per_epoch() as u64;
        if cursor.index > steps {
            return Err(DataError::Options(format!(
                "cursor index {} is past the {steps} batches of epoch {} (different data or options?)",
                cursor.index, cursor.epoch
            )));
        }
        if cursor.index == steps {
            self.start_epoch(cursor.epoch + 1);
        }
        Ok(())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.rows = plan_rows(&self.examples, &self.opts, epoch);
        self.cursor = BatchCursor { epoch, index: 0 };
    }

    /// The batch at the cursor; then advances, into the next epoch after its last batch.
    pub fn next_batch(&mut self) -> Batch {
        let bs = self.opts.batch_size;
        // The cursor index is below the epoch's step count (seek and the rollover below keep it
        // so), which bounds it by the row count and makes the cast lossless.
        let start = (self.cursor.index as usize) * bs;
        let end = (start + bs).min(self.rows.len());
        let batch = self.make_batch(&self.rows[start..end]);
        self.cursor.index += 1;
        if self.cursor.index as usize >= self.steps_per_epoch() {
            self.start_epoch(self.cursor.epoch + 1);
        }
        batch
    }

    fn make_batch(&self, rows: &[Vec<usize>]) -> Batch {
        let cap = self.opts.max_seq_len;
        let mut inputs = Vec::with_capacity(rows.len());
        let mut targets = Vec::with_capacity(rows.len());
        let mut weights = Vec::with_capacity(rows.len());
        let mut segments = Vec::with_capacity(rows.len());
        let mut tokens = 0;
        for row in rows {
            let (mut inp, mut tgt, mut w, mut seg) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (s, &ex) in row.iter().enumerate() {
                let ex = &self.examples[ex];
                let n = shifted_len(ex, cap);
                inp.extend_from_slice(&ex.ids[..n]);
                tgt.extend_from_slice(&ex.ids[1..=n]);
                w.extend_from_slice(&ex.weights[1..=n]);
                seg.extend(std::iter::repeat_n(s as u32, n));
            }
            tokens += inp.len();
            inputs.push(inp);
            targets.push(tgt);
            weights.push(w);
            segments.push(seg);
        }
        let trainable = weights.iter().flatten().filter(|&&w| w > 0.0).count();
        let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
        for (r, row) in rows.iter().enumerate() {
            inputs[r].resize(width, 0);
            targets[r].resize(width, 0);
            weights[r].resize(width, 0.0);
            segments[r].resize(width, row.len() as u32);
        }
        Batch {
            inputs,
            targets,
            weights,
            segments: self.opts.pack.then_some(segments),
            tokens,
            trainable,
        }
    }
}

/// Tokens an example contributes to a row after the shift, cut to the row capacity.
fn shifted_len(ex: &Example, cap: usize) -> usize {
    (ex.ids.len() - 1).min(cap)
}

fn epoch_rng(seed: u64, epoch: u64) -> StdRng {
    // Mixing (not xor-ing) keeps (seed, epoch) pairs like (0, 1) and (1, 0) apart.
    StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(epoch)))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rows of `epoch`: its shuffled order, one example per row or packed first-fit.
fn plan_rows(examples: &[Example], opts: &BatchOptions, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut epoch_rng(opts.seed, epoch));
    if !opts.pack {
        return order.into_iter().map(|i| vec![i]).collect();
    }
    let cap = opts.max_seq_len;
    first_fit(&order, |i| shifted_len(&examples[i], cap), cap)
}

/// First-fit bin packing: each item goes into the earliest row with room, else a new row. A max
/// segment tree over the rows' free space finds that row in O(log n), so packing a million
/// examples stays cheap.
fn first_fit(order: &[usize], len: impl Fn(usize) -> usize, cap: usize) -> Vec<Vec<usize>> {
    let size = order.len().next_power_of_two().max(1);
    // Rows not yet opened have 0 free space and so are never chosen: every item has length >= 1.
    let mut free = vec![0usize; 2 * size];
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &item in order {
        let need = len(item);
        let row = if free[1] >= need {
            let mut node = 1;
            while node < size {
                node = if free[2 * node] >= need {
                    2 * node
                } else {
                    2 * node + 1
                };
            }
            node - size
        } else {
            rows.push(Vec::new());
            let row = rows.len() - 1;
            free[size + row] = cap;
            row
        };
        rows[row].push(item);
        let mut node = size + row;
        free[node] -= need;
        while node > 1 {
            node /= 2;
            free[node] = free[2 * node].max(free[2 * node + 1]);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::numbered;
    use super::*;

    /// Example numbers in a batch, read from each segment's first token.
    fn batch_examples(b: &Batch) -> Vec<usize> {
        let mut out = Vec::new();
        for (r, row) in b.inputs.iter().enumerate() {
            for (i, &id) in row.iter().enumerate() {
                let starts = match &b.segments {
                    Some(s) => i == 0 || s[r][i] != s[r][i - 1],
                    None => i == 0,
                };
                if starts && id >= 1000 {
                    out.push(id as usize - 1000);
                }
            }
        }
        out
    }

    #[test]
    fn batcher_is_deterministic_resumable_and_covers_each_epoch() {
        for pack in [false, true] {
            let ex = Arc::new(numbered(23, |i| 2 + i % 7));
            let opts = BatchOptions {
                batch_size: 4,
                max_seq_len: 12,
                pack,
                seed: 42,
            };
            let mut a = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            let mut all = Vec::new();
            for epoch in 0..3u64 {
                assert_eq!(a.cursor(), BatchCursor { epoch, index: 0 });
                let steps = a.steps_per_epoch();
                assert_eq!(steps, a.steps_in_epoch(epoch));
                let mut seen = Vec::new();
                for _ in 0..steps {
                    let b = a.next_batch();
                    assert!(b.inputs.len() <= 4 && !b.inputs.is_empty());
                    seen.extend(batch_examples(&b));
                    all.push((a.cursor(), b));
                }
                seen.sort_unstable();
                assert_eq!(seen, (0..23).collect::<Vec<_>>(), "pack={pack}");
            }
            if !pack {
                assert_eq!(a.steps_per_epoch(), 6);
                assert_eq!(all[5].1.inputs.len(), 3);
            }
            let fresh = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            assert_eq!(fresh.total_steps(3) as usize, all.len());

            // Same seed, same batches; another seed, another order.
            let mut b = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            for (_, batch) in &all {
                assert_eq!(&b.next_batch(), batch);
            }
            let mut c = Batcher::new(
                ex.clone(),
                BatchOptions {
                    seed: 43,
                    ..opts.clone()
                },
            )
            .expect("batcher");
            assert_ne!(c.next_batch(), all[0].1);

            // Resuming from any saved cursor replays the rest exactly.
            for k in 0..all.len() {
                let mut r = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
                r.seek(all[k].0).expect("seek");
                for (_, batch) in &all[k + 1..] {
                    assert_eq!(&r.next_batch(), batch, "resume after {k}, pack={pack}");
                }
            }
            let mut r = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            let steps = r.steps_in_epoch(1) as u64;
            assert!(r
                .seek(BatchCursor {
                    epoch: 1,
                    index: steps + 1
                })
                .is_err());
            r.seek(BatchCursor {
                epoch: 1,
                index: steps,
            })
            .expect("end of epoch");
            assert_eq!(r.cursor(), BatchCursor { epoch: 2, index: 0 });
        }
    }

    #[test]
    fn batches_are_shifted_and_padded() {
        let ex = vec![
            Example {
                ids: vec![5, 6, 7, 8],
                weights: vec![0., 0., 1., 1.],
            },
            Example {
                ids: vec![9, 10],
                weights: vec![0., 1.],
            },
        ];
        let opts = BatchOptions {
            batch_size: 2,
            max_seq_len: 16,
            pack: false,
            seed: 0,
        };
        let mut b = Batcher::new(ex, opts).expect("batcher");
        let batch = b.next_batch();
        let long = usize::from(batch.inputs[0][0] != 5);
        let short = 1 - long;
        assert_eq!(batch.inputs[long], [5, 6, 7]);
        assert_eq!(batch.targets[long], [6, 7, 8]);
        assert_eq!(batch.weights[long], [0., 1., 1.]);
        assert_eq!(batch.inputs[short], [9, 0, 0]);
        assert_eq!(batch.targets[short], [10, 0, 0]);
        assert_eq!(batch.weights[short], [1., 0., 0.]);
        assert_eq!((batch.tokens, batch.trainable), (4, 3));
        assert!(batch.segments.is_none());
        let (i, t, w, p) = batch.to_tensors(&Device::Cpu).expect("tensors");
        assert_eq!(i.dims(), [2, 3]);
        assert_eq!(t.dims(), [2, 3]);
        assert_eq!(w.dims(), [2, 3]);
        assert!(p.is_none());
        assert_eq!(
            t.to_vec2::<u32>().expect("targets")[long],
            batch.targets[long]
        );
    }

    #[test]
    fn packed_rows_fit_and_keep_examples_apart() {
        let ex = Arc::new(numbered(40, |i| 2 + (i * 7) % 11));
        let opts = BatchOptions {
            batch_size: 3,
            max_seq_len: 16,
            pack: true,
            seed: 5,
        };
        let mut b = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
        let unpacked_rows = 40;
        let mut rows = 0;
        for _ in 0..b.steps_per_epoch() {
            let batch = b.next_batch();
            let segs = batch.segments.clone().expect("segments");
            let mut real = 0;
            for (r, row) in batch.inputs.iter().enumerate() {
                rows += 1;
                assert!(row.len() <= 16);
                let seg = &segs[r];
                assert_eq!(seg.len(), row.len());
                assert!(seg.windows(2).all(|w| w[0] <= w[1]), "{seg:?}");
                // Within a segment the example's tokens are contiguous: its first token starts
                // it and its targets continue it.
                let mut i = 0;
                while i < row.len() {
                    let s = seg[i];
                    let end = seg[i..]
                        .iter()
                        .position(|&x| x != s)
                        .map_or(row.len(), |p| i + p);
                    if row[i] >= 1000 {
                        real += end - i;
                        assert_eq!(row[i + 1..end], batch.targets[r][i..end - 1]);
                    } else {
                        assert!(batch.weights[r][i..end].iter().all(|&w| w == 0.0));
                    }
                    i = end;
                }
            }
            assert_eq!(real, batch.tokens);
            let (_, _, _, packed) = batch.to_tensors(&Device::Cpu).expect("tensors");
            let packed = packed.expect("packed");
            let l = batch.inputs[0].len();
            assert_eq!(packed.positions.dims(), [batch.inputs.len(), l]);
            // Positions restart at every example.
            let pos = packed.positions.to_vec2::<u32>().expect("positions");
            for (r, seg) in segs.iter().enumerate() {
                for i in 0..l {
                    if i == 0 || seg[i] != seg[i - 1] {
                        assert_eq!(pos[r][i], 0);
                    }
                }
            }
        }
        assert!(rows < unpacked_rows / 2, "{rows} rows");
    }

    #[test]
    fn over_long_examples_are_cut_to_the_row() {
        let ex = numbered(3, |_| 30);
        let mut b = Batcher::new(
            ex,
            BatchOptions {
                batch_size: 3,
                max_seq_len: 8,
                pack: true,
                seed: 1,
            },
        )
        .expect("batcher");
        let batch = b.next_batch();
        assert_eq!(batch.inputs.len(), 3);
        assert!(batch.inputs.iter().all(|r| r.len() == 8));
        assert!(Batcher::new(
            Vec::new(),
            BatchOptions {
                batch_size: 1,
                max_seq_len: 8,
                pack: false,
                seed: 0
            }
        )
        .is_err());
    }

    #[test]
    fn first_fit_uses_the_earliest_row_with_room() {
        let lens = [6, 5, 4, 3, 2, 1];
        let rows = first_fit(&[0, 1, 2, 3, 4, 5], |i| lens[i], 8);
        assert_eq!(rows, vec![vec![0, 4], vec![1, 3], vec![2, 5]]);
    }
}
