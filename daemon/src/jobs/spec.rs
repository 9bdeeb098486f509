//! A fine-tuning job request (`POST /v1/fine_tuning/jobs`) parsed and checked into a [`JobSpec`]:
//! OpenAI's fields, hyperparameters given top-level (legacy) or in `method.supervised`, and the
//! adapter extension `method.supervised.adapter`. Every error names the request field at fault.
//!
//! The adapter object is parsed and checked by its method's config
//! ([`AdapterConfig::parse`], shared with the trainer, `itamaed train` and the client); target
//! names are checked against the model's projections here.
//!
//! The spec is stored with the job (as JSON) and turned into a trainer [`Method`] and
//! [`TrainConfig`] when the job runs, once the dataset size is known and "auto" can be resolved.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::storage::{valid_id, FILE_PREFIX};
use crate::adapters::{lora, AdapterConfig, PrefixTuningConfig};
use crate::train::trainer::default_learning_rate;
use crate::train::{Method, TrainConfig};

/// A request value that is not acceptable; `param` is its path in the request.
pub use crate::adapters::FieldError;

fn bad<T>(param: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        param: param.into(),
        message: message.into(),
    })
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
    pub adapter: AdapterConfig,
    pub hyper: Hyper,
    pub seed: u64,
    /// Continued fine-tuning: the fine-tuned model (a job's result or checkpoint) whose
    /// adapter the training starts from, with the same method. None: a fresh adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
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
    /// The request named an adapter (`method.supervised.adapter`); without one, a continued
    /// job takes its parent's.
    pub adapter_given: bool,
}

pub const DEFAULT_MAX_SEQ_LEN: usize = 1024;

/// Parses `POST /v1/fine_tuning/jobs`. `default_seed` is used when the request has none.
pub fn parse_create(body: &Value, default_seed: u64) -> Result<CreateJob, FieldError> {
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
            None,
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
        adapter_given: adapter.is_some(),
        spec: JobSpec {
            adapter: adapter.unwrap_or_default(),
            hyper,
            seed,
            parent: None,
        },
    })
}

fn required_str(obj: &Map<String, Value>, key: &str) -> Result<String, FieldError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => bad(key, format!("Missing required parameter: `{key}`")),
        Some(_) => bad(key, format!("`{key}` must be a non-empty string")),
    }
}

fn parse_method(m: &Value) -> Result<(Option<Hyper>, Option<AdapterConfig>), FieldError> {
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
        None | Some(Value::Null) => return Ok((None, None)),
        Some(Value::Object(s)) => s,
        Some(_) => return bad("method.supervised", "method.supervised must be an object"),
    };
    let hyper = match sup.get("hyperparameters") {
        None | Some(Value::Null) => None,
        Some(h) => Some(parse_hyper(h, "method.supervised.hyperparameters")?),
    };
    let adapter = match sup.get("adapter") {
        None | Some(Value::Null) => None,
        Some(a) => Some(AdapterConfig::parse(
            a,
            "method.supervised.adapter",
            &lora::check_targets,
        )?),
    };
    Ok((hyper, adapter))
}

/// The adapter a job continuing from a model trained with `parent` trains: the parent's
/// when the request names none; else the request's, which must be the same method with the
/// same shape (the parent's weights are its starting point). Errors name the field at fault.
pub fn continued_adapter(
    parent: &AdapterConfig,
    given: Option<&AdapterConfig>,
) -> Result<AdapterConfig, FieldError> {
    const AT: &str = "method.supervised.adapter";
    let Some(given) = given else {
        return Ok(match parent {
            // A saved prefix holds the projection's output: training goes on on the prefix.
            AdapterConfig::PrefixTuning(p) if p.prefix_projection() => {
                AdapterConfig::PrefixTuning(PrefixTuningConfig {
                    prefix_projection: Some(false),
                    encoder_hidden_size: None,
                    ..p.clone()
                })
            }
            other => other.clone(),
        });
    };
    let differs = |field: &str, parent: String, given: String| {
        bad::<()>(
            &format!("{AT}.{field}"),
            format!(
                "A job continuing from a fine-tuned model starts from its weights: `{field}` \
                 must be the parent's {parent}, got {given} (or leave the adapter out to take \
                 the parent's)"
            ),
        )
    };
    match (parent, given) {
        (AdapterConfig::Lora(p), AdapterConfig::Lora(g)) => {
            if p.r() != g.r() {
                differs("r", p.r().to_string(), g.r().to_string())?;
            }
            if p.target_modules() != g.target_modules() {
                differs(
                    "target_modules",
                    format!("{:?}", p.target_modules()),
                    format!("{:?}", g.target_modules()),
                )?;
            }
        }
        (AdapterConfig::PromptTuning(p), AdapterConfig::PromptTuning(g)) => {
            if p.num_virtual_tokens() != g.num_virtual_tokens() {
                differs(
                    "num_virtual_tokens",
                    p.num_virtual_tokens().to_string(),
                    g.num_virtual_tokens().to_string(),
                )?;
            }
        }
        (AdapterConfig::PrefixTuning(p), AdapterConfig::PrefixTuning(g)) => {
            if p.num_virtual_tokens() != g.num_virtual_tokens() {
                differs(
                    "num_virtual_tokens",
                    p.num_virtual_tokens().to_string(),
                    g.num_virtual_tokens().to_string(),
                )?;
            }
            if g.prefix_projection() {
                // A saved prefix holds the projection's output, not the projection.
                return bad(
                    &format!("{AT}.prefix_projection"),
                    "A continued prefix-tuning job trains the saved prefix itself: \
                     `prefix_projection` must be false",
                );
            }
        }
        (p, g) => {
            return bad(
                "method",
                format!(
                    "The parent model was trained with {}; a job continuing from it must use \
                     the same method, not {}",
                    p.name(),
                    g.name()
                ),
            )
        }
    }
    Ok(given.clone())
}

