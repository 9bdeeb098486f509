//! `itamaed eval`: validation loss and mean token accuracy of the base model, or of the base with
//! a PEFT adapter, on a JSONL dataset.
//!
//! It scores exactly what a fine-tuning job's eval events report — the same tokenization and
//! loss weights ([`data::load_jsonl`]), the same shifted batches ([`Batcher`]) and the same loss
//! kernel — so the base model's score here and a job's final `valid_loss` compare directly: that
//! comparison is what the worked examples print.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use serde::Serialize;

use crate::adapters::{peft, Adapter};
use crate::model::layers::{Ctx, ForwardHooks};
use crate::model::Transformer;
use crate::ops::loss::lm_head_cross_entropy;
use crate::train::data::{self, BatchOptions, Batcher, DataOptions, Example};

/// Flags of `itamaed eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long, env = "ITAMAE_MODEL", default_value = crate::config::DEFAULT_MODEL)]
    pub model: PathBuf,
    #[command(flatten)]
    pub weights: crate::config::WeightsArg,
    /// JSONL dataset to score (the formats training accepts).
    #[arg(long)]
    pub data: PathBuf,
    /// A PEFT adapter directory (LoRA, prompt or prefix tuning); without it, the base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// What [`score`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean negative log-likelihood per scored token (nats).
    pub loss: f64,
    /// Share of scored tokens whose argmax prediction is the target.
    pub mean_token_accuracy: f64,
    pub examples: usize,
    /// Tokens that carry loss (assistant replies).
    pub scored_tokens: usize,
}

/// Loss and token accuracy of `model` (with `adapter` applied) over every example once.
pub fn score(
    model: &Transformer,
    adapter: Option<&Adapter>,
    examples: &[Example],
    batch_size: usize,
    max_seq_len: usize,
) -> anyhow::Result<EvalResult> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let mut batches = Batcher::new(
        Arc::new(examples.to_vec()),
        BatchOptions {
            batch_size,
            max_seq_len,
            pack: false,
            seed: 0,
        },
    )?;
    let (mut sum, mut count, mut correct) = (0f64, 0f64, 0usize);
    for _ in 0..batches.steps_per_epoch() {
        let batch = batches.next_batch();
        let (inputs, targets, weights, _) = batch.to_tensors(model.device())?;
        let (b, l) = inputs.dims2()?;
        let x = model.embed(&inputs)?;
        // Mirrors the trainer: a soft prompt is prepended and cut off again, the other adapter
        // kinds hook into the forward.
        let hidden = match adapter {
            Some(Adapter::Prompt(soft)) => model
                .forward_hidden(&soft.prepend(&x)?, Ctx::default())?
                .narrow(1, soft.len(), l)?,
            hooks => model.forward_hidden(
                &x,
                Ctx {
                    hooks: hooks.map(|a| a as &dyn ForwardHooks),
                    ..Default::default()
                },
            )?,
        };
        let h = hidden.reshape((b * l, hidden.dim(2)?))?;
        let (loss, stats) = lm_head_cross_entropy(
            &h,
            &model.lm_head.to_dense(h.dtype())?,
            &targets.flatten_all()?,
            &weights.flatten_all()?,
        )?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += stats.weight_sum;
        correct += stats.correct;
    }
    let scored = examples.iter().map(Example::trainable).sum();
    Ok(EvalResult {
        loss: sum / count.max(1.0),
        mean_token_accuracy: correct as f64 / count.max(1.0),
        examples: examples.len(),
        scored_tokens: scored,
    })
}

/// `itamaed eval`.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let loaded = crate::model::load(&a.model, &candle_core::Device::Cpu, a.weights.resolve(None))
        .with_context(|| format!("loading {}", a.model.display()))?;
    let opts = DataOptions {
        max_seq_len: a.max_seq_len,
        ..Default::default()
    };
    let (examples, _) = data::load_jsonl(&a.data, &loaded.text, loaded.template.as_ref(), &opts)
        .with_context(|| format!("reading {}", a.data.display()))?;
    let adapter = a
        .adapter
        .as_ref()
        .map(|d| {
            peft::load(d, &loaded.model.cfg, loaded.model.device())
                .with_context(|| format!("loading adapter {}", d.display()))
        })
        .transpose()?;
    let r = score(
        &loaded.model,
        adapter.as_ref(),
        &examples,
        a.batch_size,
        a.max_seq_len,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "loss {:.4} | mean token accuracy {:.3} | {} examples, {} scored tokens",
            r.loss, r.mean_token_accuracy, r.examples, r.scored_tokens
        );
    }
    Ok(())
}
