//! LM head + cross-entropy fused over chunks of rows.
//!
//! With a 49k vocabulary, `logits = hidden · headᵀ` for a 4 × 512 batch is a 2048 × 49152 matrix
//! (400 MB in f32), and candle's log-softmax, its backward and the logits' gradient each make
//! another one, on a single thread: ~75% of a naive training step (docs/candle-notes.md). Here the
//! logits exist only a chunk of rows at a time, and because the loss is a scalar the gradient
//! is computed in the same pass (the upstream gradient only scales it): per chunk one GEMM for
//! the logits, a parallel softmax pass, one GEMM for `dH = G · head` and, only when the head
//! trains, one for `dHead += Gᵀ · H`. No logits are recomputed in backward, and rows of weight 0
//! (prompt, padding) cost nothing at all.
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::blas::{self, BlasFloat, Mat, Operand};

/// Rows per chunk: 256 × 49152 f32 logits are 50 MB, and GEMMs of 256 rows run at full speed.
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// What the loss pass saw, as plain numbers (weighted tokens are those of non-zero weight).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CeStats {
    /// Weighted tokens whose argmax logit is the target (ties: the lowest index wins, as in
    /// torch's argmax).
    pub correct: usize,
    /// Tokens of non-zero weight.
    pub counted: usize,
    /// Sum of the weights.
    pub weight_sum: f64,
}

impl CeStats {
    /// `correct / counted`, 0 when nothing was counted.
    pub fn accuracy(&self) -> f64 {
        if self.counted == 0 {
            0.0
        } else {
            self.correct as f64 / self.counted as f64
        }
    }
}

/// Weighted sum of token NLLs `Σ_i w_i · (logsumexp(h_i · headᵀ) − h_i · head[t_i])`, as a
/// scalar of `hidden`'s dtype (callers divide by their token count), and [`CeStats`].
///
/// `hidden`: `(n, h)` or `(b, l, h)`; `head`: `(vocab, h)`, frozen or trained; `targets`: `n`
/// integer ids, any shape (any value where the weight is 0, e.g. -100); `weights`: `n` floats. Gradients flow to `hidden` and
/// `head` when they track. On CPU f32/f64 with tuned BLAS the logits are never materialized;
/// elsewhere this is [`lm_head_cross_entropy_reference`].
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, CeStats)> {
    lm_head_cross_entropy_chunked(hidden, head, targets, weights, DEFAULT_CHUNK_ROWS)
}

/// [`lm_head_cross_entropy`] with a chosen number of rows per chunk.
pub fn lm_head_cross_entropy_chunked(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    chunk_rows: usize,
) -> Result<(Tensor, CeStats)> {
    let (hidden, targets, weights) = flatten_rows(hidden, targets, weights)?;
    let (hidden, targets, weights) = (&hidden, &targets, &weights);
    let rows = Rows::read(hidden, head, targets, weights)?;
    let dtype = hidden.dtype();
    let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == dtype;
    if !(matches!(dtype, DType::F32 | DType::F64) && cpu(hidden) && cpu(head) && blas::preferred())
    {
        return reference(hidden, head, &rows);
    }
    let saved = Arc::new(Mutex::new(Saved::default()));
    let op = FusedCe {
        rows,
        grad_hidden: hidden.track_op(),
        grad_head: head.track_op(),
        chunk_rows: chunk_rows.max(1),
        saved: saved.clone(),
    };
    let loss = if op.grad_hidden || op.grad_head {
        hidden.apply_op2_arc(head, Arc::new(Box::new(op)))?
    } else {
        hidden.apply_op2_no_bwd(head, &op)?
    };
    let stats = lock(&saved)?.stats;
    Ok((loss, stats))
}

/// The same loss from candle's differentiable ops (full logits, `log_softmax`, `gather`): the
/// reference in tests and the path for other devices and dtypes.
pub fn lm_head_cross_entropy_reference(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, CeStats)> {
    let (hidden, targets, weights) = flatten_rows(hidden, targets, weights)?;
    let rows = Rows::read(&hidden, head, &targets, &weights)?;
    reference(&hidden, head, &rows)
}

/// `(..., h)` hidden states → `(n, h)`, and targets and weights of any shape → `(n)`.
fn flatten_rows(
    hidden: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let hidden = if hidden.rank() > 2 {
        let h = hidden.dim(candle_core::D::Minus1)?;
        hidden.reshape((hidden.elem_count() / h.max(1), h))?
    } else {
        hidden.clone()
    };
    Ok((hidden, targets.flatten_all()?, weights.flatten_all()?))
}

