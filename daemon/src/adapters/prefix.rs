//! Prefix tuning: per-layer key/value prefixes ahead of the real tokens (PEFT `PREFIX_TUNING`).
//!
//! The stored tensor is PEFT's `prompt_embeddings` `(P, num_layers · 2 · kv_dim)`, i.e. after the
//! optional projection MLP used during training. It is viewed as `(P, 2·L, n_kv, head_dim)` and
//! permuted to `(2·L, n_kv, P, head_dim)`: entry `2i` is layer i's keys, `2i + 1` its values,
//! used as is (no RoPE), exactly like PEFT's `past_key_values`. `kv_dim = n_kv · head_dim`, so
//! GQA models get prefixes for their KV heads only.
use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor};
use serde_json::{json, Value};

use super::peft::{f32_tensor, get_usize, PeftError};
use super::{rng, seeded_normal, seeded_uniform, AdapterMethod};
use crate::model::layers::{Ctx, ForwardHooks, KvCache};
use crate::model::{ModelConfig, Transformer};

/// The config (the API's `{"type": "prefix_tuning"}` object) is defined once, with the API
/// types. With `prefix_projection` it trains through `Linear(kv_dim → encoder_hidden) → tanh →
/// Linear(→ L·2·kv_dim)` (PEFT's `PrefixEncoder`, whose token_dim is kv_dim on GQA models).
pub use itamae_client::methods::PrefixTuningConfig;

/// A prefix-tuning adapter: per-layer key/value prefixes ahead of every sequence.
pub struct Prefix {
    pub config: PrefixTuningConfig,
    /// `(P, L · 2 · kv_dim)`
    pub flat: Tensor,
    /// `(2L, n_kv, P, head_dim)` view of `flat`, split per layer on use.
    per_layer: Tensor,
}

impl Prefix {
    pub fn from_flat(
        model: &ModelConfig,
        config: PrefixTuningConfig,
        flat: Tensor,
    ) -> Result<Self> {
        let p = config.num_virtual_tokens();
        let want = (p, model.num_layers * 2 * model.kv_dim());
        if flat.dims2()? != want {
            candle_core::bail!(
                "prefix tensor has shape {:?}, this model needs {want:?}",
                flat.dims()
            );
        }
        let per_layer = flat
            .reshape((p, 2 * model.num_layers, model.num_kv_heads, model.head_dim))?
            .permute((1, 2, 0, 3))?
            .contiguous()?;
        Ok(Self {
            config,
            flat,
            per_layer,
        })
    }

    pub fn len(&self) -> usize {
        self.config.num_virtual_tokens()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `layer`'s keys and values, `(1, n_kv, P, head_dim)` each.
    pub fn layer_kv(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let k = self.per_layer.get(2 * layer)?.unsqueeze(0)?;
        let v = self.per_layer.get(2 * layer + 1)?.unsqueeze(0)?;
        Ok((k, v))
    }
}

/// Trainable parameters of a prefix before projection (PEFT's `PrefixEncoder`).
///
/// Initialisation differs from PEFT's on purpose. PEFT draws the prefix from N(0, 1) (torch's
/// `nn.Embedding` default): keys and values unlike anything attention produces, which on
/// SmolLM2-135M lifts a persona batch's loss from 5.84 (base) to 11.6 at step 1, and even an
/// all-zero prefix (5.94–6.3) costs the model its attention mass. Here the prefix starts as the
/// model's own keys and values of a short text (`init_ids`), as Li & Liang's prefix-tuning paper
/// recommends: the model reads it as context it has seen before, so the step-1 loss stays near
/// the base model's (5.0–5.96 on the same batch for the texts tried) and training starts from a
/// working model (docs/interop.md, "Why prefix tuning lagged").
pub struct PrefixParams {
    /// `(P, L·2·kv_dim)` without projection, `(P, kv_dim)` with it.
    pub embedding: Tensor,
    /// `(encoder_hidden, kv_dim)`, `(encoder_hidden)`, `(L·2·kv_dim, encoder_hidden)`, `(L·2·kv_dim)`.
    pub mlp: Option<[Tensor; 4]>,
    /// With the projection: the fixed `(P, L·2·kv_dim)` starting prefix the MLP's output is
    /// added to (its last layer starts at zero, like LoRA's B), so training starts from the
    /// model's own keys and values too. Saved adapters hold the sum, as PEFT's do.
    pub offset: Option<Tensor>,
}

impl PrefixParams {
    /// `init_ids`: the text whose keys and values the prefix starts from, repeated or cut to
    /// `num_virtual_tokens`; `seed` draws the projection's weights.
    pub fn init(
        model: &Transformer,
        config: &PrefixTuningConfig,
        init_ids: &[u32],
        seed: u64,
    ) -> Result<Self> {
        let cfg = &model.cfg;
        let device = model.device();
        let kv = model_kv(model, config.num_virtual_tokens(), init_ids)?;
        if !config.prefix_projection() {
            return Ok(Self {
                embedding: kv,
                mlp: None,
                offset: None,
            });
        }
        let mut r = rng(seed);
        let p = config.num_virtual_tokens();
        let out = cfg.num_layers * 2 * cfg.kv_dim();
        let (h, e) = (cfg.kv_dim(), config.encoder_hidden_size(cfg.kv_dim()));
        // PEFT's `nn.Embedding` and `nn.Linear` inits for the MLP's input side.
        let bound = 1.0 / (h as f32).sqrt();
        let embedding = Tensor::from_vec(seeded_normal(p * h, 1.0, &mut r), (p, h), device)?;
        let w1 = Tensor::from_vec(seeded_uniform(e * h, bound, &mut r), (e, h), device)?;
        let b1 = Tensor::from_vec(seeded_uniform(e, bound, &mut r), e, device)?;
        let w2 = Tensor::zeros((out, e), DType::F32, device)?;
        let b2 = Tensor::zeros(out, DType::F32, device)?;
        Ok(Self {
            embedding,
            mlp: Some([w1, b1, w2, b2]),
            offset: Some(kv),
        })
    }

