//! Fused causal attention for training: `softmax(scale·Q·Kᵀ + mask)·V` per head with an analytic
//! backward that recomputes the probabilities from the saved row log-sum-exps instead of keeping
//! the `l × t` score, mask and softmax tensors of every layer alive until the backward pass
//! (the composed graph keeps five of them per layer). GEMMs go through BLAS; rows of a head are
//! independent, so the softmax work is spread over rayon threads.
//!
//! Mask: key `j` is visible to query `i` when `j < offset` (a prefix or cached positions: always
//! visible) or `j − offset ≤ i` and, for packed rows, both tokens belong to the same example.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::blas::{gemm, BlasFloat, Mat};
use super::{cpu_slice as slice, to_flat_vec};

pub(crate) struct FusedAttention {
    scale: f64,
    /// Keys before this index are visible to every query.
    offset: usize,
    /// Packed rows: example id of each query position, `(b, l)` flattened.
    segments: Option<Vec<u32>>,
    /// Query rows per block (see [`ROW_BLOCK`]).
    block: usize,
    /// Row log-sum-exps saved by the forward for the backward, `(b, n_head, l)`.
    lse: Mutex<Vec<f64>>,
}

/// Queries are taken in blocks of this many rows, and a block only multiplies against the keys
/// its last row can see (`offset + r1`): the causal upper triangle is never computed, which
/// saves close to half of the attention GEMMs and softmax work at 512 tokens (the full square
/// was about a fifth of a SmolLM2 training step). Blocks of 128 keep each GEMM large enough for
/// BLAS to run at full speed.
pub(crate) const ROW_BLOCK: usize = 128;

/// `eˣ` at the precision of `T`: the fast f32 exponential for f32 (the softmax is most of this
/// op's non-GEMM time), libm's f64 one otherwise (gradient checks run in f64).
#[inline(always)]
fn exp<T: WithDType>(x: f64) -> f64 {
    if T::DTYPE == DType::F32 {
        super::loss::exp_f32(x as f32) as f64
    } else {
        x.exp()
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    /// Queries per row.
    pub l: usize,
    /// Keys per row (`offset + l`).
    pub t: usize,
    pub d: usize,
}

pub(crate) use Dims as AttentionDims;

/// One block of query rows `r0..r1` and the `w` keys they can see at all.
#[derive(Clone, Copy)]
struct RowBlock {
    r0: usize,
    r1: usize,
    w: usize,
}

impl RowBlock {
    fn rows(&self) -> usize {
        self.r1 - self.r0
    }
}

/// A row-major `rows × cols` operand with leading dimension `ld`.
fn strided<T>(data: &[T], rows: usize, cols: usize, ld: usize) -> Mat<'_, T> {
    Mat {
        data,
        rows,
        cols,
        ld,
        trans: false,
    }
}

impl FusedAttention {
    /// `segments`: for packed rows, the example id of each query position, `(b, l)` flattened.
    pub(crate) fn new(scale: f64, offset: usize, segments: Option<Vec<u32>>) -> Self {
        Self::with_block(scale, offset, segments, ROW_BLOCK)
    }

    fn with_block(scale: f64, offset: usize, segments: Option<Vec<u32>>, block: usize) -> Self {
        Self {
            scale,
            offset,
            segments,
            block: block.max(1),
            lse: Mutex::new(Vec::new()),
        }
    }

