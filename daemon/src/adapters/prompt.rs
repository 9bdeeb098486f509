//! Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to the input embeddings
//! (PEFT `PROMPT_TUNING`). Positions count the virtual tokens, as in PEFT.
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use serde_json::{json, Value};

use super::peft::{f32_tensor, get_usize, PeftError};
use super::{rng, seeded_normal, AdapterMethod};
use crate::model::layers::ForwardHooks;
use crate::model::{ModelConfig, Transformer};

/// The config (the API's `{"type": "prompt_tuning"}` object) is defined once, with the API types.
pub use itamae_client::methods::{PromptInit, PromptTuningConfig};

pub struct SoftPrompt {
    pub config: PromptTuningConfig,
    /// `(num_virtual_tokens, hidden)`
    pub embeddings: Tensor,
}

impl SoftPrompt {
    /// `init_ids`: the tokenized init text (`config.init_text()`), for [`PromptInit::Text`].
    pub fn init(
        model: &Transformer,
        config: PromptTuningConfig,
        init_ids: &[u32],
        seed: u64,
    ) -> Result<Self> {
        let n = config.num_virtual_tokens();
        let h = model.cfg.hidden_size;
        let dev: &Device = model.device();
        // A transient f32 copy when the base holds its embeddings in blocks.
        let table = &model.embed_tokens.to_dense(DType::F32)?;
        let mut r = rng(seed);
        let embeddings = match config.init() {
            PromptInit::Random => {
                let std = table.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?;
                Tensor::from_vec(seeded_normal(n * h, std, &mut r), (n, h), dev)?
            }
            PromptInit::Text => {
                if init_ids.is_empty() {
                    candle_core::bail!("prompt tuning init text tokenizes to nothing");
                }
                let ids: Vec<u32> = init_ids.iter().copied().cycle().take(n).collect();
                table.index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?
            }
            PromptInit::SampleVocab => {
                use rand::Rng;
                let v = model.cfg.vocab_size as u32;
                let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..v)).collect();
                table.index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?
            }
        };
        Ok(Self {
            config,
            embeddings: embeddings.to_dtype(DType::F32)?.contiguous()?,
        })
    }

    /// `(b, l, h)` → `(b, n + l, h)`.
    pub fn prepend(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (n, h) = self.embeddings.dims2()?;
        let p = self.embeddings.unsqueeze(0)?.expand((b, n, h))?;
        Tensor::cat(&[&p, x], 1)
    }

    pub fn len(&self) -> usize {
        self.config.num_virtual_tokens()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The soft prompt is prepended to the input embeddings by the caller
/// ([`AdapterMethod::soft_prompt`]); inside the model it hooks nothing.
impl ForwardHooks for SoftPrompt {
    fn only_low_rank(&self) -> bool {
        true
    }

    fn has_decode_terms(&self) -> bool {
        // no projection deltas at all
        true
    }
}

impl AdapterMethod for SoftPrompt {
    type Config = PromptTuningConfig;
    const NAME: &'static str = itamae_client::methods::prompt_tuning::NAME;
    const PEFT_TYPE: &'static str = "PROMPT_TUNING";
    const DEFAULT_LEARNING_RATE: f64 = 3e-2;

    fn config(&self) -> &PromptTuningConfig {
        &self.config
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![("prompt_embeddings".into(), self.embeddings.clone())]
    }

    fn peft_config(&self, model: &ModelConfig, base_name: &str) -> Value {
        let c = &self.config;
        let (init, text) = match c.init() {
            PromptInit::Random => ("RANDOM", Value::Null),
            PromptInit::Text => (
                "TEXT",
                Value::String(c.init_text().unwrap_or_default().to_string()),
            ),
            PromptInit::SampleVocab => ("SAMPLE_VOCAB", Value::Null),
        };
        json!({
            "peft_type": Self::PEFT_TYPE,
            "num_virtual_tokens": c.num_virtual_tokens(),
            "token_dim": model.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": model.num_heads,
            "num_layers": model.num_layers,
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": text,
            "tokenizer_name_or_path": if text.is_null() { Value::Null } else { Value::String(base_name.into()) },
            "tokenizer_kwargs": null,
        })
    }

    fn from_peft(
        c: &Value,
        tensors: &HashMap<String, Tensor>,
        model: &ModelConfig,
    ) -> std::result::Result<Self, PeftError> {
        let n = get_usize(c, "num_virtual_tokens")?;
        let emb = f32_tensor(tensors, "prompt_embeddings")?;
        if emb.dims() != [n, model.hidden_size] {
            return Err(PeftError::Mismatch(format!(
                "prompt_embeddings has shape {:?}, expected [{n}, {}]",
                emb.dims(),
                model.hidden_size
            )));
        }
        let (init, init_text) = match c.get("prompt_tuning_init").and_then(Value::as_str) {
            Some("TEXT") => (
                PromptInit::Text,
                Some(
                    c.get("prompt_tuning_init_text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                ),
            ),
            Some("SAMPLE_VOCAB") => (PromptInit::SampleVocab, None),
            _ => (PromptInit::Random, None),
        };
        Ok(SoftPrompt {
            config: PromptTuningConfig {
                num_virtual_tokens: Some(n),
                init: Some(init),
                init_text,
            },
            embeddings: emb,
        })
    }

    fn detached(&self, _model: &ModelConfig) -> Result<Self> {
        Ok(SoftPrompt {
            config: self.config.clone(),
            embeddings: self.embeddings.detach(),
        })
    }

    fn soft_prompt(&self) -> Option<&Tensor> {
        Some(&self.embeddings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;

    #[test]
    fn inits_have_the_right_shape_and_text_repeats() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        for init in [
            PromptInit::Random,
            PromptInit::Text,
            PromptInit::SampleVocab,
        ] {
            let p = SoftPrompt::init(
                &m,
                PromptTuningConfig {
                    num_virtual_tokens: Some(5),
                    init: Some(init),
                    init_text: Some("x".into()),
                },
                &[3, 4],
                0,
            )
            .unwrap();
            assert_eq!(p.embeddings.dims(), &[5, 32]);
        }
        let p = SoftPrompt::init(
            &m,
            PromptTuningConfig {
                num_virtual_tokens: Some(3),
                init: Some(PromptInit::Text),
                init_text: Some("x".into()),
            },
            &[7, 9],
            0,
        )
        .unwrap();
        let rows = p.embeddings.to_vec2::<f32>().unwrap();
        let table = m
            .embed_tokens
            .to_dense(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(rows[0], table[7]);
        assert_eq!(rows[2], table[7]);
        let x = Tensor::zeros((2, 4, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(p.prepend(&x).unwrap().dims(), &[2, 7, 32]);
    }
}