    /// The saved form `(P, L·2·kv_dim)`.
    pub fn project(&self) -> Result<Tensor> {
        match &self.mlp {
            None => Ok(self.embedding.clone()),
            Some([w1, b1, w2, b2]) => {
                let h = candle_nn::Linear::new(w1.clone(), Some(b1.clone()))
                    .forward(&self.embedding)?;
                let y = candle_nn::Linear::new(w2.clone(), Some(b2.clone())).forward(&h.tanh()?)?;
                match &self.offset {
                    Some(o) => y + o,
                    None => Ok(y),
                }
            }
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embedding];
        if let Some(m) = &self.mlp {
            v.extend(m.iter());
        }
        v
    }
}

/// The model's keys (after RoPE, at positions 0..P) and values for `ids` repeated or cut to `p`
/// tokens, in the saved layout `(P, L·2·kv_dim)`: exactly the cache the model would hold after
/// reading that text, which is what a prefix is at serving time.
pub fn model_kv(model: &Transformer, p: usize, ids: &[u32]) -> Result<Tensor> {
    if ids.is_empty() {
        candle_core::bail!("the prefix init text tokenizes to nothing");
    }
    let cfg = &model.cfg;
    let ids: Vec<u32> = ids.iter().copied().cycle().take(p).collect();
    let tokens = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let mut cache = KvCache::new(cfg, p);
    // Exact products on a quantized base: the start must not depend on the serving kernels'
    // 8-bit activations (a short text takes the few-row path).
    crate::ops::quant::exact(|| {
        model.forward_hidden(&model.embed(&tokens)?, Ctx::with_cache(Some(&mut cache)))
    })?;
    let mut per_layer = Vec::with_capacity(2 * cfg.num_layers);
    for layer in 0..cfg.num_layers {
        let (k, v) = cache
            .layer_kv(layer)?
            .ok_or_else(|| candle_core::Error::Msg(format!("no cache for layer {layer}")))?;
        per_layer.push(k.squeeze(0)?.to_dtype(DType::F32)?);
        per_layer.push(v.squeeze(0)?.to_dtype(DType::F32)?);
    }
    // (2L, n_kv, P, hd) -> (P, 2L, n_kv, hd): the inverse of `Prefix::from_flat`'s view.
    Tensor::stack(&per_layer, 0)?
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((p, cfg.num_layers * 2 * cfg.kv_dim()))?
        .detach()
        .contiguous()
}

impl ForwardHooks for Prefix {
    fn has_decode_terms(&self) -> bool {
        // no projection deltas at all
        true
    }

    fn prefix_len(&self) -> usize {
        self.len()
    }

    fn kv_prefix(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        self.layer_kv(layer).map(Some)
    }
}

impl AdapterMethod for Prefix {
    type Config = PrefixTuningConfig;
    const NAME: &'static str = itamae_client::methods::prefix_tuning::NAME;
    const PEFT_TYPE: &'static str = "PREFIX_TUNING";
    const DEFAULT_LEARNING_RATE: f64 = 1e-2;

    fn config(&self) -> &PrefixTuningConfig {
        &self.config
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![("prompt_embeddings".into(), self.flat.clone())]
    }

