//! One-shot commands of `itamaed` besides `serve`: `train` (a fine-tuning run from the command
//! line), `chat` (talk to the base model or an adapter in-process), `export-hf` (write the base
//! model as an HF directory) and `logits` (dump logits, for interop checks against PEFT).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::adapters::{peft, LoraConfig, PrefixTuningConfig, PromptTuningConfig};
use crate::config::WeightsArg;
use crate::engine::{EngineHandle, GenEvent, GenerationRequest, PromptInput, SamplingParams};
use crate::jobs::auto_hyper;
use crate::model::chat::{ChatMessage, Role};
use crate::model::{self, LoadedModel};
use crate::train::data::{self, DataOptions};
use crate::train::optim::Schedule;
use crate::train::trainer::default_learning_rate;
use crate::train::{Finish, Method, TrainConfig, TrainControl, TrainEvent, Trainer};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Lora,
    PromptTuning,
    PrefixTuning,
    Full,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

/// Flags of `itamaed train`, named like the job API's fields.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long, env = "ITAMAE_MODEL", default_value = crate::config::DEFAULT_MODEL)]
    pub model: PathBuf,
    #[command(flatten)]
    pub weights: WeightsArg,
    /// Training JSONL (chat `messages`, `prompt`/`completion`, or `text`).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub validation_data: Option<PathBuf>,
    /// Fraction of the training data held out for validation when no validation file is given.
    #[arg(long, default_value_t = 0.0)]
    pub validation_split: f64,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodArg,
    /// Output directory (PEFT adapter, or an HF model directory for `full`).
    #[arg(long)]
    pub out: PathBuf,
    /// Default: "auto", sized to the dataset as a job's `n_epochs` is.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Default: "auto", sized to the dataset as a job's `batch_size` is.
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Default: per method (LoRA 2e-4, prompt tuning 3e-2, prefix tuning 1e-2, full 2e-5).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Scales the per-method default (OpenAI's `learning_rate_multiplier`).
    #[arg(long)]
    pub learning_rate_multiplier: Option<f64>,
    #[arg(long, default_value_t = 0.05)]
    pub warmup_ratio: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Reject over-long examples instead of cutting them.
    #[arg(long)]
    pub no_truncation: bool,
    /// Pack short examples into shared rows (attention stays within each example).
    #[arg(long)]
    pub pack: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    /// Continue from a checkpoint directory (`<out>/checkpoints/step-N`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start from this PEFT adapter directory's weights instead of a fresh init (LoRA, prompt
    /// tuning, prefix tuning without projection), e.g. to compare training curves with PEFT.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    // The methods' own flags: each config is also the API's adapter object.
    #[command(flatten)]
    pub lora: LoraConfig,
    /// Virtual tokens of prompt and prefix tuning.
    #[arg(long, default_value_t = itamae_client::methods::DEFAULT_NUM_VIRTUAL_TOKENS)]
    pub num_virtual_tokens: usize,
    #[command(flatten)]
    pub prompt_tuning: PromptTuningConfig,
    #[command(flatten)]
    pub prefix_tuning: PrefixTuningConfig,
}

fn load_model(path: &Path, weights: &WeightsArg) -> anyhow::Result<LoadedModel> {
    model::load(path, &candle_core::Device::Cpu, weights.resolve(None))
        .with_context(|| format!("loading {}", path.display()))
}

/// The method the flags ask for; checked by the trainer, by the rules the jobs API applies.
fn method_of(a: &TrainArgs, loaded: &LoadedModel) -> Method {
    let n = Some(a.num_virtual_tokens);
    match a.method {
        MethodArg::Lora => Method::Lora(a.lora.clone()),
        MethodArg::PromptTuning => Method::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: n,
            ..a.prompt_tuning.clone()
        }),
        MethodArg::PrefixTuning => Method::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: n,
            encoder_hidden_size: Some(
                a.prefix_tuning
                    .encoder_hidden_size(loaded.model.cfg.kv_dim()),
            ),
            ..a.prefix_tuning.clone()
        }),
        MethodArg::Full => Method::Full,
    }
}

