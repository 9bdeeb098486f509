//! Adapters: what turns the resident base model into a variant without touching its weights.
//! LoRA (low-rank deltas on projections), prompt tuning (soft prompt embeddings prepended to the
//! input) and prefix tuning (per-layer key/value prefixes). This layer owns their parameters,
//! their initialisation, how they hook into the model's forward ([`ForwardHooks`]) and their
//! HF PEFT on-disk format ([`peft`]).
//!
//! Each method is one file implementing [`AdapterMethod`]; its config (the API's
//! `method.supervised.adapter` object, also the trainer's and `itamaed train`'s) is defined once
//! in `itamae_client::methods` and re-exported here. Adding a method (IA3, DoRA) touches:
//! 1. `client/src/methods/<method>.rs`: its config, parsed and checked once; plus its variant
//!    of `AdapterConfig` in `client/src/methods/mod.rs`;
//! 2. `adapters/<method>.rs`: its [`AdapterMethod`] and [`ForwardHooks`] impls;
//! 3. this file: its [`Adapter`] variant, its arm in `each!`, its `peft_type` in [`from_peft`];
//! 4. `train/trainer.rs`: how its tensors become trainable (the arm of `Trainer::new`);
//! 5. `openapi/openapi.yaml`: its schema under `Adapter` (tests/openapi.rs checks the two agree).
pub mod lora;
pub mod peft;
pub mod prefix;
pub mod prompt;

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub use itamae_client::methods::{AdapterConfig, FieldError};
pub use lora::{Lora, LoraConfig};
pub use prefix::{Prefix, PrefixTuningConfig};
pub use prompt::{PromptInit, PromptTuningConfig, SoftPrompt};

use crate::model::layers::{ForwardHooks, LowRank, Proj};
use crate::model::ModelConfig;
use crate::ops::lora_rows::{DecodeElem, RowTerm};

/// What one adapter method provides besides its config: a loaded (servable) adapter of that
/// kind, how it hooks into the forward (the [`ForwardHooks`] supertrait) and its PEFT files.
pub trait AdapterMethod: ForwardHooks + Sized {
    /// Its config: the API's adapter object (`itamae_client::methods`).
    type Config;
    /// The config's `type` and a served adapter's `kind`.
    const NAME: &'static str;
    /// `peft_type` in adapter_config.json.
    const PEFT_TYPE: &'static str;
    /// The learning rate "auto" stands for (and that `learning_rate_multiplier` scales).
    const DEFAULT_LEARNING_RATE: f64;

    fn config(&self) -> &Self::Config;
    /// Every parameter tensor, named as in the PEFT safetensors file.
    fn tensors(&self) -> Vec<(String, Tensor)>;
    /// Its keys of adapter_config.json (the common ones are [`peft`]'s).
    fn peft_config(&self, model: &ModelConfig, base_name: &str) -> Value;
    /// Rebuilds it from adapter_config.json and the safetensors tensors.
    fn from_peft(
        c: &Value,
        tensors: &HashMap<String, Tensor>,
        model: &ModelConfig,
    ) -> std::result::Result<Self, peft::PeftError>;
    /// A copy cut loose from the training graph.
    fn detached(&self, model: &ModelConfig) -> Result<Self>;
    /// Bytes held besides [`Self::tensors`] (copies packed for serving).
    fn extra_bytes(&self) -> usize {
        0
    }
    /// Readies a copy that will only serve (never train).
    fn prepare_for_serving(&mut self) -> Result<()> {
        Ok(())
    }
    /// Embeddings to prepend to the input, if the method has any.
    fn soft_prompt(&self) -> Option<&Tensor> {
        None
    }
}

/// A loaded adapter of any kind.
pub enum Adapter {
    Lora(Lora),
    Prompt(SoftPrompt),
    Prefix(Prefix),
}

/// `$body` with `$a` bound to whichever method `$adapter` holds: the one list of methods the
/// dispatch below goes through.
macro_rules! each {
    ($adapter:expr, $a:ident => $body:expr) => {
        match $adapter {
            Adapter::Lora($a) => $body,
            Adapter::Prompt($a) => $body,
            Adapter::Prefix($a) => $body,
        }
    };
}

/// The adapter a PEFT `adapter_config.json` (`c`, of `peft_type` `kind`) and its tensors make.
pub fn from_peft(
    kind: &str,
    c: &Value,
    tensors: &HashMap<String, Tensor>,
    model: &ModelConfig,
) -> std::result::Result<Adapter, peft::PeftError> {
    Ok(match kind {
        Lora::PEFT_TYPE => Adapter::Lora(Lora::from_peft(c, tensors, model)?),
        SoftPrompt::PEFT_TYPE => Adapter::Prompt(SoftPrompt::from_peft(c, tensors, model)?),
        Prefix::PEFT_TYPE => Adapter::Prefix(Prefix::from_peft(c, tensors, model)?),
        other => return Err(peft::PeftError::UnsupportedType(other.to_string())),
    })
}

impl Adapter {
    pub fn kind(&self) -> &'static str {
        fn name<M: AdapterMethod>(_: &M) -> &'static str {
            M::NAME
        }
        each!(self, a => name(a))
    }

    /// Soft prompt to prepend to the input embeddings, if any.
    pub fn soft_prompt(&self) -> Option<&Tensor> {
        each!(self, a => a.soft_prompt())
    }

    /// Every parameter tensor, named as in the PEFT safetensors file.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        each!(self, a => a.tensors())
    }

    /// Bytes held by the adapter's parameters (and the packed copy decode batches read).
    pub fn size_bytes(&self) -> usize {
        each!(self, a => a.extra_bytes())
            + self
                .tensors()
                .iter()
                .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                .sum::<usize>()
    }

    /// Readies a copy that will only serve (never train): LoRA factors packed for decode
    /// batches.
    pub fn prepare_for_serving(&mut self) -> Result<()> {
        each!(self, a => a.prepare_for_serving())
    }

    /// Its keys of adapter_config.json.
    pub(crate) fn peft_config(&self, model: &ModelConfig, base_name: &str) -> Value {
        each!(self, a => a.peft_config(model, base_name))
    }

    /// A copy cut loose from the training graph.
    pub fn detached(&self, model: &ModelConfig) -> Result<Adapter> {
        Ok(match self {
            Adapter::Lora(a) => Adapter::Lora(a.detached(model)?),
            Adapter::Prompt(a) => Adapter::Prompt(a.detached(model)?),
            Adapter::Prefix(a) => Adapter::Prefix(a.detached(model)?),
        })
    }
}

impl ForwardHooks for Adapter {
    fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        each!(self, a => a.linear_delta(layer, proj, x))
    }

    fn low_rank(
        &self,
        layer: usize,
        proj: Proj,
        input: &candle_core::Shape,
    ) -> Result<Option<LowRank>> {
        each!(self, a => ForwardHooks::low_rank(a, layer, proj, input))
    }

    fn only_low_rank(&self) -> bool {
        each!(self, a => a.only_low_rank())
    }

    fn has_decode_terms(&self) -> bool {
        each!(self, a => a.has_decode_terms())
    }

    fn decode_term(&self, layer: usize, proj: Proj) -> Option<RowTerm<'_, DecodeElem>> {
        each!(self, a => ForwardHooks::decode_term(a, layer, proj))
    }

    fn prefix_len(&self) -> usize {
        each!(self, a => a.prefix_len())
    }

    fn kv_prefix(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        each!(self, a => a.kv_prefix(layer))
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