fn reference(hidden: &Tensor, head: &Tensor, rows: &Rows) -> Result<(Tensor, CeStats)> {
    let device = hidden.device();
    // Rows of weight 0 may carry any target (e.g. -100): gather needs a valid index there.
    let safe: Vec<u32> = rows
        .targets
        .iter()
        .zip(&rows.weights)
        .map(|(&t, &w)| if w == 0.0 { 0 } else { t })
        .collect();
    let n = safe.len();
    let targets = Tensor::from_vec(safe, (n, 1), device)?;
    let weights = Tensor::from_vec(rows.weights.clone(), n, device)?.to_dtype(hidden.dtype())?;
    let logits = hidden.matmul(&head.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = logp.gather(&targets, 1)?.squeeze(1)?.neg()?;
    let loss = (nll * weights)?.sum_all()?;
    let argmax = logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
    let mut stats = CeStats::default();
    for i in rows.active() {
        stats.counted += 1;
        stats.weight_sum += rows.weights[i];
        stats.correct += usize::from(argmax[i] == rows.targets[i]);
    }
    Ok((loss, stats))
}

/// Targets and weights read out of their tensors, validated against the shapes.
struct Rows {
    targets: Vec<u32>,
    weights: Vec<f64>,
}

impl Rows {
    fn read(hidden: &Tensor, head: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Self> {
        let (n, h) = hidden.dims2()?;
        let (vocab, h2) = head.dims2()?;
        if h != h2 {
            bail!("lm_head_cross_entropy: hidden size {h} but the head has rows of {h2}")
        }
        if targets.dims() != [n] || weights.dims() != [n] {
            bail!(
                "lm_head_cross_entropy: {n} rows but targets {:?} and weights {:?}",
                targets.dims(),
                weights.dims()
            )
        }
        let targets = match targets.dtype() {
            DType::U32 => targets.to_vec1::<u32>()?,
            DType::I64 => targets
                .to_vec1::<i64>()?
                .into_iter()
                .map(|t| u32::try_from(t).unwrap_or(u32::MAX))
                .collect(),
            d => bail!("lm_head_cross_entropy: targets must be u32 or i64, got {d:?}"),
        };
        let weights = weights.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let rows = Self { targets, weights };
        for i in rows.active() {
            if rows.targets[i] as usize >= vocab {
                bail!(
                    "lm_head_cross_entropy: target {} of row {i} is outside the vocabulary of {vocab}",
                    rows.targets[i]
                )
            }
            if !rows.weights[i].is_finite() {
                bail!("lm_head_cross_entropy: weight of row {i} is not finite")
            }
        }
        Ok(rows)
    }

    fn active(&self) -> impl Iterator<Item = usize> + '_ {
        self.weights
            .iter()
            .enumerate()
            .filter(|(_, &w)| w != 0.0)
            .map(|(i, _)| i)
    }
}

/// Results of the forward pass kept for the backward: the gradients for an upstream gradient
/// of 1 (the loss is a scalar, so the real ones are these times the upstream value).
#[derive(Default)]
struct Saved {
    stats: CeStats,
    d_hidden: Option<Tensor>,
    d_head: Option<Tensor>,
}

fn lock(saved: &Mutex<Saved>) -> Result<std::sync::MutexGuard<'_, Saved>> {
    saved
        .lock()
        .map_err(|_| candle_core::Error::Msg("lm_head_cross_entropy: state lock poisoned".into()))
}

struct FusedCe {
    rows: Rows,
    grad_hidden: bool,
    grad_head: bool,
    chunk_rows: usize,
    saved: Arc<Mutex<Saved>>,
}

