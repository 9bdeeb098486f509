//! One whole pre-norm decoder block (RMSNorm → q/k/v → RoPE → causal attention → o + residual
//! → RMSNorm → SwiGLU MLP + residual) as a single op with a hand-written backward, for training
//! on frozen base weights with optional LoRA terms on any of the seven projections.
//!
//! Why one op: chained per-op autograd keeps every intermediate of every layer alive until the
//! backward (norm outputs, head-layout copies, rotated copies, SiLU output, products, sums:
//! ~110 MB per SmolLM2 layer at batch 4 × 512), which put LoRA training far above its memory
//! budget. This op keeps only what is expensive to recompute — the rotated q/k, v, the
//! attention output and row log-sum-exps, the mid-block residual, the gate and up projections —
//! and recomputes the cheap rest (norms, SwiGLU product, LoRA inputs) in the backward: ~47 MB
//! per layer, no extra GEMM. Every GEMM goes to BLAS; elementwise work is row-parallel.
//!
//! The LoRA factors travel as one flat tensor (`A` then `B` per targeted projection, in
//! [`PROJS`] order) so that candle's autograd routes their gradients; base weights, biases and
//! norms are captured frozen. The per-op path in `model::transformer` stays the reference this op
//! is tested against (and the path for full fine-tuning, prefixes and other devices).
//!
//! The op's wiring is fixed, so it is a capability an architecture declares (`Architecture::
//! fused_block` in the model layer hands over its block's weights in [`LayerWeights`] layout);
//! families wired otherwise (fused `qkv_proj`, other norms or MLPs) train through the per-op
//! path.
use std::any::Any;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{AttentionDims, FusedAttention};
use super::blas::{gemm, matmul, BlasFloat, Mat};
use super::quant::Weight;
use super::{cpu_slice as slice, to_flat_vec};

/// Projection order of [`LayerWeights::proj`] and of the flat LoRA tensor.
pub const PROJS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// The frozen weights of one block; `proj` in [`PROJS`] order, each `(out, in)`. A weight held
/// in blocks is dequantized for the duration of one forward or backward of this layer only.
pub struct LayerWeights {
    pub proj: [Weight; 7],
    /// q/k/v biases (Qwen2).
    pub bias: [Option<Tensor>; 3],
    pub norm1: Tensor,
    pub norm2: Tensor,
    pub eps: f64,
}

/// A LoRA term of one projection; its factors are read from the flat tensor.
pub struct LoraSpec {
    pub r: usize,
    pub scale: f64,
    /// Dropout of the projection's input, `(rows, in)`, entries 0 or `1 / (1 − p)`.
    pub mask: Option<Tensor>,
}

/// Shape of the block's input and heads.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    pub b: usize,
    pub l: usize,
    pub n_head: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

pub struct DecoderLayer {
    w: LayerWeights,
    lora: [Option<LoraSpec>; 7],
    dims: BlockDims,
    /// `(b·l, head_dim / 2)` rotary tables for each token's position.
    cos: Tensor,
    sin: Tensor,
    attn: FusedAttention,
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

/// What the forward keeps for the backward.
struct Saved<T> {
    /// Rotated queries `(b, nh, l, d)`, rotated keys and values `(b, nkv, l, d)`.
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// Attention output in head layout `(b, nh, l, d)`.
    o: Vec<T>,
    /// Residual after the attention half, `(rows, hidden)`.
    xm: Vec<T>,
    /// Gate and up projections, `(rows, ff)`.
    g: Vec<T>,
    u: Vec<T>,
}

/// A LoRA term as slices: `A (r × in)`, `B (out × r)`, `r`, scale, dropout mask.
type LoraSlices<'a, T> = (&'a [T], &'a [T], usize, T, Option<&'a [T]>);

/// The frozen operands of one projection, as slices.
struct Projection<'a, T> {
    w: &'a [T],
    out: usize,
    inp: usize,
    bias: Option<&'a [T]>,
    lora: Option<LoraSlices<'a, T>>,
}