    /// The row blocks of `dm` in order.
    fn blocks(&self, dm: Dims) -> impl Iterator<Item = RowBlock> + '_ {
        (0..dm.l).step_by(self.block).map(move |r0| {
            let r1 = (r0 + self.block).min(dm.l);
            RowBlock {
                r0,
                r1,
                w: (self.offset + r1).min(dm.t),
            }
        })
    }

    fn visible(&self, bi: usize, i: usize, j: usize, l: usize) -> bool {
        if j < self.offset {
            return true;
        }
        let jj = j - self.offset;
        if jj > i {
            return false;
        }
        match &self.segments {
            Some(s) => s[bi * l + i] == s[bi * l + jj],
            None => true,
        }
    }

    /// Scaled, masked scores of one head's row block into `s` (`rows × w`, compact); `q` is the
    /// head's whole query matrix, `k` its keys. Masked entries are -inf.
    fn scores<T: BlasFloat>(
        &self,
        dm: Dims,
        bi: usize,
        rb: RowBlock,
        q: &[T],
        k: &[T],
        s: &mut [T],
    ) -> Result<()> {
        let (l, d, w) = (dm.l, dm.d, rb.w);
        gemm(
            T::from_f64(self.scale),
            Mat::new(&q[rb.r0 * d..rb.r1 * d], rb.rows(), d),
            Mat::new(&k[..w * d], w, d).t(),
            T::from_f64(0.0),
            s,
            w,
        )?;
        let neg = T::from_f64(f64::NEG_INFINITY);
        s.par_chunks_mut(w).enumerate().for_each(|(ii, row)| {
            // Keys past the query's own position are always hidden; only packed rows need the
            // per-key check.
            let i = rb.r0 + ii;
            let last = self.offset + i;
            for x in row.iter_mut().skip(last + 1) {
                *x = neg;
            }
            if self.segments.is_some() {
                for (j, x) in row.iter_mut().enumerate().take(last + 1) {
                    if !self.visible(bi, i, j, l) {
                        *x = neg;
                    }
                }
            }
        });
        Ok(())
    }

    pub(crate) fn forward<T: BlasFloat>(
        &self,
        dm: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Vec<T>> {
        let Dims {
            b,
            nh,
            nkv,
            l,
            t,
            d,
        } = dm;
        let rep = nh / nkv;
        let mut out = vec![T::from_f64(0.0); b * nh * l * d];
        let mut lse = vec![0f64; b * nh * l];
        let mut s = vec![T::from_f64(0.0); self.block.min(l.max(1)) * t];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / rep;
                let qh = &q[((bi * nh + h) * l) * d..][..l * d];
                let kg = &k[((bi * nkv + g) * t) * d..][..t * d];
                let vg = &v[((bi * nkv + g) * t) * d..][..t * d];
                for rb in self.blocks(dm) {
                    let w = rb.w;
                    let sb = &mut s[..rb.rows() * w];
                    self.scores(dm, bi, rb, qh, kg, sb)?;
                    let lse_h = &mut lse[(bi * nh + h) * l + rb.r0..][..rb.rows()];
                    sb.par_chunks_mut(w)
                        .zip(lse_h.par_iter_mut())
                        .for_each(|(row, lse)| {
                            let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.to_f64()));
                            let mut sum = 0f64;
                            for x in row.iter_mut() {
                                let e = exp::<T>(x.to_f64() - m);
                                sum += e;
                                *x = T::from_f64(e);
                            }
                            for x in row.iter_mut() {
                                *x = T::from_f64(x.to_f64() / sum);
                            }
                            *lse = m + sum.ln();
                        });
                    let oh = &mut out[((bi * nh + h) * l + rb.r0) * d..][..rb.rows() * d];
                    gemm(
                        T::from_f64(1.0),
                        strided(sb, rb.rows(), w, w),
                        Mat::new(&vg[..w * d], w, d),
                        T::from_f64(0.0),
                        oh,
                        d,
                    )?;
                }
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<T: BlasFloat>(
        &self,
        dm: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        go: &[T],
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let Dims {
            b,
            nh,
            nkv,
            l,
            t,
            d,
        } = dm;
        let rep = nh / nkv;
        let zero = T::from_f64(0.0);
        let one = T::from_f64(1.0);
        let sc = T::from_f64(self.scale);
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if lse.len() != b * nh * l {
            candle_core::bail!("fused attention: backward without a matching forward");
        }
        let mut gq = vec![zero; q.len()];
        let mut gk = vec![zero; k.len()];
        let mut gv = vec![zero; v.len()];
        let cap = self.block.min(l.max(1)) * t;
        let mut p = vec![zero; cap];
        let mut dp = vec![zero; cap];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / rep;
                let qo = ((bi * nh + h) * l) * d;
                let ko = ((bi * nkv + g) * t) * d;
                let (qh, kg, vg) = (&q[qo..][..l * d], &k[ko..][..t * d], &v[ko..][..t * d]);
                for rb in self.blocks(dm) {
                    let (w, n) = (rb.w, rb.rows());
                    let (oh, goh) = (
                        &o[qo + rb.r0 * d..][..n * d],
                        &go[qo + rb.r0 * d..][..n * d],
                    );
                    let qb = &qh[rb.r0 * d..rb.r1 * d];
                    let pb = &mut p[..n * w];
                    let dpb = &mut dp[..n * w];
                    self.scores(dm, bi, rb, qh, kg, pb)?;
                    let lse_h = &lse[(bi * nh + h) * l + rb.r0..][..n];
                    pb.par_chunks_mut(w)
                        .zip(lse_h.par_iter())
                        .for_each(|(row, &lse)| {
                            for x in row.iter_mut() {
                                *x = T::from_f64(exp::<T>(x.to_f64() - lse));
                            }
                        });
                    // dV_g += Pᵀ·dO ; dP = dO·V_gᵀ (over the block's visible keys)
                    gemm(
                        one,
                        strided(pb, n, w, w).t(),
                        Mat::new(goh, n, d),
                        one,
                        &mut gv[ko..][..w * d],
                        d,
                    )?;
                    gemm(
                        one,
                        Mat::new(goh, n, d),
                        Mat::new(&vg[..w * d], w, d).t(),
                        zero,
                        dpb,
                        w,
                    )?;
                    // dS = P ∘ (dP − rowsum(dO ∘ O))
                    dpb.par_chunks_mut(w)
                        .zip(pb.par_chunks(w))
                        .enumerate()
                        .for_each(|(i, (dprow, prow))| {
                            let di: f64 = (0..d)
                                .map(|c| goh[i * d + c].to_f64() * oh[i * d + c].to_f64())
                                .sum();
                            for (x, pv) in dprow.iter_mut().zip(prow) {
                                *x = T::from_f64(pv.to_f64() * (x.to_f64() - di));
                            }
                        });
                    // dQ = scale·dS·K_g ; dK_g += scale·dSᵀ·Q
                    gemm(
                        sc,
                        strided(dpb, n, w, w),
                        Mat::new(&kg[..w * d], w, d),
                        zero,
                        &mut gq[qo + rb.r0 * d..][..n * d],
                        d,
                    )?;
                    gemm(
                        sc,
                        strided(dpb, n, w, w).t(),
                        Mat::new(qb, n, d),
                        one,
                        &mut gk[ko..][..w * d],
                        d,
                    )?;
                }
            }
        }
        Ok((gq, gk, gv))
    }
}

