//! The row decode path: one decode step for a few sequences (one new token each) run on plain
//! `f32` buffers instead of candle tensors, for serving on the CPU.
//!
//! Why its own path: a decode token of a small model is ~30 blocks of a dozen small steps, and
//! through candle each step is an op with its own output allocation, shape bookkeeping and (for
//! the projections) its own activation quantization and rayon scope — measured on SmolLM2 that
//! overhead, not the weight bytes, set the token rate. Here a step allocates its buffers once,
//! RMSNorm, RoPE, SwiGLU and the residuals run in place, the projections that read one input
//! (q/k/v, gate/up) are one fan-out ([`ops::fanout`]: one quantization of the activations, one
//! parallel region), and attention reads the KV cache in place ([`ops::decode`]). Only the KV
//! append and the LM head stay candle ops: the cache is the one the prefill writes, and the LM
//! head's kernel is chosen in [`Transformer::logits`].
//!
//! It computes what [`Transformer::decode_batch`]'s composed path computes, with the same
//! kernels for every projection; it applies when the family's blocks have the standard wiring
//! ([`super::arch::Architecture::row_decode`]), every weight is one the fan-out reads, and every
//! adapter's deltas are packed factors (or it has none). Otherwise the caller runs the composed
//! path.
use std::borrow::Cow;

use candle_core::{DType, Device, Result, Tensor};

use super::layers::{Block, ForwardHooks, KvCache, Proj};
use super::transformer::Transformer;
use super::weights::Weight;
use crate::ops::fanout::{self, Target};
use crate::ops::qdot::Fmt;

/// A block's projections in the order the step runs them: the attention inputs (`[q | k | v]`),
/// o, the MLP inputs (`[gate | up]`), down.
struct Groups<'a> {
    attn_in: Vec<(Proj, &'a super::layers::Linear)>,
    o: &'a super::layers::Linear,
    mlp_in: Vec<(Proj, &'a super::layers::Linear)>,
    down: &'a super::layers::Linear,
}

fn groups(blk: &Block) -> Option<Groups<'_>> {
    let find = |p: Proj| blk.proj.iter().find(|(q, _)| *q == p).map(|(_, l)| l);
    let attn_in = blk
        .proj
        .iter()
        .filter(|(p, _)| p.is_attention() && *p != Proj::O)
        .map(|(p, l)| (*p, l))
        .collect();
    let mlp_in = blk
        .proj
        .iter()
        .filter(|(p, _)| !p.is_attention() && *p != Proj::Down)
        .map(|(p, l)| (*p, l))
        .collect();
    Some(Groups {
        attn_in,
        o: find(Proj::O)?,
        mlp_in,
        down: find(Proj::Down)?,
    })
}

/// Whether the fan-out reads this weight: blocks of a type it knows on the CPU, or an f32
/// matrix on the CPU that no gradient tracks.
fn readable(w: &Weight) -> bool {
    match w {
        Weight::Quant(q) => Fmt::from_ggml(q.dtype()).is_some() && q.device().is_cpu(),
        Weight::Dense(t) => {
            t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op() && t.rank() == 2
        }
    }
}

fn f32_tensor(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op()
}

/// Whether the row path applies to this model and these adapters.
pub(super) fn applies(m: &Transformer, hooks: &[Option<&dyn ForwardHooks>]) -> bool {
    let c = &m.cfg;
    let widths = |g: &[(Proj, &super::layers::Linear)]| -> usize {
        g.iter().map(|(p, _)| p.dims(c).1).sum()
    };
    let (qd, kvd) = (c.num_heads * c.head_dim, c.kv_dim());
    m.device().is_cpu()
        && c.arch.family().row_decode()
        && c.head_dim.is_multiple_of(2)
        && f32_tensor(&m.cos)
        && f32_tensor(&m.sin)
        && f32_tensor(&m.norm)
        && hooks.iter().flatten().all(|h| h.has_decode_terms())
        && m.layers.iter().all(|blk| {
            let Some(g) = groups(blk) else { return false };
            widths(&g.attn_in) == qd + 2 * kvd
                && widths(&g.mlp_in) == 2 * c.intermediate_size
                && blk.proj.iter().all(|(_, l)| {
                    readable(&l.w) && l.b.as_ref().is_none_or(|b| f32_tensor(b) && b.rank() == 1)
                })
                && f32_tensor(&blk.input_layernorm)
                && f32_tensor(&blk.post_attention_layernorm)
        })
}

