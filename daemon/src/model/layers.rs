//! The layers every architecture is built from: the projection vocabulary ([`Proj`], also the
//! adapter targets), a block's weights ([`Block`]), the q/k/v and MLP variants the families wire
//! their blocks from (separate or fused q/k/v, SwiGLU with separate or fused gate/up), the
//! rotary tables, the key/value cache, and the plumbing through which adapters hook into a
//! forward ([`ForwardHooks`], [`Rows`]).
//!
//! These are shared so that a family (`llama.rs`, `phi3.rs`, …) only declares which of them it
//! uses and how they connect; the forward that runs them is [`super::Transformer`].
use candle_core::{DType, Device, Result, Tensor, D};

use super::arch::ProjectFn;
use super::config::{rope_inv_freq, ModelConfig};
use super::weights::Weight;
use crate::ops;

/// One projection's frozen weight `(out, in)` (dense or in stored blocks) and optional f32
/// bias `(out)`.
pub struct Linear {
    pub w: Weight,
    pub b: Option<Tensor>,
}

/// The weights of one pre-norm decoder block: its two norms and the projections its
/// architecture declares ([`super::arch::Architecture::projections`]), in that order.
pub struct Block {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub proj: Vec<(Proj, Linear)>,
}

impl Block {
    /// The weights of projection `p`; an error when the block's architecture has no such
    /// projection.
    pub fn linear(&self, p: Proj) -> Result<&Linear> {
        self.proj
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, l)| l)
            .ok_or_else(|| candle_core::Error::Msg(format!("block has no {}", p.hf_name())))
    }

    pub fn linear_mut(&mut self, p: Proj) -> Result<&mut Linear> {
        self.proj
            .iter_mut()
            .find(|(q, _)| *q == p)
            .map(|(_, l)| l)
            .ok_or_else(|| candle_core::Error::Msg(format!("block has no {}", p.hf_name())))
    }

    /// Every plain tensor of the block: norms, dense weights, biases (not quantized weights).
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .chain(
                self.proj
                    .iter()
                    .flat_map(|(_, l)| l.w.as_dense().into_iter().chain(l.b.as_ref())),
            )
    }

    /// Bytes of the block's norms, weights and biases as held.
    pub fn bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        t(&self.input_layernorm)
            + t(&self.post_attention_layernorm)
            + self
                .proj
                .iter()
                .map(|(_, l)| l.w.bytes() + l.b.as_ref().map_or(0, t))
                .sum::<usize>()
    }
}

/// Per-sequence key/value cache for incremental decoding.
pub struct KvCache {
    pub(super) layers: Vec<candle_nn::kv_cache::KvCache>,
    pub(super) len: usize,
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

    /// An independent copy of the cached positions, in fresh buffers sized for `capacity`
    /// (several continuations of one prefilled prompt, e.g. `n` > 1). A deep copy, because
    /// candle's cache appends into its buffer in place: two caches sharing one buffer would
    /// write their next tokens over each other.
    pub fn fork(&self, capacity: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|c| {
                let mut copy = candle_nn::kv_cache::KvCache::new(2, capacity.max(1));
                if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                    copy.append(&k.contiguous()?, &v.contiguous()?)?;
                }
                Ok(copy)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// Layer `layer`'s cached keys (after RoPE) and values, `(b, n_kv, len, head_dim)` each.
    pub fn layer_kv(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(c) = self.layers.get(layer) else {
            return Ok(None);
        };
        Ok(c.k()?.zip(c.v()?))
    }
}

/// The projections an adapter can add a delta to: the vocabulary every architecture picks its
/// block's projections from.
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
    /// q, k and v as one projection, rows in that order (Phi-3).
    #[serde(rename = "qkv_proj")]
    Qkv,
    /// Gate and up as one projection, gate rows first (Phi-3).
    #[serde(rename = "gate_up_proj")]
    GateUp,
}

