//! The decoder-only transformer every architecture runs as: embeddings, pre-norm blocks
//! (norm → attention → residual → norm → MLP → residual) with grouped-query attention,
//! rotate-half RoPE and RMSNorm, and a tied or separate LM head. What differs between families —
//! which projections a block has, how q/k/v and the MLP are wired from them, whether blocks can
//! train as the fused op — the forward asks the config's [`super::arch::Architecture`].
//!
//! One forward serves training and serving. Which kernels run is decided inside [`crate::ops`]
//! from whether a gradient is tracked:
//!
//! | step            | serving (no gradient)               | training (gradient tracked)      |
//! |-----------------|-------------------------------------|----------------------------------|
//! | RMSNorm         | `candle_nn::ops::rms_norm` (fused)  | composed `x·rsqrt(mean(x²)+ε)·w` |
//! | RoPE            | `candle_nn::rotary_emb::rope`       | composed narrow/mul/cat          |
//! | softmax         | `softmax_last_dim` (fused)          | composed exp/sum (max detached)  |
//! | projections     | 2-D matmul (gemm)                   | same                             |
//! | attention       | GQA folded into rows, one matmul per KV head, KV cache | same, no cache |
//!
//! Weights are named as in HF checkpoints; GGUF tensors are renamed at load time, so both
//! sources end up in the same structure. Weight matrices (projections, embeddings, LM head) are
//! [`Weight`]s — f32 tensors, or blocks as stored ([`super::weights::WeightsMode`]); norms and
//! biases are f32 tensors. Projections go through [`ops::quant::linear`], which sends each
//! kind to its kernel.
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use super::arch::FUSED_PROJS;
use super::config::ModelConfig;
use super::layers::{
    expand_batch, rope_tables, Block, Ctx, ForwardHooks, KvCache, Linear, Packed, Proj, Rows,
};
use super::weights::Weight;
use crate::ops;

/// A loaded model of any registered architecture (`cfg.arch`).
pub struct Transformer {
    pub cfg: ModelConfig,
    pub embed_tokens: Weight,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// Shares storage with `embed_tokens` when the embeddings are tied.
    pub lm_head: Weight,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    device: Device,
}

fn take(w: &mut HashMap<String, Weight>, name: &str) -> std::result::Result<Weight, String> {
    w.remove(name).ok_or_else(|| name.to_string())
}

/// A norm or bias: always a plain f32 tensor (the loaders never quantize vectors).
fn vector(w: Weight) -> Result<Tensor> {
    w.to_dense(DType::F32)
}

impl Transformer {
    /// Builds the model from f32 tensors named as in HF checkpoints (`model.layers.0.self_attn.
    /// q_proj.weight`, …), the block tensors being those `cfg.arch` declares.
    /// Returns the name of the first missing tensor on error.
    pub fn from_weights(
        cfg: ModelConfig,
        w: HashMap<String, Tensor>,
        device: &Device,
    ) -> std::result::Result<Self, super::ModelError> {
        let w = w.into_iter().map(|(k, t)| (k, Weight::Dense(t))).collect();
        Self::from_stored(cfg, w, device)
    }