impl FusedCe {
    fn run<T: CeFloat>(
        &self,
        hs: &[T],
        hl: &Layout,
        ws: &[T],
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hidden = Operand::new(hs, hl)?;
        let head = Operand::new(ws, wl)?;
        let (hm, wm) = (hidden.mat(), head.mat());
        let (n, hd, vocab) = (hm.rows, hm.cols, wm.rows);
        let need_grad = self.grad_hidden || self.grad_head;
        let active: Vec<usize> = self.rows.active().collect();
        let chunk = self.chunk_rows.min(active.len()).max(1);
        let mut logits = vec![T::zero(); chunk * vocab];
        let mut h_chunk = vec![T::zero(); chunk * hd];
        let mut dh_chunk = vec![T::zero(); if self.grad_hidden { chunk * hd } else { 0 }];
        let mut d_hidden = vec![T::zero(); if self.grad_hidden { n * hd } else { 0 }];
        let mut d_head = vec![T::zero(); if self.grad_head { vocab * hd } else { 0 }];
        let mut loss = 0f64;
        let mut stats = CeStats::default();
        for idx in active.chunks(chunk) {
            let r = idx.len();
            for (dst, &i) in h_chunk.chunks_exact_mut(hd.max(1)).zip(idx) {
                copy_row(&hm, i, dst);
            }
            let hc = Mat::new(&h_chunk[..r * hd], r, hd);
            let lg = &mut logits[..r * vocab];
            blas::gemm(T::one(), hc, wm.t(), T::zero(), lg, vocab.max(1))?;
            let per_row: Vec<(f64, bool)> = lg
                .par_chunks_mut(vocab.max(1))
                .zip(idx.par_iter())
                .map(|(row, &i)| {
                    let t = self.rows.targets[i] as usize;
                    row_loss(row, t, self.rows.weights[i], need_grad)
                })
                .collect();
            for (&i, (nll, hit)) in idx.iter().zip(per_row) {
                loss += self.rows.weights[i] * nll;
                stats.counted += 1;
                stats.weight_sum += self.rows.weights[i];
                stats.correct += usize::from(hit);
            }
            // `lg` now holds G = w · (softmax − onehot) for each row.
            let g = Mat::new(&logits[..r * vocab], r, vocab);
            if self.grad_hidden {
                let dst = &mut dh_chunk[..r * hd];
                blas::gemm(T::one(), g, wm, T::zero(), dst, hd.max(1))?;
                for (src, &i) in dst.chunks_exact(hd.max(1)).zip(idx) {
                    d_hidden[i * hd..(i + 1) * hd].copy_from_slice(src);
                }
            }
            if self.grad_head {
                blas::gemm(T::one(), g.t(), hc, T::one(), &mut d_head, hd.max(1))?;
            }
        }
        let mut saved = lock(&self.saved)?;
        saved.stats = stats;
        if self.grad_hidden {
            saved.d_hidden = Some(Tensor::from_vec(d_hidden, (n, hd), &Device::Cpu)?);
        }
        if self.grad_head {
            saved.d_head = Some(Tensor::from_vec(d_head, (vocab, hd), &Device::Cpu)?);
        }
        Ok((
            T::to_cpu_storage_owned(vec![T::from_f64(loss)]),
            Shape::from(()),
        ))
    }
}

/// Row `i` of `m` into `dst` (its `cols` values).
fn copy_row<T: Copy>(m: &Mat<'_, T>, i: usize, dst: &mut [T]) {
    if m.trans {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = m.data[j * m.ld + i];
        }
    } else {
        dst.copy_from_slice(&m.data[i * m.ld..i * m.ld + m.cols]);
    }
}

/// NLL of one row of logits and whether its argmax is the target. With `grad`, the row is
/// replaced by its gradient `w · (softmax − onehot(t))`.
fn row_loss<T: CeFloat>(row: &mut [T], t: usize, w: f64, grad: bool) -> (f64, bool) {
    let max = T::row_max(row);
    let hit = row.iter().position(|&v| v == max) == Some(t);
    let target = row[t].to_f64();
    let sum = if grad {
        T::exp_sum::<true>(row, max)
    } else {
        T::exp_sum::<false>(row, max)
    };
    let nll = max.to_f64() + sum.ln() - target;
    if grad {
        T::scale(row, T::from_f64(w / sum));
        row[t] -= T::from_f64(w);
    }
    (nll, hit)
}

impl CustomOp2 for FusedCe {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(w)) => self.run(h, l1, w, l2),
            (CpuStorage::F64(h), CpuStorage::F64(w)) => self.run(h, l1, w, l2),
            _ => bail!("lm-head-cross-entropy: needs f32 or f64 operands of one dtype"),
        }
    }

    fn bwd(
        &self,
        _hidden: &Tensor,
        _head: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let saved = lock(&self.saved)?;
        let scale = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            match t {
                Some(t) if g == 1.0 => Ok(Some(t.clone())),
                Some(t) => Ok(Some((t * g)?)),
                None => Ok(None),
            }
        };
        Ok((scale(&saved.d_hidden)?, scale(&saved.d_head)?))
    }
}

