//! The architecture registry: which model families the daemon runs and what each one declares.
//!
//! Everything that differs between decoder-only families sits behind [`Architecture`]: the names
//! a checkpoint uses for it, the defaults of its config, its tensor names (GGUF → HF) and
//! per-weight fix-ups, its projections (which are also the adapter targets), the wiring of its
//! block out of the shared layers of [`super::layers`], and whether its blocks can train as the
//! fused whole-block op of [`crate::ops::decoder`]. The model ([`super::Transformer`]), the
//! loaders, LoRA target resolution and PEFT tensor naming ask the architecture instead of a
//! global list, so a family is one file.
//!
//! # Adding a model
//! 1. Write `model/<family>.rs`: a unit struct implementing [`Architecture`]. Declare its
//!    projections from [`Proj`] (add a variant to [`Proj`] in `layers.rs` only for a projection
//!    kind no family has yet), wire [`Architecture::attention_inputs`] and
//!    [`Architecture::mlp`] from the helpers in [`super::layers`], map its GGUF tensor names
//!    (or leave GGUF unsupported), and add an equivalence test against a reference forward on a
//!    tiny random model. `phi3.rs` is the worked example: fused `qkv_proj` and `gate_up_proj`.
//! 2. Register it here: a variant of [`Arch`], its names in [`Arch::parse`] and [`Arch::name`],
//!    and its instance in [`Arch::family`].
//! 3. Declare the module in `model/mod.rs`.
//!
//! Config keys the family reads beyond the shared ones (`ModelConfig`) go into `config.rs`.
use candle_core::{Result, Tensor};

use super::config::ModelConfig;
use super::layers::{Block, Proj};
use super::weights::Weight;
use super::{ModelError, Result as ModelResult};
use crate::ops::decoder::LayerWeights;

/// The model families the daemon can load. The variant is what a config carries; its
/// [`Architecture`] ([`Arch::family`]) is what the code asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Phi3,
}

impl Arch {
    /// Every registered architecture, in the order error messages list them.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Phi3];

    /// From a GGUF `general.architecture`, an HF `model_type` or an HF `architectures` class.
    pub fn parse(name: &str) -> ModelResult<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            "phi3" | "Phi3ForCausalLM" => Ok(Arch::Phi3),
            other => Err(ModelError::UnsupportedArch(other.to_string())),
        }
    }

    /// The GGUF / HF `model_type` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Phi3 => "phi3",
        }
    }

    /// What this architecture declares.
    pub fn family(self) -> &'static dyn Architecture {
        match self {
            Arch::Llama => &super::llama::LLAMA,
            Arch::Mistral => &super::llama::MISTRAL,
            Arch::Qwen2 => &super::llama::QWEN2,
            Arch::Phi3 => &super::phi3::Phi3,
        }
    }
}

/// The base projection of a block's input plus whatever the adapters add to it: what the model
/// hands an architecture's wiring, so the wiring never sees adapters.
pub type ProjectFn<'a> = dyn Fn(Proj, &Tensor) -> Result<Tensor> + 'a;

/// What one model family declares. See the module doc for where a new family goes.
pub trait Architecture: Sync {
    /// The HF `architectures` class written into a saved `config.json`.
    fn hf_class(&self) -> &'static str;

    /// Whether q/k/v carry biases when the config does not say (`attention_bias`).
    fn default_qkv_bias(&self) -> bool {
        false
    }

    /// The projections of one block, in block order. They are the adapter targets: LoRA can add
    /// a delta to each, and PEFT names them `…layers.N.<Proj::hf_path>`.
    fn projections(&self) -> &'static [Proj];

    /// Whether projection `p` has a bias under `cfg`.
    fn has_bias(&self, p: Proj, cfg: &ModelConfig) -> bool {
        cfg.qkv_bias && matches!(p, Proj::Q | Proj::K | Proj::V | Proj::Qkv)
    }

    /// The HF name of a block tensor for a GGUF block tensor's module (`attn_q` → `self_attn.
    /// q_proj`), None for modules the family does not use. `general.architecture` picks the
    /// family; the global tensors (embeddings, final norm, head) are the same for all.
    fn gguf_module(&self, module: &str) -> Option<&'static str>;