/// "auto" → None; a number in `range` → Some.
fn auto_or_int(
    v: Option<&Value>,
    param: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<usize>, FieldError> {
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

fn parse_hyper(h: &Value, prefix: &str) -> Result<Hyper, FieldError> {
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

/// JSON of a hyperparameter: the number, or "auto".
fn auto<T: Serialize>(v: Option<T>) -> Value {
    v.map_or_else(|| json!("auto"), |x| json!(x))
}

impl JobSpec {
    /// The trainer's method; `kv_dim` (the model's key/value width) is the default prefix
    /// encoder width.
    pub fn method(&self, kv_dim: usize) -> Result<Method, FieldError> {
        Ok(match &self.adapter {
            AdapterConfig::PrefixTuning(c) => AdapterConfig::PrefixTuning(PrefixTuningConfig {
                encoder_hidden_size: Some(c.encoder_hidden_size(kv_dim)),
                ..c.clone()
            }),
            AdapterConfig::Full => {
                return bad(
                    "method.supervised.adapter.type",
                    "Full fine-tuning is not available through the jobs API",
                )
            }
            other => other.clone(),
        })
    }

    /// "auto" resolved for a dataset of `n_train` examples ([`super::auto_hyper`]); the
    /// learning rate's "auto" is the method's own default (multiplier 1).
    pub fn resolve(&self, n_train: usize) -> Resolved {
        let batch_size = self
            .hyper
            .batch_size
            .unwrap_or_else(|| super::auto_hyper::batch_size(n_train));
        Resolved {
            n_epochs: self
                .hyper
                .n_epochs
                .unwrap_or_else(|| super::auto_hyper::n_epochs(n_train, batch_size)),
            batch_size,
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

    /// The trainer configuration for `n_train` examples of a model with kv width `kv_dim` and
    /// hidden size `hidden_size`.
    pub fn train_config(
        &self,
        n_train: usize,
        kv_dim: usize,
        hidden_size: usize,
    ) -> Result<TrainConfig, FieldError> {
        let method = self.method(kv_dim)?;
        let r = self.resolve(n_train);
        let mut c = TrainConfig::new(method.clone());
        c.learning_rate = default_learning_rate(&method, hidden_size) * r.learning_rate_multiplier;
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

    fn err(body: Value) -> FieldError {
        parse_create(&body, 7).expect_err(&body.to_string())
    }

    #[test]
    fn a_continued_job_keeps_its_parents_method_and_shape() {
        let adapter = |a: Value| {
            ok(json!({"model": "m", "training_file": "file-abc",
                      "method": {"type": "supervised", "supervised": {"adapter": a}}}))
        };
        let parent = adapter(json!({"type": "lora", "r": 4, "alpha": 8}))
            .spec
            .adapter;
        let plain = ok(json!({"model": "m", "training_file": "file-abc"}));
        assert!(!plain.adapter_given);
        assert_eq!(continued_adapter(&parent, None).unwrap(), parent);
        // another alpha or dropout is fine: the weights keep their shapes
        let g = adapter(json!({"type": "lora", "r": 4, "alpha": 16}));
        assert!(g.adapter_given);
        assert_eq!(
            continued_adapter(&parent, Some(&g.spec.adapter)).unwrap(),
            g.spec.adapter
        );
        let e =
            continued_adapter(&parent, Some(&adapter(json!({"r": 8})).spec.adapter)).unwrap_err();
        assert_eq!(e.param, "method.supervised.adapter.r");
        let e = continued_adapter(
            &parent,
            Some(
                &adapter(json!({"r": 4, "target_modules": ["q_proj"]}))
                    .spec
                    .adapter,
            ),
        )
        .unwrap_err();
        assert_eq!(e.param, "method.supervised.adapter.target_modules");
        let prompt = adapter(json!({"type": "prompt_tuning", "num_virtual_tokens": 4}));
        let e = continued_adapter(&parent, Some(&prompt.spec.adapter)).unwrap_err();
        assert_eq!(e.param, "method");
        assert!(e.message.contains("lora") && e.message.contains("prompt_tuning"));
        let e = continued_adapter(
            &prompt.spec.adapter,
            Some(
                &adapter(json!({"type": "prompt_tuning", "num_virtual_tokens": 5}))
                    .spec
                    .adapter,
            ),
        )
        .unwrap_err();
        assert_eq!(e.param, "method.supervised.adapter.num_virtual_tokens");
        let prefix = adapter(json!({"type": "prefix_tuning", "num_virtual_tokens": 3}));
        let projected = adapter(json!({"type": "prefix_tuning", "num_virtual_tokens": 3,
                                       "prefix_projection": true}));
        let e = continued_adapter(&prefix.spec.adapter, Some(&projected.spec.adapter)).unwrap_err();
        assert_eq!(e.param, "method.supervised.adapter.prefix_projection");
    }

    #[test]
    fn plain_openai_request_gets_lora_defaults() {
        let j = ok(json!({"model": "m", "training_file": "file-abc"}));
        assert_eq!(j.spec.adapter, AdapterConfig::default());
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
        let c = j.spec.train_config(100, 192, 576).unwrap();
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
        match j.spec.method(64).unwrap() {
            Method::PrefixTuning(c) => assert_eq!(c.encoder_hidden_size, Some(64)),
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
        assert_eq!(
            back.adapter.init_text(),
            Some(itamae_client::methods::prompt_tuning::DEFAULT_INIT_TEXT)
        );
        assert_eq!(back.checkpoint_every(6), 2);
        assert_eq!(back.checkpoint_every(1), 1);
    }
}
