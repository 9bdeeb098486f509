//! A fine-tuning job request (`POST /v1/fine_tuning/jobs`) parsed and checked into a [`JobSpec`]:
//! OpenAI's fields, hyperparameters given top-level (legacy) or in `method.supervised`, and the
//! adapter extension `method.supervised.adapter`. Every error names the request field at fault.
//!
//! The spec is stored with the job (as JSON) and turned into a trainer [`Method`] and
//! [`TrainConfig`] when the job runs, once the dataset size is known and "auto" can be resolved.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::storage::{valid_id, FILE_PREFIX};
use crate::adapters::{LoraConfig, PrefixConfig, PromptInit, PromptTuningConfig};
use crate::train::{Method, TrainConfig};

/// A request value that is not acceptable; `param` is its path in the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub param: String,
    pub message: String,
}

fn bad<T>(param: &str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        param: param.into(),
        message: message.into(),
    })
}

/// `method.supervised.adapter`; LoRA r=16 all-linear when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdapterSpec {
    Lora {
        r: usize,
        alpha: f64,
        dropout: f32,
        /// `["all-linear"]` or projection names.
        target_modules: Vec<String>,
        use_rslora: bool,
    },
    PromptTuning {
        num_virtual_tokens: usize,
        /// `text`, `random` or `sample_vocab`.
        init: String,
        init_text: Option<String>,
    },
    PrefixTuning {
        num_virtual_tokens: usize,
        prefix_projection: bool,
        /// The model's kv width when absent.
        encoder_hidden_size: Option<usize>,
    },
}

impl Default for AdapterSpec {
    fn default() -> Self {
        Self::Lora {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
        }
    }
}

/// Hyperparameters; `None` is "auto".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
    /// Extensions.
    pub max_steps: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub checkpoint_every: Option<usize>,
}

/// Hyperparameters after "auto" is resolved against the dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

/// What the runner needs to train a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub adapter: AdapterSpec,
    pub hyper: Hyper,
    pub seed: u64,
}

/// The validated create request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub metadata: Option<Value>,
    pub spec: JobSpec,
}

pub const DEFAULT_MAX_SEQ_LEN: usize = 1024;
const DEFAULT_INIT_TEXT: &str = "You are a helpful assistant.";

/// Parses `POST /v1/fine_tuning/jobs`. `default_seed` is used when the request has none.
pub fn parse_create(body: &Value, default_seed: u64) -> Result<CreateJob, SpecError> {
    let Some(obj) = body.as_object() else {
        return bad("", "The request body must be a JSON object");
    };
    let model = required_str(obj, "model")?;
    let training_file = required_str(obj, "training_file")?;
    if !valid_id(FILE_PREFIX, &training_file) {
        return bad(
            "training_file",
            format!("Invalid file id `{training_file}`"),
        );
    }
    let validation_file = match obj.get("validation_file") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_id(FILE_PREFIX, s) => Some(s.clone()),
        Some(v) => return bad("validation_file", format!("Invalid file id {v}")),
    };
    let suffix = match obj.get("suffix") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if s.is_empty() || s.len() > 64 {
                return bad("suffix", "suffix must be 1 to 64 characters long");
            }
            if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(
                    "suffix",
                    "suffix may only contain letters, digits, `-` and `_`",
                );
            }
            Some(s.clone())
        }
        Some(_) => return bad("suffix", "suffix must be a string"),
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => default_seed,
        Some(v) => match v.as_u64() {
            Some(n) if n <= i64::MAX as u64 => n,
            _ => return bad("seed", "seed must be a non-negative integer"),
        },
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return bad("metadata", "metadata may hold at most 16 keys");
            }
            for (k, v) in m {
                if k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512) {
                    return bad(
                        &format!("metadata.{k}"),
                        "metadata keys must be at most 64 characters and values strings of at most 512",
                    );
                }
            }
            Some(Value::Object(m.clone()))
        }
        Some(_) => return bad("metadata", "metadata must be an object of strings"),
    };
    let legacy = obj.get("hyperparameters").filter(|v| !v.is_null());
    let (hyper, adapter) = match obj.get("method").filter(|v| !v.is_null()) {
        None => (
            match legacy {
                Some(h) => parse_hyper(h, "hyperparameters")?,
                None => Hyper::default(),
            },
            AdapterSpec::default(),
        ),
        Some(m) => {
            let (h, a) = parse_method(m)?;
            match (legacy, h) {
                (Some(_), Some(_)) => {
                    return bad(
                        "hyperparameters",
                        "Give hyperparameters either top-level or in method.supervised.hyperparameters, not both",
                    )
                }
                (Some(l), None) => (parse_hyper(l, "hyperparameters")?, a),
                (None, h) => (h.unwrap_or_default(), a),
            }
        }
    };
    Ok(CreateJob {
        model,
        training_file,
        validation_file,
        suffix,
        metadata,
        spec: JobSpec {
            adapter,
            hyper,
            seed,
        },
    })
}