/// `itamaed train`.
pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let loaded = load_model(&a.model, &a.weights)?;
    let method = method_of(&a, &loaded);
    let opts = DataOptions {
        max_seq_len: a.max_seq_len,
        truncation: !a.no_truncation,
        pack: a.pack,
        ..Default::default()
    };
    let template = loaded.template.as_ref();
    let (train, report) = data::load_jsonl(&a.data, &loaded.text, template, &opts)?;
    eprintln!(
        "data {}: {} examples, {} tokens ({} trained), {} truncated",
        a.data.display(),
        report.examples,
        report.tokens,
        report.trainable_tokens,
        report.truncated
    );
    let (train, valid) = match &a.validation_data {
        Some(v) => {
            let (valid, r) = data::load_jsonl(v, &loaded.text, template, &opts)?;
            eprintln!("validation {}: {} examples", v.display(), r.examples);
            (train, valid)
        }
        None => data::split_validation(train, a.validation_split, a.seed),
    };
    let mut config = TrainConfig::new(method.clone());
    let default_lr = default_learning_rate(&method, loaded.model.cfg.hidden_size);
    config.learning_rate = match (a.learning_rate, a.learning_rate_multiplier) {
        (Some(_), Some(_)) => bail!("give --learning-rate or --learning-rate-multiplier, not both"),
        (Some(lr), None) => lr,
        (None, Some(m)) => default_lr * m,
        (None, None) => default_lr,
    };
    // "auto" as a job resolves it, so one-shot runs and jobs train alike on the same data.
    config.batch_size = a
        .batch_size
        .unwrap_or_else(|| auto_hyper::batch_size(train.len()));
    config.epochs = a
        .epochs
        .unwrap_or_else(|| auto_hyper::n_epochs(train.len(), config.batch_size));
    eprintln!(
        "epochs {}, batch size {}, learning rate {:e}",
        config.epochs, config.batch_size, config.learning_rate
    );
    config.max_steps = a.max_steps;
    config.grad_accum = a.grad_accum;
    config.warmup_ratio = a.warmup_ratio;
    config.schedule = match a.schedule {
        ScheduleArg::Cosine => Schedule::Cosine,
        ScheduleArg::Linear => Schedule::Linear,
        ScheduleArg::Constant => Schedule::Constant,
    };
    config.adamw.weight_decay = a.weight_decay;
    config.adamw.max_grad_norm = a.max_grad_norm;
    config.seed = a.seed;
    config.max_seq_len = a.max_seq_len;
    config.pack = a.pack;
    config.eval_every = a.eval_every;
    config.checkpoint_every = a.checkpoint_every;
    config.early_stopping_patience = a.early_stopping_patience;
    let init_ids: Vec<u32> = match method.init_text() {
        Some(t) => loaded
            .text
            .tokenizer
            .encode(t, false)
            .map_err(|e| anyhow::anyhow!("tokenizing --prompt-init-text: {e}"))?
            .get_ids()
            .to_vec(),
        None => Vec::new(),
    };
    let mut trainer = Trainer::new(
        &loaded.model,
        Some(&loaded.text),
        &loaded.name,
        config,
        train,
        valid,
        &init_ids,
    )?;
    if let Some(dir) = &a.init_adapter {
        trainer.init_from_dir(dir)?;
        eprintln!("initial weights from {}", dir.display());
    }
    if let Some(ck) = &a.resume {
        trainer.resume_from(ck)?;
        eprintln!("resumed from {} at step {}", ck.display(), trainer.step());
    }
    let control = TrainControl::default();
    let started = Instant::now();
    let outcome = trainer.run(Some(&a.out), &control, &mut |e| match e {
        TrainEvent::Step(s) => eprintln!(
            "step {:>5}/{} | loss {:.4} | acc {:.3} | lr {:.2e} | {:.0} tok/s | ETA {}",
            s.step,
            s.total_steps,
            s.loss,
            s.mean_token_accuracy,
            s.learning_rate,
            s.tokens_per_sec,
            fmt_secs(s.eta_secs)
        ),
        TrainEvent::Eval(m) => eprintln!(
            "eval  step {:>5} | valid_loss {:.4} | valid_acc {:.3}",
            m.step, m.valid_loss, m.valid_mean_token_accuracy
        ),
        TrainEvent::Checkpoint { step, path } => {
            eprintln!("checkpoint step {step}: {}", path.display())
        }
        TrainEvent::Message(m) => eprintln!("{m}"),
    })?;
    let how = match outcome.finish {
        Finish::Completed => "completed",
        Finish::EarlyStopped => "stopped early",
        Finish::Cancelled => "cancelled",
    };
    println!(
        "training {how}: {} steps, {} tokens in {}; result in {}",
        outcome.steps,
        outcome.trained_tokens,
        fmt_secs(started.elapsed().as_secs_f64()),
        a.out.display()
    );
    Ok(())
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[arg(long, env = "ITAMAE_MODEL", default_value = crate::config::DEFAULT_MODEL)]
    pub model: PathBuf,
    #[command(flatten)]
    pub weights: WeightsArg,
    /// A PEFT adapter directory to chat with (LoRA, prompt or prefix tuning).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One-shot prompt; without it, read prompts from stdin, one per line.
    #[arg(short, long)]
    pub prompt: Option<String>,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
}

