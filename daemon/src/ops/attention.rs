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
    /// Row log-sum-exps saved by the forward for the backward, `(b, n_head, l)`.
    lse: Mutex<Vec<f64>>,
}

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

impl FusedAttention {
    /// `segments`: for packed rows, the example id of each query position, `(b, l)` flattened.
    pub(crate) fn new(scale: f64, offset: usize, segments: Option<Vec<u32>>) -> Self {
        Self {
            scale,
            offset,
            segments,
            lse: Mutex::new(Vec::new()),
        }
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

    /// Scaled, masked scores of one head into `s` (`l × t`); masked entries are -inf.
    fn scores<T: BlasFloat>(
        &self,
        dm: Dims,
        bi: usize,
        q: &[T],
        k: &[T],
        s: &mut [T],
    ) -> Result<()> {
        let (l, t, d) = (dm.l, dm.t, dm.d);
        gemm(
            T::from_f64(self.scale),
            Mat::new(q, l, d),
            Mat::new(k, t, d).t(),
            T::from_f64(0.0),
            s,
            t,
        )?;
        let neg = T::from_f64(f64::NEG_INFINITY);
        s.par_chunks_mut(t).enumerate().for_each(|(i, row)| {
            // Keys past the query's own position are always hidden; only packed rows need the
            // per-key check.
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
        let mut s = vec![T::from_f64(0.0); l * t];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / rep;
                let qh = &q[((bi * nh + h) * l) * d..][..l * d];
                let kg = &k[((bi * nkv + g) * t) * d..][..t * d];
                let vg = &v[((bi * nkv + g) * t) * d..][..t * d];
                self.scores(dm, bi, qh, kg, &mut s)?;
                let lse_h = &mut lse[(bi * nh + h) * l..][..l];
                s.par_chunks_mut(t)
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
                let oh = &mut out[((bi * nh + h) * l) * d..][..l * d];
                gemm(
                    T::from_f64(1.0),
                    Mat::new(&s, l, t),
                    Mat::new(vg, t, d),
                    T::from_f64(0.0),
                    oh,
                    d,
                )?;
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
        let mut p = vec![zero; l * t];
        let mut dp = vec![zero; l * t];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / rep;
                let qo = ((bi * nh + h) * l) * d;
                let ko = ((bi * nkv + g) * t) * d;
                let (qh, kg, vg) = (&q[qo..][..l * d], &k[ko..][..t * d], &v[ko..][..t * d]);
                let (oh, goh) = (&o[qo..][..l * d], &go[qo..][..l * d]);
                self.scores(dm, bi, qh, kg, &mut p)?;
                let lse_h = &lse[(bi * nh + h) * l..][..l];
                p.par_chunks_mut(t)
                    .zip(lse_h.par_iter())
                    .for_each(|(row, &lse)| {
                        for x in row.iter_mut() {
                            *x = T::from_f64(exp::<T>(x.to_f64() - lse));
                        }
                    });
                // dV_g += Pᵀ·dO ; dP = dO·V_gᵀ
                gemm(
                    one,
                    Mat::new(&p, l, t).t(),
                    Mat::new(goh, l, d),
                    one,
                    &mut gv[ko..][..t * d],
                    d,
                )?;
                gemm(
                    one,
                    Mat::new(goh, l, d),
                    Mat::new(vg, t, d).t(),
                    zero,
                    &mut dp,
                    t,
                )?;
                // dS = P ∘ (dP − rowsum(dO ∘ O))
                dp.par_chunks_mut(t)
                    .zip(p.par_chunks(t))
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
                    Mat::new(&dp, l, t),
                    Mat::new(kg, t, d),
                    zero,
                    &mut gq[qo..][..l * d],
                    d,
                )?;
                gemm(
                    sc,
                    Mat::new(&dp, l, t).t(),
                    Mat::new(qh, l, d),
                    one,
                    &mut gk[ko..][..t * d],
                    d,
                )?;
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
    let op = FusedAttention {
        scale,
        offset,
        segments: segments.map(|s| s.concat()),
        lse: Mutex::new(Vec::new()),
    };
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
        let got = fused_attention(&q, &k, &v, off, None, 0.35).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let seg = vec![vec![0, 0, 1, 1, 1], vec![0, 1, 1, 2, 2]];
        let mask = packed_mask(&seg, off).to_dtype(DType::F32).unwrap();
        let want = attention(&q, &k, &v, Some(&mask), 0.35).unwrap();
        let got = fused_attention(&q, &k, &v, off, Some(&seg), 0.35).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (b, nh, nkv, l, off, d) = (2, 4, 2, 4, 2, 3);
        let q = randn(&[b, nh, l, d], DType::F64);
        let k = randn(&[b, nkv, off + l, d], DType::F64);
        let v = randn(&[b, nkv, off + l, d], DType::F64);
        let seg = vec![vec![0, 0, 1, 1], vec![0, 0, 0, 0]];
        for segs in [None, Some(seg.as_slice())] {
            let f = |q: &Tensor, k: &Tensor, v: &Tensor| fused_attention(q, k, v, off, segs, 0.5);
            for (name, e) in [
                ("q", max_grad_error(&q, |q| f(q, &k, &v)).unwrap()),
                ("k", max_grad_error(&k, |k| f(&q, k, &v)).unwrap()),
                ("v", max_grad_error(&v, |v| f(&q, &k, v)).unwrap()),
            ] {
                assert!(e < 1e-6, "d{name} error {e}");
            }
        }
    }
}
