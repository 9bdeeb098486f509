//! Architecture hyper-parameters of a model, read from an HF `config.json` or from GGUF metadata
//! (`{arch}.*` keys). The keys are the ones every registered family shares; what a family
//! defaults differently (q/k/v biases) or names differently (its HF class) it declares in its
//! own file ([`super::arch`]).
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use super::arch::Arch;
use super::{ModelError, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        Ok(())
    }

    /// The HF `config.json` for this config (what [`Self::from_hf_json`] reads back).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch_class, model_type) = (self.arch.family().hf_class(), self.arch.name());
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        serde_json::json!({
            "architectures": [arch_class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "torch_dtype": "float32",
        })
    }

    /// From an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let arch_name = c
            .model_type
            .clone()
            .or_else(|| c.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| ModelError::Config("config.json has no model_type".into()))?;
        let arch = Arch::parse(&arch_name)?;
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let rope_scaling = match &c.rope_scaling {
            None => RopeScaling::None,
            Some(s) => parse_hf_rope_scaling(s)?,
        };
        // Rotating only part of each head (some Phi and NeoX-style models) would need its own
        // RoPE path; refusing it beats loading a model that runs with the wrong positions.
        if let Some(f) = c.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(ModelError::Config(format!(
                "partial_rotary_factor {f} is not supported (RoPE over the whole head only)"
            )));
        }
        let cfg = Self {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: c.attention_bias.unwrap_or(arch.family().default_qkv_bias()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From GGUF metadata. `has_output` tells whether the file carries `output.weight`
    /// (untied head).
    pub fn from_gguf(md: &HashMap<String, Value>, has_output: bool) -> Result<Self> {
        let arch_name = md
            .get("general.architecture")
            .ok_or_else(|| ModelError::MissingKey("general.architecture".into()))?
            .to_string()?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize> {
            let name = key(k);
            let v = md.get(&name).ok_or(ModelError::MissingKey(name.clone()))?;
            Ok(value_to_u64(v)
                .map_err(|_| ModelError::Config(format!("`{name}` is not an integer")))?
                as usize)
        };
        let get_f = |k: &str| -> Option<f64> { md.get(&key(k)).and_then(|v| value_to_f64(v).ok()) };
        let hidden_size = get_u("embedding_length")?;
        let num_heads = get_u("attention.head_count")?;
        let num_kv_heads = get_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.to_vec().ok())
                .map(|t| t.len())
                .ok_or_else(|| ModelError::MissingKey(key("vocab_size")))?,
        };
        let rope_scaling = match md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling `{other}`"
                )))
            }
        };
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has_output,
            qkv_bias: arch.family().default_qkv_bias(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn value_to_u64(v: &Value) -> candle_core::Result<u64> {
    match v {
        Value::U8(x) => Ok(*x as u64),
        Value::U16(x) => Ok(*x as u64),
        Value::U32(x) => Ok(*x as u64),
        Value::U64(x) => Ok(*x),
        Value::I8(x) => Ok(*x as u64),
        Value::I16(x) => Ok(*x as u64),
        Value::I32(x) => Ok(*x as u64),
        Value::I64(x) => Ok(*x as u64),
        _ => candle_core::bail!("not an integer"),
    }
}

fn value_to_f64(v: &Value) -> candle_core::Result<f64> {
    match v {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        other => value_to_u64(other).map(|x| x as f64),
    }
}

fn parse_hf_rope_scaling(s: &serde_json::Value) -> Result<RopeScaling> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64());
    let need = |k: &str| {
        f(k).ok_or_else(|| {
            ModelError::Config(format!("rope_scaling.{k} is missing or not a number"))
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        }),
        other => Err(ModelError::Config(format!(
            "unsupported rope_scaling type `{other}` (supported: linear, llama3)"
        ))),
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, with the configured scaling applied.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_with_llama3_scaling() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        let f = rope_inv_freq(&c);
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0); // high frequency: untouched
    }

    #[test]
    fn hf_json_round_trips() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_scaling":{"type":"linear","factor":2.0},"tie_word_embeddings":false}"#,
        )
        .unwrap();
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(format!("{c:?}"), format!("{back:?}"));
    }

    #[test]
    fn partial_rotary_factor_is_refused() {
        let json = |f: &str| {
            format!(
                r#"{{"model_type":"phi3","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"partial_rotary_factor":{f}}}"#
            )
        };
        let e = ModelConfig::from_hf_json(&json("0.5")).unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor 0.5"), "{e}");
        assert!(ModelConfig::from_hf_json(&json("1.0")).is_ok());
    }

    #[test]
    fn unknown_arch_is_named() {
        let e = ModelConfig::from_hf_json(
            r#"{"model_type":"gpt_neox","vocab_size":1,"hidden_size":4,"intermediate_size":4,
            "num_hidden_layers":1,"num_attention_heads":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("gpt_neox"), "{e}");
    }

    #[test]
    fn qwen2_has_bias_and_linear_scaling() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_scaling":{"type":"linear","factor":2.0}}"#,
        )
        .unwrap();
        assert!(c.qkv_bias);
        let base = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..c.clone()
        };
        assert_eq!(rope_inv_freq(&c)[1] * 2.0, rope_inv_freq(&base)[1]);
    }
}
