//! HF PEFT on-disk format: `adapter_config.json` + `adapter_model.safetensors`, byte-compatible
//! with `PeftModel.save_pretrained` / `from_pretrained` for LoRA, prompt tuning and prefix tuning.
//! Writes are atomic: files go to a temporary sibling directory, are fsynced, and the directory
//! is renamed into place, so a reader never sees half an adapter.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::Adapter;
use crate::model::ModelConfig;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("adapter_model.safetensors: {0}")]
    Weights(String),
    #[error("unsupported peft_type `{0}` (supported: LORA, PROMPT_TUNING, PREFIX_TUNING)")]
    UnsupportedType(String),
    #[error("the adapter does not fit this base model: {0}")]
    Mismatch(String),
}

type Result<T> = std::result::Result<T, PeftError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `adapter_config.json` PEFT writes for this adapter.
pub fn config_json(adapter: &Adapter, model: &ModelConfig, base_name: &str) -> Value {
    let common = json!({
        "base_model_name_or_path": base_name,
        "task_type": "CAUSAL_LM",
        "inference_mode": true,
        "revision": null,
    });
    let mut v = adapter.peft_config(model, base_name);
    if let (Some(obj), Some(c)) = (v.as_object_mut(), common.as_object()) {
        for (k, val) in c {
            obj.insert(k.clone(), val.clone());
        }
    }
    v
}

/// Writes the adapter atomically to `dir` (replacing an existing one).
pub fn save(dir: &Path, adapter: &Adapter, model: &ModelConfig, base_name: &str) -> Result<()> {
    let config = serde_json::to_vec_pretty(&config_json(adapter, model, base_name))
        .map_err(|e| PeftError::Config(e.to_string()))?;
    let tensors: HashMap<String, Tensor> = adapter
        .tensors()
        .into_iter()
        .map(|(k, t)| t.contiguous().map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| PeftError::Weights(e.to_string()))?;
    write_atomically(dir, |tmp| {
        let cpath = tmp.join(CONFIG_FILE);
        let mut f = std::fs::File::create(&cpath).map_err(io(&cpath))?;
        f.write_all(&config).map_err(io(&cpath))?;
        f.sync_all().map_err(io(&cpath))?;
        let wpath = tmp.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &wpath)
            .map_err(|e| PeftError::Weights(e.to_string()))?;
        std::fs::File::open(&wpath)
            .and_then(|f| f.sync_all())
            .map_err(io(&wpath))
    })
}

/// Entries of an output directory that belong to the run rather than to its result: they are
/// carried over when the result is replaced (checkpoints live beside the final adapter).
pub const KEPT_ENTRIES: &[&str] = &["checkpoints"];

/// Fills a temporary sibling of `dir` with `fill`, then swaps it into place. Entries of the old
/// directory named in [`KEPT_ENTRIES`] are moved into the new one first.
pub fn write_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    crate::durable::replace_dir(dir, KEPT_ENTRIES, fill).map_err(|e| match e {
        crate::durable::ReplaceError::Fill(e) => e,
        crate::durable::ReplaceError::Io(e) => PeftError::Io {
            path: e.path,
            source: e.source,
        },
    })
}

/// A non-negative integer of an adapter_config.json.
pub(crate) fn get_usize(c: &Value, key: &str) -> Result<usize> {
    c.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| {
            PeftError::Config(format!("`{key}` is missing or not a non-negative integer"))
        })
}

/// Reads a PEFT adapter directory written by itamae or by PEFT itself.
pub fn load(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Adapter> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(io(&cpath))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| PeftError::Config(e.to_string()))?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        return Err(io(&wpath)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "missing (only safetensors weights are read)",
        )));
    }
    let tensors = candle_core::safetensors::load(&wpath, device)
        .map_err(|e| PeftError::Weights(e.to_string()))?;
    from_parts(&c, tensors, model)
}

/// Builds an adapter from a parsed `adapter_config.json` and its tensors.
pub fn from_parts(
    c: &Value,
    tensors: HashMap<String, Tensor>,
    model: &ModelConfig,
) -> Result<Adapter> {
    let kind = c
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| PeftError::Config("`peft_type` is missing".into()))?;
    super::from_peft(kind, c, &tensors, model)
}

