//! Adapter methods as the API spells them: the `method.supervised.adapter` object of a
//! fine-tuning job, one typed config per method (one file each), checked by one function per
//! method whose errors name the JSON path of the value at fault.
//!
//! These structs are the only definition of a method's fields. The daemon's jobs API parses
//! requests into them, its trainer and `itamaed train` flags (`clap::Args`) hold them, its PEFT
//! I/O writes them; this crate's `itamae jobs create` sends them. They live here, not in the
//! daemon, so the client gets them without the daemon's tensor stack.
//!
//! A field left `None` takes the method's default (the accessors say which); [`AdapterConfig::parse`]
//! fills every defaulted field in, so a parsed config says what was trained. `None` stays
//! `None` on the wire: a request with unset fields leaves them to the server.
//!
//! Adding a method (IA3, DoRA): a file here with its config, `parse` and accessors, a variant of
//! [`AdapterConfig`] (and its arms in this file), and its schema under `Adapter` in
//! `openapi/openapi.yaml` (tests/openapi.rs fails until the two agree). The daemon side is
//! described in the daemon's `adapters` module.
pub mod lora;
pub mod prefix_tuning;
pub mod prompt_tuning;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use lora::LoraConfig;
pub use prefix_tuning::PrefixTuningConfig;
pub use prompt_tuning::{PromptInit, PromptTuningConfig};

/// A request value that is not acceptable; `param` is its JSON path in the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct FieldError {
    pub param: String,
    pub message: String,
}

/// `Err` of a [`FieldError`] at `param`.
pub fn bad<T>(param: &str, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        param: param.into(),
        message: message.into(),
    })
}

/// `prefix.key`, or `key` at the top level.
pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Checks a method's target names against the model at hand (the daemon knows which
/// projections an architecture has; this crate does not). Returns the message of the first bad
/// name.
pub type TargetCheck<'a> = &'a dyn Fn(&[String]) -> Result<(), String>;

/// Accepts every target name: for callers that check names elsewhere (or cannot).
pub fn any_targets(_: &[String]) -> Result<(), String> {
    Ok(())
}

/// `method.supervised.adapter`: what is trained. LoRA r=16 on every linear projection when
/// absent. `full` (every weight) is `itamaed train`'s; the jobs API refuses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdapterConfig {
    Lora(LoraConfig),
    PromptTuning(PromptTuningConfig),
    PrefixTuning(PrefixTuningConfig),
    Full,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self::Lora(LoraConfig::default().with_defaults())
    }
}

/// The `type`s an adapter object may have, for messages.
const ADAPTER_TYPES: &str = "lora, prompt_tuning or prefix_tuning";

/// Virtual tokens of prompt and prefix tuning when not given.
pub const DEFAULT_NUM_VIRTUAL_TOKENS: usize = 20;

