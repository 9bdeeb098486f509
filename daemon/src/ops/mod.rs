//! Numeric kernels of the transformer, each with two paths:
//!
//! * a **fast path** used when no gradient is tracked (serving): candle's fused CPU/GPU kernels
//!   (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rotary_emb::rope`), which have no backward;
//! * a **composed path** used whenever an input tracks a gradient (training): the same maths
//!   written with differentiable candle primitives (broadcast ops, reductions, `narrow`, `cat`,
//!   `matmul`), because candle's fused kernels silently drop the gradient (docs/candle-notes.md).
//!
//! The path is chosen per call from [`Tensor::track_op`], so one model forward serves both
//! training and inference. On CPU the training path uses our own fused ops with analytic
//! backward ([`fused`], [`attention`], [`linear`], [`loss`]) instead of the composed graphs,
//! which are kept as the reference they are tested against and for other devices. Every op here is tested against a composed reference and with a
//! finite-difference gradient check in f64.
//!
//! Serving on CPU has three kernels of its own, inference only (no backward, so no gradient
//! check; each is tested against an f64 or composed reference): [`skinny`] (`x·Wᵀ` at 2–16
//! rows, which `blas::gemm` routes to it), [`decode`] (one query per sequence against its KV
//! cache) and [`lora_rows`] (per-row or per-span LoRA deltas from factors packed at load);
//! [`fanout`] runs the projections of one decode input (q/k/v, gate/up) as one parallel region.
use candle_core::{DType, Device, Result, Tensor, D};

pub mod attention;
pub mod blas;
pub mod decode;
pub mod decoder;
pub mod dequant;
pub mod fanout;
pub mod fused;
pub mod linear;
pub mod lora_rows;
pub mod loss;
pub mod qdot;
pub mod quant;
pub mod skinny;

/// The contiguous data of a CPU storage as a slice, for our custom ops' `cpu_fwd`; `what` names
/// the op in the error.
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// A tensor's elements in row-major order, for our custom ops' backward passes.
pub(crate) fn to_flat_vec<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.contiguous()?.flatten_all()?.to_vec1::<T>()
}

/// `Σ aᵢ·bᵢ` over the shorter of the two, with eight partial sums so the loop vectorises
/// without reassociating (the portable kernels' and decode attention's dot product).
pub(crate) fn dot<A: Copy + Into<f32>>(a: &[A], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, y)| x.into() * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            s[i] += x[i].into() * y[i];
        }
    }
    s.iter().sum::<f32>() + tail
}

/// Whether any of `ts` takes part in a gradient computation.
fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if tracked(&[x, w]) && x.device().is_cpu() {
        fused::rms_norm(x, w, eps)
    } else if tracked(&[x, w]) {
        rms_norm_composed(x, w, eps)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    }
}

fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if tracked(&[x]) {
        softmax_composed(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    // The max is a constant shift: detaching it keeps the gradient exact and the graph small.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotate-half (HF/NeoX style) rotary embedding. `x` is `(batch, heads, seq, head_dim)`;
/// `cos`/`sin` are `(seq, head_dim / 2)` for the positions of `x`, or `(batch, 1, seq, head_dim / 2)`
/// when every row has its own positions (packed examples).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if tracked(&[x]) && x.device().is_cpu() {
        fused::rope(x, cos, sin)
    } else if tracked(&[x]) {
        rope_composed(x, cos, sin)
    } else if cos.rank() == 4 {
        let (cos, sin) = (cos.squeeze(1)?.contiguous()?, sin.squeeze(1)?.contiguous()?);
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
    }
}

fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let (cos, sin) = if cos.rank() == 4 {
        (cos.clone(), sin.clone())
    } else {
        (
            cos.unsqueeze(0)?.unsqueeze(0)?,
            sin.unsqueeze(0)?.unsqueeze(0)?,
        )
    };
    // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    let lo = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let hi = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[&lo, &hi], D::Minus1)
}

/// `x · wᵀ (+ b)` for `x` of any rank `(..., in)` and `w` of shape `(out, in)`.
///
/// Flattened to a 2-D product: candle's batched CPU matmul is wrong for some broadcast (stride-0)
/// layouts (docs/candle-notes.md), and one large GEMM is faster than many small ones anyway. On CPU
/// (f32/f64) it runs on BLAS and its backward skips the gradient of a frozen weight
/// ([`linear::linear`]); elsewhere it is candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear::linear(x, w, b)
}