/// Tensor `name` of an adapter's safetensors, as f32.
pub(crate) fn f32_tensor(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    tensors
        .get(name)
        .ok_or_else(|| PeftError::Weights(format!("tensor `{name}` is missing")))?
        .to_dtype(candle_core::DType::F32)
        .map_err(|e| PeftError::Weights(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{Lora, LoraConfig, Prefix, PrefixTuningConfig, PromptInit};
    use crate::adapters::{PromptTuningConfig, SoftPrompt};
    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;
    use crate::model::Transformer;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("itamae-peft-{tag}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn same(a: &Adapter, b: &Adapter) {
        let (ta, tb) = (a.tensors(), b.tensors());
        assert_eq!(ta.len(), tb.len());
        let tb: HashMap<_, _> = tb.into_iter().collect();
        for (k, t) in ta {
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb[&k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
    }

    #[test]
    fn round_trips_every_kind_and_replaces_atomically() {
        let cfg = tiny_config(Arch::Llama);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).unwrap();
        let dir = tmpdir("rt");
        let lora = Adapter::Lora(
            Lora::init(
                &cfg,
                LoraConfig {
                    target_modules: Some(vec!["q_proj".into(), "down_proj".into()]),
                    ..Default::default()
                },
                1,
                &Device::Cpu,
            )
            .unwrap(),
        );
        let prompt = Adapter::Prompt(
            SoftPrompt::init(
                &m,
                PromptTuningConfig {
                    num_virtual_tokens: Some(4),
                    init: Some(PromptInit::Text),
                    init_text: Some("hi".into()),
                },
                &[1, 2],
                0,
            )
            .unwrap(),
        );
        let pcfg = PrefixTuningConfig {
            num_virtual_tokens: Some(3),
            prefix_projection: Some(false),
            encoder_hidden_size: Some(cfg.kv_dim()),
        };
        let flat = Tensor::randn(
            0f32,
            1.,
            (3, cfg.num_layers * 2 * cfg.kv_dim()),
            &Device::Cpu,
        )
        .unwrap();
        let prefix = Adapter::Prefix(Prefix::from_flat(&cfg, pcfg, flat).unwrap());
        for a in [&lora, &prompt, &prefix] {
            let d = dir.join("variant");
            save(&d, a, &cfg, "base").unwrap();
            let back = load(&d, &cfg, &Device::Cpu).unwrap();
            assert_eq!(back.kind(), a.kind());
            same(a, &back);
        }
        // replacing a result keeps the run's checkpoints beside it
        std::fs::create_dir_all(dir.join("variant/checkpoints/step-1")).unwrap();
        save(&dir.join("variant"), &prefix, &cfg, "base").unwrap();
        assert!(dir.join("variant/checkpoints/step-1").is_dir());
        std::fs::remove_dir_all(dir.join("variant/checkpoints")).unwrap();
        // only the final directory is left behind, no temporaries
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("variant")]);
        let c: Value =
            serde_json::from_slice(&std::fs::read(dir.join("variant").join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(c["peft_type"], "PREFIX_TUNING");
        assert_eq!(c["token_dim"], cfg.kv_dim());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_adapters_are_named() {
        let cfg = tiny_config(Arch::Llama);
        let e = from_parts(
            &json!({"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj": 64}}),
            HashMap::new(),
            &cfg,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("alpha_pattern"), "{e}");
        let norm = Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = from_parts(
            &json!({"peft_type": "LORA", "r": 4}),
            HashMap::from([("base_model.model.model.norm.weight".to_string(), norm)]),
            &cfg,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("modules_to_save"), "{e}");
        let e = from_parts(&json!({"peft_type": "IA3"}), HashMap::new(), &cfg)
            .err()
            .unwrap();
        assert!(e.to_string().contains("IA3"));
        let e = from_parts(&json!({"peft_type": "LORA", "r": 4}), HashMap::new(), &cfg)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no LoRA tensor"), "{e}");
        let t = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = from_parts(
            &json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}),
            HashMap::from([("prompt_embeddings".to_string(), t)]),
            &cfg,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("expected [2, 32]"), "{e}");
    }
}