impl AdapterConfig {
    /// The method's name: its `type` in the API, the kind of a served adapter.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lora(_) => lora::NAME,
            Self::PromptTuning(_) => prompt_tuning::NAME,
            Self::PrefixTuning(_) => prefix_tuning::NAME,
            Self::Full => "full",
        }
    }

    /// Parses and checks an adapter object found at `path` (absent `type`: LoRA). Unknown
    /// fields are refused, defaults filled in; `full` is refused (the jobs API cannot serve
    /// it). `targets` checks LoRA's target names.
    pub fn parse(v: &Value, path: &str, targets: TargetCheck) -> Result<Self, FieldError> {
        let Some(a) = v.as_object() else {
            return bad(path, format!("{path} must be an object"));
        };
        let ty = a.get("type").and_then(Value::as_str).unwrap_or(lora::NAME);
        let known: &[&str] = match ty {
            lora::NAME => lora::FIELDS,
            prompt_tuning::NAME => prompt_tuning::FIELDS,
            prefix_tuning::NAME => prefix_tuning::FIELDS,
            "full" => return bad(
                &join(path, "type"),
                "Full fine-tuning is not available through the jobs API yet (its result could not \
                 be served as a variant of the resident model); use `lora`, `prompt_tuning` or \
                 `prefix_tuning`, or `itamaed train --method full --weights f32` (full \
                 fine-tuning needs the base in f32, `model.weights`)",
            ),
            other => {
                return bad(
                    &join(path, "type"),
                    format!("Unknown adapter type `{other}` (expected {ADAPTER_TYPES})"),
                )
            }
        };
        if let Some(k) = a
            .keys()
            .find(|k| k.as_str() != "type" && !known.contains(&k.as_str()))
        {
            return bad(
                &join(path, k),
                format!("Unknown field `{k}` for a `{ty}` adapter"),
            );
        }
        Ok(match ty {
            lora::NAME => Self::Lora(LoraConfig::parse(a, path, targets)?),
            prompt_tuning::NAME => Self::PromptTuning(PromptTuningConfig::parse(a, path)?),
            _ => Self::PrefixTuning(PrefixTuningConfig::parse(a, path)?),
        })
    }

    /// Checks a config built in code (flags, a stored job) by the same rules as [`Self::parse`],
    /// naming fields under `path` (`""`: bare field names). `full` has nothing to check.
    pub fn validate(&self, path: &str, targets: TargetCheck) -> Result<(), FieldError> {
        if matches!(self, Self::Full) {
            return Ok(());
        }
        let v = serde_json::to_value(self).map_err(|e| FieldError {
            param: path.into(),
            message: e.to_string(),
        })?;
        Self::parse(&v, path, targets).map(|_| ())
    }

    /// The adapter object as a job echoes it in its `method`: every field, defaults filled in.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Lora(c) => c.to_json(),
            Self::PromptTuning(c) => c.to_json(),
            Self::PrefixTuning(c) => c.to_json(),
            Self::Full => json!({"type": "full"}),
        }
    }

    /// The text a `text`-initialised soft prompt starts from, or whose keys and values a prefix
    /// starts as.
    pub fn init_text(&self) -> Option<&str> {
        match self {
            Self::PromptTuning(c) => c.init_text(),
            Self::PrefixTuning(_) => Some(prefix_tuning::INIT_TEXT),
            _ => None,
        }
    }
}

/// An integer field: absent → `None`; else a number in `range`.
pub(crate) fn get_usize(
    a: &Map<String, Value>,
    key: &str,
    prefix: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<usize>, FieldError> {
    match a.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n as usize)),
            _ => {
                let p = join(prefix, key);
                bad(
                    &p,
                    format!(
                        "{p} must be an integer from {} to {}, got {v}",
                        range.start(),
                        range.end()
                    ),
                )
            }
        },
    }
}