impl<T: BlasFloat> Projection<'_, T> {
    /// `x ⊙ mask` when there is dropout.
    fn lora_input(&self, x: &[T]) -> Option<Vec<T>> {
        let (_, _, _, _, Some(m)) = self.lora? else {
            return None;
        };
        Some(x.iter().zip(m).map(|(&a, &b)| a * b).collect())
    }

    /// `y (+)= x·Wᵀ + bias + s·((x ⊙ m)·Aᵀ)·Bᵀ` over `rows` rows; `accumulate` keeps `y`'s content.
    fn forward(&self, x: &[T], rows: usize, y: &mut [T], accumulate: bool) -> Result<()> {
        let (inp, out) = (self.inp, self.out);
        let mut beta = if accumulate { T::one() } else { T::zero() };
        if let Some(bias) = self.bias {
            for row in y.chunks_exact_mut(out) {
                for (o, &b) in row.iter_mut().zip(bias) {
                    *o = if accumulate { *o + b } else { b };
                }
            }
            beta = T::one();
        }
        gemm(
            T::one(),
            Mat::new(x, rows, inp),
            Mat::new(self.w, out, inp).t(),
            beta,
            y,
            out,
        )?;
        if let Some((a, b, r, s, _)) = self.lora {
            let xl = self.lora_input(x);
            let xm = xl.as_deref().unwrap_or(x);
            let h = matmul(Mat::new(xm, rows, inp), Mat::new(a, r, inp).t())?;
            gemm(
                s,
                Mat::new(&h, rows, r),
                Mat::new(b, out, r).t(),
                T::one(),
                y,
                out,
            )?;
        }
        Ok(())
    }

    /// `dx += dy·W + ((s·dy·B)·A) ⊙ m`; with LoRA also returns `(dA, dB)`:
    /// `dA = (s·dy·B)ᵀ·(x ⊙ m)`, `dB = s·dyᵀ·((x ⊙ m)·Aᵀ)`. `x` is only read with LoRA.
    fn backward(
        &self,
        dy: &[T],
        x: &[T],
        rows: usize,
        dx: &mut [T],
    ) -> Result<Option<(Vec<T>, Vec<T>)>> {
        let (inp, out) = (self.inp, self.out);
        gemm(
            T::one(),
            Mat::new(dy, rows, out),
            Mat::new(self.w, out, inp),
            T::one(),
            dx,
            inp,
        )?;
        let Some((a, b, r, s, mask)) = self.lora else {
            return Ok(None);
        };
        let xl = self.lora_input(x);
        let xm = xl.as_deref().unwrap_or(x);
        let mut g = vec![T::zero(); rows * r];
        gemm(
            s,
            Mat::new(dy, rows, out),
            Mat::new(b, out, r),
            T::zero(),
            &mut g,
            r,
        )?;
        match mask {
            None => gemm(
                T::one(),
                Mat::new(&g, rows, r),
                Mat::new(a, r, inp),
                T::one(),
                dx,
                inp,
            )?,
            Some(m) => {
                let mut t = vec![T::zero(); rows * inp];
                gemm(
                    T::one(),
                    Mat::new(&g, rows, r),
                    Mat::new(a, r, inp),
                    T::zero(),
                    &mut t,
                    inp,
                )?;
                dx.par_iter_mut()
                    .zip(t.par_iter().zip(m.par_iter()))
                    .for_each(|(d, (&tv, &mv))| *d += tv * mv);
            }
        }
        let da = matmul(Mat::new(&g, rows, r).t(), Mat::new(xm, rows, inp))?;
        let h = matmul(Mat::new(xm, rows, inp), Mat::new(a, r, inp).t())?;
        let mut db = vec![T::zero(); out * r];
        gemm(
            s,
            Mat::new(dy, rows, out).t(),
            Mat::new(&h, rows, r),
            T::zero(),
            &mut db,
            r,
        )?;
        Ok(Some((da, db)))
    }
}

