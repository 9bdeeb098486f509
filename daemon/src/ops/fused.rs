//! Fused RMSNorm and RoPE with analytic backward, for the training path. The composed versions
//! build five to eight single-threaded elementwise nodes per call (each kept for the backward);
//! these keep only their inputs and run row-parallel with rayon.
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{cpu_slice as slice, to_flat_vec as to_vec};

struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let n = w.len();
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, xr)| {
                let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = T::from_f64(xv.to_f64() * r * wv.to_f64());
                }
            });
        out
    }

    fn bwd<T: WithDType>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let n = w.len();
        let mut dx = vec![T::zero(); x.len()];
        let dw_parts: Vec<Vec<f64>> = dx
            .par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .fold(
                || vec![0f64; n],
                |mut dw, (dxr, (xr, gr))| {
                    let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / n as f64;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    let dot: f64 = (0..n)
                        .map(|j| gr[j].to_f64() * w[j].to_f64() * xr[j].to_f64())
                        .sum();
                    let c = r * r * r * dot / n as f64;
                    for j in 0..n {
                        let (xv, gv) = (xr[j].to_f64(), gr[j].to_f64());
                        dxr[j] = T::from_f64(r * gv * w[j].to_f64() - xv * c);
                        dw[j] += gv * xv * r;
                    }
                    dw
                },
            )
            .collect();
        let mut dw = vec![0f64; n];
        for p in dw_parts {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        (dx, dw.into_iter().map(T::from_f64).collect())
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        if l1.shape().dims().last() != Some(&n) {
            candle_core::bail!("rms norm: x {:?} vs w {:?}", l1.shape(), l2.shape());
        }
        let shape = l1.shape().clone();
        match s1.dtype() {
            DType::F32 => Ok((
                CpuStorage::F32(
                    self.fwd::<f32>(slice(s1, l1, "rms norm")?, slice(s2, l2, "rms norm")?),
                ),
                shape,
            )),
            DType::F64 => Ok((
                CpuStorage::F64(
                    self.fwd::<f64>(slice(s1, l1, "rms norm")?, slice(s2, l2, "rms norm")?),
                ),
                shape,
            )),
            other => candle_core::bail!("rms norm: unsupported dtype {other:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: WithDType>(
            op: &RmsNorm,
            x: &Tensor,
            w: &Tensor,
            g: &Tensor,
        ) -> Result<(Tensor, Tensor)> {
            let (dx, dw) = op.bwd(&to_vec::<T>(x)?, &to_vec::<T>(w)?, &to_vec::<T>(g)?);
            Ok((
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dw, w.shape(), w.device())?,
            ))
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => run::<f32>(self, x, w, g)?,
            DType::F64 => run::<f64>(self, x, w, g)?,
            other => candle_core::bail!("rms norm: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), w.track_op().then_some(dw)))
    }
}

/// RMSNorm over the last dimension with an analytic backward.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// RMSNorm of each `w.len()`-wide row of `x` (for ops that fuse it).
pub(crate) fn rms_norm_rows<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    RmsNorm { eps }.fwd(x, w)
}

/// `(dx, dw)` of [`rms_norm_rows`] for the output gradient `g`.
pub(crate) fn rms_norm_rows_backward<T: WithDType>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    RmsNorm { eps }.bwd(x, w, g)
}

/// Rotate-half RoPE as an op whose backward is the inverse rotation (the same op with `-sin`).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `x (b, h, l, d)`, `cos`/`sin` `(l, d/2)` or `(b, l, d/2)`.
    fn apply<T: WithDType>(
        x: &[T],
        dims: (usize, usize, usize, usize),
        cos: &[T],
        sin: &[T],
        per_batch: bool,
    ) -> Vec<T> {
        let (_, h, l, d) = dims;
        let half = d / 2;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(l * d)
            .zip(x.par_chunks(l * d))
            .enumerate()
            .for_each(|(bh, (o, xs))| {
                let base = if per_batch { (bh / h) * l * half } else { 0 };
                for p in 0..l {
                    let (c, s) = (
                        &cos[base + p * half..][..half],
                        &sin[base + p * half..][..half],
                    );
                    let (xr, orow) = (&xs[p * d..][..d], &mut o[p * d..][..d]);
                    for i in 0..half {
                        let (x1, x2) = (xr[i].to_f64(), xr[i + half].to_f64());
                        let (cv, sv) = (c[i].to_f64(), s[i].to_f64());
                        orow[i] = T::from_f64(x1 * cv - x2 * sv);
                        orow[i + half] = T::from_f64(x2 * cv + x1 * sv);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let per_batch = self.cos.rank() == 3;
        let shape = l.shape().clone();
        match s.dtype() {
            DType::F32 => {
                let (c, si) = (to_vec::<f32>(&self.cos)?, to_vec::<f32>(&self.sin)?);
                Ok((
                    CpuStorage::F32(Self::apply(slice(s, l, "rope")?, dims, &c, &si, per_batch)),
                    shape,
                ))
            }
            DType::F64 => {
                let (c, si) = (to_vec::<f64>(&self.cos)?, to_vec::<f64>(&self.sin)?);
                Ok((
                    CpuStorage::F64(Self::apply(slice(s, l, "rope")?, dims, &c, &si, per_batch)),
                    shape,
                ))
            }
            other => candle_core::bail!("rope: unsupported dtype {other:?}"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Rotate-half RoPE with an analytic backward. `x (b, h, l, d)`; `cos`/`sin` `(l, d/2)`, or
/// `(b, 1, l, d/2)` for per-row positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = if cos.rank() == 4 {
        (cos.squeeze(1)?, sin.squeeze(1)?)
    } else {
        (cos.clone(), sin.clone())
    };
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.contiguous()?.apply_op1(Rope { cos, sin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_grad_error;
    use crate::ops::gradcheck::{max_diff, randn};

    #[test]
    fn rms_norm_matches_reference_and_gradients() {
        let x = randn(&[3, 4, 7], DType::F64);
        let w = randn(&[7], DType::F64);
        let want = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-9);
        assert!(max_grad_error(&x, |x| rms_norm(x, &w, 1e-5)).unwrap() < 1e-6);
        assert!(max_grad_error(&w, |w| rms_norm(&x, w, 1e-5)).unwrap() < 1e-6);
    }

    #[test]
    fn rope_matches_reference_and_gradients() {
        let x = randn(&[2, 3, 4, 8], DType::F64);
        let theta = randn(&[4, 4], DType::F64);
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        let want = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        assert!(max_diff(&rope(&x, &cos, &sin).unwrap(), &want) < 1e-12);
        assert!(max_grad_error(&x, |x| rope(x, &cos, &sin)).unwrap() < 1e-6);
        // per-row positions
        let theta = randn(&[2, 1, 4, 4], DType::F64);
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        let want =
            crate::ops::rope(&candle_core::Var::from_tensor(&x).unwrap(), &cos, &sin).unwrap();
        assert!(max_diff(&rope(&x, &cos, &sin).unwrap(), &want) < 1e-12);
        assert!(max_grad_error(&x, |x| rope(x, &cos, &sin)).unwrap() < 1e-6);
    }
}
