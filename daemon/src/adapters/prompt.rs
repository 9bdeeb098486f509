//! Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to the input embeddings
//! (PEFT `PROMPT_TUNING`). Positions count the virtual tokens, as in PEFT.
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{rng, seeded_normal};
use crate::model::Llama;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Normal noise with the spread of the model's own embedding table.
    Random,
    /// Embeddings of a tokenized text, repeated or cut to length.
    Text(String),
    /// Embeddings of random vocabulary entries.
    SampleVocab,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
}

pub struct SoftPrompt {
    pub config: PromptTuningConfig,
    /// `(num_virtual_tokens, hidden)`
    pub embeddings: Tensor,
}

impl SoftPrompt {
    /// `init_ids`: the tokenized init text, for [`PromptInit::Text`].
    pub fn init(
        model: &Llama,
        config: PromptTuningConfig,
        init_ids: &[u32],
        seed: u64,
    ) -> Result<Self> {
        let n = config.num_virtual_tokens;
        let h = model.cfg.hidden_size;
        let dev: &Device = model.device();
        let table = &model.embed_tokens;
        let mut r = rng(seed);
        let embeddings = match &config.init {
            PromptInit::Random => {
                let std = table.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?;
                Tensor::from_vec(seeded_normal(n * h, std, &mut r), (n, h), dev)?
            }
            PromptInit::Text(_) => {
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
        self.config.num_virtual_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use crate::model::llama::tests::tiny_config;

    #[test]
    fn inits_have_the_right_shape_and_text_repeats() {
        let m = Llama::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        for init in [
            PromptInit::Random,
            PromptInit::Text("x".into()),
            PromptInit::SampleVocab,
        ] {
            let p = SoftPrompt::init(
                &m,
                PromptTuningConfig {
                    num_virtual_tokens: 5,
                    init,
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
                num_virtual_tokens: 3,
                init: PromptInit::Text("x".into()),
            },
            &[7, 9],
            0,
        )
        .unwrap();
        let rows = p.embeddings.to_vec2::<f32>().unwrap();
        let table = m.embed_tokens.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], table[7]);
        assert_eq!(rows[2], table[7]);
        let x = Tensor::zeros((2, 4, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(p.prepend(&x).unwrap().dims(), &[2, 7, 32]);
    }
}