fn sigmoid<T: BlasFloat>(x: f64) -> f64 {
    if T::DTYPE == DType::F32 {
        1.0 / (1.0 + super::loss::exp_f32(-x as f32) as f64)
    } else {
        1.0 / (1.0 + (-x).exp())
    }
}

fn rms_norm<T: BlasFloat>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    super::fused::rms_norm_rows(x, w, eps)
}

/// Token rows `(b·l, n·d)` → heads `(b, n, l, d)`, rotated by `(cos, sin)` (per token row) when
/// given.
fn to_heads<T: BlasFloat>(src: &[T], bd: BlockDims, n: usize, rot: Option<(&[T], &[T])>) -> Vec<T> {
    move_heads(src, bd, n, rot, true)
}

/// Heads `(b, n, l, d)` → token rows `(b·l, n·d)`, rotated back (the inverse rotation, i.e. the
/// gradient of [`to_heads`]) when `(cos, sin)` are given.
fn from_heads<T: BlasFloat>(
    src: &[T],
    bd: BlockDims,
    n: usize,
    rot: Option<(&[T], &[T])>,
) -> Vec<T> {
    move_heads(src, bd, n, rot, false)
}

/// Moves every head vector between the two layouts, rotating it by its token's angle (towards
/// heads) or by minus that angle (back to rows).
fn move_heads<T: BlasFloat>(
    src: &[T],
    bd: BlockDims,
    n: usize,
    rot: Option<(&[T], &[T])>,
    towards_heads: bool,
) -> Vec<T> {
    let (l, d) = (bd.l, bd.head_dim);
    let half = d / 2;
    let mut out = vec![T::zero(); src.len()];
    out.par_chunks_mut(d).enumerate().for_each(|(k, y)| {
        // k numbers the output's head vectors; (row, h) is the token row and head it holds
        let (row, h) = if towards_heads {
            let (bh, p) = (k / l, k % l);
            ((bh / n) * l + p, bh % n)
        } else {
            (k / n, k % n)
        };
        let at = if towards_heads {
            row * n + h
        } else {
            ((row / l) * n + h) * l + row % l
        };
        let x = &src[at * d..][..d];
        match rot {
            None => y.copy_from_slice(x),
            Some((cos, sin)) => {
                let (c, s) = (&cos[row * half..][..half], &sin[row * half..][..half]);
                for i in 0..half {
                    let (x1, x2, si) = (
                        x[i],
                        x[i + half],
                        if towards_heads {
                            s[i]
                        } else {
                            T::zero() - s[i]
                        },
                    );
                    y[i] = x1 * c[i] - x2 * si;
                    y[i + half] = x2 * c[i] + x1 * si;
                }
            }
        }
    });
    out
}

impl DecoderLayer {
    pub fn new(
        w: LayerWeights,
        lora: [Option<LoraSpec>; 7],
        dims: BlockDims,
        cos: Tensor,
        sin: Tensor,
        segments: Option<Vec<u32>>,
    ) -> Self {
        let scale = 1.0 / (dims.head_dim as f64).sqrt();
        Self {
            w,
            lora,
            dims,
            cos,
            sin,
            attn: FusedAttention::new(scale, 0, segments),
            saved: Mutex::new(None),
        }
    }

    /// Number of elements of the flat LoRA tensor this layer expects.
    pub fn lora_len(&self) -> Result<usize> {
        let mut n = 0;
        for (i, spec) in self.lora.iter().enumerate() {
            if let Some(s) = spec {
                let (out, inp) = self.w.proj[i].dims2()?;
                n += s.r * (inp + out);
            }
        }
        Ok(n)
    }

    fn attn_dims(&self) -> AttentionDims {
        let bd = self.dims;
        AttentionDims {
            b: bd.b,
            nh: bd.n_head,
            nkv: bd.n_kv,
            l: bd.l,
            t: bd.l,
            d: bd.head_dim,
        }
    }

