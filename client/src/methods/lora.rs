//! LoRA's config: low-rank deltas `s · B·A` on chosen projections, `s = alpha / r`
//! (`alpha / √r` with rsLoRA).
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{bad, get_bool, get_usize, join, FieldError, TargetCheck};

/// The method's name (its `type`).
pub const NAME: &str = "lora";
/// Its fields besides `type`, as the API spells them.
pub const FIELDS: &[&str] = &["r", "alpha", "dropout", "target_modules", "use_rslora"];
/// Every linear projection of the model.
pub const ALL_LINEAR: &str = "all-linear";
/// Defaults of the fields. clap needs its defaults as text on these `Option` fields; a test
/// checks they parse to these.
pub const DEFAULT_R: usize = 16;
pub const DEFAULT_ALPHA: f64 = 32.0;
pub const DEFAULT_DROPOUT: f32 = 0.0;

/// `{"type": "lora", ...}`. As flags (`itamaed train`): `--r`, `--alpha`, `--dropout`,
/// `--target-modules`, `--use-rslora`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct LoraConfig {
    /// Rank of the update (1 to 1024; default 16).
    #[arg(long = "r", default_value = "16")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// Scale numerator, positive (default 32).
    #[arg(long, default_value = "32")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input while training, in [0, 1) (default 0).
    #[arg(long, default_value = "0")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f32>,
    /// `all-linear` or a comma-separated list (q_proj,v_proj,...).
    #[arg(long, default_value = ALL_LINEAR, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
    /// Scale by alpha/√r (rsLoRA) instead of alpha/r (default false).
    #[arg(long, action = clap::ArgAction::SetTrue)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
}

impl LoraConfig {
    pub fn r(&self) -> usize {
        self.r.unwrap_or(DEFAULT_R)
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(DEFAULT_ALPHA)
    }

    pub fn dropout(&self) -> f32 {
        self.dropout.unwrap_or(DEFAULT_DROPOUT)
    }

    /// `["all-linear"]` or projection names.
    pub fn target_modules(&self) -> &[String] {
        match &self.target_modules {
            Some(t) => t,
            None => std::slice::from_ref(all_linear()),
        }
    }

    pub fn use_rslora(&self) -> bool {
        self.use_rslora.unwrap_or(false)
    }

    /// The update's scale: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora() {
            self.alpha() / (self.r() as f64).sqrt()
        } else {
            self.alpha() / self.r() as f64
        }
    }

    /// Every field set, to its default where it was not.
    pub fn with_defaults(&self) -> Self {
        Self {
            r: Some(self.r()),
            alpha: Some(self.alpha()),
            dropout: Some(self.dropout()),
            target_modules: Some(self.target_modules().to_vec()),
            use_rslora: Some(self.use_rslora()),
        }
    }

    /// The fields of an adapter object at `prefix` (its `type` and unknown fields are the
    /// caller's), defaults filled in.
    pub fn parse(
        a: &Map<String, Value>,
        prefix: &str,
        targets: TargetCheck,
    ) -> Result<Self, FieldError> {
        let r = get_usize(a, "r", prefix, 1..=1024)?;
        let alpha = match a.get("alpha") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Some(x),
                _ => return bad(&join(prefix, "alpha"), "alpha must be a positive number"),
            },
        };
        let dropout = match a.get("dropout") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(x) if (0.0..1.0).contains(&x) => Some(x as f32),
                _ => return bad(&join(prefix, "dropout"), "dropout must be in [0, 1)"),
            },
        };
        let tm_param = join(prefix, "target_modules");
        let target_modules: Option<Vec<String>> = match a.get("target_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(xs)) if !xs.is_empty() => Some(
                xs.iter()
                    .map(|x| x.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .map_or_else(|| bad(&tm_param, "target_modules must hold strings"), Ok)?,
            ),
            Some(_) => {
                return bad(
                    &tm_param,
                    "target_modules must be \"all-linear\" or a non-empty list of module names",
                )
            }
        };
        let config = Self {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: None,
        };
        if let Err(e) = targets(config.target_modules()) {
            return bad(&tm_param, e);
        }
        Ok(Self {
            use_rslora: Some(get_bool(a, "use_rslora", prefix)?),
            ..config
        }
        .with_defaults())
    }

    /// As a job echoes it: every field, `target_modules` `"all-linear"` or the list.
    pub fn to_json(&self) -> Value {
        let t = self.target_modules();
        json!({
            "type": NAME, "r": self.r(), "alpha": self.alpha(), "dropout": self.dropout(),
            "target_modules": if t.len() == 1 && t[0] == ALL_LINEAR { json!(ALL_LINEAR) } else { json!(t) },
            "use_rslora": self.use_rslora(),
        })
    }
}

fn all_linear() -> &'static String {
    static ALL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ALL.get_or_init(|| ALL_LINEAR.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        lora: LoraConfig,
    }

    #[test]
    fn flag_defaults_are_the_config_defaults() {
        let parsed = Flags::parse_from(["t"]).lora;
        assert_eq!(parsed, LoraConfig::default().with_defaults());
        assert_eq!(parsed.r, Some(DEFAULT_R));
        assert_eq!(parsed.alpha, Some(DEFAULT_ALPHA));
        assert_eq!(parsed.dropout, Some(DEFAULT_DROPOUT));
    }
}
