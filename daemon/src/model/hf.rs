//! Loading an HF model directory: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and the text side through [`super::tokenizer::from_hf_dir`].
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::weights::{Weight, WeightsMode};
use super::{ModelError, Result};

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `org/name` with one slash and hub-safe characters: a hub id, not a local path or a URL.
pub fn looks_like_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The hub id in `config.json`'s `_name_or_path`, when it is one.
pub fn hub_id(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let id = v.get("_name_or_path")?.as_str()?.trim();
    looks_like_hub_id(id).then(|| id.to_string())
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    ModelConfig::from_hf_json(&read_text(&dir.join("config.json"))?)
}

/// All tensors of the checkpoint, held as `mode` says (`f32`: every tensor converted to f32).
pub fn read_weights(
    dir: &Path,
    device: &Device,
    mode: WeightsMode,
) -> Result<HashMap<String, Weight>> {
    let single = dir.join("model.safetensors");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index_path = dir.join("model.safetensors.index.json");
        let index: serde_json::Value = serde_json::from_str(&read_text(&index_path)?)
            .map_err(|e| ModelError::Config(format!("{}: {e}", index_path.display())))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::Config(format!("{} has no weight_map", index_path.display()))
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        shards
            .iter()
            .map(|s| {
                // Shard names come from a file: keep them inside the model directory.
                if s.contains('/') || s.contains("..") {
                    Err(ModelError::Config(format!("invalid shard name `{s}`")))
                } else {
                    Ok(dir.join(s))
                }
            })
            .collect::<Result<_>>()?
    };
    let mut out = HashMap::new();
    for f in files {
        let tensors = candle_core::safetensors::load(&f, device)
            .map_err(|e| ModelError::Config(format!("{}: {e}", f.display())))?;
        for (name, t) in tensors {
            out.insert(name, mode.convert_dense(t)?);
        }
    }
    Ok(out)
}

/// Writes an HF model directory (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, generation_config.json) atomically: what full SFT produces and what
/// HF `transformers` (and PEFT, for interop checks) load as a base model.
pub fn save_model_dir(
    dir: &Path,
    model: &super::Transformer,
    text: &super::TextSpec,
) -> Result<()> {
    let config = serde_json::to_vec_pretty(&model.cfg.to_hf_json())
        .map_err(|e| ModelError::Config(e.to_string()))?;
    let weights: HashMap<String, Tensor> = model
        .named_weights()?
        .into_iter()
        .map(|(n, t)| t.detach().contiguous().map(|t| (n, t)))
        .collect::<candle_core::Result<_>>()?;
    let tok_config = serde_json::json!({
        "chat_template": text.chat_template,
        "bos_token": text.bos_token,
        "eos_token": text.eos_token,
        "add_bos_token": text.add_bos,
        "model_max_length": model.cfg.max_position_embeddings,
    });
    let gen_config = serde_json::json!({
        "bos_token_id": text.bos_id,
        "eos_token_id": text.eos_ids,
    });
    // Checkpoints of the run that produced the model sit beside it and are carried over.
    crate::durable::replace_dir(dir, &["checkpoints"], |tmp| {
        let w = |name: &str, bytes: &[u8]| -> std::result::Result<(), String> {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))
        };
        w("config.json", &config)?;
        w("tokenizer_config.json", tok_config.to_string().as_bytes())?;
        w("generation_config.json", gen_config.to_string().as_bytes())?;
        text.tokenizer
            .save(tmp.join("tokenizer.json"), false)
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        candle_core::safetensors::save(&weights, tmp.join("model.safetensors"))
            .map_err(|e| format!("model.safetensors: {e}"))
    })
    .map_err(|e| ModelError::Config(format!("writing {}: {e}", dir.display())))
}