    fn peft_config(&self, model: &ModelConfig, _base_name: &str) -> Value {
        let c = &self.config;
        json!({
            // PEFT sizes prefixes of GQA models by their KV heads (token_dim = kv_dim).
            "peft_type": Self::PEFT_TYPE,
            "num_virtual_tokens": c.num_virtual_tokens(),
            "token_dim": model.kv_dim(),
            "num_transformer_submodules": 1,
            "num_attention_heads": model.num_kv_heads,
            "num_layers": model.num_layers,
            "encoder_hidden_size": c.encoder_hidden_size(model.kv_dim()),
            "prefix_projection": c.prefix_projection(),
        })
    }

    fn from_peft(
        c: &Value,
        tensors: &HashMap<String, Tensor>,
        model: &ModelConfig,
    ) -> std::result::Result<Self, PeftError> {
        let n = get_usize(c, "num_virtual_tokens")?;
        let config = PrefixTuningConfig {
            num_virtual_tokens: Some(n),
            prefix_projection: Some(
                c.get("prefix_projection")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
            encoder_hidden_size: Some(
                c.get("encoder_hidden_size")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .unwrap_or(model.kv_dim()),
            ),
        };
        let flat = f32_tensor(tensors, "prompt_embeddings")?;
        Prefix::from_flat(model, config, flat).map_err(|e| PeftError::Mismatch(e.to_string()))
    }

    fn detached(&self, model: &ModelConfig) -> Result<Self> {
        Prefix::from_flat(model, self.config.clone(), self.flat.detach())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;
    use candle_core::Device;

    #[test]
    fn layout_matches_peft_view_and_permute() {
        let cfg = tiny_config(Arch::Llama); // 2 layers, 2 kv heads, head_dim 8
        let p = 3;
        let n = p * cfg.num_layers * 2 * cfg.kv_dim();
        let flat = Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape((p, n / p))
            .unwrap();
        let conf = PrefixTuningConfig {
            num_virtual_tokens: Some(p),
            prefix_projection: Some(false),
            encoder_hidden_size: Some(0),
        };
        let pre = Prefix::from_flat(&cfg, conf, flat.clone()).unwrap();
        let (k, v) = pre.layer_kv(1).unwrap();
        assert_eq!(k.dims(), &[1, 2, 3, 8]);
        // PEFT: flat.view(P, 2L, n_kv, hd).permute(1, 2, 0, 3)[2*layer + kv] -> (n_kv, P, hd)
        let f = flat.to_vec2::<f32>().unwrap();
        let at = |tok: usize, slot: usize, head: usize, d: usize| f[tok][(slot * 2 + head) * 8 + d];
        let k = k.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let v = v.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(k[1][2][5], at(2, 2, 1, 5));
        assert_eq!(v[0][1][7], at(1, 3, 0, 7));
    }

    #[test]
    fn projection_gives_the_saved_shape_and_starts_at_the_models_kv() {
        let cfg = tiny_config(Arch::Qwen2);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).unwrap();
        let conf = PrefixTuningConfig {
            num_virtual_tokens: Some(4),
            prefix_projection: Some(true),
            encoder_hidden_size: Some(16),
        };
        let params = PrefixParams::init(&m, &conf, &[3, 5], 0).unwrap();
        let flat = params.project().unwrap();
        assert_eq!(flat.dims(), &[4, cfg.num_layers * 2 * cfg.kv_dim()]);
        let kv = model_kv(&m, 4, &[3, 5]).unwrap();
        let d = (&flat - &kv).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        Prefix::from_flat(&cfg, conf, flat).unwrap();
        assert!(PrefixParams::init(&m, &PrefixTuningConfig::default(), &[], 0).is_err());
    }

    /// A fresh prefix is the cache of its init text: the real tokens' hidden states are the
    /// base model's on `init text + tokens`, so training starts from the base model reading a
    /// context, not from a damaged one.
    #[test]
    fn fresh_prefix_equals_reading_the_init_text_first() {
        let cfg = tiny_config(Arch::Llama);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).unwrap();
        let conf = PrefixTuningConfig {
            num_virtual_tokens: Some(5),
            prefix_projection: Some(false),
            encoder_hidden_size: None,
        };
        let init = [7u32, 2];
        let params = PrefixParams::init(&m, &conf, &init, 0).unwrap();
        let prefix = Prefix::from_flat(&cfg, conf, params.project().unwrap()).unwrap();
        let tokens = [4u32, 9, 1, 6];
        let x = m
            .embed(
                &Tensor::new(&tokens[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let got = m
            .forward_hidden(
                &x,
                Ctx {
                    hooks: Some(&prefix),
                    ..Default::default()
                },
            )
            .unwrap();
        let all: Vec<u32> = [7, 2, 7, 2, 7].into_iter().chain(tokens).collect();
        let xa = m
            .embed(
                &Tensor::new(all.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let want = m
            .forward_hidden(&xa, Ctx::default())
            .unwrap()
            .narrow(1, 5, tokens.len())
            .unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{d}");
    }
}