fn dims(q: &Layout, k: &Layout) -> Result<Dims> {
    let (b, nh, l, d) = q.shape().dims4()?;
    let (kb, nkv, t, kd) = k.shape().dims4()?;
    if kb != b || kd != d || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "fused attention: q {:?} and k {:?} do not fit",
            q.shape(),
            k.shape()
        );
    }
    Ok(Dims {
        b,
        nh,
        nkv,
        l,
        t,
        d,
    })
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(l1, l2)?;
        if l3.shape() != l2.shape() {
            candle_core::bail!(
                "fused attention: v {:?} differs from k {:?}",
                l3.shape(),
                l2.shape()
            );
        }
        if dm.t < dm.l + self.offset {
            candle_core::bail!(
                "fused attention: {} keys for {} queries at offset {}",
                dm.t,
                dm.l,
                self.offset
            );
        }
        let shape = l1.shape().clone();
        match s1.dtype() {
            DType::F32 => {
                let o = self.forward::<f32>(
                    dm,
                    slice(s1, l1, "fused attention")?,
                    slice(s2, l2, "fused attention")?,
                    slice(s3, l3, "fused attention")?,
                )?;
                Ok((CpuStorage::F32(o), shape))
            }
            DType::F64 => {
                let o = self.forward::<f64>(
                    dm,
                    slice(s1, l1, "fused attention")?,
                    slice(s2, l2, "fused attention")?,
                    slice(s3, l3, "fused attention")?,
                )?;
                Ok((CpuStorage::F64(o), shape))
            }
            other => candle_core::bail!("fused attention: unsupported dtype {other:?}"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = dims(q.layout(), k.layout())?;
        fn run<T: BlasFloat>(
            op: &FusedAttention,
            dm: Dims,
            ts: [&Tensor; 5],
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let v: Vec<Vec<T>> = ts
                .iter()
                .map(|t| to_flat_vec::<T>(t))
                .collect::<Result<_>>()?;
            let (gq, gk, gv) = op.backward(dm, &v[0], &v[1], &v[2], &v[3], &v[4])?;
            let dev = ts[0].device();
            Ok((
                Tensor::from_vec(gq, ts[0].shape(), dev)?,
                Tensor::from_vec(gk, ts[1].shape(), dev)?,
                Tensor::from_vec(gv, ts[2].shape(), dev)?,
            ))
        }
        let ts = [q, k, v, res, grad];
        let (gq, gk, gv) = match q.dtype() {
            DType::F32 => run::<f32>(self, dm, ts)?,
            DType::F64 => run::<f64>(self, dm, ts)?,
            other => candle_core::bail!("fused attention: unsupported dtype {other:?}"),
        };
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

/// Fused attention: `q (b, n_head, l, d)`, `k`/`v (b, n_kv, offset + l, d)`; `segments`: for
/// packed rows, the example id of each of the `l` positions per row.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    segments: Option<&[Vec<u32>]>,
    scale: f64,
) -> Result<Tensor> {
    fused_attention_blocked(q, k, v, offset, segments, scale, ROW_BLOCK)
}

/// [`fused_attention`] with query blocks of `block` rows (tests use small ones so that tiny
/// shapes cross block edges).
fn fused_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    segments: Option<&[Vec<u32>]>,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    let op = FusedAttention::with_block(scale, offset, segments.map(|s| s.concat()), block);
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_grad_error;
    use crate::ops::gradcheck::{max_diff, randn};
    use crate::ops::{attention, causal_mask};
    use candle_core::Device;

    /// Reference mask for packed rows with a visible prefix, `(b, l, offset + l)`.
    fn packed_mask(segments: &[Vec<u32>], offset: usize) -> Tensor {
        let (b, l) = (segments.len(), segments[0].len());
        let mut m = Vec::new();
        for s in segments {
            for i in 0..l {
                for j in 0..offset + l {
                    let ok = j < offset || (j - offset <= i && s[j - offset] == s[i]);
                    m.push(if ok { 0f64 } else { f64::NEG_INFINITY });
                }
            }
        }
        Tensor::from_vec(m, (b, l, offset + l), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_composed_attention() {
        let (b, nh, nkv, l, off, d) = (2, 6, 2, 5, 3, 8);
        let q = randn(&[b, nh, l, d], DType::F32);
        let k = randn(&[b, nkv, off + l, d], DType::F32);
        let v = randn(&[b, nkv, off + l, d], DType::F32);
        let mask = causal_mask(l, off, DType::F32, &Device::Cpu).unwrap();
        let want = attention(&q, &k, &v, Some(&mask), 0.35).unwrap();
        let seg = vec![vec![0, 0, 1, 1, 1], vec![0, 1, 1, 2, 2]];
        let pmask = packed_mask(&seg, off).to_dtype(DType::F32).unwrap();
        let pwant = attention(&q, &k, &v, Some(&pmask), 0.35).unwrap();
        // one block, blocks that do and do not divide l, one row per block
        for block in [ROW_BLOCK, 2, 3, 1] {
            let got = fused_attention_blocked(&q, &k, &v, off, None, 0.35, block).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "block {block}");
            let got = fused_attention_blocked(&q, &k, &v, off, Some(&seg), 0.35, block).unwrap();
            assert!(max_diff(&got, &pwant) < 1e-5, "packed, block {block}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (b, nh, nkv, l, off, d) = (2, 4, 2, 4, 2, 3);
        let q = randn(&[b, nh, l, d], DType::F64);
        let k = randn(&[b, nkv, off + l, d], DType::F64);
        let v = randn(&[b, nkv, off + l, d], DType::F64);
        let seg = vec![vec![0, 0, 1, 1], vec![0, 0, 0, 0]];
        for (segs, block) in [None, Some(seg.as_slice())]
            .into_iter()
            .flat_map(|s| [(s, ROW_BLOCK), (s, 3), (s, 1)])
        {
            let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
                fused_attention_blocked(q, k, v, off, segs, 0.5, block)
            };
            for (name, e) in [
                ("q", max_grad_error(&q, |q| f(q, &k, &v)).unwrap()),
                ("k", max_grad_error(&k, |k| f(&q, k, &v)).unwrap()),
                ("v", max_grad_error(&v, |v| f(&q, &k, v)).unwrap()),
            ] {
                assert!(e < 1e-6, "d{name} error {e} (block {block})");
            }
        }
    }
}