/// Row kernels of the softmax pass.
trait CeFloat: BlasFloat {
    fn row_max(row: &[Self]) -> Self;
    /// `Σ exp(x − shift)` in f64; with `WRITE` each `x` becomes `exp(x − shift)`.
    fn exp_sum<const WRITE: bool>(row: &mut [Self], shift: Self) -> f64;
    fn scale(row: &mut [Self], s: Self);
}

/// Lanes of the reductions: independent accumulators let the compiler vectorize them.
const LANES: usize = 16;

impl CeFloat for f32 {
    fn row_max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut it = row.chunks_exact(LANES);
        for c in &mut it {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = a.max(v);
            }
        }
        let m = it
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        acc.iter().fold(m, |m, &v| m.max(v))
    }

    fn exp_sum<const WRITE: bool>(row: &mut [f32], shift: f32) -> f64 {
        let mut acc = [0f32; LANES];
        let mut it = row.chunks_exact_mut(LANES);
        for c in &mut it {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                let e = exp_f32(*v - shift);
                if WRITE {
                    *v = e;
                }
                *a += e;
            }
        }
        let mut sum = 0f64;
        for v in it.into_remainder() {
            let e = exp_f32(*v - shift);
            if WRITE {
                *v = e;
            }
            sum += e as f64;
        }
        sum + acc.iter().map(|&a| a as f64).sum::<f64>()
    }

    fn scale(row: &mut [f32], s: f32) {
        row.iter_mut().for_each(|v| *v *= s);
    }
}

impl CeFloat for f64 {
    fn row_max(row: &[f64]) -> f64 {
        row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v))
    }

    fn exp_sum<const WRITE: bool>(row: &mut [f64], shift: f64) -> f64 {
        let mut sum = 0f64;
        for v in row.iter_mut() {
            let e = (*v - shift).exp();
            if WRITE {
                *v = e;
            }
            sum += e;
        }
        sum
    }

    fn scale(row: &mut [f64], s: f64) {
        row.iter_mut().for_each(|v| *v *= s);
    }
}

