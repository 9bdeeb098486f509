//! `y = x · Wᵀ (+ b)` on BLAS, with a backward that computes only the gradients needed.
//!
//! candle's matmul backward always computes the gradient of both operands, so with a frozen
//! weight (LoRA, prompt and prefix tuning) half of the backward GEMMs are thrown away
//! (REFERENCE.md §2). Here the op's backward looks at which operands take part in the gradient:
//! `dX = dY · W` only when `x` tracks, `dW = dYᵀ · X` only when `w` tracks, `db = Σ_rows dY`
//! only when `b` tracks.
//!
//! CPU f32/f64 go through BLAS when [`blas::preferred`] (tuned kernels that passed their
//! self-check); every other device, dtype or odd shape falls back to candle's composed matmul,
//! so the CUDA build keeps working.
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::blas::{self, BlasFloat, Operand};

/// `x · wᵀ (+ b)` for `x` of any rank `(..., in)` and `w` of shape `(out, in)`, `b` of `(out)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let Some(&in_dim) = dims.last() else {
        bail!("linear: input must have at least one dimension")
    };
    let rows = x.elem_count() / in_dim.max(1);
    let x2 = x.reshape((rows, in_dim))?;
    let y = if blas_applies(&x2, w, b) {
        linear_blas(&x2, w, b)?
    } else {
        linear_composed(&x2, w, b)?
    };
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

/// candle's own matmul (and its autograd): the fallback and the reference in tests.
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// CPU, f32 or f64 throughout, the shapes of a plain linear layer, and tuned BLAS kernels.
fn blas_applies(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let dtype = x.dtype();
    let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == dtype;
    let shapes = match (x.dims(), w.dims()) {
        ([_, k], [n, k2]) if k == k2 => match b {
            Some(b) => b.dims() == [*n],
            None => true,
        },
        _ => false,
    };
    matches!(dtype, DType::F32 | DType::F64)
        && cpu(x)
        && cpu(w)
        && b.is_none_or(cpu)
        && shapes
        && blas::preferred()
}

/// The BLAS op for a 2-D `x`. Callers check [`blas_applies`] first; the op itself errors on
/// anything it cannot run.
pub fn linear_blas(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    match (b, tracked) {
        (None, false) => x.apply_op2_no_bwd(w, &Linear),
        (None, true) => x.apply_op2(w, Linear),
        (Some(b), false) => x.apply_op3_no_bwd(w, b, &Linear),
        (Some(b), true) => x.apply_op3(w, b, Linear),
    }
}

struct Linear;

fn forward<T: BlasFloat>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    bias: Option<(&[T], &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let x = Operand::new(x, lx)?;
    let w = Operand::new(w, lw)?;
    let (xm, wm) = (x.mat(), w.mat());
    let (m, n) = (xm.rows, wm.rows);
    let mut y = vec![T::zero(); m * n];
    let beta = match bias {
        Some((b, lb)) => {
            // Seed every row with the bias and let the GEMM accumulate onto it (beta = 1):
            // saves a separate broadcast pass over the output.
            let b = bias_values(b, lb, n)?;
            for row in y.chunks_exact_mut(n.max(1)) {
                row.copy_from_slice(&b);
            }
            T::one()
        }
        None => T::zero(),
    };
    blas::gemm(T::one(), xm, wm.t(), beta, &mut y, n.max(1))?;
    Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
}

fn bias_values<T: Copy>(b: &[T], lb: &Layout, n: usize) -> Result<Vec<T>> {
    if lb.dims() != [n] {
        bail!("linear: bias of shape {:?}, expected [{n}]", lb.dims())
    }
    let stride = lb.stride()[0];
    (0..n)
        .map(|j| match b.get(lb.start_offset() + j * stride) {
            Some(v) => Ok(*v),
            None => bail!("linear: bias layout reaches past its storage"),
        })
        .collect()
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "blas-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => forward(x, l1, w, l2, None),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => forward(x, l1, w, l2, None),
            _ => bail!("blas-linear: needs f32 or f64 operands of one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "blas-linear-bias"
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
        match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                forward(x, l1, w, l2, Some((b, l3)))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                forward(x, l1, w, l2, Some((b, l3)))
            }
            _ => bail!("blas-linear: needs f32 or f64 operands of one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, w, Some(b), dy)
    }
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Gradients of the operands that take part in the backward pass, and only those: a frozen
/// weight (neither a variable nor computed from one) costs no GEMM.
fn backward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor) -> Result<Grads> {
    let dx = if x.track_op() {
        Some(gemm_tensors(dy, false, w, false)?)
    } else {
        None
    };
    let dw = if w.track_op() {
        Some(gemm_tensors(dy, true, x, false)?)
    } else {
        None
    };
    let db = match b {
        Some(b) if b.track_op() => Some(dy.sum(0)?),
        _ => None,
    };
    Ok((dx, dw, db))
}

