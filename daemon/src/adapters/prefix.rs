//! Prefix tuning: per-layer key/value prefixes ahead of the real tokens (PEFT `PREFIX_TUNING`).
//!
//! The stored tensor is PEFT's `prompt_embeddings` `(P, num_layers · 2 · kv_dim)`, i.e. after the
//! optional projection MLP used during training. It is viewed as `(P, 2·L, n_kv, head_dim)` and
//! permuted to `(2·L, n_kv, P, head_dim)`: entry `2i` is layer i's keys, `2i + 1` its values,
//! used as is (no RoPE), exactly like PEFT's `past_key_values`. `kv_dim = n_kv · head_dim`, so
//! GQA models get prefixes for their KV heads only.
use std::collections::HashMap;

use candle_core::{Device, Module, Result, Tensor};
use serde_json::{json, Value};

use super::peft::{f32_tensor, get_usize, PeftError};
use super::{rng, seeded_normal, seeded_uniform, AdapterMethod};
use crate::model::layers::ForwardHooks;
use crate::model::ModelConfig;

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
pub struct PrefixParams {
    /// `(P, L·2·kv_dim)` without projection, `(P, kv_dim)` with it.
    pub embedding: Tensor,
    /// `(encoder_hidden, kv_dim)`, `(encoder_hidden)`, `(L·2·kv_dim, encoder_hidden)`, `(L·2·kv_dim)`.
    pub mlp: Option<[Tensor; 4]>,
}

impl PrefixParams {
    pub fn init(
        model: &ModelConfig,
        config: &PrefixTuningConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut r = rng(seed);
        let p = config.num_virtual_tokens();
        let out = model.num_layers * 2 * model.kv_dim();
        if config.prefix_projection() {
            let (h, e) = (model.kv_dim(), config.encoder_hidden_size(model.kv_dim()));
            let lin =
                |o: usize, i: usize, r: &mut rand::rngs::StdRng| -> Result<(Tensor, Tensor)> {
                    let bound = 1.0 / (i as f32).sqrt();
                    Ok((
                        Tensor::from_vec(seeded_uniform(o * i, bound, r), (o, i), device)?,
                        Tensor::from_vec(seeded_uniform(o, bound, r), o, device)?,
                    ))
                };
            let embedding = Tensor::from_vec(seeded_normal(p * h, 1.0, &mut r), (p, h), device)?;
            let (w1, b1) = lin(e, h, &mut r)?;
            let (w2, b2) = lin(out, e, &mut r)?;
            Ok(Self {
                embedding,
                mlp: Some([w1, b1, w2, b2]),
            })
        } else {
            // Keys/values of the size attention produces: small values, like a fresh cache.
            let embedding =
                Tensor::from_vec(seeded_normal(p * out, 0.1, &mut r), (p, out), device)?;
            Ok(Self {
                embedding,
                mlp: None,
            })
        }
    }

    /// The saved form `(P, L·2·kv_dim)`.
    pub fn project(&self) -> Result<Tensor> {
        match &self.mlp {
            None => Ok(self.embedding.clone()),
            Some([w1, b1, w2, b2]) => {
                let h = candle_nn::Linear::new(w1.clone(), Some(b1.clone()))
                    .forward(&self.embedding)?;
                candle_nn::Linear::new(w2.clone(), Some(b2.clone())).forward(&h.tanh()?)
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
    fn projection_gives_the_saved_shape() {
        let cfg = tiny_config(Arch::Qwen2);
        let conf = PrefixTuningConfig {
            num_virtual_tokens: Some(4),
            prefix_projection: Some(true),
            encoder_hidden_size: Some(16),
        };
        let params = PrefixParams::init(&cfg, &conf, 0, &Device::Cpu).unwrap();
        let flat = params.project().unwrap();
        assert_eq!(flat.dims(), &[4, cfg.num_layers * 2 * cfg.kv_dim()]);
        Prefix::from_flat(&cfg, conf, flat).unwrap();
    }
}