/// `exp(x)` for f32 within 2 ulp, written so loops over it vectorize: libm's `expf` is a call
/// per element, and the softmax pass takes one exp per logit (100M per step). Cephes' `expf`:
/// `x = k·ln2 + r` with `|r| ≤ ln2/2`, a degree-7 polynomial for `exp(r)`, and `2^k` built from
/// its exponent bits. Inputs are clamped to [-87, 88] (results saturate near 0 and 1.6e38);
/// NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer that lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * (r * r) + r + 1.0;
    let ki = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits(((ki + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_grad_error;
    use crate::ops::gradcheck::{max_diff, randn};
    use candle_core::Var;

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Targets, and weights with some zeros (prompt tokens) and fractional values.
    fn batch(n: usize, vocab: u32) -> (Tensor, Tensor) {
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab).collect();
        let w: Vec<f32> = (0..n)
            .map(|i| match i % 4 {
                0 => 0.0,
                1 => 0.5,
                _ => 1.0,
            })
            .collect();
        (
            Tensor::from_vec(t, n, &Device::Cpu).unwrap(),
            Tensor::from_vec(w, n, &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn forward_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
            let (n, h, v) = (37, 16, 101);
            let hidden = randn(&[n, h], dtype);
            let head = randn(&[v, h], dtype);
            let (t, w) = batch(n, v as u32);
            for chunk in [1, 5, 256] {
                let (got, s) =
                    lm_head_cross_entropy_chunked(&hidden, &head, &t, &w, chunk).unwrap();
                let (want, rs) = lm_head_cross_entropy_reference(&hidden, &head, &t, &w).unwrap();
                let (g, wv) = (scalar(&got), scalar(&want));
                assert!((g - wv).abs() <= tol * wv.abs().max(1.0), "{g} vs {wv}");
                assert_eq!(s, rs);
                assert_eq!(got.dtype(), dtype);
            }
        }
    }

    #[test]
    fn accuracy_counts_argmax_hits_among_weighted_rows() {
        // head = identity: the argmax of row i is the position of h_i's largest entry.
        let v = 4;
        let head = Tensor::eye(v, DType::F32, &Device::Cpu).unwrap();
        let hidden = Tensor::new(
            &[
                [5f32, 0., 0., 0.],
                [0., 5., 0., 0.],
                [0., 0., 5., 0.],
                [0., 0., 0., 5.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        // rows 0, 1 right; row 2 wrong; row 3 right but unweighted (and its target out of range)
        let t = Tensor::new(&[0u32, 1, 0, 99], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2., 1., 0.], &Device::Cpu).unwrap();
        let (_, s) = lm_head_cross_entropy(&hidden, &head, &t, &w).unwrap();
        assert_eq!(
            s,
            CeStats {
                correct: 2,
                counted: 3,
                weight_sum: 4.0
            }
        );
        assert!((s.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        let (_, rs) = lm_head_cross_entropy_reference(&hidden, &head, &t, &w).unwrap();
        assert_eq!(s, rs);
    }

    #[test]
    fn accepts_batched_rows_and_i64_ignore_index() {
        let hidden = randn(&[2, 3, 8], DType::F32);
        let head = randn(&[10, 8], DType::F32);
        let t = Tensor::new(&[[1i64, -100, 3], [4, 5, -100]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1f32, 0., 1.], [1., 1., 0.]], &Device::Cpu).unwrap();
        let (got, s) = lm_head_cross_entropy(&hidden, &head, &t, &w).unwrap();
        let flat_t = Tensor::new(&[1u32, 0, 3, 4, 5, 0], &Device::Cpu).unwrap();
        let (want, rs) = lm_head_cross_entropy_reference(
            &hidden.reshape((6, 8)).unwrap(),
            &head,
            &flat_t,
            &w.flatten_all().unwrap(),
        )
        .unwrap();
        assert!((scalar(&got) - scalar(&want)).abs() < 1e-4);
        assert_eq!((s, s.counted), (rs, 4));
    }

    #[test]
    fn rejects_bad_targets_and_shapes() {
        let hidden = randn(&[3, 4], DType::F32);
        let head = randn(&[5, 4], DType::F32);
        let w = Tensor::new(&[1f32, 1., 1.], &Device::Cpu).unwrap();
        let bad = Tensor::new(&[0u32, 5, 1], &Device::Cpu).unwrap();
        assert!(lm_head_cross_entropy(&hidden, &head, &bad, &w).is_err());
        let short = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(lm_head_cross_entropy(&hidden, &head, &short, &w).is_err());
        let narrow_head = randn(&[5, 3], DType::F32);
        let t = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        assert!(lm_head_cross_entropy(&hidden, &narrow_head, &t, &w).is_err());
    }

    #[test]
    fn all_rows_unweighted_gives_zero() {
        let hidden = Var::from_tensor(&randn(&[3, 4], DType::F32)).unwrap();
        let head = randn(&[5, 4], DType::F32);
        let t = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let w = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let (loss, s) = lm_head_cross_entropy(hidden.as_tensor(), &head, &t, &w).unwrap();
        assert_eq!(scalar(&loss), 0.0);
        assert_eq!(s.counted, 0);
        let g = loss.backward().unwrap();
        let dh = g.get(hidden.as_tensor()).unwrap();
        assert_eq!(scalar(&dh.abs().unwrap().sum_all().unwrap()), 0.0);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, h, v) = (7, 5, 11);
        let hidden = randn(&[n, h], DType::F64);
        let head = randn(&[v, h], DType::F64);
        let (t, w) = batch(n, v as u32);
        let loss = |hd: &Tensor, hh: &Tensor| {
            // Scaled, so the upstream gradient is not 1.
            let (l, _) = lm_head_cross_entropy_chunked(hd, hh, &t, &w, 3)?;
            l * 0.7
        };
        let e = max_grad_error(&hidden, |x| loss(x, &head)).unwrap();
        assert!(e < 1e-6, "dhidden error {e}");
        let e = max_grad_error(&head, |x| loss(&hidden, x)).unwrap();
        assert!(e < 1e-6, "dhead error {e}");
    }

    #[test]
    fn f32_gradients_equal_reference_autograd() {
        let (n, h, v) = (19, 8, 67);
        let hv = Var::from_tensor(&randn(&[n, h], DType::F32)).unwrap();
        let wv = Var::from_tensor(&randn(&[v, h], DType::F32)).unwrap();
        let (t, w) = batch(n, v as u32);
        let (hs, ws) = (hv.as_tensor(), wv.as_tensor());
        let ours = (lm_head_cross_entropy_chunked(hs, ws, &t, &w, 4).unwrap().0 / 3.0)
            .unwrap()
            .backward()
            .unwrap();
        let theirs = (lm_head_cross_entropy_reference(hs, ws, &t, &w).unwrap().0 / 3.0)
            .unwrap()
            .backward()
            .unwrap();
        for x in [hs, ws] {
            let d = max_diff(ours.get(x).unwrap(), theirs.get(x).unwrap());
            assert!(d < 1e-5, "gradient differs by {d}");
        }
    }

    #[test]
    fn frozen_head_gets_no_gradient() {
        let hidden = Var::from_tensor(&randn(&[6, 4], DType::F32)).unwrap();
        let head = randn(&[9, 4], DType::F32);
        let (t, w) = batch(6, 9);
        let (loss, _) = lm_head_cross_entropy(hidden.as_tensor(), &head, &t, &w).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(hidden.as_tensor()).is_some());
        assert!(
            g.get(&head).is_none(),
            "a gradient was computed for a frozen head"
        );
        // Serving / evaluation: no graph at all.
        let (loss, _) = lm_head_cross_entropy(&hidden.as_tensor().detach(), &head, &t, &w).unwrap();
        assert!(!loss.track_op());
    }

    /// Peak resident set size of this process since the last reset, in MB (Linux).
    fn peak_rss_mb() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    fn reset_peak_rss() {
        // "5" resets VmHWM to the current RSS (Linux ≥ 4.0); without it the figures are upper
        // bounds.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// Loss forward + backward for a 4 × 512 batch against SmolLM2's head, reference (full
    /// logits, candle ops) vs fused. Run alone, for a meaningful peak RSS:
    /// `cargo test --release -p itamae-daemon --lib ce_bench -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore]
    fn ce_bench() {
        use std::time::Instant;
        println!("OpenBLAS kernels: {}", blas::core_name());
        let (n, h, v) = (2048, 576, 49152);
        let hidden = Var::from_tensor(&(randn(&[n, h], DType::F32) * 0.5).unwrap()).unwrap();
        let head = (randn(&[v, h], DType::F32) * 0.05).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        let all = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        // SFT-like: the first half of every 512-token row is prompt (weight 0).
        let half: Vec<f32> = (0..n)
            .map(|i| if i % 512 < 256 { 0.0 } else { 1.0 })
            .collect();
        let half = Tensor::from_vec(half, n, &Device::Cpu).unwrap();
        let base = peak_rss_mb();
        // Best of 3 (the machine is shared); peak RSS of the first timed run.
        let run = |name: &str, f: &dyn Fn() -> Tensor| {
            let _ = f();
            let (mut fwd, mut total, mut peak, mut value) = (f64::INFINITY, f64::INFINITY, 0., 0.);
            for rep in 0..3 {
                reset_peak_rss();
                let before = peak_rss_mb();
                let st = Instant::now();
                let loss = f();
                fwd = fwd.min(st.elapsed().as_secs_f64());
                let g = loss.backward().unwrap();
                total = total.min(st.elapsed().as_secs_f64());
                drop(g);
                if rep == 0 {
                    peak = peak_rss_mb() - before;
                    value = scalar(&loss);
                }
            }
            println!(
                "{name:<34} fwd {fwd:>6.3} s  fwd+bwd {total:>6.3} s  peak RSS +{peak:>6.0} MB \
                 (loss {value:.4})"
            );
        };
        println!("baseline RSS {base:.0} MB");
        let hs = hidden.as_tensor();
        run("reference (candle, all rows)", &|| {
            lm_head_cross_entropy_reference(hs, &head, &t, &all)
                .unwrap()
                .0
        });
        for chunk in [128, 256, 512] {
            run(&format!("fused, chunk {chunk}, all rows"), &|| {
                lm_head_cross_entropy_chunked(hs, &head, &t, &all, chunk)
                    .unwrap()
                    .0
            });
        }
        run("fused, chunk 256, half the rows", &|| {
            lm_head_cross_entropy(hs, &head, &t, &half).unwrap().0
        });
        let headv = Var::from_tensor(&head).unwrap();
        run("fused, chunk 256, trained head", &|| {
            lm_head_cross_entropy(hs, headv.as_tensor(), &t, &all)
                .unwrap()
                .0
        });
    }
}
