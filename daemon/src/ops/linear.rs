//! `y = x · Wᵀ (+ b)` on BLAS, with a backward that computes only the gradients needed.
//!
//! candle's matmul backward always computes the gradient of both operands, so with a frozen
//! weight (LoRA, prompt and prefix tuning) half of the backward GEMMs are thrown away
//! (docs/candle-notes.md). Here the op's backward looks at which operands take part in the gradient:
//! `dX = dY · W` only when `x` tracks, `dW = dYᵀ · X` only when `w` tracks, `db = Σ_rows dY`
//! only when `b` tracks.
//!
//! CPU f32/f64 go through BLAS when [`blas::preferred`] (tuned kernels that passed their
//! self-check); every other device, dtype or odd shape falls back to candle's composed matmul,
//! so the CUDA build keeps working.
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::blas::{self, BlasFloat, Mat, Operand};

/// `x · wᵀ (+ b)` for `x` of any rank `(..., in)` and `w` of shape `(out, in)`, `b` of `(out)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let Some(&in_dim) = dims.last() else {
        bail!("linear: input must have at least one dimension")
    };
    let rows = x.elem_count() / in_dim.max(1);
    let x2 = x.reshape((rows, in_dim))?;
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    // Training always takes the op (its backward skips frozen weights); serving takes whichever
    // GEMM is faster for the row count.
    let y = if blas_applies(&x2, w, b) && (tracked || blas_serves_rows(rows)) {
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

/// Whether BLAS beats candle's gemm on `rows` rows. Measured on this machine kind (2 cores,
/// AVX-512), `x·Wᵀ` with W 576×1536: one row is a GEMV, 3× faster in OpenBLAS; AVX-512 kernels
/// win at every row count (1.2–1.9×); AVX2 ("Haswell") kernels lose below ~64 rows (42 rows:
/// 121 vs 164 GFLOP/s, 8 rows: 54 vs 67) and tie above.
fn blas_serves_rows(rows: usize) -> bool {
    rows == 1 || rows >= 64 || blas::avx512_kernels()
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

/// A LoRA term on a frozen projection: `scale · ((x ⊙ mask) · Aᵀ) · Bᵀ` (PEFT's
/// `scale · B · A · dropout(x)`).
#[derive(Clone, Copy, Debug)]
pub struct LoraTerm<'a> {
    /// `lora_A`, `(r, in)`.
    pub a: &'a Tensor,
    /// `lora_B`, `(out, r)`.
    pub b: &'a Tensor,
    /// `alpha / r` (or `alpha / √r` for rsLoRA).
    pub scale: f64,
    /// Dropout of the LoRA input: `x`'s shape, entries 0 or `1 / (1 − p)`; None without dropout.
    pub dropout_mask: Option<&'a Tensor>,
}

/// `x · Wᵀ (+ b) + scale · ((x ⊙ mask) · Aᵀ) · Bᵀ` for `x` of any rank `(..., in)`.
///
/// With a frozen `W` (and bias, and mask) on CPU this is one op whose forward is three GEMMs
/// accumulating into one output, and whose backward is GEMMs only: no elementwise pass over
/// the `(rows, out)` output for the scale and the sum, and none of the gradient bookkeeping
/// candle's autograd does for them, per projection and per layer. Anything else (a trained `W`,
/// other devices or dtypes) composes [`linear`] calls with the same result.
pub fn linear_lora(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: &LoraTerm<'_>,
) -> Result<Tensor> {
    let dims = x.dims();
    let Some(&in_dim) = dims.last() else {
        bail!("linear: input must have at least one dimension")
    };
    let rows = x.elem_count() / in_dim.max(1);
    let x2 = x.reshape((rows, in_dim))?;
    let mask = match lora.dropout_mask {
        Some(m) if m.dims() == dims => Some(m.reshape((rows, in_dim))?),
        Some(m) => bail!(
            "linear_lora: dropout mask of shape {:?} for an input of {dims:?}",
            m.dims()
        ),
        None => None,
    };
    let y = if lora_fused_applies(&x2, w, b, lora, mask.as_ref()) {
        let op = LoraLinear {
            w: w.clone(),
            bias: b.cloned(),
            mask,
            scale: lora.scale,
        };
        if x2.track_op() || lora.a.track_op() || lora.b.track_op() {
            x2.apply_op3(lora.a, lora.b, op)?
        } else {
            x2.apply_op3_no_bwd(lora.a, lora.b, &op)?
        }
    } else {
        let xl = match &mask {
            Some(m) => (&x2 * m)?,
            None => x2.clone(),
        };
        let d = linear(&linear(&xl, lora.a, None)?, lora.b, None)?;
        (linear(&x2, w, b)? + (d * lora.scale)?)?
    };
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

fn lora_fused_applies(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: &LoraTerm<'_>,
    mask: Option<&Tensor>,
) -> bool {
    let same = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == x.dtype();
    let (Ok((r, k)), Ok((n, r2)), Ok((_, k2))) = (lora.a.dims2(), lora.b.dims2(), x.dims2()) else {
        return false;
    };
    let frozen = !w.track_op() && !b.is_some_and(|b| b.track_op());
    frozen
        && r == r2
        && k == k2
        && w.dims() == [n, k]
        && same(lora.a)
        && same(lora.b)
        && mask.is_none_or(|m| same(m) && !m.track_op())
        && blas_applies(x, w, b)
}

/// The fused LoRA projection; `x`, `A`, `B` are the op's operands, the frozen rest is captured.
struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scale: f64,
}

impl LoraLinear {
    /// `x ⊙ mask` as a dense row-major `n × in` array (None: no dropout, use `x` itself).
    fn lora_input<T: BlasFloat>(&self, x: &Mat<'_, T>) -> Result<Option<Vec<T>>> {
        let Some(mask) = &self.mask else {
            return Ok(None);
        };
        let (ms, ml) = mask.storage_and_layout();
        let mo = blas::cpu_operand::<T>(&ms, ml)?;
        let m = mo.mat();
        if (m.rows, m.cols) != (x.rows, x.cols) {
            bail!("linear_lora: dropout mask does not match the input")
        }
        let mut out = Vec::with_capacity(x.rows * x.cols);
        for i in 0..x.rows {
            for j in 0..x.cols {
                out.push(x.at(i, j) * m.at(i, j));
            }
        }
        Ok(Some(out))
    }

    fn forward<T: BlasFloat>(
        &self,
        x: &[T],
        lx: &Layout,
        a: &[T],
        la: &Layout,
        b: &[T],
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (
            Operand::new(x, lx)?,
            Operand::new(a, la)?,
            Operand::new(b, lb)?,
        );
        let (xm, am, bm) = (x.mat(), a.mat(), b.mat());
        let (n, k, r, out) = (xm.rows, xm.cols, am.rows, bm.rows);
        let xl = self.lora_input(&xm)?;
        let xl_m = xl.as_deref().map_or(xm, |v| Mat::new(v, n, k));
        let h = blas::matmul(xl_m, am.t())?;
        let mut y = vec![T::zero(); n * out];
        let beta = match &self.bias {
            Some(bias) => {
                let (bs, bl) = bias.storage_and_layout();
                let values = match &*bs {
                    candle_core::Storage::Cpu(c) => {
                        bias_values(T::cpu_storage_as_slice(c)?, bl, out)?
                    }
                    _ => bail!("linear_lora: bias is not on the CPU"),
                };
                for row in y.chunks_exact_mut(out.max(1)) {
                    row.copy_from_slice(&values);
                }
                T::one()
            }
            None => T::zero(),
        };
        let (ws, wl) = self.w.storage_and_layout();
        let w = blas::cpu_operand::<T>(&ws, wl)?;
        blas::gemm(T::one(), xm, w.mat().t(), beta, &mut y, out.max(1))?;
        let s = T::from_f64(self.scale);
        blas::gemm(s, Mat::new(&h, n, r), bm.t(), T::one(), &mut y, out.max(1))?;
        Ok((T::to_cpu_storage_owned(y), Shape::from((n, out))))
    }

    /// dX = dY·W + (s·dY·B)·A ⊙ mask, dA = (s·dY·B)ᵀ·(x ⊙ mask), dB = s·dYᵀ·((x ⊙ mask)·Aᵀ),
    /// each only when its operand tracks.
    fn backward<T: BlasFloat>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<Grads> {
        let (gx, ga, gb) = (x.track_op(), a.track_op(), b.track_op());
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (x_op, a_op, b_op, d_op) = (
            blas::cpu_operand::<T>(&xs, xl)?,
            blas::cpu_operand::<T>(&as_, al)?,
            blas::cpu_operand::<T>(&bs, bl)?,
            blas::cpu_operand::<T>(&ds, dl)?,
        );
        let (xm, am, bm, dym) = (x_op.mat(), a_op.mat(), b_op.mat(), d_op.mat());
        let (n, k, r, out) = (xm.rows, xm.cols, am.rows, bm.rows);
        let s = T::from_f64(self.scale);
        let xl = if ga || gb {
            self.lora_input(&xm)?
        } else {
            None
        };
        let xl_m = xl.as_deref().map_or(xm, |v| Mat::new(v, n, k));
        let cpu = &Device::Cpu;
        let db = if gb {
            let h = blas::matmul(xl_m, am.t())?;
            let mut db = vec![T::zero(); out * r];
            blas::gemm(s, dym.t(), Mat::new(&h, n, r), T::zero(), &mut db, r.max(1))?;
            Some(Tensor::from_vec(db, (out, r), cpu)?)
        } else {
            None
        };
        let g = if ga || gx {
            let mut g = vec![T::zero(); n * r];
            blas::gemm(s, dym, bm, T::zero(), &mut g, r.max(1))?;
            g
        } else {
            Vec::new()
        };
        let da = if ga {
            let da = blas::matmul(Mat::new(&g, n, r).t(), xl_m)?;
            Some(Tensor::from_vec(da, (r, k), cpu)?)
        } else {
            None
        };
        let dx = if gx {
            let (ws, wl) = self.w.storage_and_layout();
            let w = blas::cpu_operand::<T>(&ws, wl)?;
            let mut dx = blas::matmul(dym, w.mat())?;
            let gm = Mat::new(&g, n, r);
            match &self.mask {
                None => blas::gemm(T::one(), gm, am, T::one(), &mut dx, k.max(1))?,
                Some(mask) => {
                    let t = blas::matmul(gm, am)?;
                    let (ms, ml) = mask.storage_and_layout();
                    let m = blas::cpu_operand::<T>(&ms, ml)?;
                    let m = m.mat();
                    for (idx, (d, tv)) in dx.iter_mut().zip(&t).enumerate() {
                        *d += *tv * m.at(idx / k.max(1), idx % k.max(1));
                    }
                }
            }
            Some(Tensor::from_vec(dx, (n, k), cpu)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "blas-linear-lora"
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
            (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                self.forward(x, l1, a, l2, b, l3)
            }
            (CpuStorage::F64(x), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                self.forward(x, l1, a, l2, b, l3)
            }
            _ => bail!("blas-linear-lora: needs f32 or f64 operands of one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.backward::<f32>(x, a, b, dy),
            DType::F64 => self.backward::<f64>(x, a, b, dy),
            d => bail!("blas-linear-lora: unsupported dtype {d:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_grad_error;
    use crate::ops::gradcheck::{max_diff, randn};
    use candle_core::Var;

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

    fn lora_reference(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        l: &LoraTerm<'_>,
    ) -> Result<Tensor> {
        let xl = match l.dropout_mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let d = xl
            .broadcast_matmul(&l.a.t()?)?
            .broadcast_matmul(&l.b.t()?)?;
        let y = x.broadcast_matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y + (d * l.scale)?
    }

    fn dropout_mask(shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let m: Vec<f32> = (0..n)
            .map(|i| if i % 5 == 2 { 0.0 } else { 1.25 })
            .collect();
        Tensor::from_vec(m, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn lora_forward_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-12 };
            let x = randn(&[2, 3, 10], dtype);
            let w = randn(&[7, 10], dtype);
            let bias = randn(&[7], dtype);
            let (a, b) = (randn(&[4, 10], dtype), randn(&[7, 4], dtype));
            let mask = dropout_mask(&[2, 3, 10], dtype);
            for m in [None, Some(&mask)] {
                for bias in [None, Some(&bias)] {
                    let l = LoraTerm {
                        a: &a,
                        b: &b,
                        scale: 0.7,
                        dropout_mask: m,
                    };
                    let got = linear_lora(&x, &w, bias, &l).unwrap();
                    assert_eq!(got.dims(), &[2, 3, 7]);
                    let want = lora_reference(&x, &w, bias, &l).unwrap();
                    assert!(max_diff(&got, &want) < tol);
                }
            }
        }
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let dtype = DType::F64;
        let x = randn(&[5, 6], dtype);
        let w = randn(&[4, 6], dtype);
        let bias = randn(&[4], dtype);
        let (a, b) = (randn(&[3, 6], dtype), randn(&[4, 3], dtype));
        let mask = dropout_mask(&[5, 6], dtype);
        for m in [None, Some(&mask)] {
            let f = |x: &Tensor, a: &Tensor, b: &Tensor| {
                let l = LoraTerm {
                    a,
                    b,
                    scale: 1.5,
                    dropout_mask: m,
                };
                linear_lora(x, &w, Some(&bias), &l)
            };
            for (name, e) in [
                ("x", max_grad_error(&x, |x| f(x, &a, &b)).unwrap()),
                ("A", max_grad_error(&a, |a| f(&x, a, &b)).unwrap()),
                ("B", max_grad_error(&b, |b| f(&x, &a, b)).unwrap()),
            ] {
                assert!(e < 1e-6, "d{name} error {e} (mask {})", m.is_some());
            }
        }
    }

    #[test]
    fn lora_frozen_base_gets_no_gradient() {
        let x = Var::from_tensor(&randn(&[4, 6], DType::F32)).unwrap();
        let w = randn(&[5, 6], DType::F32);
        let bias = randn(&[5], DType::F32);
        let a = Var::from_tensor(&randn(&[2, 6], DType::F32)).unwrap();
        let b = Var::from_tensor(&randn(&[5, 2], DType::F32)).unwrap();
        let mask = dropout_mask(&[4, 6], DType::F32);
        let l = LoraTerm {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: 2.0,
            dropout_mask: Some(&mask),
        };
        let r = randn(&[4, 5], DType::F32);
        let y = linear_lora(x.as_tensor(), &w, Some(&bias), &l).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&w, &bias, &mask] {
            assert!(g.get(t).is_none(), "a frozen tensor got a gradient");
        }
        // Same gradients as candle's autograd on the composed formula.
        let want = (lora_reference(x.as_tensor(), &w, Some(&bias), &l).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
            let d = max_diff(g.get(t).unwrap(), want.get(t).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn lora_with_trained_base_falls_back() {
        let x = randn(&[3, 4], DType::F64);
        let w = randn(&[2, 4], DType::F64);
        let (a, b) = (randn(&[2, 4], DType::F64), randn(&[2, 2], DType::F64));
        let l = LoraTerm {
            a: &a,
            b: &b,
            scale: 0.5,
            dropout_mask: None,
        };
        let e = max_grad_error(&w, |w| linear_lora(&x, w, None, &l)).unwrap();
        assert!(e < 1e-6, "dW error {e}");
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
            (8, 576, 1536),
            (8, 1536, 576),
            (8, 576, 49152),
            (8, 576, 192),
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

    /// Forward + backward of the projections of `layers` SmolLM2 decoder layers with LoRA
    /// (r = 16) on every linear, batch 4 × 512: what LoRA SFT spends in linears (attention,
    /// norms and the LM head aside). candle's matmul vs the BLAS op. Run with
    /// `cargo test --release -p itamae-daemon --lib lora_stack_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lora_stack_bench() {
        use std::time::Instant;
        type Lin = fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
        let (n, h, f, kv, r, layers) = (2048, 576, 1536, 192, 16, 4);
        let shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)];
        let frozen: Vec<Vec<Tensor>> = (0..layers)
            .map(|_| {
                shapes
                    .iter()
                    .map(|&(o, i)| (randn(&[o, i], DType::F32) * 0.03).unwrap())
                    .collect()
            })
            .collect();
        let lora: Vec<Vec<(Var, Var)>> = (0..layers)
            .map(|_| {
                shapes
                    .iter()
                    .map(|&(o, i)| {
                        let a = (randn(&[r, i], DType::F32) * 0.03).unwrap();
                        let b = (randn(&[o, r], DType::F32) * 0.03).unwrap();
                        (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap())
                    })
                    .collect()
            })
            .collect();
        let x0 = randn(&[n, h], DType::F32);
        // mode 0: candle matmul, 1: BLAS op composed as adapters::lora does, 2: linear_lora.
        let step = |mode: usize| -> f64 {
            let lin: Lin = if mode == 0 {
                linear_composed
            } else {
                linear_blas
            };
            let t = Instant::now();
            let proj = |l: usize, p: usize, x: &Tensor| -> Tensor {
                let (a, b) = &lora[l][p];
                if mode == 2 {
                    let term = LoraTerm {
                        a: a.as_tensor(),
                        b: b.as_tensor(),
                        scale: 2.0,
                        dropout_mask: None,
                    };
                    return linear_lora(x, &frozen[l][p], None, &term).unwrap();
                }
                let d = lin(&lin(x, a.as_tensor(), None).unwrap(), b.as_tensor(), None).unwrap();
                (lin(x, &frozen[l][p], None).unwrap() + (d * 2.0).unwrap()).unwrap()
            };
            let mut x = x0.clone();
            for l in 0..layers {
                let qkv = [proj(l, 0, &x), proj(l, 1, &x), proj(l, 2, &x)];
                let att = (&qkv[0] + qkv[1].sum_keepdim(1).unwrap().broadcast_as((n, h)).unwrap())
                    .unwrap()
                    .broadcast_add(&qkv[2].sum_keepdim(1).unwrap())
                    .unwrap();
                x = (&x + proj(l, 3, &att)).unwrap();
                let g = proj(l, 4, &x).silu().unwrap();
                let u = proj(l, 5, &x);
                x = (&x + proj(l, 6, &(g * u).unwrap())).unwrap();
            }
            let g = x.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            assert!(g.get(lora[0][0].0.as_tensor()).is_some());
            t.elapsed().as_secs_f64()
        };
        println!("OpenBLAS kernels: {}", blas::core_name());
        let mut best = [f64::INFINITY; 3];
        // Interleaved, best of 3: the machine is shared.
        for _ in 0..3 {
            for (mode, b) in best.iter_mut().enumerate() {
                *b = b.min(step(mode));
            }
        }
        for (name, t) in ["candle matmul", "blas op", "linear_lora"].iter().zip(best) {
            println!(
                "{name:<14} {layers} layers fwd+bwd {t:>7.3} s  (x30/{layers}: {:>6.2} s per step)",
                t * 30.0 / layers as f64
            );
        }
    }
}