fn required_str(obj: &Map<String, Value>, key: &str) -> Result<String, SpecError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => bad(key, format!("Missing required parameter: `{key}`")),
        Some(_) => bad(key, format!("`{key}` must be a non-empty string")),
    }
}

fn parse_method(m: &Value) -> Result<(Option<Hyper>, AdapterSpec), SpecError> {
    let Some(m) = m.as_object() else {
        return bad("method", "method must be an object");
    };
    match m.get("type").and_then(Value::as_str) {
        Some("supervised") => {}
        Some(other) => {
            return bad(
                "method.type",
                format!("Only the `supervised` method is supported, not `{other}`"),
            )
        }
        None => return bad("method.type", "method.type is required (`supervised`)"),
    }
    let sup = match m.get("supervised") {
        None | Some(Value::Null) => return Ok((None, AdapterSpec::default())),
        Some(Value::Object(s)) => s,
        Some(_) => return bad("method.supervised", "method.supervised must be an object"),
    };
    let hyper = match sup.get("hyperparameters") {
        None | Some(Value::Null) => None,
        Some(h) => Some(parse_hyper(h, "method.supervised.hyperparameters")?),
    };
    let adapter = match sup.get("adapter") {
        None | Some(Value::Null) => AdapterSpec::default(),
        Some(a) => parse_adapter(a, "method.supervised.adapter")?,
    };
    Ok((hyper, adapter))
}

/// "auto" → None; a number in `range` → Some.
fn auto_or_int(
    v: Option<&Value>,
    param: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<usize>, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n as usize)),
            _ => bad(
                param,
                format!(
                    "{param} must be \"auto\" or an integer from {} to {}, got {v}",
                    range.start(),
                    range.end()
                ),
            ),
        },
    }
}

fn parse_hyper(h: &Value, prefix: &str) -> Result<Hyper, SpecError> {
    let Some(h) = h.as_object() else {
        return bad(prefix, format!("{prefix} must be an object"));
    };
    const KNOWN: [&str; 6] = [
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "max_steps",
        "max_seq_len",
        "checkpoint_every",
    ];
    if let Some(k) = h.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return bad(
            &format!("{prefix}.{k}"),
            format!("Unknown hyperparameter `{k}` (known: {})", KNOWN.join(", ")),
        );
    }
    let p = |k: &str| format!("{prefix}.{k}");
    let lr_param = p("learning_rate_multiplier");
    let learning_rate_multiplier = match h.get("learning_rate_multiplier") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "auto" => None,
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 && x <= 100.0 => Some(x),
            _ => {
                return bad(
                    &lr_param,
                    format!("{lr_param} must be \"auto\" or a number in (0, 100], got {v}"),
                )
            }
        },
    };
    Ok(Hyper {
        n_epochs: auto_or_int(h.get("n_epochs"), &p("n_epochs"), 1..=50)?,
        batch_size: auto_or_int(h.get("batch_size"), &p("batch_size"), 1..=256)?,
        learning_rate_multiplier,
        max_steps: auto_or_int(h.get("max_steps"), &p("max_steps"), 1..=1_000_000)?,
        max_seq_len: auto_or_int(h.get("max_seq_len"), &p("max_seq_len"), 8..=32_768)?,
        checkpoint_every: auto_or_int(
            h.get("checkpoint_every"),
            &p("checkpoint_every"),
            1..=1_000_000,
        )?,
    })
}