impl Proj {
    /// The seven separate projections: the Llama family's block, the fused block op's slots and
    /// what `all-linear` lists (each architecture resolves it, see
    /// [`super::arch::Architecture::targets`]).
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
            Proj::Qkv => "qkv_proj",
            Proj::GateUp => "gate_up_proj",
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
            Proj::Qkv => "self_attn.qkv_proj",
            Proj::GateUp => "mlp.gate_up_proj",
        }
    }

    /// Whether the projection belongs to the attention half of a block (its weights are listed
    /// between the two norms).
    pub fn is_attention(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V | Proj::O | Proj::Qkv)
    }

    /// The separate projections a fused one stands for (itself for a separate one).
    pub fn parts(self) -> &'static [Proj] {
        match self {
            Proj::Qkv => &[Proj::Q, Proj::K, Proj::V],
            Proj::GateUp => &[Proj::Gate, Proj::Up],
            Proj::Q => &[Proj::Q],
            Proj::K => &[Proj::K],
            Proj::V => &[Proj::V],
            Proj::O => &[Proj::O],
            Proj::Gate => &[Proj::Gate],
            Proj::Up => &[Proj::Up],
            Proj::Down => &[Proj::Down],
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
            Proj::Qkv => (h, q + 2 * kv),
            Proj::GateUp => (h, 2 * ff),
        }
    }
}

/// q, k and v as three projections (Llama).
pub fn separate_qkv(h: &Tensor, project: &ProjectFn<'_>) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        project(Proj::Q, h)?,
        project(Proj::K, h)?,
        project(Proj::V, h)?,
    ))
}

/// q, k and v as one projection [`Proj::Qkv`] split along its output (Phi-3).
pub fn fused_qkv(
    c: &ModelConfig,
    h: &Tensor,
    project: &ProjectFn<'_>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, kv) = (c.num_heads * c.head_dim, c.kv_dim());
    let y = project(Proj::Qkv, h)?;
    Ok((
        y.narrow(D::Minus1, 0, q)?,
        y.narrow(D::Minus1, q, kv)?,
        y.narrow(D::Minus1, q + kv, kv)?,
    ))
}

/// SwiGLU with separate gate and up projections: `down(silu(gate(h)) ⊙ up(h))` (Llama).
pub fn swiglu(h: &Tensor, project: &ProjectFn<'_>) -> Result<Tensor> {
    let gate = project(Proj::Gate, h)?.silu()?;
    let up = project(Proj::Up, h)?;
    project(Proj::Down, &(gate * up)?)
}

/// SwiGLU with one [`Proj::GateUp`] projection whose first half is the gate (Phi-3).
pub fn fused_swiglu(c: &ModelConfig, h: &Tensor, project: &ProjectFn<'_>) -> Result<Tensor> {
    let ff = c.intermediate_size;
    let y = project(Proj::GateUp, h)?;
    let gate = y.narrow(D::Minus1, 0, ff)?.silu()?;
    let up = y.narrow(D::Minus1, ff, ff)?;
    project(Proj::Down, &(gate * up)?)
}

/// Rotate-half RoPE tables `(max_positions, head_dim / 2)`: cosines and sines of every position
/// at the config's (scaled) frequencies.
pub fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = rope_inv_freq(cfg).iter().map(|&f| f as f32).collect();
    let half = inv.len();
    let max = cfg.max_position_embeddings.max(1);
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, max as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
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
pub(super) enum Rows<'a> {
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
    pub(super) fn add_deltas(
        &self,
        layer: usize,
        proj: Proj,
        h: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
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

/// Per-call options of [`super::Transformer::forward_hidden`].
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

/// `t` with its batch dimension expanded to `b` (a prefix shared by every row).
pub(super) fn expand_batch(t: &Tensor, b: usize) -> Result<Tensor> {
    if t.dim(0)? == b {
        Ok(t.clone())
    } else {
        let mut dims = t.dims().to_vec();
        dims[0] = b;
        t.expand(dims)?.contiguous()
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