    /// Whether this family loads from GGUF files at all.
    fn loads_gguf(&self) -> bool {
        true
    }

    /// Fix-up of a GGUF block tensor (dense or in blocks) of module `module` (e.g. undoing llama.cpp's
    /// Q/K row permutation).
    fn fix_gguf_tensor(&self, _module: &str, t: Weight, _cfg: &ModelConfig) -> Result<Weight> {
        Ok(t)
    }

    /// Queries `(b, l, n_head·d)`, keys and values `(b, l, n_kv·d)` of a block for its normed
    /// input `h`, through `project`.
    fn attention_inputs(
        &self,
        cfg: &ModelConfig,
        h: &Tensor,
        project: &ProjectFn<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)>;

    /// The MLP of a block on its normed input `h`, through `project`.
    fn mlp(&self, cfg: &ModelConfig, h: &Tensor, project: &ProjectFn<'_>) -> Result<Tensor>;

    /// The capability to train as the fused whole-block op ([`crate::ops::decoder`], RMSNorm →
    /// separate q/k/v → rotate-half RoPE → attention → o → RMSNorm → SwiGLU): the block's frozen
    /// weights in that op's layout, or None when the family's blocks are wired otherwise (they
    /// then train through the composed per-op path). LoRA factors go to the op's slots in
    /// [`FUSED_PROJS`] order, so only families whose projections are those seven can say yes.
    fn fused_block(&self, _blk: &Block, _cfg: &ModelConfig) -> Option<LayerWeights> {
        None
    }

    /// Whether a block is the standard pre-norm wiring that the row decode path
    /// ([`super::decode_step`]) hard-codes: RMSNorm → q/k/v (the attention projections before
    /// `o_proj`, outputs side by side as `[q | k | v]`) → rotate-half RoPE → attention → o →
    /// RMSNorm → SwiGLU (`[gate | up]` from the MLP projections before `down_proj`). A family
    /// wired any other way keeps the default and decodes through the composed forward.
    fn row_decode(&self) -> bool {
        false
    }

    /// The projections of this family that `wanted` targets: each one it names that the family
    /// has, and each fused projection of the family whose parts it names all (so `all-linear`,
    /// which lists the seven separate projections, covers `qkv_proj` and `gate_up_proj`).
    /// Keeps `wanted`'s order; a fused projection takes the place of its first part.
    fn targets(&self, wanted: &[Proj]) -> Vec<Proj> {
        let own = self.projections();
        let mut out = Vec::new();
        for &p in wanted {
            let hit = if own.contains(&p) {
                Some(p)
            } else {
                own.iter().copied().find(|f| {
                    f.parts().contains(&p) && f.parts().iter().all(|q| wanted.contains(q))
                })
            };
            if let Some(t) = hit {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        out
    }
}

/// The slot order of the fused block op's projections and LoRA factors
/// ([`crate::ops::decoder::PROJS`]).
pub const FUSED_PROJS: [Proj; 7] = Proj::ALL;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_named() {
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()).unwrap(), a);
            assert_eq!(Arch::parse(a.family().hf_class()).unwrap(), a);
        }
        let e = Arch::parse("gpt_neox").unwrap_err().to_string();
        assert!(e.contains("gpt_neox") && e.contains("phi3"), "{e}");
    }

    #[test]
    fn targets_resolve_against_the_family() {
        let all = Proj::ALL.to_vec();
        assert_eq!(Arch::Llama.family().targets(&all), all);
        assert_eq!(
            Arch::Qwen2.family().targets(&[Proj::Down, Proj::Q]),
            [Proj::Down, Proj::Q]
        );
        assert_eq!(
            Arch::Phi3.family().targets(&all),
            [Proj::Qkv, Proj::O, Proj::GateUp, Proj::Down]
        );
        // a fused projection needs all its parts named
        assert_eq!(
            Arch::Phi3.family().targets(&[Proj::Q, Proj::V, Proj::Up]),
            []
        );
        assert_eq!(Arch::Phi3.family().targets(&[Proj::Qkv]), [Proj::Qkv]);
    }
}