/// `itamaed chat`: in-process generation through the same engine the daemon serves with.
pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let loaded = load_model(&a.model, &a.weights)?;
    let base = loaded.name.clone();
    let cfg = loaded.model.cfg.clone();
    let engine = EngineHandle::from_loaded(loaded);
    let model_id = match &a.adapter {
        Some(dir) => {
            let adapter = peft::load(dir, &cfg, &candle_core::Device::Cpu)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            let id = format!(
                "{base}:{}",
                dir.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            engine.add_adapter(&id, adapter)?;
            id
        }
        None => base,
    };
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new(Role::System, s.as_str()));
    }
    let ask = |prompt: &str, history: &mut Vec<ChatMessage>| -> anyhow::Result<()> {
        history.push(ChatMessage::new(Role::User, prompt));
        let p = engine.prepare(GenerationRequest {
            model: model_id.clone(),
            input: PromptInput::Chat {
                messages: history.clone(),
            },
            sampling: SamplingParams {
                temperature: a.temperature,
                ..Default::default()
            },
            max_tokens: Some(a.max_tokens),
            stop: vec![],
            guided: Default::default(),
            n: 1,
        })?;
        let mut rx = engine.submit(p)?;
        let mut answer = String::new();
        use std::io::Write;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenEvent::Text(t) => {
                    print!("{t}");
                    std::io::stdout().flush().ok();
                    answer.push_str(&t);
                }
                GenEvent::Finished { .. } => break,
                GenEvent::Failed(e) => bail!("generation failed: {e}"),
                // This chat sends no tools, so no call is ever parsed.
                GenEvent::ToolCall(_) => {}
                // Not asked for (no echo, no logprobs).
                GenEvent::Echo { .. } | GenEvent::Token(_) => {}
            }
        }
        println!();
        history.push(ChatMessage::new(Role::Assistant, answer));
        Ok(())
    };
    match &a.prompt {
        Some(p) => ask(p, &mut history),
        None => {
            for line in std::io::stdin().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    ask(line.trim(), &mut history)?;
                }
            }
            Ok(())
        }
    }
}