fn get_usize(
    a: &Map<String, Value>,
    key: &str,
    prefix: &str,
    default: usize,
    range: std::ops::RangeInclusive<u64>,
) -> Result<usize, SpecError> {
    match a.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(n as usize),
            _ => bad(
                &format!("{prefix}.{key}"),
                format!(
                    "{prefix}.{key} must be an integer from {} to {}, got {v}",
                    range.start(),
                    range.end()
                ),
            ),
        },
    }
}

fn get_bool(a: &Map<String, Value>, key: &str, prefix: &str) -> Result<bool, SpecError> {
    match a.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => bad(
            &format!("{prefix}.{key}"),
            format!("{prefix}.{key} must be a boolean"),
        ),
    }
}

fn parse_adapter(a: &Value, prefix: &str) -> Result<AdapterSpec, SpecError> {
    let Some(a) = a.as_object() else {
        return bad(prefix, format!("{prefix} must be an object"));
    };
    let ty = a.get("type").and_then(Value::as_str).unwrap_or("lora");
    let known: &[&str] =
        match ty {
            "lora" => &[
                "type",
                "r",
                "alpha",
                "dropout",
                "target_modules",
                "use_rslora",
            ],
            "prompt_tuning" => &["type", "num_virtual_tokens", "init", "init_text"],
            "prefix_tuning" => &[
                "type",
                "num_virtual_tokens",
                "prefix_projection",
                "encoder_hidden_size",
            ],
            "full" => return bad(
                &format!("{prefix}.type"),
                "Full fine-tuning is not available through the jobs API yet (its result could not \
                 be served as a variant of the resident model); use `lora`, `prompt_tuning` or \
                 `prefix_tuning`, or `itamaed train --method full`",
            ),
            other => {
                return bad(
                    &format!("{prefix}.type"),
                    format!(
                    "Unknown adapter type `{other}` (expected lora, prompt_tuning or prefix_tuning)"
                ),
                )
            }
        };
    if let Some(k) = a.keys().find(|k| !known.contains(&k.as_str())) {
        return bad(
            &format!("{prefix}.{k}"),
            format!("Unknown field `{k}` for a `{ty}` adapter"),
        );
    }
    Ok(match ty {
        "lora" => {
            let r = get_usize(a, "r", prefix, 16, 1..=1024)?;
            let alpha = match a.get("alpha") {
                None | Some(Value::Null) => 32.0,
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => x,
                    _ => {
                        return bad(
                            &format!("{prefix}.alpha"),
                            "alpha must be a positive number",
                        )
                    }
                },
            };
            let dropout = match a.get("dropout") {
                None | Some(Value::Null) => 0.0,
                Some(v) => match v.as_f64() {
                    Some(x) if (0.0..1.0).contains(&x) => x as f32,
                    _ => return bad(&format!("{prefix}.dropout"), "dropout must be in [0, 1)"),
                },
            };
            let tm_param = format!("{prefix}.target_modules");
            let target_modules: Vec<String> =
                match a.get("target_modules") {
                    None | Some(Value::Null) => vec!["all-linear".into()],
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(xs)) if !xs.is_empty() => xs
                        .iter()
                        .map(|x| x.as_str().map(str::to_owned))
                        .collect::<Option<_>>()
                        .map_or_else(|| bad(&tm_param, "target_modules must hold strings"), Ok)?,
                    Some(_) => return bad(
                        &tm_param,
                        "target_modules must be \"all-linear\" or a non-empty list of module names",
                    ),
                };
            if let Err(e) = LoraConfig::parse_targets(&target_modules) {
                return bad(&tm_param, e);
            }
            AdapterSpec::Lora {
                r,
                alpha,
                dropout,
                target_modules,
                use_rslora: get_bool(a, "use_rslora", prefix)?,
            }
        }
        "prompt_tuning" => {
            let init = match a.get("init") {
                None | Some(Value::Null) => "text".to_string(),
                Some(Value::String(s))
                    if ["text", "random", "sample_vocab"].contains(&s.as_str()) =>
                {
                    s.clone()
                }
                Some(v) => {
                    return bad(
                        &format!("{prefix}.init"),
                        format!("init must be \"text\", \"random\" or \"sample_vocab\", got {v}"),
                    )
                }
            };
            let init_text = match a.get("init_text") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 4096 => Some(s.clone()),
                Some(_) => {
                    return bad(
                        &format!("{prefix}.init_text"),
                        "init_text must be a non-empty string of at most 4096 bytes",
                    )
                }
            };
            AdapterSpec::PromptTuning {
                num_virtual_tokens: get_usize(a, "num_virtual_tokens", prefix, 20, 1..=512)?,
                init,
                init_text,
            }
        }
        _ => AdapterSpec::PrefixTuning {
            num_virtual_tokens: get_usize(a, "num_virtual_tokens", prefix, 20, 1..=512)?,
            prefix_projection: get_bool(a, "prefix_projection", prefix)?,
            encoder_hidden_size: match a.get("encoder_hidden_size") {
                None | Some(Value::Null) => None,
                Some(_) => Some(get_usize(a, "encoder_hidden_size", prefix, 0, 1..=65_536)?),
            },
        },
    })
}