/// Scaled dot-product attention with grouped-query heads, without copying K/V per query head.
///
/// `q`: `(b, n_head, l, d)`, `k`/`v`: `(b, n_kv, t, d)` with `n_head = n_kv · rep`. Query heads
/// that share a KV head are folded into the row dimension, so one matmul per KV head serves them
/// all. `mask`: additive (0 or -inf), `(l, t)` broadcast over batch and heads, or `(b, l, t)`
/// per row (packed examples); `None` when every query may see every key (single-token decode).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, n_head, l, d) = q.dims4()?;
    let (_, n_kv, t, _) = k.dims4()?;
    let rep = n_head / n_kv;
    let q = q.contiguous()?.reshape((b, n_kv, rep * l, d))?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        // rows are (rep, l): the same mask for every query head of the group.
        Some(m) if m.rank() == 3 => {
            let m = m
                .unsqueeze(1)?
                .expand((b, rep, l, t))?
                .reshape((b, 1, rep * l, t))?;
            scores.broadcast_add(&m)?
        }
        Some(m) => {
            let m = m.unsqueeze(0)?.expand((rep, l, t))?.reshape((rep * l, t))?;
            scores.broadcast_add(&m)?
        }
        None => scores,
    };
    let p = softmax_last(&scores)?;
    p.matmul(&v)?.reshape((b, n_head, l, d))
}

/// Additive causal mask `(l, offset + l)`: query `i` (at absolute position `offset + i`) sees keys
/// `0..=offset + i`.
pub fn causal_mask(l: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = offset + l;
    let data: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (l, t), device)?.to_dtype(dtype)
}

#[cfg(test)]
pub(crate) mod gradcheck {
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// Standard-normal test input of `dtype`.
    pub fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Max abs difference, as f64 whatever the dtype.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
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

