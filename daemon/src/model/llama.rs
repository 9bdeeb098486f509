//! The Llama-family transformer (Llama/SmolLM, Mistral, Qwen2): pre-norm decoder blocks with
//! grouped-query attention, rotate-half RoPE, RMSNorm and a SwiGLU MLP; optional q/k/v biases
//! (Qwen2) and a tied or separate LM head.
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
//! Weights are plain f32 tensors named as in HF checkpoints; GGUF files are dequantized and
//! renamed at load time, so both sources end up in the same structure.
use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::config::{rope_inv_freq, ModelConfig};
use crate::ops;

pub struct Attention {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
}

pub struct Mlp {
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

pub struct Block {
    pub input_layernorm: Tensor,
    pub attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// Shares storage with `embed_tokens` when the embeddings are tied.
    pub lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Per-sequence key/value cache for incremental decoding.
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    len: usize,
}

impl KvCache {
    /// `capacity` is a hint (prompt + generation budget); the cache grows past it if needed.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        Self {
            layers: (0..cfg.num_layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity.max(1)))
                .collect(),
            len: 0,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The projections an adapter can add a delta to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Proj {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// HF module name (`q_proj`, …), as PEFT's `target_modules` names it.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Path of the module inside a layer (`self_attn.q_proj`, `mlp.up_proj`, …).
    pub fn hf_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// (in, out) features of this projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, ff) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.kv_dim(),
            c.intermediate_size,
        );
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, ff),
            Proj::Down => (ff, h),
        }
    }
}

