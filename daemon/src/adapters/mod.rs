//! Adapters: what turns the resident base model into a variant without touching its weights.
//! LoRA (low-rank deltas on projections), prompt tuning (soft prompt embeddings prepended to the
//! input) and prefix tuning (per-layer key/value prefixes). This layer owns their parameters,
//! their initialisation, how they hook into the model's forward ([`ForwardHooks`]) and their
//! HF PEFT on-disk format ([`peft`]).
pub mod lora;
pub mod peft;
pub mod prefix;
pub mod prompt;

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use lora::{Lora, LoraConfig};
pub use prefix::{Prefix, PrefixConfig};
pub use prompt::{PromptInit, PromptTuningConfig, SoftPrompt};

use crate::model::llama::{ForwardHooks, Proj};

/// A loaded adapter of any kind.
pub enum Adapter {
    Lora(Lora),
    Prompt(SoftPrompt),
    Prefix(Prefix),
}

impl Adapter {
    pub fn kind(&self) -> &'static str {
        match self {
            Adapter::Lora(_) => "lora",
            Adapter::Prompt(_) => "prompt_tuning",
            Adapter::Prefix(_) => "prefix_tuning",
        }
    }

    /// Soft prompt to prepend to the input embeddings, if any.
    pub fn soft_prompt(&self) -> Option<&Tensor> {
        match self {
            Adapter::Prompt(p) => Some(&p.embeddings),
            _ => None,
        }
    }

    /// Every parameter tensor, named as in the PEFT safetensors file.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Adapter::Lora(l) => l.tensors(),
            Adapter::Prompt(p) => vec![("prompt_embeddings".into(), p.embeddings.clone())],
            Adapter::Prefix(p) => vec![("prompt_embeddings".into(), p.flat.clone())],
        }
    }

    /// Bytes held by the adapter's parameters (and the packed copy decode batches read).
    pub fn size_bytes(&self) -> usize {
        let packed = match self {
            Adapter::Lora(l) => l.decode_bytes(),
            _ => 0,
        };
        packed
            + self
                .tensors()
                .iter()
                .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                .sum::<usize>()
    }

    /// Readies a copy that will only serve (never train): LoRA factors packed for decode
    /// batches.
    pub fn prepare_for_serving(&mut self) -> Result<()> {
        match self {
            Adapter::Lora(l) => l.pack_for_decode(),
            _ => Ok(()),
        }
    }
}

impl ForwardHooks for Adapter {
    fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Adapter::Lora(l) => l.delta(layer, proj, x),
            _ => Ok(None),
        }
    }

    fn low_rank(
        &self,
        layer: usize,
        proj: Proj,
        input: &candle_core::Shape,
    ) -> Result<Option<crate::model::llama::LowRank>> {
        match self {
            Adapter::Lora(l) => l.low_rank(layer, proj, input),
            _ => Ok(None),
        }
    }

    fn only_low_rank(&self) -> bool {
        !matches!(self, Adapter::Prefix(_))
    }

    fn has_decode_terms(&self) -> bool {
        match self {
            Adapter::Lora(l) => l.decode.is_some(),
            // no projection deltas at all
            Adapter::Prompt(_) | Adapter::Prefix(_) => true,
        }
    }

    fn decode_term(
        &self,
        layer: usize,
        proj: Proj,
    ) -> Option<crate::ops::lora_rows::RowTerm<'_, crate::ops::lora_rows::DecodeElem>> {
        match self {
            Adapter::Lora(l) => l.decode_term(layer, proj),
            _ => None,
        }
    }

    fn prefix_len(&self) -> usize {
        match self {
            Adapter::Prefix(p) => p.len(),
            _ => 0,
        }
    }

    fn kv_prefix(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self {
            Adapter::Prefix(p) => p.layer_kv(layer).map(Some),
            _ => Ok(None),
        }
    }
}

/// Seeded values so that a run's initialisation is reproducible (candle's own random tensors
/// draw from an unseeded thread RNG).
pub(crate) fn seeded_uniform(n: usize, bound: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

pub(crate) fn seeded_normal(n: usize, std: f32, rng: &mut StdRng) -> Vec<f32> {
    // Box-Muller: `rand` 0.9 has no normal distribution without `rand_distr`.
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