impl AdapterSpec {
    /// The adapter object as echoed in the job's `method`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Lora {
                r,
                alpha,
                dropout,
                target_modules,
                use_rslora,
            } => json!({
                "type": "lora", "r": r, "alpha": alpha, "dropout": dropout,
                "target_modules": if target_modules.len() == 1 && target_modules[0] == "all-linear" {
                    json!("all-linear")
                } else {
                    json!(target_modules)
                },
                "use_rslora": use_rslora,
            }),
            Self::PromptTuning {
                num_virtual_tokens,
                init,
                init_text,
            } => {
                let mut v = json!({"type": "prompt_tuning", "num_virtual_tokens": num_virtual_tokens, "init": init});
                if init == "text" {
                    v["init_text"] = json!(init_text.as_deref().unwrap_or(DEFAULT_INIT_TEXT));
                }
                v
            }
            Self::PrefixTuning {
                num_virtual_tokens,
                prefix_projection,
                encoder_hidden_size,
            } => json!({
                "type": "prefix_tuning", "num_virtual_tokens": num_virtual_tokens,
                "prefix_projection": prefix_projection, "encoder_hidden_size": encoder_hidden_size,
            }),
        }
    }

    /// The text a `text`-initialised soft prompt starts from.
    pub fn init_text(&self) -> Option<&str> {
        match self {
            Self::PromptTuning {
                init, init_text, ..
            } if init == "text" => Some(init_text.as_deref().unwrap_or(DEFAULT_INIT_TEXT)),
            _ => None,
        }
    }

    /// The trainer's method; `kv_dim` is the default prefix encoder width.
    pub fn method(&self, kv_dim: usize) -> Result<Method, SpecError> {
        Ok(match self {
            Self::Lora {
                r,
                alpha,
                dropout,
                target_modules,
                use_rslora,
            } => Method::Lora(LoraConfig {
                r: *r,
                alpha: *alpha,
                dropout: *dropout,
                target_modules: LoraConfig::parse_targets(target_modules).map_err(|e| {
                    SpecError {
                        param: "method.supervised.adapter.target_modules".into(),
                        message: e,
                    }
                })?,
                use_rslora: *use_rslora,
            }),
            Self::PromptTuning {
                num_virtual_tokens,
                init,
                ..
            } => Method::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: *num_virtual_tokens,
                init: match init.as_str() {
                    "random" => PromptInit::Random,
                    "sample_vocab" => PromptInit::SampleVocab,
                    _ => PromptInit::Text(self.init_text().unwrap_or(DEFAULT_INIT_TEXT).into()),
                },
            }),
            Self::PrefixTuning {
                num_virtual_tokens,
                prefix_projection,
                encoder_hidden_size,
            } => Method::PrefixTuning(PrefixConfig {
                num_virtual_tokens: *num_virtual_tokens,
                prefix_projection: *prefix_projection,
                encoder_hidden_size: encoder_hidden_size.unwrap_or(kv_dim),
            }),
        })
    }
}

/// JSON of a hyperparameter: the number, or "auto".
fn auto<T: Serialize>(v: Option<T>) -> Value {
    v.map_or_else(|| json!("auto"), |x| json!(x))
}

