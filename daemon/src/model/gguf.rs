//! Loading a single GGUF file: metadata → [`ModelConfig`], tensors kept in their blocks or
//! converted as the [`WeightsMode`] says and renamed to HF names with the per-weight fix-ups the
//! architecture declares (e.g. undoing llama.cpp's Q/K row permutation for the llama arch, by
//! whole rows of blocks), text side through [`super::tokenizer::from_gguf`].
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::arch::Architecture;
use super::config::ModelConfig;
use super::weights::{Weight, WeightsMode};
use super::{ModelError, Result};

/// GGUF tensor name → HF name, or None for tensors we do not use. Block tensors are named by
/// the architecture.
fn hf_name(family: &dyn Architecture, gguf: &str) -> Option<String> {
    let map_global = |s: &str| match s {
        "token_embd.weight" => Some("model.embed_tokens.weight".to_string()),
        "output_norm.weight" => Some("model.norm.weight".to_string()),
        "output.weight" => Some("lm_head.weight".to_string()),
        _ => None,
    };
    if let Some(n) = map_global(gguf) {
        return Some(n);
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = family.gguf_module(module)?;
    Some(format!("model.layers.{idx}.{hf}.{kind}"))
}

/// Undoes llama.cpp's interleaving of Q/K rows (made for interleaved RoPE) so that the
/// rotate-half RoPE of HF checkpoints applies: rows viewed as `(n_head, rows/n_head/2, 2, ...)`
/// with axes 1 and 2 swapped.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, rows / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// [`unpermute_qk`] as a row reordering of a weight in any storage: the rows of blocks move.
pub fn unpermute_qk_rows(w: &Weight, n_head: usize) -> candle_core::Result<Weight> {
    let rows = w.dim(0)?;
    let idx = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
    let src: Vec<usize> = unpermute_qk(&idx, n_head)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    w.permute_rows(&src)
}

pub struct GgufParts {
    pub config: ModelConfig,
    pub weights: HashMap<String, Weight>,
    pub metadata: HashMap<String, gguf_file::Value>,
}

/// The hub id a GGUF names as its source or base model, if any (`org/name`).
pub fn hub_id(metadata: &HashMap<String, gguf_file::Value>) -> Option<String> {
    let text = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.trim().to_string())
    };
    let id = text("general.source.huggingface.repository")
        .or_else(|| text("general.base_model.0.repo_url"))?;
    let id = id
        .trim_start_matches("https://huggingface.co/")
        .trim_end_matches('/');
    super::hf::looks_like_hub_id(id).then(|| id.to_string())
}

pub fn read(path: &Path, device: &Device, mode: WeightsMode) -> Result<GgufParts> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        ModelError::Config(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig::from_gguf(&content.metadata, has_output)?;
    let family = config.arch.family();
    if !family.loads_gguf() {
        return Err(ModelError::Config(format!(
            "architecture `{}` loads from HF directories only",
            config.arch.name()
        )));
    }
    let mut weights = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(family, name) else {
            continue;
        };
        let info = &content.tensor_infos[name];
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| ModelError::Config(format!("reading tensor `{name}`: {e}")))?;
        let t = mode
            .convert_gguf(q)
            .map_err(|_| ModelError::UnsupportedQuant {
                tensor: name.clone(),
                dtype: format!("{:?}", info.ggml_dtype),
            })?;
        let t = family.fix_gguf_tensor(name, t, &config)?;
        weights.insert(hf, t);
    }
    Ok(GgufParts {
        config,
        weights,
        metadata: content.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_from_metadata() {
        use gguf_file::Value;
        let meta = |k: &str, v: &str| HashMap::from([(k.to_string(), Value::String(v.into()))]);
        assert_eq!(
            hub_id(&meta(
                "general.source.huggingface.repository",
                "HuggingFaceTB/SmolLM2-135M"
            )),
            Some("HuggingFaceTB/SmolLM2-135M".into())
        );
        assert_eq!(
            hub_id(&meta(
                "general.base_model.0.repo_url",
                "https://huggingface.co/Qwen/Qwen2-0.5B"
            )),
            Some("Qwen/Qwen2-0.5B".into())
        );
        assert_eq!(hub_id(&meta("general.name", "Smollm2 135M")), None);
        assert_eq!(
            hub_id(&meta(
                "general.base_model.0.repo_url",
                "https://example.com/x"
            )),
            None
        );
    }

    #[test]
    fn names_map_to_hf() {
        let hf_name = |n| hf_name(crate::model::arch::Arch::Llama.family(), n);
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.12.ffn_norm.weight").unwrap(),
            "model.layers.12.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp's convert script: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
        let (n_head, rows, cols) = (3, 12, 5);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let permuted = w
            .reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let back = unpermute_qk(&permuted, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // The same on rows of quantized blocks: the rows move as bytes, unchanged.
        let cols = 32;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let permuted = w
            .reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let q = |t: &Tensor| {
            Weight::quantize(t, candle_core::quantized::GgmlDType::Q8_0)
                .unwrap()
                .to_dense(candle_core::DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let fixed = Weight::quantize(&permuted, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let back = unpermute_qk_rows(&fixed, n_head).unwrap();
        assert_eq!(back.type_name(), "q8_0");
        let back = back.to_dense(candle_core::DType::F32).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), q(&w));
    }
}