/// A boolean field: absent → false.
pub(crate) fn get_bool(
    a: &Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Result<bool, FieldError> {
    match a.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => {
            let p = join(prefix, key);
            bad(&p, format!("{p} must be a boolean"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "method.supervised.adapter";

    fn parse(v: Value) -> Result<AdapterConfig, FieldError> {
        AdapterConfig::parse(&v, P, &any_targets)
    }

    #[test]
    fn absent_fields_take_the_defaults_and_type_defaults_to_lora() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c, AdapterConfig::default());
        let AdapterConfig::Lora(l) = &c else {
            panic!("{c:?}")
        };
        assert_eq!((l.r(), l.alpha(), l.dropout()), (16, 32.0, 0.0));
        assert_eq!(l.target_modules(), ["all-linear"]);
        assert!(!l.use_rslora());
        assert_eq!(c.to_json()["target_modules"], "all-linear");
        let p = parse(json!({"type": "prompt_tuning"})).unwrap();
        assert_eq!(p.init_text(), Some(prompt_tuning::DEFAULT_INIT_TEXT));
        assert_eq!(p.to_json()["num_virtual_tokens"], 20);
        let x = parse(json!({"type": "prefix_tuning"})).unwrap();
        assert_eq!(x.to_json()["encoder_hidden_size"], Value::Null);
        assert_eq!(x.init_text(), Some(prefix_tuning::INIT_TEXT));
    }

    #[test]
    fn errors_name_the_json_path() {
        let cases = [
            (json!(3), P.to_string()),
            (json!({"r": 0}), format!("{P}.r")),
            (json!({"r": "8"}), format!("{P}.r")),
            (json!({"alpha": -1}), format!("{P}.alpha")),
            (json!({"dropout": 1.0}), format!("{P}.dropout")),
            (json!({"target_modules": []}), format!("{P}.target_modules")),
            (
                json!({"target_modules": [1]}),
                format!("{P}.target_modules"),
            ),
            (json!({"use_rslora": "yes"}), format!("{P}.use_rslora")),
            (json!({"rank": 4}), format!("{P}.rank")),
            (json!({"type": "full"}), format!("{P}.type")),
            (json!({"type": "ia3"}), format!("{P}.type")),
            (
                json!({"type": "prompt_tuning", "init": "zeros"}),
                format!("{P}.init"),
            ),
            (
                json!({"type": "prompt_tuning", "init_text": ""}),
                format!("{P}.init_text"),
            ),
            (
                json!({"type": "prompt_tuning", "num_virtual_tokens": 513}),
                format!("{P}.num_virtual_tokens"),
            ),
            (
                json!({"type": "prefix_tuning", "encoder_hidden_size": 0}),
                format!("{P}.encoder_hidden_size"),
            ),
            (
                json!({"type": "prefix_tuning", "init": "text"}),
                format!("{P}.init"),
            ),
        ];
        for (v, param) in cases {
            let e = parse(v.clone()).expect_err(&v.to_string());
            assert_eq!(e.param, param, "{v}: {e:?}");
            assert!(!e.message.is_empty());
        }
        assert_eq!(
            parse(json!({"r": 0})).unwrap_err().message,
            format!("{P}.r must be an integer from 1 to 1024, got 0")
        );
        let e = AdapterConfig::parse(
            &json!({"target_modules": ["nope"]}),
            P,
            &|_: &[String]| Err("no such module".to_string()),
        )
        .unwrap_err();
        assert_eq!(
            (e.param.as_str(), e.message.as_str()),
            ("method.supervised.adapter.target_modules", "no such module")
        );
    }

    #[test]
    fn validate_applies_the_parse_rules_to_typed_values() {
        let ok = AdapterConfig::Lora(LoraConfig {
            r: Some(8),
            ..Default::default()
        });
        ok.validate("", &any_targets).unwrap();
        let e = AdapterConfig::Lora(LoraConfig {
            r: Some(0),
            ..Default::default()
        })
        .validate("", &any_targets)
        .unwrap_err();
        assert_eq!(e.param, "r");
        assert_eq!(e.message, "r must be an integer from 1 to 1024, got 0");
        let e = AdapterConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: Some(0),
            ..Default::default()
        })
        .validate("", &any_targets)
        .unwrap_err();
        assert_eq!(e.param, "num_virtual_tokens");
        AdapterConfig::Full.validate("", &any_targets).unwrap();
    }

    #[test]
    fn parsed_configs_round_trip_through_serde() {
        for v in [
            json!({"type": "lora", "r": 4, "target_modules": ["q_proj"], "use_rslora": true}),
            json!({"type": "prompt_tuning", "init": "sample_vocab", "num_virtual_tokens": 3}),
            json!({"type": "prompt_tuning", "init_text": "Be brief."}),
            json!({"type": "prefix_tuning", "prefix_projection": true, "encoder_hidden_size": 64}),
        ] {
            let c = parse(v.clone()).unwrap();
            let back: AdapterConfig = serde_json::from_value(serde_json::to_value(&c).unwrap())
                .unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(back, c);
            assert_eq!(parse(serde_json::to_value(&c).unwrap()).unwrap(), c);
        }
    }
}