/// `itamaed export-hf`: the base model as an HF directory (what PEFT and transformers load).
pub fn export_hf(model_path: &Path, out: &Path) -> anyhow::Result<()> {
    // An export is the full-precision model whatever the serving mode.
    let f32 = WeightsArg {
        weights: Some(model::WeightsMode::F32),
    };
    let loaded = load_model(model_path, &f32)?;
    model::hf::save_model_dir(out, &loaded.model, &loaded.text)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// `itamaed logits`: JSON `{"input_ids", "logits"}` (every position) for a raw-text prompt, with an
/// optional adapter; the interop check compares it with PEFT's.
pub fn logits(
    model_path: &Path,
    weights: &WeightsArg,
    adapter: Option<&Path>,
    prompt: &str,
) -> anyhow::Result<()> {
    use crate::model::layers::{Ctx, ForwardHooks};
    use candle_core::Tensor;
    let loaded = load_model(model_path, weights)?;
    let m = &loaded.model;
    let adapter = adapter
        .map(|d| {
            peft::load(d, &m.cfg, m.device()).with_context(|| format!("loading {}", d.display()))
        })
        .transpose()?;
    let ids = loaded
        .text
        .tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    let input = Tensor::new(ids.as_slice(), m.device())?.unsqueeze(0)?;
    let mut x = m.embed(&input)?;
    let mut skip = 0;
    if let Some(soft) = adapter.as_ref().and_then(|a| a.soft_prompt()) {
        x = Tensor::cat(&[&soft.unsqueeze(0)?, &x], 1)?;
        skip = soft.dim(0)?;
    }
    let h = m.forward_hidden(
        &x,
        Ctx {
            hooks: adapter.as_ref().map(|a| a as &dyn ForwardHooks),
            ..Default::default()
        },
    )?;
    let h = h.narrow(1, skip, ids.len())?;
    let logits = m.logits(&h)?.squeeze(0)?.to_vec2::<f32>()?;
    println!(
        "{}",
        serde_json::json!({"input_ids": ids, "logits": logits})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::adapters::PromptInit;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(extra: &[&str]) -> TrainArgs {
        let args = ["train", "--data", "d.jsonl", "--out", "o"];
        T::try_parse_from(args.iter().chain(extra))
            .unwrap_or_else(|e| panic!("{extra:?}: {e}"))
            .args
    }

    #[test]
    fn method_flags_fill_the_method_configs() {
        // The flattened configs and the shared flags form one valid command.
        T::command().debug_assert();
        let a = parse(&[]);
        assert_eq!(a.lora, LoraConfig::default().with_defaults());
        assert_eq!(a.num_virtual_tokens, 20);
        assert_eq!(a.prompt_tuning.init, Some(PromptInit::Text));
        assert_eq!(
            a.prompt_tuning.init_text.as_deref(),
            Some("You are a helpful assistant.")
        );
        assert_eq!(a.prefix_tuning.prefix_projection, Some(false));
        assert_eq!(a.prefix_tuning.encoder_hidden_size, None);

        let a = parse(&[
            "--r",
            "4",
            "--alpha",
            "8",
            "--dropout",
            "0.1",
            "--target-modules",
            "q_proj,v_proj",
            "--use-rslora",
        ]);
        assert_eq!(
            a.lora,
            LoraConfig {
                r: Some(4),
                alpha: Some(8.0),
                dropout: Some(0.1),
                target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
                use_rslora: Some(true),
            }
        );
        let a = parse(&[
            "--num-virtual-tokens",
            "8",
            "--prompt-init",
            "sample-vocab",
            "--prompt-init-text",
            "Hi.",
            "--prefix-projection",
            "--encoder-hidden-size",
            "64",
        ]);
        assert_eq!(a.num_virtual_tokens, 8);
        assert_eq!(a.prompt_tuning.init, Some(PromptInit::SampleVocab));
        assert_eq!(a.prompt_tuning.init_text.as_deref(), Some("Hi."));
        assert_eq!(a.prefix_tuning.prefix_projection, Some(true));
        assert_eq!(a.prefix_tuning.encoder_hidden_size, Some(64));
    }
}