impl JobSpec {
    /// "auto" resolved for a dataset of `n_train` examples.
    pub fn resolve(&self, n_train: usize) -> Resolved {
        Resolved {
            n_epochs: self.hyper.n_epochs.unwrap_or(3),
            batch_size: self.hyper.batch_size.unwrap_or_else(|| n_train.clamp(1, 4)),
            learning_rate_multiplier: self.hyper.learning_rate_multiplier.unwrap_or(1.0),
        }
    }

    /// The job's `hyperparameters` object: as requested, or resolved once the run knows them.
    pub fn hyperparameters_json(&self, resolved: Option<Resolved>) -> Value {
        let mut v = match resolved {
            Some(r) => json!({
                "n_epochs": r.n_epochs, "batch_size": r.batch_size,
                "learning_rate_multiplier": r.learning_rate_multiplier,
            }),
            None => json!({
                "n_epochs": auto(self.hyper.n_epochs), "batch_size": auto(self.hyper.batch_size),
                "learning_rate_multiplier": auto(self.hyper.learning_rate_multiplier),
            }),
        };
        for (k, x) in [
            ("max_steps", self.hyper.max_steps),
            ("max_seq_len", self.hyper.max_seq_len),
            ("checkpoint_every", self.hyper.checkpoint_every),
        ] {
            if let Some(x) = x {
                v[k] = json!(x);
            }
        }
        v
    }

    /// The job's `method` object (OpenAI's, with the adapter extension).
    pub fn method_json(&self, resolved: Option<Resolved>) -> Value {
        json!({
            "type": "supervised",
            "supervised": {
                "hyperparameters": self.hyperparameters_json(resolved),
                "adapter": self.adapter.to_json(),
            }
        })
    }

    /// The trainer configuration for `n_train` examples of a model with kv width `kv_dim`.
    pub fn train_config(&self, n_train: usize, kv_dim: usize) -> Result<TrainConfig, SpecError> {
        let method = self.adapter.method(kv_dim)?;
        let r = self.resolve(n_train);
        let mut c = TrainConfig::new(method.clone());
        c.learning_rate = method.default_learning_rate() * r.learning_rate_multiplier;
        c.epochs = r.n_epochs;
        c.batch_size = r.batch_size;
        c.max_steps = self.hyper.max_steps;
        c.max_seq_len = self.max_seq_len();
        c.seed = self.seed;
        Ok(c)
    }