/// A tensor's contiguous f32 values, read in place for the duration of `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else {
        candle_core::bail!("row decode: a tensor is not on the CPU")
    };
    f(crate::ops::cpu_slice::<f32>(cpu, l, "row decode")?)
}

/// A weight's raw rows as the fan-out reads them, borrowed for one product: the stored bytes
/// of a block type, or an f32 matrix's storage (read-locked meanwhile).
enum Held<'a> {
    Blocks(Fmt, Cow<'a, [u8]>),
    F32(candle_core::StorageRef<'a>, &'a candle_core::Layout),
}

impl<'a> Held<'a> {
    fn of(w: &'a Weight) -> Result<Self> {
        match w {
            Weight::Quant(q) => {
                let Some(fmt) = Fmt::from_ggml(q.dtype()) else {
                    candle_core::bail!("row decode: no kernel for {:?}", q.dtype())
                };
                Ok(Held::Blocks(fmt, q.data()?))
            }
            Weight::Dense(t) => {
                let (s, l) = t.storage_and_layout();
                Ok(Held::F32(s, l))
            }
        }
    }

    fn rows(&self) -> Result<fanout::Rows<'_>> {
        Ok(match self {
            Held::Blocks(fmt, data) => fanout::Rows::Blocks { fmt: *fmt, data },
            Held::F32(s, l) => {
                let candle_core::Storage::Cpu(cpu) = &**s else {
                    candle_core::bail!("row decode: a weight is not on the CPU")
                };
                fanout::Rows::F32(crate::ops::cpu_slice::<f32>(cpu, l, "row decode")?)
            }
        })
    }
}

/// `y[r, col..col + n] = x[r]·Wᵀ + b` for each projection of `group`, side by side from column
/// 0 of `y` (`m` rows of `ldy`), then each row's adapter delta from its packed factors.
#[allow(clippy::too_many_arguments)]
fn project(
    layer: usize,
    group: &[(Proj, &super::layers::Linear)],
    x: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
    hooks: &[Option<&dyn ForwardHooks>],
) -> Result<()> {
    let held = group
        .iter()
        .map(|(_, l)| Held::of(&l.w))
        .collect::<Result<Vec<_>>>()?;
    let mut targets = Vec::with_capacity(group.len());
    let mut col = 0;
    for ((_, l), h) in group.iter().zip(&held) {
        let n = l.w.dim(0)?;
        targets.push(Target {
            w: h.rows()?,
            n,
            col,
        });
        col += n;
    }
    fanout::products(x, m, k, &targets, y, ldy, true).map_err(candle_core::Error::Msg)?;
    for ((_, l), t) in group.iter().zip(&targets) {
        if let Some(b) = &l.b {
            with_f32(b, |b| {
                for row in y.chunks_mut(ldy).take(m) {
                    for (v, bv) in row[t.col..t.col + t.n].iter_mut().zip(b) {
                        *v += bv;
                    }
                }
                Ok(())
            })?;
        }
    }
    // Adapter deltas: each row its own variant's factors; rows with a variant in parallel.
    let mut work = Vec::new();
    for (r, (yr, xr)) in y.chunks_mut(ldy).zip(x.chunks(k)).take(m).enumerate() {
        let Some(hk) = hooks[r] else { continue };
        let mut parts = Vec::new();
        let mut rest = yr;
        let mut at = 0;
        for ((p, _), t) in group.iter().zip(&targets) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(t.col - at);
            let (mine, tail) = tail.split_at_mut(t.n);
            rest = tail;
            at = t.col + t.n;
            if let Some(term) = hk.decode_term(layer, *p) {
                parts.push((mine, term));
            }
        }
        if !parts.is_empty() {
            work.push((xr, parts));
        }
    }
    if !work.is_empty() {
        count_packed(group.len());
    }
    let apply = |(xr, parts): (&[f32], Vec<(&mut [f32], _)>)| -> Result<()> {
        for (y, term) in parts {
            crate::ops::lora_rows::add_row(y, xr, term)?;
        }
        Ok(())
    };
    if work.len() > 1 {
        use rayon::prelude::*;
        work.into_par_iter().try_for_each(apply)
    } else {
        work.into_iter().try_for_each(apply)
    }
}

/// Counts projections whose deltas came from packed factors in the test counter
/// `ops::lora_rows::RUNS` (one per projection of a step, as the composed path's `add_spans`),
/// so tests can prove which path a batch took.
#[cfg(test)]
fn count_packed(projections: usize) {
    crate::ops::lora_rows::RUNS.with(|c| c.set(c.get() + projections));
}