    /// Runs `f` with every frozen operand borrowed as a slice (no copies: the weights are
    /// read in place) and the LoRA factors cut from `flat`.
    fn with_operands<T: BlasFloat, R>(
        &self,
        flat: &[T],
        f: impl FnOnce(&[Projection<'_, T>], &[T], &[T], &[T], &[T]) -> Result<R>,
    ) -> Result<R> {
        let masks: [Option<&Tensor>; 7] =
            std::array::from_fn(|i| self.lora[i].as_ref().and_then(|s| s.mask.as_ref()));
        let dense = self
            .w
            .proj
            .iter()
            .map(|w| w.to_dense(T::DTYPE))
            .collect::<Result<Vec<_>>>()?;
        let mut tensors: Vec<&Tensor> = dense.iter().collect();
        tensors.extend(self.w.bias.iter().flatten());
        tensors.extend(masks.iter().flatten());
        tensors.extend([&self.w.norm1, &self.w.norm2, &self.cos, &self.sin]);
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(guards.len());
        for (g, l) in &guards {
            let s: &[T] = match &**g {
                candle_core::Storage::Cpu(c) => slice(c, l, "decoder layer")?,
                _ => candle_core::bail!("decoder layer: operands must be on the CPU"),
            };
            slices.push(s);
        }
        let mut next = slices.into_iter();
        let mut take = || {
            next.next()
                .ok_or_else(|| candle_core::Error::Msg("decoder layer: operand missing".into()))
        };
        let mut ws = Vec::with_capacity(7);
        for _ in 0..7 {
            ws.push(take()?);
        }
        let mut biases = [None; 3];
        for (i, b) in self.w.bias.iter().enumerate() {
            if b.is_some() {
                biases[i] = Some(take()?);
            }
        }
        let mut mask_slices = [None; 7];
        for (i, m) in masks.iter().enumerate() {
            if m.is_some() {
                mask_slices[i] = Some(take()?);
            }
        }
        let (n1, n2, cos, sin) = (take()?, take()?, take()?, take()?);
        let mut projs = Vec::with_capacity(7);
        let mut off = 0;
        for i in 0..7 {
            let (out, inp) = self.w.proj[i].dims2()?;
            let lora = match &self.lora[i] {
                Some(s) => {
                    let (na, nb) = (s.r * inp, out * s.r);
                    if flat.len() < off + na + nb {
                        candle_core::bail!("decoder layer: LoRA tensor too short");
                    }
                    let a = &flat[off..off + na];
                    let b = &flat[off + na..off + na + nb];
                    off += na + nb;
                    Some((a, b, s.r, T::from_f64(s.scale), mask_slices[i]))
                }
                None => None,
            };
            projs.push(Projection {
                w: ws[i],
                out,
                inp,
                bias: biases.get(i).copied().flatten(),
                lora,
            });
        }
        f(&projs, n1, n2, cos, sin)
    }

    fn forward<T: BlasFloat>(&self, x: &[T], flat: &[T]) -> Result<Vec<T>> {
        let bd = self.dims;
        let rows = bd.b * bd.l;
        let (nh, nkv, d) = (bd.n_head, bd.n_kv, bd.head_dim);
        let eps = self.w.eps;
        self.with_operands(flat, |p, n1, n2, cos, sin| {
            let hidden = n1.len();
            let h1 = rms_norm(x, n1, eps);
            let mut q = vec![T::zero(); rows * nh * d];
            let mut k = vec![T::zero(); rows * nkv * d];
            let mut v = vec![T::zero(); rows * nkv * d];
            p[0].forward(&h1, rows, &mut q, false)?;
            p[1].forward(&h1, rows, &mut k, false)?;
            p[2].forward(&h1, rows, &mut v, false)?;
            drop(h1);
            let q = to_heads(&q, bd, nh, Some((cos, sin)));
            let k = to_heads(&k, bd, nkv, Some((cos, sin)));
            let v = to_heads(&v, bd, nkv, None);
            let o = self.attn.forward(self.attn_dims(), &q, &k, &v)?;
            let att = from_heads(&o, bd, nh, None);
            let mut xm = x.to_vec();
            p[3].forward(&att, rows, &mut xm, true)?;
            drop(att);
            let h2 = rms_norm(&xm, n2, eps);
            let ff = p[4].out;
            let mut g = vec![T::zero(); rows * ff];
            let mut u = vec![T::zero(); rows * ff];
            p[4].forward(&h2, rows, &mut g, false)?;
            p[5].forward(&h2, rows, &mut u, false)?;
            drop(h2);
            let a = swiglu(&g, &u);
            let mut y = xm.clone();
            p[6].forward(&a, rows, &mut y, true)?;
            debug_assert_eq!(y.len(), rows * hidden);
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(Saved {
                q,
                k,
                v,
                o,
                xm,
                g,
                u,
            }));
            Ok(y)
        })
    }

    /// `(dx, d_flat)` for an output gradient `dy`; `d_flat` only when LoRA terms exist.
    fn backward<T: BlasFloat>(
        &self,
        x: &[T],
        flat: &[T],
        dy: &[T],
    ) -> Result<(Vec<T>, Option<Vec<T>>)> {
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(|b| b.downcast::<Saved<T>>().ok());
        let Some(s) = saved else {
            candle_core::bail!("decoder layer: backward without a matching forward")
        };
        let bd = self.dims;
        let rows = bd.b * bd.l;
        let (nh, nkv) = (bd.n_head, bd.n_kv);
        let eps = self.w.eps;
        self.with_operands(flat, |p, n1, n2, cos, sin| {
            let hidden = n1.len();
            let mut grads: [Option<(Vec<T>, Vec<T>)>; 7] = Default::default();
            // MLP half: y = xm + down(silu(g)·u)
            let mut dxm = dy.to_vec();
            let a = swiglu(&s.g, &s.u);
            let ff = p[4].out;
            let mut da = vec![T::zero(); rows * ff];
            grads[6] = p[6].backward(dy, &a, rows, &mut da)?;
            drop(a);
            let (dg, du) = swiglu_backward(&s.g, &s.u, &da);
            drop(da);
            let h2 = rms_norm(&s.xm, n2, eps);
            let mut dh2 = vec![T::zero(); rows * hidden];
            grads[4] = p[4].backward(&dg, &h2, rows, &mut dh2)?;
            grads[5] = p[5].backward(&du, &h2, rows, &mut dh2)?;
            drop((h2, dg, du));
            let (dn, _) = super::fused::rms_norm_rows_backward(&s.xm, n2, &dh2, eps);
            for (a, b) in dxm.iter_mut().zip(dn) {
                *a += b;
            }
            // attention half: xm = x + o_proj(attention(rope(q), rope(k), v))
            let att = from_heads(&s.o, bd, nh, None);
            let mut datt = vec![T::zero(); att.len()];
            grads[3] = p[3].backward(&dxm, &att, rows, &mut datt)?;
            drop(att);
            let d_o = to_heads(&datt, bd, nh, None);
            drop(datt);
            let (dq, dk, dv) =
                self.attn
                    .backward(self.attn_dims(), &s.q, &s.k, &s.v, &s.o, &d_o)?;
            let dq = from_heads(&dq, bd, nh, Some((cos, sin)));
            let dk = from_heads(&dk, bd, nkv, Some((cos, sin)));
            let dv = from_heads(&dv, bd, nkv, None);
            let h1 = rms_norm(x, n1, eps);
            let mut dh1 = vec![T::zero(); rows * hidden];
            grads[0] = p[0].backward(&dq, &h1, rows, &mut dh1)?;
            grads[1] = p[1].backward(&dk, &h1, rows, &mut dh1)?;
            grads[2] = p[2].backward(&dv, &h1, rows, &mut dh1)?;
            let (dn, _) = super::fused::rms_norm_rows_backward(x, n1, &dh1, eps);
            for (a, b) in dxm.iter_mut().zip(dn) {
                *a += b;
            }
            let any = grads.iter().any(Option::is_some);
            let dflat = any.then(|| {
                let mut out = Vec::with_capacity(flat.len());
                for (da, db) in grads.into_iter().flatten() {
                    out.extend(da);
                    out.extend(db);
                }
                out
            });
            Ok((dxm, dflat))
        })
    }
}

/// `silu(g) · u`.
fn swiglu<T: BlasFloat>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                let gf = gv.to_f64();
                *o = T::from_f64(gf * sigmoid::<T>(gf) * uv.to_f64());
            }
        });
    out
}

