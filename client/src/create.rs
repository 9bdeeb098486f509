//! `itamae jobs create`: its flags, and their mapping onto the job API's request
//! (`method.supervised.hyperparameters` and the `method.supervised.adapter` extension). A flag
//! of another method than the chosen one is refused here rather than silently dropped.
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use itamae_client::methods::{self, LoraConfig, PrefixTuningConfig, PromptTuningConfig};
use itamae_client::{AdapterConfig, AutoOr, CreateJob, Hyperparameters, JobMethod, Supervised};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodKind {
    Lora,
    #[value(name = "prompt_tuning", alias = "prompt-tuning")]
    PromptTuning,
    #[value(name = "prefix_tuning", alias = "prefix-tuning")]
    PrefixTuning,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PromptInit {
    Text,
    Random,
    #[value(name = "sample_vocab", alias = "sample-vocab")]
    SampleVocab,
}

impl PromptInit {
    fn config(self) -> methods::PromptInit {
        match self {
            PromptInit::Text => methods::PromptInit::Text,
            PromptInit::Random => methods::PromptInit::Random,
            PromptInit::SampleVocab => methods::PromptInit::SampleVocab,
        }
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
#[command(group = clap::ArgGroup::new("training").required(true).args(["file", "file_id"]))]
pub struct CreateArgs {
    /// Local JSONL training data: uploaded first (purpose fine-tune).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// An already uploaded training file.
    #[arg(long, value_name = "ID")]
    pub file_id: Option<String>,
    /// Local JSONL validation data: uploaded first.
    #[arg(long, value_name = "PATH", conflicts_with = "validation_file_id")]
    pub validation_file: Option<PathBuf>,
    /// An already uploaded validation file.
    #[arg(long, value_name = "ID")]
    pub validation_file_id: Option<String>,
    /// The model to tune (default: the server's base model).
    #[arg(long)]
    pub model: Option<String>,
    /// What to train (`full` is refused by servers that cannot serve it as a variant).
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodKind,
    /// Goes into the tuned model's name `ft:{base}:{org}:{suffix}:{job}`.
    #[arg(long)]
    pub suffix: Option<String>,
    /// Makes the run reproducible (default: a random seed, shown in the job).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Job metadata, repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
    /// Wait for the job and show its progress (as `jobs watch`).
    #[arg(long)]
    pub watch: bool,

    // Hyperparameters: unset ones are "auto" (the server picks).
    /// Passes over the training data.
    #[arg(long, help_heading = "Hyperparameters")]
    pub epochs: Option<u32>,
    /// Examples per optimizer step.
    #[arg(long, help_heading = "Hyperparameters")]
    pub batch_size: Option<u32>,
    /// Scales the method's base learning rate.
    #[arg(long, help_heading = "Hyperparameters")]
    pub learning_rate_multiplier: Option<f64>,
    /// Stop after this many optimizer steps.
    #[arg(long, help_heading = "Hyperparameters")]
    pub max_steps: Option<u64>,
    /// Truncate examples to this many tokens.
    #[arg(long, help_heading = "Hyperparameters")]
    pub max_seq_len: Option<u64>,
    /// Write (and serve) a checkpoint every N steps.
    #[arg(long, help_heading = "Hyperparameters")]
    pub checkpoint_every: Option<u64>,

    /// LoRA rank.
    #[arg(long = "r", help_heading = "LoRA")]
    pub r: Option<u32>,
    /// LoRA scale numerator (scale = alpha/r).
    #[arg(long, help_heading = "LoRA")]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input, in [0, 1).
    #[arg(long, help_heading = "LoRA")]
    pub dropout: Option<f64>,
    /// `all-linear` or projection names, comma-separated (q_proj,v_proj,...).
    #[arg(long, value_delimiter = ',', help_heading = "LoRA")]
    pub target_modules: Vec<String>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long, help_heading = "LoRA")]
    pub rslora: bool,

    /// Virtual tokens trained ahead of the input.
    #[arg(long, help_heading = "Prompt and prefix tuning")]
    pub num_virtual_tokens: Option<u32>,
    /// How prompt tuning's virtual tokens start.
    #[arg(long, value_enum, help_heading = "Prompt and prefix tuning")]
    pub init: Option<PromptInit>,
    /// The text of `--init text`.
    #[arg(long, help_heading = "Prompt and prefix tuning")]
    pub init_text: Option<String>,
    /// Prefix tuning through a projection MLP.
    #[arg(long, help_heading = "Prompt and prefix tuning")]
    pub prefix_projection: bool,
    /// The projection's hidden width.
    #[arg(long, help_heading = "Prompt and prefix tuning")]
    pub encoder_hidden_size: Option<u32>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

impl CreateArgs {
    /// The method flags that were given, with the methods they belong to.
    fn method_flags(&self) -> Vec<(&'static str, &'static [MethodKind])> {
        use MethodKind::*;
        let mut given = Vec::new();
        let mut flag = |set: bool, name: &'static str, methods: &'static [MethodKind]| {
            if set {
                given.push((name, methods));
            }
        };
        flag(self.r.is_some(), "--r", &[Lora]);
        flag(self.alpha.is_some(), "--alpha", &[Lora]);
        flag(self.dropout.is_some(), "--dropout", &[Lora]);
        flag(!self.target_modules.is_empty(), "--target-modules", &[Lora]);
        flag(self.rslora, "--rslora", &[Lora]);
        flag(
            self.num_virtual_tokens.is_some(),
            "--num-virtual-tokens",
            &[PromptTuning, PrefixTuning],
        );
        flag(self.init.is_some(), "--init", &[PromptTuning]);
        flag(self.init_text.is_some(), "--init-text", &[PromptTuning]);
        flag(
            self.prefix_projection,
            "--prefix-projection",
            &[PrefixTuning],
        );
        flag(
            self.encoder_hidden_size.is_some(),
            "--encoder-hidden-size",
            &[PrefixTuning],
        );
        given
    }

    fn adapter(&self) -> Result<AdapterConfig, String> {
        let name = |m: MethodKind| {
            m.to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        };
        for (flag, methods) in self.method_flags() {
            if !methods.contains(&self.method) {
                let wanted: Vec<String> = methods.iter().map(|m| name(*m)).collect();
                return Err(format!(
                    "{flag} applies to --method {}, not {}",
                    wanted.join(" or "),
                    name(self.method)
                ));
            }
        }
        // Unset flags stay unset: the server applies the method's defaults.
        Ok(match self.method {
            MethodKind::Lora => AdapterConfig::Lora(LoraConfig {
                r: self.r.map(|r| r as usize),
                alpha: self.alpha,
                dropout: self.dropout.map(|d| d as f32),
                target_modules: (!self.target_modules.is_empty())
                    .then(|| self.target_modules.clone()),
                use_rslora: self.rslora.then_some(true),
            }),
            MethodKind::PromptTuning => AdapterConfig::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: self.num_virtual_tokens.map(|n| n as usize),
                init: self.init.map(PromptInit::config),
                init_text: self.init_text.clone(),
            }),
            MethodKind::PrefixTuning => AdapterConfig::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: self.num_virtual_tokens.map(|n| n as usize),
                prefix_projection: self.prefix_projection.then_some(true),
                encoder_hidden_size: self.encoder_hidden_size.map(|n| n as usize),
            }),
            MethodKind::Full => AdapterConfig::Full,
        })
    }

    fn hyperparameters(&self) -> Hyperparameters {
        Hyperparameters {
            n_epochs: self.epochs.map(AutoOr::Value),
            batch_size: self.batch_size.map(AutoOr::Value),
            learning_rate_multiplier: self.learning_rate_multiplier.map(AutoOr::Value),
            max_steps: self.max_steps,
            max_seq_len: self.max_seq_len,
            checkpoint_every: self.checkpoint_every,
        }
    }

    /// The request, once the model and the file ids are known. Values are checked by the
    /// server, whose messages name the field at fault.
    pub fn request(
        &self,
        model: String,
        training_file: String,
        validation_file: Option<String>,
    ) -> Result<CreateJob, String> {
        let metadata = (!self.metadata.is_empty()).then(|| {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>()
        });
        Ok(CreateJob {
            model,
            training_file,
            validation_file,
            suffix: self.suffix.clone(),
            seed: self.seed,
            metadata,
            method: JobMethod {
                supervised: Supervised {
                    hyperparameters: self.hyperparameters(),
                    adapter: Some(self.adapter()?),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn parse(args: &[&str]) -> Result<CreateArgs, clap::Error> {
        T::try_parse_from(std::iter::once("create").chain(args.iter().copied())).map(|t| t.args)
    }

    fn body(args: &[&str]) -> Value {
        let a = parse(args).unwrap();
        let req = a
            .request("base".into(), "file-t".into(), Some("file-v".into()))
            .unwrap();
        serde_json::to_value(req).unwrap()
    }

    #[test]
    fn lora_flags_map_onto_the_adapter_extension() {
        let b = body(&[
            "--file",
            "d.jsonl",
            "--r",
            "8",
            "--alpha",
            "16",
            "--target-modules",
            "q_proj,v_proj",
            "--rslora",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--learning-rate-multiplier",
            "0.5",
            "--max-steps",
            "10",
            "--max-seq-len",
            "96",
            "--checkpoint-every",
            "5",
            "--suffix",
            "chef",
            "--seed",
            "7",
            "--metadata",
            "team=kitchen",
            "--metadata",
            "note=a=b",
        ]);
        assert_eq!(
            b,
            json!({
                "model": "base", "training_file": "file-t", "validation_file": "file-v",
                "suffix": "chef", "seed": 7, "metadata": {"team": "kitchen", "note": "a=b"},
                "method": {"type": "supervised", "supervised": {
                    "hyperparameters": {"n_epochs": 2, "batch_size": 4,
                        "learning_rate_multiplier": 0.5, "max_steps": 10, "max_seq_len": 96,
                        "checkpoint_every": 5},
                    "adapter": {"type": "lora", "r": 8, "alpha": 16.0,
                        "target_modules": ["q_proj", "v_proj"], "use_rslora": true}}}
            })
        );
    }

    #[test]
    fn defaults_leave_everything_to_the_server() {
        let a = parse(&["--file-id", "file-x"]).unwrap();
        assert_eq!(a.method, MethodKind::Lora);
        let b =
            serde_json::to_value(a.request("m".into(), "file-x".into(), None).unwrap()).unwrap();
        assert_eq!(
            b,
            json!({"model": "m", "training_file": "file-x",
                   "method": {"type": "supervised", "supervised": {"adapter": {"type": "lora"}}}})
        );
    }

    #[test]
    fn prompt_prefix_and_full() {
        let b = body(&[
            "--file",
            "d",
            "--method",
            "prompt_tuning",
            "--num-virtual-tokens",
            "8",
            "--init",
            "text",
            "--init-text",
            "You are a sushi chef.",
        ]);
        assert_eq!(
            b["method"]["supervised"]["adapter"],
            json!({"type": "prompt_tuning", "num_virtual_tokens": 8, "init": "text",
                   "init_text": "You are a sushi chef."})
        );
        let b = body(&[
            "--file",
            "d",
            "--method",
            "prefix-tuning",
            "--num-virtual-tokens",
            "4",
            "--prefix-projection",
            "--encoder-hidden-size",
            "64",
        ]);
        assert_eq!(
            b["method"]["supervised"]["adapter"],
            json!({"type": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": true,
                   "encoder_hidden_size": 64})
        );
        let b = body(&["--file", "d", "--method", "full"]);
        assert_eq!(
            b["method"]["supervised"]["adapter"],
            json!({"type": "full"})
        );
    }

    #[test]
    fn flags_of_another_method_are_refused() {
        let a = parse(&["--file", "d", "--method", "prompt_tuning", "--r", "8"]).unwrap();
        let e = a.request("m".into(), "f".into(), None).unwrap_err();
        assert_eq!(e, "--r applies to --method lora, not prompt_tuning");
        let a = parse(&["--file", "d", "--num-virtual-tokens", "8"]).unwrap();
        let e = a.request("m".into(), "f".into(), None).unwrap_err();
        assert_eq!(
            e,
            "--num-virtual-tokens applies to --method prompt_tuning or prefix_tuning, not lora"
        );
    }

    #[test]
    fn usage_errors() {
        // Exactly one of --file and --file-id.
        assert!(parse(&[]).is_err());
        assert!(parse(&["--file", "a", "--file-id", "file-b"]).is_err());
        assert!(parse(&[
            "--file",
            "a",
            "--validation-file",
            "v",
            "--validation-file-id",
            "file-v"
        ])
        .is_err());
        assert!(parse(&["--file", "a", "--method", "qlora"]).is_err());
        assert!(parse(&["--file", "a", "--metadata", "novalue"]).is_err());
        assert!(parse(&["--file", "a", "--r", "-1"]).is_err());
    }
}
