//! The model layer: the decoder-only transformer ([`Transformer`]) and the architectures it runs
//! (one file per family: `llama.rs` for Llama/SmolLM, Mistral and Qwen2, `phi3.rs` for Phi-3,
//! registered in [`arch`]), the shared layers they are built from ([`layers`]), their config,
//! the loaders for GGUF files and HF directories, the tokenizer and the chat template.
//!
//! A new model family goes into `model/<family>.rs` and is registered in `arch.rs`: the steps
//! are in [`arch`]'s module doc.
pub mod arch;
#[cfg(test)]
mod batch_invariance;
pub mod chat;
pub mod chat_template;
pub mod config;
mod decode_step;
pub mod gguf;
pub mod hf;
mod kv_prefix;
pub mod layers;
pub mod llama;
pub mod phi3;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use std::path::PathBuf;

pub use chat_template::ChatTemplate;
pub use config::{ModelConfig, RopeScaling};
pub use layers::KvCache;
pub use tokenizer::TextSpec;
/// The model's former name, kept importable while callers move to [`Transformer`].
pub use transformer::Transformer;
pub use weights::{Weight, WeightsMode};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unsupported architecture `{0}` (supported: {list})", list = supported_archs())]
    UnsupportedArch(String),
    #[error("unsupported tensor type {dtype} for tensor `{tensor}`")]
    UnsupportedQuant { tensor: String, dtype: String },
    #[error(
        "unsupported pre-tokenizer `{0}` (supported: smollm, qwen2, llama-bpe, gpt2, default)"
    )]
    UnsupportedPreTokenizer(String),
    #[error("unsupported tokenizer model `{0}` (supported: gpt2 byte-level BPE)")]
    UnsupportedTokenizer(String),
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// The registered architectures' names, as error messages list them.
fn supported_archs() -> String {
    arch::Arch::ALL.map(arch::Arch::name).join(", ")
}

/// A model ready to serve or train: weights, text side and chat template.
pub struct LoadedModel {
    pub model: Transformer,
    pub text: TextSpec,
    pub template: Option<ChatTemplate>,
    /// Served id of the base model (the file or directory name).
    pub name: String,
    /// The model's Hugging Face hub id when the files name it (GGUF `general.source.
    /// huggingface.repository` or `general.base_model.0.repo_url`, HF `_name_or_path`): what
    /// saved adapters give PEFT as `base_model_name_or_path`.
    pub hub_id: Option<String>,
    /// How the weights are held.
    pub weights: WeightsMode,
}

/// Loads a GGUF file or an HF directory, holding the weights as `mode` says.
pub fn load(
    path: &std::path::Path,
    device: &candle_core::Device,
    mode: WeightsMode,
) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (config, weights, text, hub_id) = if meta.is_dir() {
        let config = hf::read_config(path)?;
        let weights = hf::read_weights(path, device, mode)?;
        let hub_id = hf::hub_id(path);
        (config, weights, tokenizer::from_hf_dir(path)?, hub_id)
    } else {
        let parts = gguf::read(path, device, mode)?;
        let text = tokenizer::from_gguf(&parts.metadata)?;
        let hub_id = gguf::hub_id(&parts.metadata);
        (parts.config, parts.weights, text, hub_id)
    };
    let model = Transformer::from_stored(config, weights, device)?;
    // The file's read buffers and the conversions' transients are freed by now.
    crate::alloc::release_after_burst();
    let template = match &text.chat_template {
        Some(src) => Some(ChatTemplate::new(
            src,
            text.bos_token.as_deref().unwrap_or(""),
            text.eos_token.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    let name = if meta.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    }
    .map(|s| s.to_string_lossy().into_owned())
    .unwrap_or_else(|| "model".to_string());
    Ok(LoadedModel {
        model,
        text,
        template,
        name,
        hub_id,
        weights: mode,
    })
}