/// Gradients of `silu(g) · u` for an output gradient `da`: `(da·u·silu'(g), da·silu(g))`.
fn swiglu_backward<T: BlasFloat>(g: &[T], u: &[T], da: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    let mut du = vec![T::zero(); g.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dgc, duc))| {
            let base = c * 4096;
            for i in 0..dgc.len() {
                let (gv, uv, dav) = (
                    g[base + i].to_f64(),
                    u[base + i].to_f64(),
                    da[base + i].to_f64(),
                );
                let sg = sigmoid::<T>(gv);
                duc[i] = T::from_f64(dav * gv * sg);
                dgc[i] = T::from_f64(dav * uv * sg * (1.0 + gv * (1.0 - sg)));
            }
        });
    (dg, du)
}

impl CustomOp2 for DecoderLayer {
    fn name(&self) -> &'static str {
        "fused-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bd = self.dims;
        let (b, l, _) = l1.shape().dims3()?;
        if (b, l) != (bd.b, bd.l) {
            candle_core::bail!(
                "decoder layer: input {:?} for ({}, {})",
                l1.shape(),
                bd.b,
                bd.l
            );
        }
        #[cfg(test)]
        FUSED_RUNS.with(|c| c.set(c.get() + 1));
        let shape = l1.shape().clone();
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let y =
                    self.forward::<f32>(slice(s1, l1, "decoder")?, slice(s2, l2, "decoder")?)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let y =
                    self.forward::<f64>(slice(s1, l1, "decoder")?, slice(s2, l2, "decoder")?)?;
                Ok((CpuStorage::F64(y), shape))
            }
            _ => candle_core::bail!("decoder layer: needs f32 or f64 operands of one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: BlasFloat>(
            op: &DecoderLayer,
            x: &Tensor,
            flat: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, df) = op.backward::<T>(
                &to_flat_vec::<T>(x)?,
                &to_flat_vec::<T>(flat)?,
                &to_flat_vec::<T>(dy)?,
            )?;
            let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
            let df = match df {
                Some(v) if flat.track_op() => Some(Tensor::from_vec(v, flat.shape(), x.device())?),
                _ => None,
            };
            Ok((x.track_op().then_some(dx), df))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, flat, dy),
            DType::F64 => run::<f64>(self, x, flat, dy),
            d => candle_core::bail!("decoder layer: unsupported dtype {d:?}"),
        }
    }
}