#[cfg(not(test))]
fn count_packed(_: usize) {}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w` for every row of `hidden` values, rounded as
/// the composed path's kernel (`candle_nn::ops::rms_norm`) rounds it: a sequential sum and a
/// division, so both paths hand the projections the same activations.
fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], hidden: usize, eps: f32) {
    for (o, xr) in out.chunks_mut(hidden).zip(x.chunks(hidden)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let rms = (ss / hidden as f32 + eps).sqrt();
        for ((ov, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
            *ov = xv / rms * wv;
        }
    }
}

/// Rotate-half RoPE in place on `heads` heads of `d` values, with the position's cosines and
/// sines (`d / 2` each).
fn rope(v: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for h in v.chunks_mut(d).take(heads) {
        let (lo, hi) = h.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// One decode step on the row path: see [`Transformer::decode_batch`] (whose checks of the
/// arguments and positions have run). Returns the logits `(n, vocab)`.
pub(super) fn decode(
    m: &Transformer,
    tokens: &[u32],
    caches: &mut [&mut KvCache],
    hooks: &[Option<&dyn ForwardHooks>],
) -> Result<Tensor> {
    let c = &m.cfg;
    let n = tokens.len();
    let (hid, d, nh, nkv, ff) = (
        c.hidden_size,
        c.head_dim,
        c.num_heads,
        c.num_kv_heads,
        c.intermediate_size,
    );
    let (qd, kvd) = (nh * d, nkv * d);
    let eps = c.rms_norm_eps as f32;
    let scale = 1.0 / (d as f32).sqrt();
    let device = Device::Cpu;
    let ids = Tensor::new(tokens, &device)?;
    let mut x = m
        .embed(&ids)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if x.len() != n * hid {
        candle_core::bail!("row decode: embeddings of {} values for {n} rows", x.len())
    }
    let positions: Vec<usize> = caches.iter().map(|k| k.len).collect();
    let half = d / 2;
    // Each row's cosines and sines, copied out of the tables once per step.
    let (cos, sin) = with_f32(&m.cos, |cos| {
        with_f32(&m.sin, |sin| {
            let pick = |t: &[f32]| -> Result<Vec<f32>> {
                let mut out = Vec::with_capacity(n * half);
                for &p in &positions {
                    match t.get(p * half..(p + 1) * half) {
                        Some(s) => out.extend_from_slice(s),
                        None => candle_core::bail!("row decode: position {p} past the rope table"),
                    }
                }
                Ok(out)
            };
            Ok((pick(cos)?, pick(sin)?))
        })
    })?;
    let wqkv = qd + 2 * kvd;
    let mut h = vec![0f32; n * hid];
    let mut qkv = vec![0f32; n * wqkv];
    let mut q = vec![0f32; n * qd];
    let mut att = vec![0f32; n * qd];
    let mut y = vec![0f32; n * hid];
    let mut gu = vec![0f32; n * 2 * ff];
    let mut act = vec![0f32; n * ff];
    for (i, blk) in m.layers.iter().enumerate() {
        let Some(g) = groups(blk) else {
            candle_core::bail!("row decode: layer {i} lacks o_proj or down_proj")
        };
        with_f32(&blk.input_layernorm, |w| {
            rms_norm(&mut h, &x, w, hid, eps);
            Ok(())
        })?;
        project(i, &g.attn_in, &h, n, hid, &mut qkv, wqkv, hooks)?;
        let mut kv = Vec::with_capacity(n);
        for (r, cache) in caches.iter_mut().enumerate() {
            let row = &mut qkv[r * wqkv..][..wqkv];
            let (cr, sr) = (&cos[r * half..][..half], &sin[r * half..][..half]);
            let (qr, rest) = row.split_at_mut(qd);
            rope(qr, nh, d, cr, sr);
            rope(&mut rest[..kvd], nkv, d, cr, sr);
            q[r * qd..][..qd].copy_from_slice(qr);
            let k = Tensor::from_slice(&rest[..kvd], (1, nkv, 1, d), &device)?;
            let v = Tensor::from_slice(&rest[kvd..], (1, nkv, 1, d), &device)?;
            kv.push(cache.layers[i].append(&k, &v)?);
        }
        crate::ops::decode::attention_slices(&mut att, &q, &kv, nh, d, scale)?;
        drop(kv);
        project(
            i,
            std::slice::from_ref(&(Proj::O, g.o)),
            &att,
            n,
            qd,
            &mut y,
            hid,
            hooks,
        )?;
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        with_f32(&blk.post_attention_layernorm, |w| {
            rms_norm(&mut h, &x, w, hid, eps);
            Ok(())
        })?;
        project(i, &g.mlp_in, &h, n, hid, &mut gu, 2 * ff, hooks)?;
        for (a, row) in act.chunks_mut(ff).zip(gu.chunks(2 * ff)) {
            let (gate, up) = row.split_at(ff);
            for ((o, &gv), &uv) in a.iter_mut().zip(gate).zip(up) {
                *o = gv / (1.0 + (-gv).exp()) * uv;
            }
        }
        project(
            i,
            std::slice::from_ref(&(Proj::Down, g.down)),
            &act,
            n,
            ff,
            &mut y,
            hid,
            hooks,
        )?;
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
    }
    for cache in caches.iter_mut() {
        cache.len += 1;
    }
    with_f32(&m.norm, |w| {
        rms_norm(&mut h, &x, w, hid, eps);
        Ok(())
    })?;
    m.logits(&Tensor::from_vec(h, (n, hid), &device)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::model::arch::Arch;
    use crate::model::layers::Ctx;
    use crate::model::llama::tests::{max_abs, tiny_config};
    use crate::ops::lora_rows::{DecodeElem, PackedPair, RowTerm};

    /// A LoRA-like adapter with packed factors on every projection of every layer.
    struct Packed {
        pairs: HashMap<(usize, Proj), PackedPair<DecodeElem>>,
        scale: f32,
    }

    impl Packed {
        fn new(m: &Transformer, r: usize, seed: f32) -> Self {
            let mut pairs = HashMap::new();
            for (i, blk) in m.layers.iter().enumerate() {
                for (p, _) in &blk.proj {
                    let (inp, out) = p.dims(&m.cfg);
                    let a = Tensor::randn(seed, 0.3, (r, inp), &Device::Cpu).unwrap();
                    let b = Tensor::randn(-seed, 0.3, (out, r), &Device::Cpu).unwrap();
                    pairs.insert((i, *p), PackedPair::new(&a, &b).unwrap());
                }
            }
            Self { pairs, scale: 0.5 }
        }
    }

    impl ForwardHooks for Packed {
        fn has_decode_terms(&self) -> bool {
            true
        }
        fn decode_term(&self, layer: usize, proj: Proj) -> Option<RowTerm<'_, DecodeElem>> {
            Some(RowTerm {
                pair: self.pairs.get(&(layer, proj))?,
                scale: self.scale,
            })
        }
    }

    /// A config whose widths are whole 32-element blocks, so projections can be quantized.
    fn blocky(arch: Arch) -> crate::model::ModelConfig {
        let mut c = tiny_config(arch);
        c.hidden_size = 64;
        c.intermediate_size = 96;
        c.head_dim = 16;
        c.num_heads = 4;
        c.num_kv_heads = 2;
        c
    }

    /// The model with its projections and embeddings held in GGUF blocks (Q4_1 and Q8_0, as the
    /// default SmolLM2 file) and the LM head tied or in f16.
    fn quantized(arch: Arch) -> Transformer {
        let mut m = Transformer::random(blocky(arch), &Device::Cpu).unwrap();
        let q = |w: &Weight, t: GgmlDType| Weight::quantize(&w.to_dense(DType::F32).unwrap(), t);
        for blk in &mut m.layers {
            for (j, (_, l)) in blk.proj.iter_mut().enumerate() {
                let t = if j % 2 == 0 {
                    GgmlDType::Q4_1
                } else {
                    GgmlDType::Q8_0
                };
                l.w = q(&l.w, t).unwrap();
            }
        }
        m.embed_tokens = q(&m.embed_tokens, GgmlDType::Q8_0).unwrap();
        m.lm_head = if m.cfg.tie_word_embeddings {
            m.embed_tokens.clone()
        } else {
            q(&m.lm_head, GgmlDType::F16).unwrap()
        };
        m
    }

    /// Several decode steps of three sequences (different lengths, base and two adapters) on
    /// the row path and on the composed path from the same prefilled caches. With weights in
    /// blocks both paths run the same kernels on the same values, so the logits are equal bit
    /// for bit; with f32 weights the row path's few-row kernel and BLAS sum in other orders, so
    /// the logits agree within 2e-3 of their largest magnitude. The caches agree too.
    #[test]
    fn row_path_equals_composed_path() {
        for arch in [Arch::Llama, Arch::Qwen2, Arch::Phi3] {
            for m in [
                quantized(arch),
                Transformer::random(blocky(arch), &Device::Cpu).unwrap(),
            ] {
                let (a, b) = (Packed::new(&m, 4, 0.1), Packed::new(&m, 2, -0.2));
                let hooks: [Option<&dyn ForwardHooks>; 3] = [None, Some(&a), Some(&b)];
                assert!(applies(&m, &hooks), "{arch:?}: row path does not apply");
                let prompts: [&[u32]; 3] = [&[3, 4, 5], &[7, 8, 9, 10, 11, 12, 13], &[14]];
                let mut row: Vec<KvCache> = prompts
                    .iter()
                    .zip(hooks)
                    .map(|(p, hk)| {
                        let mut cache = KvCache::new(&m.cfg, 4);
                        let ids = Tensor::new(*p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                        let ctx = Ctx {
                            cache: Some(&mut cache),
                            hooks: hk,
                            packed: None,
                        };
                        m.forward_hidden(&m.embed(&ids).unwrap(), ctx).unwrap();
                        cache
                    })
                    .collect();
                let mut composed: Vec<KvCache> = row.iter().map(|c| c.fork(4).unwrap()).collect();
                for step in 0..4u32 {
                    let next = [20 + step, 30 + step, 40 + step];
                    let mut r: Vec<&mut KvCache> = row.iter_mut().collect();
                    let got = m.decode_batch(&next, &mut r, &hooks).unwrap();
                    let mut c: Vec<&mut KvCache> = composed.iter_mut().collect();
                    let want = m.decode_batch_composed(&next, &mut c, &hooks).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    let size = want.abs().unwrap().max_all().unwrap();
                    let size = size.to_scalar::<f32>().unwrap();
                    let d = max_abs(&got, &want);
                    if m.embed_tokens.as_dense().is_none() {
                        // Blocks: both paths run the same kernels on the same activations.
                        assert_eq!(d, 0.0, "{arch:?} step {step}: the paths' logits differ");
                    }
                    assert!(
                        d <= 2e-3 * size.max(1.0),
                        "{arch:?} {} step {step}: max abs diff {d} (logits up to {size})",
                        m.embed_tokens.type_name()
                    );
                }
                for (x, y) in row.iter().zip(&composed) {
                    assert_eq!(x.len(), y.len());
                    for l in 0..m.cfg.num_layers {
                        let (kx, vx) = x.layer_kv(l).unwrap().unwrap();
                        let (ky, vy) = y.layer_kv(l).unwrap().unwrap();
                        assert!(max_abs(&kx, &ky) < 1e-2 && max_abs(&vx, &vy) < 1e-2);
                    }
                }
            }
        }
    }

    #[test]
    fn helpers_match_their_definitions() {
        // RMSNorm and RoPE against f64 versions of the formulas in the module's docs.
        let (hid, eps) = (8, 1e-5f32);
        let x: Vec<f32> = (0..2 * hid)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let w: Vec<f32> = (0..hid).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut out = vec![0f32; 2 * hid];
        rms_norm(&mut out, &x, &w, hid, eps);
        for r in 0..2 {
            let xr = &x[r * hid..][..hid];
            let ms: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hid as f64;
            for i in 0..hid {
                let want = xr[i] as f64 / (ms + eps as f64).sqrt() * w[i] as f64;
                assert!((out[r * hid + i] as f64 - want).abs() < 1e-5);
            }
        }
        let (heads, d) = (3, 6);
        let mut v: Vec<f32> = (0..heads * d).map(|i| i as f32 - 4.0).collect();
        let orig = v.clone();
        let ang = [0.3f64, 1.1, -2.0];
        let cos: Vec<f32> = ang.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin() as f32).collect();
        rope(&mut v, heads, d, &cos, &sin);
        for h in 0..heads {
            for i in 0..d / 2 {
                let (a, b) = (orig[h * d + i] as f64, orig[h * d + i + d / 2] as f64);
                let (c, s) = (ang[i].cos(), ang[i].sin());
                assert!((v[h * d + i] as f64 - (a * c - b * s)).abs() < 1e-5);
                assert!((v[h * d + i + d / 2] as f64 - (b * c + a * s)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn hooks_without_packed_factors_take_the_composed_path() {
        struct Opaque;
        impl ForwardHooks for Opaque {}
        let m = Transformer::random(blocky(Arch::Llama), &Device::Cpu).unwrap();
        assert!(applies(&m, &[None]));
        assert!(!applies(&m, &[None, Some(&Opaque)]));
    }
}