/// What an adapter changes in a forward pass. Implemented in the adapters layer; the model only
/// calls it, so one forward serves the base model and every variant.
pub trait ForwardHooks: Sync {
    /// Output added to projection `proj` of layer `layer` for its input `x` (LoRA: `s·B·A·x`).
    fn linear_delta(&self, _layer: usize, _proj: Proj, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The same delta as a low-rank factorisation, when the hook has one: lets a forward over
    /// one adapter run base projection and delta as one fused op (one output tensor instead of
    /// four kept alive for the backward, and no elementwise passes for the scale and the sum).
    /// `input` is the shape of the projection's input (dropout masks take it).
    fn low_rank(
        &self,
        _layer: usize,
        _proj: Proj,
        _input: &candle_core::Shape,
    ) -> Result<Option<LowRank>> {
        Ok(None)
    }
    /// Whether [`Self::low_rank`] describes everything this hook changes (no other deltas, no
    /// prefix): then a training forward may run each block as one fused op.
    fn only_low_rank(&self) -> bool {
        false
    }
    /// Whether [`Self::decode_term`] describes every projection delta of this hook: then decode
    /// batches use the packed factors.
    fn has_decode_terms(&self) -> bool {
        false
    }
    /// The delta of projection `proj` of `layer` as factors packed for decode batches.
    fn decode_term(
        &self,
        _layer: usize,
        _proj: Proj,
    ) -> Option<ops::lora_rows::RowTerm<'_, ops::lora_rows::DecodeElem>> {
        None
    }
    /// Number of prefix positions [`Self::kv_prefix`] provides (prefix tuning).
    fn prefix_len(&self) -> usize {
        0
    }
    /// Keys and values `(1, n_kv, prefix_len, head_dim)` placed ahead of the sequence in layer
    /// `layer` (keys already rotated, as stored in a KV cache).
    fn kv_prefix(&self, _layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

/// `scale · ((x ⊙ dropout_mask) · Aᵀ) · Bᵀ`, see [`ForwardHooks::low_rank`].
pub struct LowRank {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
    pub scale: f64,
    /// `x`'s shape, entries 0 or `1 / (1 − p)`.
    pub dropout_mask: Option<Tensor>,
}

/// Several examples packed in one row: attention stays inside an example and positions restart.
pub struct Packed {
    /// `(b, l)` u32 position of each token within its example.
    pub positions: Tensor,
    /// `(b, l, l)` additive mask (0 or -inf).
    pub mask: Tensor,
    /// The per-row segment ids the two above were built from.
    pub segments: Vec<Vec<u32>>,
}

impl Packed {
    /// From per-row segment ids (tokens of one example share an id; ids increase along a row).
    pub fn from_segments(segments: &[Vec<u32>], device: &Device) -> Result<Self> {
        let b = segments.len();
        let l = segments.first().map_or(0, |s| s.len());
        let mut pos = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l * l);
        for row in segments {
            if row.len() != l {
                candle_core::bail!("packed rows must have equal length");
            }
            let mut p = 0u32;
            for (i, &s) in row.iter().enumerate() {
                p = if i > 0 && row[i - 1] == s { p + 1 } else { 0 };
                pos.push(p);
                for (j, &sj) in row.iter().enumerate() {
                    mask.push(if j <= i && sj == s {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Ok(Self {
            positions: Tensor::from_vec(pos, (b, l), device)?,
            mask: Tensor::from_vec(mask, (b, l, l), device)?,
            segments: segments.to_vec(),
        })
    }
}

/// Which adapter applies to which rows of a batch.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// The same (or no) adapter for every row.
    All(Option<&'a dyn ForwardHooks>),
    /// Row `i` (of a `(n, 1, ·)` decode batch) uses `hooks[i]`.
    PerRow(&'a [Option<&'a dyn ForwardHooks>]),
    /// Packed prompts in one row `(1, l, ·)`: consecutive spans of `len` positions, each with
    /// its own adapter.
    Spans(&'a [(usize, Option<&'a dyn ForwardHooks>)]),
}

impl Rows<'_> {
    /// `y` (the base projection of `h`) plus the adapters' deltas.
    fn add_deltas(&self, layer: usize, proj: Proj, h: &Tensor, y: Tensor) -> Result<Tensor> {
        // Rows (a decode batch: one row each) or spans (packed prompts) with several adapters,
        // all with packed factors: one pass over the rows from the packed factors.
        let spans: Vec<(usize, Option<&dyn ForwardHooks>)> = match *self {
            Rows::All(_) => Vec::new(),
            Rows::PerRow(hooks) => hooks.iter().map(|&hk| (1, hk)).collect(),
            Rows::Spans(spans) => spans.to_vec(),
        };
        let packed = spans
            .iter()
            .filter_map(|s| s.1)
            .all(|hk| hk.has_decode_terms());
        if !spans.is_empty()
            && packed
            && !h.track_op()
            && h.device().is_cpu()
            && h.dtype() == DType::F32
        {
            let terms: Vec<_> = spans
                .iter()
                .map(|&(len, hk)| (len, hk.and_then(|hk| hk.decode_term(layer, proj))))
                .collect();
            if terms.iter().all(|t| t.1.is_none()) {
                return Ok(y);
            }
            return ops::lora_rows::add_spans(y, h, &terms);
        }
        match self.delta(layer, proj, h)? {
            Some(d) => y + d,
            None => Ok(y),
        }
    }

    fn delta(&self, layer: usize, proj: Proj, h: &Tensor) -> Result<Option<Tensor>> {
        match *self {
            Rows::All(None) => Ok(None),
            Rows::All(Some(hk)) => hk.linear_delta(layer, proj, h),
            Rows::Spans(spans) => {
                let mut parts = Vec::with_capacity(spans.len());
                let (mut off, mut shape) = (0, None);
                for &(len, hk) in spans {
                    let d = match hk {
                        Some(hk) => hk.linear_delta(layer, proj, &h.narrow(1, off, len)?)?,
                        None => None,
                    };
                    if let Some(d) = &d {
                        shape = Some(d.dims().to_vec());
                    }
                    parts.push((len, d));
                    off += len;
                }
                let Some(mut shape) = shape else {
                    return Ok(None);
                };
                let parts = parts
                    .into_iter()
                    .map(|(len, d)| match d {
                        Some(d) => Ok(d),
                        None => {
                            shape[1] = len;
                            Tensor::zeros(shape.as_slice(), h.dtype(), h.device())
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1).map(Some)
            }
            Rows::PerRow(hooks) => {
                let mut rows = Vec::with_capacity(hooks.len());
                let mut any = false;
                for (r, hk) in hooks.iter().enumerate() {
                    let hr = h.narrow(0, r, 1)?;
                    match hk
                        .map(|hk| hk.linear_delta(layer, proj, &hr))
                        .transpose()?
                        .flatten()
                    {
                        Some(d) => {
                            any = true;
                            rows.push(Some(d));
                        }
                        None => rows.push(None),
                    }
                }
                if !any {
                    return Ok(None);
                }
                let shape = rows.iter().flatten().next().map(|d| d.shape().clone());
                let Some(shape) = shape else { return Ok(None) };
                let rows = rows
                    .into_iter()
                    .map(|d| match d {
                        Some(d) => Ok(d),
                        None => Tensor::zeros(&shape, h.dtype(), h.device()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0).map(Some)
            }
        }
    }
}

/// Per-call options of [`Llama::forward_hidden`].
#[derive(Default)]
pub struct Ctx<'a> {
    pub cache: Option<&'a mut KvCache>,
    pub hooks: Option<&'a dyn ForwardHooks>,
    pub packed: Option<&'a Packed>,
}

impl<'a> Ctx<'a> {
    pub fn with_cache(cache: Option<&'a mut KvCache>) -> Self {
        Self {
            cache,
            ..Default::default()
        }
    }
}

fn expand_batch(t: &Tensor, b: usize) -> Result<Tensor> {
    if t.dim(0)? == b {
        Ok(t.clone())
    } else {
        let mut dims = t.dims().to_vec();
        dims[0] = b;
        t.expand(dims)?.contiguous()
    }
}

fn take(w: &mut HashMap<String, Tensor>, name: &str) -> std::result::Result<Tensor, String> {
    w.remove(name).ok_or_else(|| name.to_string())
}

impl Llama {
    /// Builds the model from f32 tensors named as in HF checkpoints (`model.layers.0.self_attn.q_proj.weight`, …).
    /// Returns the name of the first missing tensor on error.
    pub fn from_weights(
        cfg: ModelConfig,
        mut w: HashMap<String, Tensor>,
        device: &Device,
    ) -> std::result::Result<Self, super::ModelError> {
        let missing = super::ModelError::MissingTensor;
        let embed_tokens = take(&mut w, "model.embed_tokens.weight").map_err(missing)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut t = |n: &str| take(&mut w, &format!("{p}.{n}")).map_err(missing);
            let bias = cfg.qkv_bias;
            let attn = Attention {
                q_proj: t("self_attn.q_proj.weight")?,
                k_proj: t("self_attn.k_proj.weight")?,
                v_proj: t("self_attn.v_proj.weight")?,
                o_proj: t("self_attn.o_proj.weight")?,
                q_bias: if bias {
                    Some(t("self_attn.q_proj.bias")?)
                } else {
                    None
                },
                k_bias: if bias {
                    Some(t("self_attn.k_proj.bias")?)
                } else {
                    None
                },
                v_bias: if bias {
                    Some(t("self_attn.v_proj.bias")?)
                } else {
                    None
                },
            };
            let mlp = Mlp {
                gate_proj: t("mlp.gate_proj.weight")?,
                up_proj: t("mlp.up_proj.weight")?,
                down_proj: t("mlp.down_proj.weight")?,
            };
            layers.push(Block {
                input_layernorm: t("input_layernorm.weight")?,
                attn,
                post_attention_layernorm: t("post_attention_layernorm.weight")?,
                mlp,
            });
        }
        let norm = take(&mut w, "model.norm.weight").map_err(missing)?;
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
        embed_tokens: Tensor,
        layers: Vec<Block>,
        norm: Tensor,
        lm_head: Tensor,
        device: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = rope_inv_freq(&cfg).iter().map(|&f| f as f32).collect();
        let half = inv.len();
        let max = cfg.max_position_embeddings.max(1);
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, max as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
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
        let (h, q, kv, ff) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.kv_dim(),
            c.intermediate_size,
        );
        let want = |name: String, t: &Tensor, dims: &[usize]| {
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
            &[c.vocab_size, h],
        )?;
        want("lm_head.weight".into(), &self.lm_head, &[c.vocab_size, h])?;
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            want(
                format!("{p}.self_attn.q_proj.weight"),
                &l.attn.q_proj,
                &[q, h],
            )?;
            want(
                format!("{p}.self_attn.k_proj.weight"),
                &l.attn.k_proj,
                &[kv, h],
            )?;
            want(
                format!("{p}.self_attn.v_proj.weight"),
                &l.attn.v_proj,
                &[kv, h],
            )?;
            want(
                format!("{p}.self_attn.o_proj.weight"),
                &l.attn.o_proj,
                &[h, q],
            )?;
            want(
                format!("{p}.mlp.gate_proj.weight"),
                &l.mlp.gate_proj,
                &[ff, h],
            )?;
            want(format!("{p}.mlp.up_proj.weight"), &l.mlp.up_proj, &[ff, h])?;
            want(
                format!("{p}.mlp.down_proj.weight"),
                &l.mlp.down_proj,
                &[h, ff],
            )?;
        }
        Ok(())
    }

    /// Every weight with its HF name (the tied LM head is listed once, as the embeddings).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.attn;
            for (n, t) in [
                ("input_layernorm.weight", &l.input_layernorm),
                ("self_attn.q_proj.weight", &a.q_proj),
                ("self_attn.k_proj.weight", &a.k_proj),
                ("self_attn.v_proj.weight", &a.v_proj),
                ("self_attn.o_proj.weight", &a.o_proj),
                (
                    "post_attention_layernorm.weight",
                    &l.post_attention_layernorm,
                ),
                ("mlp.gate_proj.weight", &l.mlp.gate_proj),
                ("mlp.up_proj.weight", &l.mlp.up_proj),
                ("mlp.down_proj.weight", &l.mlp.down_proj),
            ] {
                out.push((format!("{p}.{n}"), t.clone()));
            }
            for (n, t) in [
                ("self_attn.q_proj.bias", &a.q_bias),
                ("self_attn.k_proj.bias", &a.k_bias),
                ("self_attn.v_proj.bias", &a.v_bias),
            ] {
                if let Some(t) = t {
                    out.push((format!("{p}.{n}"), t.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
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
        let r = |rows: usize, cols: usize| -> Result<Tensor> {
            Tensor::randn(
                0f32,
                (1.0 / cols as f64).sqrt() as f32,
                (rows, cols),
                device,
            )
        };
        let norm_w = |n: usize| -> Result<Tensor> { Tensor::rand(0.8f32, 1.2, n, device) };
        let (h, q, kv, ff) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.kv_dim(),
            c.intermediate_size,
        );
        let bias = |n: usize| -> Result<Option<Tensor>> {
            if c.qkv_bias {
                Ok(Some(Tensor::randn(0f32, 0.1, n, device)?))
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::new();
        for _ in 0..c.num_layers {
            layers.push(Block {
                input_layernorm: norm_w(h)?,
                attn: Attention {
                    q_proj: r(q, h)?,
                    k_proj: r(kv, h)?,
                    v_proj: r(kv, h)?,
                    o_proj: r(h, q)?,
                    q_bias: bias(q)?,
                    k_bias: bias(kv)?,
                    v_bias: bias(kv)?,
                },
                post_attention_layernorm: norm_w(h)?,
                mlp: Mlp {
                    gate_proj: r(ff, h)?,
                    up_proj: r(ff, h)?,
                    down_proj: r(h, ff)?,
                },
            });
        }
        let embed = Tensor::randn(0f32, 1.0, (c.vocab_size, h), device)?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            r(c.vocab_size, h)?
        };
        let norm = norm_w(h)?;
        Self::assemble(cfg, embed, layers, norm, lm_head, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token ids `(b, l)` → embeddings `(b, l, hidden)`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        candle_nn::Embedding::new(self.embed_tokens.clone(), self.cfg.hidden_size).forward(tokens)
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
    /// applies: CPU, f32/f64, frozen base weights, no adapter or one that is purely low-rank,
    /// and a gradient to track (the input's or a LoRA factor's). None: use [`Self::run_layers`].
    fn fused_blocks(
        &self,
        x: &Tensor,
        hooks: Option<&dyn ForwardHooks>,
        packed: Option<&Packed>,
    ) -> Result<Option<Tensor>> {
        use ops::decoder::{BlockDims, DecoderLayer, LayerWeights, LoraSpec};
        if !self.device.is_cpu()
            || !matches!(x.dtype(), DType::F32 | DType::F64)
            || hooks.is_some_and(|h| !h.only_low_rank())
        {
            return Ok(None);
        }
        let frozen = |t: &Tensor| !t.track_op() && t.dtype() == x.dtype();
        let all_frozen = self.layers.iter().all(|blk| {
            let a = &blk.attn;
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &blk.mlp.gate_proj,
                &blk.mlp.up_proj,
                &blk.mlp.down_proj,
                &blk.input_layernorm,
                &blk.post_attention_layernorm,
            ]
            .into_iter()
            .chain([&a.q_bias, &a.k_bias, &a.v_bias].into_iter().flatten())
            .all(frozen)
        });
        if !all_frozen {
            return Ok(None);
        }
        let c = &self.cfg;
        let (b, l, _) = x.dims3()?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut tracked = x.track_op();
        for i in 0..self.layers.len() {
            let mut specs: [Option<LoraSpec>; 7] = Default::default();
            let mut parts = Vec::new();
            for (j, proj) in Proj::ALL.into_iter().enumerate() {
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
        for (blk, (specs, parts)) in self.layers.iter().zip(layers) {
            let a = &blk.attn;
            let m = &blk.mlp;
            let w = LayerWeights {
                proj: [
                    a.q_proj.clone(),
                    a.k_proj.clone(),
                    a.v_proj.clone(),
                    a.o_proj.clone(),
                    m.gate_proj.clone(),
                    m.up_proj.clone(),
                    m.down_proj.clone(),
                ],
                bias: [a.q_bias.clone(), a.k_bias.clone(), a.v_bias.clone()],
                norm1: blk.input_layernorm.clone(),
                norm2: blk.post_attention_layernorm.clone(),
                eps: c.rms_norm_eps,
            };
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
    /// differs between a single forward and a batched decode step.
    fn run_layers(
        &self,
        x: &Tensor,
        hooks: Rows<'_>,
        cos: &Tensor,
        sin: &Tensor,
        attend: &mut dyn FnMut(usize, Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, l, _) = x.dims3()?;
        let proj = |layer: usize, which: Proj, h: &Tensor, w: &Tensor, bias: Option<&Tensor>| {
            if let Rows::All(Some(hk)) = hooks {
                if let Some(lr) = hk.low_rank(layer, which, h.shape())? {
                    let term = ops::linear::LoraTerm {
                        a: &lr.a,
                        b: &lr.b,
                        scale: lr.scale,
                        dropout_mask: lr.dropout_mask.as_ref(),
                    };
                    return ops::linear::linear_lora(h, w, bias, &term);
                }
            }
            let y = ops::linear(h, w, bias)?;
            hooks.add_deltas(layer, which, h, y)
        };
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps)?;
            let a = &layer.attn;
            let heads =
                |which: Proj, w: &Tensor, bias: &Option<Tensor>, n: usize| -> Result<Tensor> {
                    proj(i, which, &h, w, bias.as_ref())?
                        .reshape((b, l, n, c.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
            let q = ops::rope(
                &heads(Proj::Q, &a.q_proj, &a.q_bias, c.num_heads)?,
                cos,
                sin,
            )?;
            let k = ops::rope(
                &heads(Proj::K, &a.k_proj, &a.k_bias, c.num_kv_heads)?,
                cos,
                sin,
            )?;
            let v = heads(Proj::V, &a.v_proj, &a.v_bias, c.num_kv_heads)?;
            let att =
                attend(i, q, k, v)?
                    .transpose(1, 2)?
                    .reshape((b, l, c.num_heads * c.head_dim))?;
            x = (x + proj(i, Proj::O, &att, &a.o_proj, None)?)?;
            let h = ops::rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            let m = &layer.mlp;
            let gate = proj(i, Proj::Gate, &h, &m.gate_proj, None)?.silu()?;
            let up = proj(i, Proj::Up, &h, &m.up_proj, None)?;
            x = (x + proj(i, Proj::Down, &(gate * up)?, &m.down_proj, None)?)?;
        }
        Ok(x)
    }

    /// One decode step for several sequences at once (continuous batching): `tokens[i]` is
    /// sequence i's next input, `caches[i]` its (non-empty) cache, `hooks[i]` its adapter.
    /// Projections and the MLP run as one GEMM over all rows, so the weights are read once per
    /// step instead of once per sequence; attention runs per sequence against its own cache.
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
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let half = c.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((n, 1, 1, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((n, 1, 1, half))?;
        let x = self.embed(&Tensor::new(tokens, &self.device)?.unsqueeze(1)?)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let x = self.run_layers(&x, Rows::PerRow(hooks), &cos, &sin, &mut |i, q, k, v| {
            let mut kv = Vec::with_capacity(n);
            for (r, cache) in caches.iter_mut().enumerate() {
                kv.push(cache.layers[i].append(&k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?);
            }
            ops::decode::attention_rows(&q, &kv, scale)
        })?;
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
        ops::linear(hidden, &self.lm_head, None)
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

/// Splits the last dimension of a logits tensor into a `Vec<f32>` per row.
pub fn rows_f32(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let v = logits.dim(D::Minus1)?;
    let flat = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(flat.chunks(v).map(|c| c.to_vec()).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::{Arch, RopeScaling};

    pub fn tiny_config(arch: Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 61,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 64,
            tie_word_embeddings: arch != Arch::Qwen2,
            qkv_bias: arch == Arch::Qwen2,
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn shapes() {
        let m = Llama::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let t = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&t, None).unwrap().dims(), &[2, 5, 61]);
        assert_eq!(m.forward_last(&t, None).unwrap().dims(), &[2, 61]);
    }

    #[test]
    fn kv_cache_decode_equals_full_forward() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Llama::random(tiny_config(arch), &Device::Cpu).unwrap();
            let ids = [3u32, 14, 15, 9, 26, 5, 35, 8, 9, 7];
            let full = m
                .forward(
                    &Tensor::new(&ids[..], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    None,
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            // prefill 4 tokens, then one at a time, then a chunk of 3
            let mut cache = KvCache::new(&m.cfg, 4);
            let mut outs = Vec::new();
            for chunk in [&ids[0..4], &ids[4..5], &ids[5..6], &ids[6..7], &ids[7..10]] {
                let t = Tensor::new(chunk, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                outs.push(m.forward(&t, Some(&mut cache)).unwrap().squeeze(0).unwrap());
            }
            assert_eq!(cache.len(), ids.len());
            let inc = Tensor::cat(&outs, 0).unwrap();
            let d = max_abs(&full, &inc);
            assert!(d < 1e-4, "{arch:?}: max abs diff {d}");
        }
    }

    #[test]
    fn positions_beyond_context_are_an_error() {
        let m = Llama::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let t = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
        assert!(m.forward(&t, None).is_err());
    }

    #[test]
    fn training_path_reaches_every_weight() {
        // The composed path must carry a gradient to every weight kind of the model.
        let cfg = tiny_config(Arch::Qwen2);
        let mut m = Llama::random(cfg, &Device::Cpu).unwrap();
        let var = candle_core::Var::from_tensor(&m.layers[0].attn.q_proj).unwrap();
        m.layers[0].attn.q_proj = var.as_tensor().clone();
        let nvar = candle_core::Var::from_tensor(&m.layers[1].input_layernorm).unwrap();
        m.layers[1].input_layernorm = nvar.as_tensor().clone();
        let t = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let loss = m
            .forward(&t, None)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        for v in [&var, &nvar] {
            let gv = g.get(v.as_tensor()).expect("gradient missing");
            let n = gv
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0);
        }
    }

    #[test]
    fn packed_rows_equal_separate_sequences() {
        let m = Llama::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let a = [5u32, 6, 7];
        let b = [9u32, 10, 11, 12];
        let solo = |ids: &[u32]| {
            m.forward(
                &Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
        };
        let packed_ids: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
        let packed = Packed::from_segments(&[vec![0, 0, 0, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let emb = m
            .embed(
                &Tensor::new(packed_ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let ctx = Ctx {
            packed: Some(&packed),
            ..Default::default()
        };
        let out = m
            .logits(&m.forward_hidden(&emb, ctx).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = Tensor::cat(&[solo(&a), solo(&b)], 0).unwrap();
        assert!(max_abs(&out, &want) < 1e-4);
    }

    struct TestHooks {
        k: Tensor,
        v: Tensor,
        delta_scale: f64,
    }

    impl ForwardHooks for TestHooks {
        fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
            if layer == 1 && proj == Proj::Up {
                // a fixed rank-1 style delta: sum of inputs broadcast over outputs
                let s = (x.sum_keepdim(D::Minus1)? * self.delta_scale)?;
                Ok(Some(
                    s.broadcast_as((x.dim(0)?, x.dim(1)?, 48))?.contiguous()?,
                ))
            } else {
                Ok(None)
            }
        }
        fn prefix_len(&self) -> usize {
            self.k.dim(2).unwrap()
        }
        fn kv_prefix(&self, _layer: usize) -> Result<Option<(Tensor, Tensor)>> {
            Ok(Some((self.k.clone(), self.v.clone())))
        }
    }

    #[test]
    fn hooks_apply_identically_with_and_without_cache() {
        let m = Llama::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let hooks = TestHooks {
            k: Tensor::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap(),
            v: Tensor::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap(),
            delta_scale: 0.1,
        };
        let ids = [4u32, 8, 15, 16, 23, 42];
        let emb = m
            .embed(
                &Tensor::new(&ids[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let full = m
            .logits(
                &m.forward_hidden(
                    &emb,
                    Ctx {
                        hooks: Some(&hooks),
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let base = m
            .forward(
                &Tensor::new(&ids[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        assert!(
            max_abs(&full, &base.squeeze(0).unwrap()) > 1e-3,
            "hooks changed nothing"
        );
        let mut cache = KvCache::new(&m.cfg, 16);
        let mut outs = Vec::new();
        for (start, len) in [(0, 4), (4, 1), (5, 1)] {
            let x = emb.narrow(1, start, len).unwrap();
            let ctx = Ctx {
                cache: Some(&mut cache),
                hooks: Some(&hooks),
                packed: None,
            };
            outs.push(
                m.logits(&m.forward_hidden(&x, ctx).unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 3 + ids.len());
        let inc = Tensor::cat(&outs, 0).unwrap();
        assert!(max_abs(&full, &inc) < 1e-4);
    }

    /// Prefills each prompt alone (with its hooks), then checks that one batched decode step of
    /// `next` gives the logits each sequence gets when decoded alone, within `tol` (absolute).
    /// Returns the caches' lengths.
    pub(crate) fn assert_batched_decode_matches_solo(
        m: &Llama,
        hooks: &[Option<&dyn ForwardHooks>],
        prompts: &[&[u32]],
        next: &[u32],
        tol: f32,
    ) -> Vec<usize> {
        let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let prefill = |i: usize| {
            let mut cache = KvCache::new(&m.cfg, 16);
            let x = m.embed(&ids(prompts[i])).unwrap();
            let ctx = Ctx {
                cache: Some(&mut cache),
                hooks: hooks[i],
                packed: None,
            };
            m.forward_hidden(&x, ctx).unwrap();
            cache
        };
        let solo: Vec<Tensor> = (0..prompts.len())
            .map(|i| {
                let mut cache = prefill(i);
                let x = m.embed(&ids(&next[i..=i])).unwrap();
                let ctx = Ctx {
                    cache: Some(&mut cache),
                    hooks: hooks[i],
                    packed: None,
                };
                m.last_logits(&x, ctx).unwrap()
            })
            .collect();
        let solo = Tensor::cat(&solo, 0).unwrap();
        let mut caches: Vec<KvCache> = (0..prompts.len()).map(prefill).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batched = m.decode_batch(next, &mut refs, hooks).unwrap();
        let d = max_abs(&solo, &batched);
        assert!(d < tol, "batched vs solo: max abs diff {d}");
        caches.iter().map(KvCache::len).collect()
    }

    #[test]
    fn batched_prefill_equals_one_prompt_at_a_time() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Llama::random(tiny_config(arch), &Device::Cpu).unwrap();
            let delta = TestHooks {
                k: Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu).unwrap(),
                v: Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu).unwrap(),
                delta_scale: 0.05,
            };
            let prompts: [&[u32]; 3] = [&[3, 4, 5, 6, 7], &[8], &[9, 10, 11]];
            let d = Some(&delta as &dyn ForwardHooks);
            for hooks in [[None, None, None], [d, d, d], [d, None, d], [None, d, None]] {
                let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let mut solo_caches = Vec::new();
                let mut solo = Vec::new();
                for (p, hooks) in prompts.iter().zip(hooks) {
                    let mut cache = KvCache::new(&m.cfg, 16);
                    let ctx = Ctx {
                        cache: Some(&mut cache),
                        hooks,
                        packed: None,
                    };
                    solo.push(m.last_logits(&m.embed(&ids(p)).unwrap(), ctx).unwrap());
                    solo_caches.push(cache);
                }
                let solo = Tensor::cat(&solo, 0).unwrap();
                let xs: Vec<Tensor> = prompts.iter().map(|p| m.embed(&ids(p)).unwrap()).collect();
                let mut caches: Vec<KvCache> =
                    prompts.iter().map(|_| KvCache::new(&m.cfg, 16)).collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let batched = m.prefill_batch(&xs, &mut refs, &hooks).unwrap();
                assert!(max_abs(&solo, &batched) < 1e-4, "{arch:?}: logits differ");
                // the caches hold the same keys and values: the next decode step agrees
                let next = [12, 13, 14];
                let mut a: Vec<&mut KvCache> = caches.iter_mut().collect();
                let mut b: Vec<&mut KvCache> = solo_caches.iter_mut().collect();
                let (da, db) = (
                    m.decode_batch(&next, &mut a, &hooks).unwrap(),
                    m.decode_batch(&next, &mut b, &hooks).unwrap(),
                );
                assert!(
                    max_abs(&da, &db) < 1e-4,
                    "{arch:?}: decode after prefill differs"
                );
                assert_eq!(
                    caches.iter().map(KvCache::len).collect::<Vec<_>>(),
                    [6, 2, 4]
                );
            }
            let mut used = KvCache::new(&m.cfg, 16);
            used.len = 1;
            let x = m
                .embed(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap())
                .unwrap();
            assert!(m.prefill_batch(&[x], &mut [&mut used], &[None]).is_err());
        }
    }

    #[test]
    fn batched_decode_equals_one_sequence_at_a_time() {
        let m = Llama::random(tiny_config(Arch::Qwen2), &Device::Cpu).unwrap();
        let with_prefix = TestHooks {
            k: Tensor::randn(0f32, 1., (1, 2, 2, 8), &Device::Cpu).unwrap(),
            v: Tensor::randn(0f32, 1., (1, 2, 2, 8), &Device::Cpu).unwrap(),
            delta_scale: 0.05,
        };
        let hooks: [Option<&dyn ForwardHooks>; 3] = [None, Some(&with_prefix), None];
        let prompts: [&[u32]; 3] = [&[3, 4, 5], &[7, 8, 9, 10, 11], &[12]];
        let lens = assert_batched_decode_matches_solo(&m, &hooks, &prompts, &[21, 22, 23], 1e-4);
        // the prefix (2) sits in the cache ahead of the prompt (5) and the decoded token
        assert_eq!(lens, vec![3 + 1, 2 + 5 + 1, 1 + 1]);
    }
}