/// `op(a) · op(b)` of two 2-D CPU tensors through BLAS, with no autograd of its own (backward
/// results are leaves of the gradient store).
pub fn gemm_tensors(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &Gemm { ta, tb })
}

struct Gemm {
    ta: bool,
    tb: bool,
}

impl Gemm {
    fn run<T: BlasFloat>(
        &self,
        a: &[T],
        la: &Layout,
        b: &[T],
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (Operand::new(a, la)?, Operand::new(b, lb)?);
        let (am, bm) = (a.mat().t_if(self.ta), b.mat().t_if(self.tb));
        let (m, n) = (am.rows, bm.cols);
        let y = blas::matmul(am, bm)?;
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
    }
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "blas-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => self.run(a, l1, b, l2),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => self.run(a, l1, b, l2),
            _ => bail!("blas-gemm: needs f32 or f64 operands of one dtype"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_grad_error;
    use candle_core::Var;

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn forward_matches_candle_matmul() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-12 };
            for rows in [1, 2, 7, 33] {
                let x = randn(&[rows, 19], dtype);
                let w = randn(&[11, 19], dtype);
                let b = randn(&[11], dtype);
                let want = linear_composed(&x, &w, Some(&b)).unwrap();
                assert!(max_diff(&linear_blas(&x, &w, Some(&b)).unwrap(), &want) < tol);
                let want = linear_composed(&x, &w, None).unwrap();
                assert!(max_diff(&linear_blas(&x, &w, None).unwrap(), &want) < tol);
            }
        }
    }

    #[test]
    fn forward_reads_strided_operands() {
        // transposed weight, a column window of x, a broadcast (stride-0) x
        let x = randn(&[5, 12], DType::F32);
        let xw = x.narrow(1, 2, 7).unwrap();
        let wt = randn(&[7, 4], DType::F32).t().unwrap();
        let want = xw.contiguous().unwrap().matmul(&wt.t().unwrap()).unwrap();
        assert!(max_diff(&linear_blas(&xw, &wt, None).unwrap(), &want) < 1e-4);
        let xb = randn(&[1, 7], DType::F32).broadcast_as((6, 7)).unwrap();
        let want = xb.contiguous().unwrap().matmul(&wt.t().unwrap()).unwrap();
        assert!(max_diff(&linear_blas(&xb, &wt, None).unwrap(), &want) < 1e-4);
    }

    #[test]
    fn linear_keeps_leading_dims() {
        let x = randn(&[2, 3, 5], DType::F32);
        let w = randn(&[4, 5], DType::F32);
        let y = linear(&x, &w, None).unwrap();
        assert_eq!(y.dims(), &[2, 3, 4]);
        let want = x
            .reshape((6, 5))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        assert!(max_diff(&y, &want) < 1e-4);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = randn(&[6, 5], DType::F64);
        let w = randn(&[4, 5], DType::F64);
        let b = randn(&[4], DType::F64);
        for (name, e) in [
            (
                "x",
                max_grad_error(&x, |x| linear_blas(x, &w, Some(&b))).unwrap(),
            ),
            (
                "w",
                max_grad_error(&w, |w| linear_blas(&x, w, Some(&b))).unwrap(),
            ),
            (
                "b",
                max_grad_error(&b, |b| linear_blas(&x, &w, Some(b))).unwrap(),
            ),
            ("x (no bias)", {
                max_grad_error(&x, |x| linear_blas(x, &w, None)).unwrap()
            }),
            ("w (no bias)", {
                max_grad_error(&w, |w| linear_blas(&x, w, None)).unwrap()
            }),
            ("x (rank 3)", {
                let x3 = x.reshape((2, 3, 5)).unwrap();
                max_grad_error(&x3, |x| linear(x, &w, Some(&b))).unwrap()
            }),
        ] {
            assert!(e < 1e-6, "d{name} error {e}");
        }
    }

    #[test]
    fn gradients_equal_candle_autograd_in_f32() {
        let xv = Var::from_tensor(&randn(&[9, 8], DType::F32)).unwrap();
        let wv = Var::from_tensor(&randn(&[3, 8], DType::F32)).unwrap();
        let bv = Var::from_tensor(&randn(&[3], DType::F32)).unwrap();
        let r = randn(&[9, 3], DType::F32);
        let (x, w, b) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
        let ours = (linear_blas(x, w, Some(b)).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let theirs = (linear_composed(x, w, Some(b)).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x, w, b] {
            let d = max_diff(ours.get(t).unwrap(), theirs.get(t).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_no_work() {
        // x tracks, w and b are frozen tensors: only dX may be computed.
        let x = Var::from_tensor(&randn(&[4, 6], DType::F32)).unwrap();
        let w = randn(&[5, 6], DType::F32);
        let b = randn(&[5], DType::F32);
        let y = linear_blas(x.as_tensor(), &w, Some(&b)).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(
            g.get(&w).is_none(),
            "a gradient was computed for a frozen W"
        );
        assert!(
            g.get(&b).is_none(),
            "a gradient was computed for a frozen bias"
        );
        // The op's backward returns None for the frozen operands (not a dropped result).
        let (dx, dw, db) = backward(x.as_tensor(), &w, Some(&b), &y).unwrap();
        assert!(dx.is_some() && dw.is_none() && db.is_none());
        // Frozen input (first layer of LoRA): nothing to compute for x either.
        let wv = Var::from_tensor(&w).unwrap();
        let xt = x.as_tensor().detach();
        let (dx, dw, db) = backward(&xt, wv.as_tensor(), None, &y).unwrap();
        assert!(dx.is_none() && dw.is_some() && db.is_none());
    }

    #[test]
    fn serving_path_has_no_graph() {
        let x = randn(&[3, 4], DType::F32);
        let w = randn(&[2, 4], DType::F32);
        assert!(!linear(&x, &w, None).unwrap().track_op());
    }

    #[test]
    fn unsupported_dtypes_fall_back() {
        let x = randn(&[3, 4], DType::BF16);
        let w = randn(&[2, 4], DType::BF16);
        let y = linear(&x, &w, None).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
    }

    /// Forward + backward of a frozen-weight linear (LoRA's base projections) on the model's
    /// shapes, candle's matmul vs the BLAS op. Run with
    /// `cargo test --release -p itamae-daemon --lib linear_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn linear_bench() {
        use std::time::Instant;
        println!("OpenBLAS kernels: {}", blas::core_name());
        for (m, k, n) in [
            (2048, 576, 1536),
            (2048, 1536, 576),
            (2048, 576, 576),
            (2048, 576, 192),
            (1, 576, 1536),
            (1, 1536, 576),
            (1, 576, 49152),
        ] {
            let x = Var::from_tensor(&randn(&[m, k], DType::F32)).unwrap();
            let w = randn(&[n, k], DType::F32);
            let time = |f: &dyn Fn() -> Tensor, train: bool| {
                let reps = if m == 1 { 200 } else { 5 };
                let mut best = f64::INFINITY;
                for _ in 0..reps + 1 {
                    let t = Instant::now();
                    let y = f();
                    if train {
                        y.sum_all().unwrap().backward().unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            let xd = x.as_tensor().detach();
            let flop = 2.0 * (m * k * n) as f64;
            let serve_c = time(&|| linear_composed(&xd, &w, None).unwrap(), false);
            let serve_b = time(&|| linear_blas(&xd, &w, None).unwrap(), false);
            let (xt, wr) = (x.as_tensor(), &w);
            let train_c = time(&|| linear_composed(xt, wr, None).unwrap(), true);
            let train_b = time(&|| linear_blas(xt, wr, None).unwrap(), true);
            println!(
                "{m:>5}x{k:>5}x{n:>5}: fwd candle {:>8.3} ms ({:>5.1} GFLOP/s) blas {:>8.3} ms \
                 ({:>5.1}) | fwd+bwd candle {:>8.3} ms, blas {:>8.3} ms ({:.2}x)",
                serve_c * 1e3,
                flop / serve_c / 1e9,
                serve_b * 1e3,
                flop / serve_b / 1e9,
                train_c * 1e3,
                train_b * 1e3,
                train_c / train_b
            );
        }
    }
}