    /// [`Self::from_weights`] for weights as the loaders hold them (dense or in blocks).
    pub fn from_stored(
        cfg: ModelConfig,
        mut w: HashMap<String, Weight>,
        device: &Device,
    ) -> std::result::Result<Self, super::ModelError> {
        let missing = super::ModelError::MissingTensor;
        let family = cfg.arch.family();
        let embed_tokens = take(&mut w, "model.embed_tokens.weight").map_err(missing)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut t = |n: &str| take(&mut w, &format!("{p}.{n}")).map_err(missing);
            // Attention weights, then their biases, then the MLP, then the norms: the order a
            // missing tensor is reported in.
            let mut proj = Vec::new();
            for half in [true, false] {
                let projs = family.projections().iter().copied();
                let projs: Vec<Proj> = projs.filter(|p| p.is_attention() == half).collect();
                let start = proj.len();
                for &pr in &projs {
                    let weight = t(&format!("{}.weight", pr.hf_path()))?;
                    proj.push((pr, Linear { w: weight, b: None }));
                }
                for (pr, lin) in &mut proj[start..] {
                    if family.has_bias(*pr, &cfg) {
                        lin.b = Some(vector(t(&format!("{}.bias", pr.hf_path()))?)?);
                    }
                }
            }
            layers.push(Block {
                input_layernorm: vector(t("input_layernorm.weight")?)?,
                post_attention_layernorm: vector(t("post_attention_layernorm.weight")?)?,
                proj,
            });
        }
        let norm = vector(take(&mut w, "model.norm.weight").map_err(missing)?)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            take(&mut w, "lm_head.weight").map_err(missing)?
        };
        let model = Self::assemble(cfg, embed_tokens, layers, norm, lm_head, device)?;
        model.check_shapes()?;
        Ok(model)
    }

    fn assemble(
        cfg: ModelConfig,
        embed_tokens: Weight,
        layers: Vec<Block>,
        norm: Tensor,
        lm_head: Weight,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cos,
            sin,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    fn check_shapes(&self) -> std::result::Result<(), super::ModelError> {
        let c = &self.cfg;
        let want = |name: String, t: &Weight, dims: &[usize]| {
            if t.dims() == dims {
                Ok(())
            } else {
                Err(super::ModelError::Config(format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    t.dims()
                )))
            }
        };
        want(
            "model.embed_tokens.weight".into(),
            &self.embed_tokens,
            &[c.vocab_size, c.hidden_size],
        )?;
        want(
            "lm_head.weight".into(),
            &self.lm_head,
            &[c.vocab_size, c.hidden_size],
        )?;
        for (i, l) in self.layers.iter().enumerate() {
            for (pr, lin) in &l.proj {
                let (inp, out) = pr.dims(c);
                let name = format!("model.layers.{i}.{}.weight", pr.hf_path());
                want(name, &lin.w, &[out, inp])?;
            }
        }
        Ok(())
    }

    /// Bytes of every weight, norm and bias as held (the tied LM head counted once).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let head = if self.cfg.tie_word_embeddings {
            0
        } else {
            self.lm_head.bytes()
        };
        self.embed_tokens.bytes()
            + head
            + t(&self.norm)
            + self.layers.iter().map(Block::bytes).sum::<usize>()
    }

    /// Whether every weight matrix is a plain tensor (nothing held in quantized or half blocks).
    pub fn is_dense(&self) -> bool {
        self.embed_tokens.as_dense().is_some()
            && self.lm_head.as_dense().is_some()
            && self
                .layers
                .iter()
                .all(|l| l.proj.iter().all(|(_, lin)| lin.w.as_dense().is_some()))
    }

    /// Every weight with its HF name (the tied LM head is listed once, as the embeddings), as
    /// plain tensors: a weight held in blocks is dequantized to f32 here, so this makes a full
    /// copy of such a model (export, full fine-tuning).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dense = |w: &Weight| w.to_dense(DType::F32);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            dense(&self.embed_tokens)?,
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let weights = |attention: bool| {
                l.proj
                    .iter()
                    .filter(move |(pr, _)| pr.is_attention() == attention)
                    .map(|(pr, lin)| {
                        Ok::<_, candle_core::Error>((
                            format!("{}.weight", pr.hf_path()),
                            dense(&lin.w)?,
                        ))
                    })
            };
            let one = |n: &str, t: &Tensor| Ok::<_, candle_core::Error>((n.to_string(), t.clone()));
            let named = std::iter::once(one("input_layernorm.weight", &l.input_layernorm))
                .chain(weights(true))
                .chain(std::iter::once(one(
                    "post_attention_layernorm.weight",
                    &l.post_attention_layernorm,
                )))
                .chain(weights(false))
                .chain(l.proj.iter().filter_map(|(pr, lin)| {
                    lin.b
                        .as_ref()
                        .map(|b| one(&format!("{}.bias", pr.hf_path()), b))
                }));
            for item in named {
                let (n, t): (String, Tensor) = item?;
                out.push((format!("{p}.{n}"), t));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), dense(&self.lm_head)?));
        }
        Ok(out)
    }

    /// The same model built from other tensors of the same names (e.g. trainable copies).
    pub fn with_weights(
        &self,
        weights: HashMap<String, Tensor>,
    ) -> std::result::Result<Self, super::ModelError> {
        Self::from_weights(self.cfg.clone(), weights, &self.device)
    }

    /// A model with random weights, for tests and benchmarks.
    pub fn random(cfg: ModelConfig, device: &Device) -> Result<Self> {
        let c = &cfg;
        let family = c.arch.family();
        let r = |rows: usize, cols: usize| -> Result<Tensor> {
            Tensor::randn(
                0f32,
                (1.0 / cols as f64).sqrt() as f32,
                (rows, cols),
                device,
            )
        };
        let norm_w = |n: usize| -> Result<Tensor> { Tensor::rand(0.8f32, 1.2, n, device) };
        let h = c.hidden_size;
        let mut layers = Vec::new();
        for _ in 0..c.num_layers {
            let mut proj = Vec::new();
            for &pr in family.projections() {
                let (inp, out) = pr.dims(c);
                let b = if family.has_bias(pr, c) {
                    Some(Tensor::randn(0f32, 0.1, out, device)?)
                } else {
                    None
                };
                proj.push((
                    pr,
                    Linear {
                        w: r(out, inp)?.into(),
                        b,
                    },
                ));
            }
            layers.push(Block {
                input_layernorm: norm_w(h)?,
                post_attention_layernorm: norm_w(h)?,
                proj,
            });
        }
        let embed = Tensor::randn(0f32, 1.0, (c.vocab_size, h), device)?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            r(c.vocab_size, h)?
        };
        let norm = norm_w(h)?;
        Self::assemble(cfg, embed.into(), layers, norm, lm_head.into(), device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token ids `(b, l)` → embeddings `(b, l, hidden)`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        self.embed_tokens.embedding(tokens)
    }

    /// Runs the decoder stack on embeddings `(b, l, hidden)`. Returns the final-normed hidden
    /// states `(b, l, hidden)`.
    ///
    /// Positions: with a cache, the first position is the cache length; without one, 0. A KV
    /// prefix from the hooks (prefix tuning) sits ahead of the sequence and shifts positions by
    /// its length, as HF does with `past_key_values`; with a cache it is written into the empty
    /// cache once, so decode steps reuse it.
    pub fn forward_hidden(&self, x: &Tensor, ctx: Ctx<'_>) -> Result<Tensor> {
        let Ctx {
            mut cache,
            hooks,
            packed,
        } = ctx;
        let (b, l, _) = x.dims3()?;
        let c = &self.cfg;
        let prefix_len = hooks.map_or(0, |h| h.prefix_len());
        // Prefix KV tensors to concatenate on each layer (training path, no cache).
        let mut cat_prefix = false;
        if let Some(cache) = cache.as_deref_mut() {
            if cache.is_empty() && prefix_len > 0 {
                if let Some(h) = hooks {
                    for (i, layer_cache) in cache.layers.iter_mut().enumerate() {
                        if let Some((k, v)) = h.kv_prefix(i)? {
                            layer_cache.append(&expand_batch(&k, b)?, &expand_batch(&v, b)?)?;
                        }
                    }
                    cache.len = prefix_len;
                }
            }
        } else {
            cat_prefix = prefix_len > 0;
        }
        let offset = match cache.as_ref() {
            Some(cache) => cache.len,
            None => prefix_len,
        };
        if offset + l > c.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} positions exceeds the context of {}",
                offset + l,
                c.max_position_embeddings
            );
        }
        if cache.is_none() && prefix_len == 0 {
            if let Some(x) = self.fused_blocks(x, hooks, packed)? {
                return ops::rms_norm(&x, &self.norm, c.rms_norm_eps);
            }
        }
        let (cos, sin, mask) = match packed {
            Some(p) => {
                let pos = p.positions.flatten_all()?;
                let pos = if offset > 0 {
                    pos.broadcast_add(&Tensor::new(offset as u32, &self.device)?)?
                } else {
                    pos
                };
                let half = c.head_dim / 2;
                let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, l, half))?;
                let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, l, half))?;
                let mask = p.mask.to_dtype(x.dtype())?;
                let mask = if offset > 0 {
                    let visible = Tensor::zeros((b, l, offset), x.dtype(), &self.device)?;
                    Tensor::cat(&[&visible, &mask], 2)?
                } else {
                    mask
                };
                (cos, sin, Some(mask))
            }
            None => {
                let mask = if l > 1 {
                    Some(ops::causal_mask(l, offset, x.dtype(), &self.device)?)
                } else {
                    None
                };
                (
                    self.cos.narrow(0, offset, l)?,
                    self.sin.narrow(0, offset, l)?,
                    mask,
                )
            }
        };
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let x = self.run_layers(x, Rows::All(hooks), &cos, &sin, &mut |i, q, k, v| {
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.layers[i].append(&k, &v)?,
                None if cat_prefix => match hooks.map(|h| h.kv_prefix(i)).transpose()?.flatten() {
                    Some((pk, pv)) => (
                        Tensor::cat(&[&expand_batch(&pk, b)?, &k], 2)?,
                        Tensor::cat(&[&expand_batch(&pv, b)?, &v], 2)?,
                    ),
                    None => (k, v),
                },
                None => (k, v),
            };
            if q.track_op() && self.device.is_cpu() {
                // Training: fused kernel that recomputes probabilities in the backward.
                let visible = k.dim(2)? - l;
                let segments = packed.map(|p| p.segments.as_slice());
                ops::attention::fused_attention(&q, &k, &v, visible, segments, scale)
            } else {
                ops::attention(&q, &k, &v, mask.as_ref(), scale)
            }
        })?;
        if let Some(cache) = cache {
            cache.len += l;
        }
        ops::rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// The training forward of the blocks as fused whole-block ops ([`ops::decoder`]), when it
    /// applies: an architecture with that capability, CPU, f32/f64, frozen base weights, no
    /// adapter or one that is purely low-rank, and a gradient to track (the input's or a LoRA
    /// factor's). None: use [`Self::run_layers`].
    fn fused_blocks(
        &self,
        x: &Tensor,
        hooks: Option<&dyn ForwardHooks>,
        packed: Option<&Packed>,
    ) -> Result<Option<Tensor>> {
        use ops::decoder::{BlockDims, DecoderLayer, LoraSpec};
        if !self.device.is_cpu()
            || !matches!(x.dtype(), DType::F32 | DType::F64)
            || hooks.is_some_and(|h| !h.only_low_rank())
        {
            return Ok(None);
        }
        let c = &self.cfg;
        let family = c.arch.family();
        let Some(weights) = self
            .layers
            .iter()
            .map(|blk| family.fused_block(blk, c))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let frozen = |t: &Tensor| !t.track_op() && t.dtype() == x.dtype();
        // Weights held in blocks are frozen by nature; the op dequantizes one layer at a time.
        if !self.layers.iter().all(|blk| blk.tensors().all(frozen)) {
            return Ok(None);
        }
        let (b, l, _) = x.dims3()?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut tracked = x.track_op();
        for i in 0..self.layers.len() {
            let mut specs: [Option<LoraSpec>; 7] = Default::default();
            let mut parts = Vec::new();
            for (j, proj) in FUSED_PROJS.into_iter().enumerate() {
                let (inp, _) = proj.dims(c);
                let Some(lr) = hooks
                    .map(|h| h.low_rank(i, proj, &(b, l, inp).into()))
                    .transpose()?
                    .flatten()
                else {
                    continue;
                };
                if lr.a.dtype() != x.dtype() || lr.b.dtype() != x.dtype() {
                    return Ok(None);
                }
                tracked |= lr.a.track_op() || lr.b.track_op();
                parts.push(lr.a.flatten_all()?);
                parts.push(lr.b.flatten_all()?);
                specs[j] = Some(LoraSpec {
                    r: lr.a.dim(0)?,
                    scale: lr.scale,
                    mask: lr.dropout_mask,
                });
            }
            layers.push((specs, parts));
        }
        if !tracked {
            return Ok(None);
        }
        let pos = match packed {
            Some(p) => p.positions.flatten_all()?,
            None => Tensor::arange(0u32, l as u32, &self.device)?.repeat(b)?,
        };
        let cos = self.cos.index_select(&pos, 0)?.to_dtype(x.dtype())?;
        let sin = self.sin.index_select(&pos, 0)?.to_dtype(x.dtype())?;
        let segments = packed.map(|p| p.segments.concat());
        let dims = BlockDims {
            b,
            l,
            n_head: c.num_heads,
            n_kv: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let none = Tensor::zeros(1, x.dtype(), &self.device)?;
        let mut x = x.clone();
        for (w, (specs, parts)) in weights.into_iter().zip(layers) {
            let flat = if parts.is_empty() {
                none.clone()
            } else {
                Tensor::cat(&parts, 0)?
            };
            let op = DecoderLayer::new(w, specs, dims, cos.clone(), sin.clone(), segments.clone());
            x = ops::decoder::decoder_layer(&x, &flat, op)?;
        }
        Ok(Some(x))
    }

    /// The decoder blocks on `x (b, l, hidden)` with rotary tables `cos`/`sin` (any shape
    /// [`ops::rope`] takes). `attend(layer, q, k, v)` gets the rotated heads and returns the
    /// attention output `(b, n_head, l, head_dim)`: it owns caching and masking, which is what
    /// differs between a single forward and a batched decode step. The architecture wires q/k/v
    /// and the MLP; every projection it asks for goes through the adapters' hooks here.
    fn run_layers(
        &self,
        x: &Tensor,
        hooks: Rows<'_>,
        cos: &Tensor,
        sin: &Tensor,
        attend: &mut dyn FnMut(usize, Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let family = c.arch.family();
        let (b, l, _) = x.dims3()?;
        let proj = |layer: usize, which: Proj, h: &Tensor, w: &Weight, bias: Option<&Tensor>| {
            if let Rows::All(Some(hk)) = hooks {
                if let Some(lr) = hk.low_rank(layer, which, h.shape())? {
                    let term = ops::linear::LoraTerm {
                        a: &lr.a,
                        b: &lr.b,
                        scale: lr.scale,
                        dropout_mask: lr.dropout_mask.as_ref(),
                    };
                    return ops::quant::linear_lora(h, w, bias, &term);
                }
            }
            let y = ops::quant::linear(h, w, bias)?;
            hooks.add_deltas(layer, which, h, y)
        };
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, l, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let project = |which: Proj, h: &Tensor| -> Result<Tensor> {
                let lin = layer.linear(which)?;
                proj(i, which, h, &lin.w, lin.b.as_ref())
            };
            let h = ops::rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps)?;
            let (q, k, v) = family.attention_inputs(c, &h, &project)?;
            let q = ops::rope(&heads(q, c.num_heads)?, cos, sin)?;
            let k = ops::rope(&heads(k, c.num_kv_heads)?, cos, sin)?;
            let v = heads(v, c.num_kv_heads)?;
            let att =
                attend(i, q, k, v)?
                    .transpose(1, 2)?
                    .reshape((b, l, c.num_heads * c.head_dim))?;
            x = (x + project(Proj::O, &att)?)?;
            let h = ops::rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            x = (x + family.mlp(c, &h, &project)?)?;
        }
        Ok(x)
    }

    /// One decode step for several sequences at once (continuous batching): `tokens[i]` is
    /// sequence i's next input, `caches[i]` its (non-empty) cache, `hooks[i]` its adapter.
    /// Projections and the MLP run as one GEMM over all rows, so the weights are read once per
    /// step instead of once per sequence; attention runs per sequence against its own cache.
    /// On the CPU this takes the row decode path ([`super::decode_step`]) when it applies.
    /// Returns the logits `(n, vocab)`.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        hooks: &[Option<&dyn ForwardHooks>],
    ) -> Result<Tensor> {
        let n = tokens.len();
        if caches.len() != n || hooks.len() != n {
            candle_core::bail!(
                "decode_batch: {n} tokens, {} caches, {} hooks",
                caches.len(),
                hooks.len()
            );
        }
        let c = &self.cfg;
        let positions: Vec<u32> = caches.iter().map(|k| k.len as u32).collect();
        if let Some(&p) = positions.iter().max() {
            if p as usize + 1 > c.max_position_embeddings {
                candle_core::bail!(
                    "sequence of {} positions exceeds the context of {}",
                    p + 1,
                    c.max_position_embeddings
                );
            }
        }
        if super::decode_step::applies(self, hooks) {
            return super::decode_step::decode(self, tokens, caches, hooks);
        }
        self.decode_batch_composed(tokens, caches, hooks)
    }

    /// [`Self::decode_batch`] through the composed forward (candle ops per step): what runs when
    /// the row decode path does not apply, and the reference it is tested against.
    pub fn decode_batch_composed(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        hooks: &[Option<&dyn ForwardHooks>],
    ) -> Result<Tensor> {
        let n = tokens.len();
        let c = &self.cfg;
        let positions: Vec<u32> = caches.iter().map(|k| k.len as u32).collect();
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let half = c.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((n, 1, 1, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((n, 1, 1, half))?;
        let x = self.embed(&Tensor::new(tokens, &self.device)?.unsqueeze(1)?)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let decode = ops::quant::DecodeRows::enter();
        let x = self.run_layers(&x, Rows::PerRow(hooks), &cos, &sin, &mut |i, q, k, v| {
            let mut kv = Vec::with_capacity(n);
            for (r, cache) in caches.iter_mut().enumerate() {
                kv.push(cache.layers[i].append(&k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?);
            }
            ops::decode::attention_rows(&q, &kv, scale)
        })?;
        drop(decode);
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.logits(&ops::rms_norm(&x, &self.norm, c.rms_norm_eps)?.squeeze(1)?)
    }

    /// Prefills several fresh sequences in one forward: `xs[i]` are the embeddings `(1, l_i,
    /// hidden)` of sequence `i` (its soft prompt included), `caches[i]` its empty cache, and
    /// `hooks[i]` its adapter (none with a KV prefix). The prompts are packed into one row, so
    /// the projections run as one GEMM over all their tokens (several times the rows, a
    /// fraction more time) while attention stays inside each prompt and each adapter's deltas
    /// apply to its own prompt. Returns the logits of each prompt's last position `(n, vocab)`.
    pub fn prefill_batch(
        &self,
        xs: &[Tensor],
        caches: &mut [&mut KvCache],
        hooks: &[Option<&dyn ForwardHooks>],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let n = xs.len();
        if caches.len() != n || hooks.len() != n || n == 0 {
            candle_core::bail!(
                "prefill_batch: {n} prompts for {} caches and {} hooks",
                caches.len(),
                hooks.len()
            )
        }
        let prefixed = hooks.iter().flatten().any(|h| h.prefix_len() > 0);
        if caches.iter().any(|k| !k.is_empty()) || prefixed {
            candle_core::bail!("prefill_batch: caches must be empty and adapters prefix-free")
        }
        let lens = xs.iter().map(|x| x.dim(1)).collect::<Result<Vec<_>>>()?;
        if let Some(&l) = lens
            .iter()
            .find(|&&l| l == 0 || l > c.max_position_embeddings)
        {
            candle_core::bail!(
                "prefill_batch: a prompt of {l} positions (context {})",
                c.max_position_embeddings
            )
        }
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &l| {
                let off = *acc;
                *acc += l;
                Some(off)
            })
            .collect();
        let x = Tensor::cat(xs, 1)?;
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let total = positions.len();
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let half = c.head_dim / 2;
        let cos = self
            .cos
            .index_select(&pos, 0)?
            .reshape((1, 1, total, half))?;
        let sin = self
            .sin
            .index_select(&pos, 0)?
            .reshape((1, 1, total, half))?;
        let masks = lens
            .iter()
            .map(|&l| {
                (l > 1)
                    .then(|| ops::causal_mask(l, 0, x.dtype(), &self.device))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let spans: Vec<(usize, Option<&dyn ForwardHooks>)> =
            lens.iter().copied().zip(hooks.iter().copied()).collect();
        let x = self.run_layers(&x, Rows::Spans(&spans), &cos, &sin, &mut |i, q, k, v| {
            let mut outs = Vec::with_capacity(n);
            for (s, cache) in caches.iter_mut().enumerate() {
                let (off, l) = (offsets[s], lens[s]);
                let (ks, vs) = cache.layers[i].append(
                    &k.narrow(2, off, l)?.contiguous()?,
                    &v.narrow(2, off, l)?.contiguous()?,
                )?;
                let qs = q.narrow(2, off, l)?;
                outs.push(ops::attention(&qs, &ks, &vs, masks[s].as_ref(), scale)?);
            }
            Tensor::cat(&outs, 2)
        })?;
        for (cache, &l) in caches.iter_mut().zip(&lens) {
            cache.len += l;
        }
        let last: Vec<u32> = offsets
            .iter()
            .zip(&lens)
            .map(|(&o, &l)| (o + l - 1) as u32)
            .collect();
        let h = x
            .squeeze(0)?
            .index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        self.logits(&ops::rms_norm(&h, &self.norm, c.rms_norm_eps)?)
    }

    /// Hidden states `(..., hidden)` → logits `(..., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::quant::linear_exact(hidden, &self.lm_head, None)
    }

    /// Full forward: tokens `(b, l)` → logits `(b, l, vocab)`.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(&self.embed(tokens)?, Ctx::with_cache(cache))?;
        self.logits(&h)
    }

    /// Logits of the last position only `(b, vocab)`: what generation needs, without paying
    /// the LM head for every prompt position.
    pub fn forward_last(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.last_logits(&self.embed(tokens)?, Ctx::with_cache(cache))
    }

    /// Logits of the last position `(b, vocab)` for embeddings `(b, l, hidden)`.
    pub fn last_logits(&self, x: &Tensor, ctx: Ctx<'_>) -> Result<Tensor> {
        let h = self.forward_hidden(x, ctx)?;
        let l = h.dim(1)?;
        self.logits(&h.narrow(1, l - 1, 1)?.squeeze(1)?)
    }
}