    /// Compares the analytic gradient of `sum(f(x) · r)` (r a fixed random tensor) with central
    /// finite differences, in f64. Returns the max abs difference.
    pub fn max_grad_error(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
        let var = Var::from_tensor(x)?;
        let y = f(var.as_tensor())?;
        let r = Tensor::randn(0f64, 1., y.shape(), x.device())?;
        let loss = (y * &r)?.sum_all()?;
        let grads = loss.backward()?;
        let analytic = grads
            .get(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = x.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        let mut worst = 0f64;
        for i in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let xt = Tensor::from_vec(v, x.shape(), x.device())?;
                (f(&xt)? * &r)?.sum_all()?.to_scalar::<f64>()
            };
            let numeric = (eval(eps)? - eval(-eps)?) / (2. * eps);
            worst = worst.max((numeric - analytic[i]).abs());
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::gradcheck::{max_diff, max_grad_error, randn};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rms_norm_fast_matches_composed_and_reference() {
        let x = randn(&[2, 5, 16], DType::F32);
        let w = randn(&[16], DType::F32);
        let fast = rms_norm(&x, &w, 1e-5).unwrap();
        let composed = rms_norm_composed(&x, &w, 1e-5).unwrap();
        let reference = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&fast, &composed) < 1e-5);
        assert!(max_diff(&fast, &reference) < 1e-5);
    }

    #[test]
    fn rms_norm_path_follows_gradient_tracking() {
        let x = Var::from_tensor(&randn(&[3, 8], DType::F32)).unwrap();
        let w = randn(&[8], DType::F32);
        let y = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(
            g.get(x.as_tensor()).is_some(),
            "fast path was taken under training"
        );
    }

    #[test]
    fn rms_norm_gradients() {
        let x = randn(&[3, 7], DType::F64);
        let w = randn(&[7], DType::F64);
        let e = max_grad_error(&x, |x| rms_norm_composed(x, &w, 1e-5)).unwrap();
        assert!(e < 1e-6, "dx error {e}");
        let e = max_grad_error(&w, |w| rms_norm_composed(&x, w, 1e-5)).unwrap();
        assert!(e < 1e-6, "dw error {e}");
    }

    #[test]
    fn softmax_fast_matches_composed_and_reference() {
        let x = randn(&[4, 3, 11], DType::F32);
        let fast = softmax_last(&x).unwrap();
        let composed = softmax_composed(&x).unwrap();
        let reference = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(max_diff(&fast, &composed) < 1e-6);
        assert!(max_diff(&fast, &reference) < 1e-6);
        // with -inf entries (masked attention rows)
        let m = causal_mask(3, 2, DType::F32, &Device::Cpu).unwrap();
        let s = randn(&[3, 5], DType::F32).broadcast_add(&m).unwrap();
        assert!(max_diff(&softmax_last(&s).unwrap(), &softmax_composed(&s).unwrap()) < 1e-6);
    }

    #[test]
    fn softmax_gradients() {
        let x = randn(&[3, 6], DType::F64);
        let e = max_grad_error(&x, softmax_composed).unwrap();
        assert!(e < 1e-6, "error {e}");
    }

    fn cos_sin(seq: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
        let theta = randn(&[seq, half], DType::F32);
        (
            theta.cos().unwrap().to_dtype(dtype).unwrap(),
            theta.sin().unwrap().to_dtype(dtype).unwrap(),
        )
    }

    #[test]
    fn rope_fast_matches_composed_and_reference() {
        let x = randn(&[2, 3, 5, 8], DType::F32);
        let (cos, sin) = cos_sin(5, 4, DType::F32);
        let fast = rope(&x, &cos, &sin).unwrap();
        let composed = rope_composed(&x, &cos, &sin).unwrap();
        let reference = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        assert!(max_diff(&fast, &composed) < 1e-5);
        assert!(max_diff(&fast, &reference) < 1e-5);
    }

    #[test]
    fn rope_gradients() {
        let x = randn(&[1, 2, 3, 8], DType::F64);
        let (cos, sin) = cos_sin(3, 4, DType::F64);
        let e = max_grad_error(&x, |x| rope_composed(x, &cos, &sin)).unwrap();
        assert!(e < 1e-6, "error {e}");
    }

    /// Reference attention: K/V repeated per query head, plain softmax.
    fn attention_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Tensor {
        let (b, n_head, _, d) = q.dims4().unwrap();
        let (_, n_kv, t, _) = k.dims4().unwrap();
        let rep = n_head / n_kv;
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, n_kv, rep, t, d))
                .unwrap()
                .reshape((b, n_head, t, d))
                .unwrap()
        };
        let (k, v) = (repeat(k), repeat(v));
        let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
    }

    #[test]
    fn attention_matches_reference() {
        let (b, nh, nkv, l, off, d) = (2, 6, 2, 4, 3, 8);
        let q = randn(&[b, nh, l, d], DType::F32);
        let k = randn(&[b, nkv, off + l, d], DType::F32);
        let v = randn(&[b, nkv, off + l, d], DType::F32);
        let mask = causal_mask(l, off, DType::F32, &Device::Cpu).unwrap();
        let got = attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
        let want = attention_reference(&q, &k, &v, &mask, 0.3);
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn attention_gradients() {
        let (b, nh, nkv, l, d) = (1, 4, 2, 3, 4);
        let q = randn(&[b, nh, l, d], DType::F64);
        let k = randn(&[b, nkv, l, d], DType::F64);
        let v = randn(&[b, nkv, l, d], DType::F64);
        let mask = causal_mask(l, 0, DType::F64, &Device::Cpu).unwrap();
        let m = Some(&mask);
        for (name, e) in [
            (
                "q",
                max_grad_error(&q, |q| attention(q, &k, &v, m, 0.5)).unwrap(),
            ),
            (
                "k",
                max_grad_error(&k, |k| attention(&q, k, &v, m, 0.5)).unwrap(),
            ),
            (
                "v",
                max_grad_error(&v, |v| attention(&q, &k, v, m, 0.5)).unwrap(),
            ),
        ] {
            assert!(e < 1e-6, "d{name} error {e}");
        }
    }

    #[test]
    fn linear_matches_reference_and_gradients() {
        let x = randn(&[2, 3, 5], DType::F64);
        let w = randn(&[4, 5], DType::F64);
        let b = randn(&[4], DType::F64);
        let got = linear(&x, &w, Some(&b)).unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap().contiguous().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        let e = max_grad_error(&x, |x| linear(x, &w, Some(&b))).unwrap();
        assert!(e < 1e-6, "dx error {e}");
        let e = max_grad_error(&w, |w| linear(&x, w, Some(&b))).unwrap();
        assert!(e < 1e-6, "dw error {e}");
    }

    #[test]
    fn silu_gradients() {
        // SwiGLU's activation comes from candle (it has a backward); check it all the same.
        let x = randn(&[3, 5], DType::F64);
        let e = max_grad_error(&x, |x| x.silu()).unwrap();
        assert!(e < 1e-6, "error {e}");
    }
}