/// Runs one block on `x (b, l, hidden)`. `flat` holds the LoRA factors (`A` then `B` of each
/// targeted projection in [`PROJS`] order); pass a one-element tensor when there are none.
pub fn decoder_layer(x: &Tensor, flat: &Tensor, op: DecoderLayer) -> Result<Tensor> {
    let want = op.lora_len()?;
    if want > 0 && flat.elem_count() != want {
        candle_core::bail!(
            "decoder layer: LoRA tensor of {} elements, expected {want}",
            flat.elem_count()
        );
    }
    x.contiguous()?.apply_op2(&flat.contiguous()?, op)
}

#[cfg(test)]
thread_local! {
    /// Fused blocks run on this thread (tests check which path a forward took).
    pub(crate) static FUSED_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_grad_error, randn};
    use candle_core::Device;

    const DIMS: BlockDims = BlockDims {
        b: 2,
        l: 5,
        n_head: 4,
        n_kv: 2,
        head_dim: 4,
    };
    const HIDDEN: usize = 12;
    const FF: usize = 10;

    fn shapes() -> [(usize, usize); 7] {
        let (q, kv) = (DIMS.n_head * DIMS.head_dim, DIMS.n_kv * DIMS.head_dim);
        [
            (q, HIDDEN),
            (kv, HIDDEN),
            (kv, HIDDEN),
            (HIDDEN, q),
            (FF, HIDDEN),
            (FF, HIDDEN),
            (HIDDEN, FF),
        ]
    }

    /// A random f64 block with biases and LoRA (r = 2, dropout masks on two projections) on
    /// every projection; `op()` builds a fresh op each call.
    struct Case {
        proj: Vec<Tensor>,
        bias: Vec<Tensor>,
        norms: (Tensor, Tensor),
        masks: Vec<Option<Tensor>>,
        cos: Tensor,
        sin: Tensor,
        segments: Option<Vec<u32>>,
    }

    impl Case {
        fn new(packed: bool) -> Self {
            let rows = DIMS.b * DIMS.l;
            let proj = shapes()
                .iter()
                .map(|&(o, i)| (randn(&[o, i], DType::F64) * (1.0 / i as f64).sqrt()).unwrap())
                .collect();
            let bias = shapes()[..3]
                .iter()
                .map(|&(o, _)| randn(&[o], DType::F64))
                .collect();
            let masks = shapes()
                .iter()
                .enumerate()
                .map(|(j, &(_, i))| {
                    (j == 1 || j == 6).then(|| {
                        let m: Vec<f64> = (0..rows * i)
                            .map(|n| if n % 3 == 0 { 0.0 } else { 1.5 })
                            .collect();
                        Tensor::from_vec(m, (rows, i), &Device::Cpu).unwrap()
                    })
                })
                .collect();
            let theta = randn(&[rows, DIMS.head_dim / 2], DType::F64);
            Self {
                proj,
                bias,
                norms: (
                    randn(&[HIDDEN], DType::F64).affine(0.2, 1.0).unwrap(),
                    randn(&[HIDDEN], DType::F64).affine(0.2, 1.0).unwrap(),
                ),
                masks,
                cos: theta.cos().unwrap(),
                sin: theta.sin().unwrap(),
                segments: packed.then(|| vec![0, 0, 1, 1, 1, 0, 0, 0, 0, 2]),
            }
        }

        fn op(&self) -> DecoderLayer {
            let p = &self.proj;
            let lora = std::array::from_fn(|j| {
                Some(LoraSpec {
                    r: 2,
                    scale: 0.7,
                    mask: self.masks[j].clone(),
                })
            });
            DecoderLayer::new(
                LayerWeights {
                    proj: std::array::from_fn(|j| p[j].clone().into()),
                    bias: std::array::from_fn(|j| Some(self.bias[j].clone())),
                    norm1: self.norms.0.clone(),
                    norm2: self.norms.1.clone(),
                    eps: 1e-5,
                },
                lora,
                DIMS,
                self.cos.clone(),
                self.sin.clone(),
                self.segments.clone(),
            )
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for packed in [false, true] {
            let case = Case::new(packed);
            let x = randn(&[DIMS.b, DIMS.l, HIDDEN], DType::F64);
            let n = case.op().lora_len().unwrap();
            let flat = (randn(&[n], DType::F64) * 0.3).unwrap();
            let ex = max_grad_error(&x, |x| decoder_layer(x, &flat, case.op())).unwrap();
            assert!(ex < 1e-6, "packed {packed}: dx error {ex}");
            let ef = max_grad_error(&flat, |f| decoder_layer(&x, f, case.op())).unwrap();
            assert!(ef < 1e-6, "packed {packed}: dLoRA error {ef}");
        }
    }
}