    pub fn max_seq_len(&self) -> usize {
        self.hyper.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN)
    }

    /// Steps between checkpoints: as requested, else about four per run.
    pub fn checkpoint_every(&self, total_steps: usize) -> usize {
        self.hyper
            .checkpoint_every
            .unwrap_or_else(|| total_steps.div_ceil(4))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: Value) -> CreateJob {
        parse_create(&body, 7).unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn err(body: Value) -> SpecError {
        parse_create(&body, 7).expect_err(&body.to_string())
    }

    #[test]
    fn plain_openai_request_gets_lora_defaults() {
        let j = ok(json!({"model": "m", "training_file": "file-abc"}));
        assert_eq!(j.spec.adapter, AdapterSpec::default());
        assert_eq!(j.spec.seed, 7);
        assert_eq!(j.spec.hyper, Hyper::default());
        let m = j.spec.method_json(None);
        assert_eq!(m["supervised"]["hyperparameters"]["n_epochs"], "auto");
        assert_eq!(m["supervised"]["adapter"]["type"], "lora");
        assert_eq!(m["supervised"]["adapter"]["target_modules"], "all-linear");
    }

    #[test]
    fn method_hyperparameters_and_adapter_extension() {
        let j = ok(json!({
            "model": "m", "training_file": "file-abc", "validation_file": "file-def",
            "suffix": "my-bot_1", "seed": 3, "metadata": {"team": "a"},
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": "auto",
                                    "learning_rate_multiplier": 0.5, "max_steps": 6, "max_seq_len": 96},
                "adapter": {"type": "prompt_tuning", "num_virtual_tokens": 8, "init": "random"}}}
        }));
        assert_eq!(j.validation_file.as_deref(), Some("file-def"));
        assert_eq!(j.suffix.as_deref(), Some("my-bot_1"));
        assert_eq!(j.spec.seed, 3);
        assert_eq!(j.spec.hyper.n_epochs, Some(2));
        assert_eq!(j.spec.hyper.batch_size, None);
        assert_eq!(j.spec.hyper.max_steps, Some(6));
        let r = j.spec.resolve(3);
        assert_eq!((r.n_epochs, r.batch_size), (2, 3));
        let c = j.spec.train_config(100, 192).unwrap();
        assert_eq!(c.max_seq_len, 96);
        assert!(matches!(c.method, Method::PromptTuning(_)));
        assert!((c.learning_rate - 0.5 * 3e-2).abs() < 1e-12);
        let h = j.spec.hyperparameters_json(Some(r));
        assert_eq!(h["batch_size"], 3);
        assert_eq!(h["max_steps"], 6);
        // legacy top-level hyperparameters
        let j = ok(json!({"model": "m", "training_file": "file-abc",
                          "hyperparameters": {"n_epochs": 1}}));
        assert_eq!(j.spec.hyper.n_epochs, Some(1));
        // prefix tuning takes the model's kv width by default
        let j = ok(json!({"model": "m", "training_file": "file-abc",
            "method": {"type": "supervised", "supervised": {"adapter": {"type": "prefix_tuning"}}}}));
        match j.spec.adapter.method(64).unwrap() {
            Method::PrefixTuning(c) => assert_eq!(c.encoder_hidden_size, 64),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let base = |extra: Value| {
            let mut b = json!({"model": "m", "training_file": "file-abc"});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let sup = |h: Value| json!({"method": {"type": "supervised", "supervised": h}});
        let cases = [
            (json!({"training_file": "file-abc"}), "model"),
            (json!({"model": "m"}), "training_file"),
            (
                base(json!({"training_file": "file-../../etc"})),
                "training_file",
            ),
            (base(json!({"validation_file": "x"})), "validation_file"),
            (base(json!({"suffix": "a".repeat(65)})), "suffix"),
            (base(json!({"suffix": "a b"})), "suffix"),
            (base(json!({"seed": -1})), "seed"),
            (base(json!({"metadata": {"k": 1}})), "metadata.k"),
            (
                base(json!({"hyperparameters": {"n_epochs": 0}})),
                "hyperparameters.n_epochs",
            ),
            (
                base(json!({"hyperparameters": {"nepochs": 1}})),
                "hyperparameters.nepochs",
            ),
            (base(json!({"method": {"type": "dpo"}})), "method.type"),
            (
                base(sup(json!({"hyperparameters": {"batch_size": "big"}}))),
                "method.supervised.hyperparameters.batch_size",
            ),
            (
                base(sup(
                    json!({"hyperparameters": {"learning_rate_multiplier": 0}}),
                )),
                "method.supervised.hyperparameters.learning_rate_multiplier",
            ),
            (
                base(sup(json!({"adapter": {"type": "lora", "r": 0}}))),
                "method.supervised.adapter.r",
            ),
            (
                base(sup(
                    json!({"adapter": {"type": "lora", "target_modules": ["nope"]}}),
                )),
                "method.supervised.adapter.target_modules",
            ),
            (
                base(sup(json!({"adapter": {"type": "lora", "rank": 4}}))),
                "method.supervised.adapter.rank",
            ),
            (
                base(sup(json!({"adapter": {"type": "full"}}))),
                "method.supervised.adapter.type",
            ),
            (
                base(sup(
                    json!({"adapter": {"type": "prompt_tuning", "init": "zeros"}}),
                )),
                "method.supervised.adapter.init",
            ),
            (
                base(json!({"hyperparameters": {"n_epochs": 1},
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}})),
                "hyperparameters",
            ),
        ];
        for (body, param) in cases {
            let e = err(body.clone());
            assert_eq!(e.param, param, "{body}: {e:?}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let j = ok(json!({"model": "m", "training_file": "file-abc",
            "method": {"type": "supervised", "supervised": {"adapter": {"type": "prompt_tuning"}}}}));
        let v = serde_json::to_value(&j.spec).unwrap();
        let back: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, j.spec);
        assert_eq!(back.adapter.init_text(), Some(DEFAULT_INIT_TEXT));
        assert_eq!(back.checkpoint_every(6), 2);
        assert_eq!(back.checkpoint_every(1), 1);
    }
}
