//! The training loop: one method (LoRA, prompt tuning, prefix tuning or full SFT) trained on the
//! resident model's weights, with gradient accumulation, clipping, warmup + decay, periodic
//! evaluation, checkpoints that resume exactly, early stopping, and cancel/pause between steps.
//!
//! Adapter methods never copy the base weights: the frozen tensors the serving path uses are the
//! ones the forward reads here. Full SFT has to own trainable copies (it changes every weight).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::data::{Batch, BatchCursor, BatchOptions, Batcher, DataError, Example};
use super::optim::{lr_at, AdamW, AdamWConfig, Param, Schedule};
use crate::adapters::lora::LoraPair;
use crate::adapters::prefix::PrefixParams;
use crate::adapters::{lora, peft, Adapter, AdapterMethod, Lora, Prefix, SoftPrompt};
use crate::adapters::{FieldError, PrefixTuningConfig};
use crate::model::layers::Ctx;
use crate::model::TextSpec;
use crate::model::Transformer;
use crate::ops;

/// What a run trains: an adapter method's config (the API's adapter object, defined once with
/// the API types), or `full` (every weight).
pub use itamae_client::methods::AdapterConfig as Method;

/// Full SFT's learning rate "auto" stands for; the adapter methods' are theirs
/// ([`AdapterMethod::DEFAULT_LEARNING_RATE`]).
const FULL_LEARNING_RATE: f64 = 2e-5;

/// The hidden size LoRA's reference rate ([`AdapterMethod::DEFAULT_LEARNING_RATE`], 2e-4) is
/// right for: a 7B-class model's.
const LORA_REFERENCE_WIDTH: usize = 4096;
/// Most a narrow model's LoRA rate is raised above the reference.
const LORA_MAX_WIDTH_SCALE: f64 = 5.0;

/// The learning rate "auto" stands for (and that `learning_rate_multiplier` scales) on a model
/// `hidden_size` wide.
///
/// LoRA's rate grows as the model narrows (reference × 4096 / hidden, at most 5×): 2e-4, right
/// for 7B-class models, left SmolLM2 (576 wide) at validation loss 1.35 on the company-faq
/// example after 60 steps where 1e-3 reached 0.04, and the persona set still adheres at 1e-3.
/// Prompt and prefix tuning train free vectors, not a low-rank update to width-sized matrices,
/// so their rates do not scale; full SFT keeps its conservative rate.
pub fn default_learning_rate(method: &Method, hidden_size: usize) -> f64 {
    match method {
        Method::Lora(_) => {
            let scale = LORA_REFERENCE_WIDTH as f64 / hidden_size.max(1) as f64;
            Lora::DEFAULT_LEARNING_RATE * scale.clamp(1.0, LORA_MAX_WIDTH_SCALE)
        }
        Method::PromptTuning(_) => SoftPrompt::DEFAULT_LEARNING_RATE,
        Method::PrefixTuning(_) => Prefix::DEFAULT_LEARNING_RATE,
        Method::Full => FULL_LEARNING_RATE,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub epochs: usize,
    /// Stops after this many optimizer steps, whatever the epochs.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub seed: u64,
    pub max_seq_len: usize,
    pub pack: bool,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0: never).
    pub checkpoint_every: usize,
    /// Stop when the validation loss has not improved for this many evaluations.
    pub early_stopping_patience: Option<usize>,
}

impl TrainConfig {
    pub fn new(method: Method) -> Self {
        // The reference-width rate; callers resolving "auto" for a model use
        // `default_learning_rate` with its hidden size.
        let learning_rate = default_learning_rate(&method, LORA_REFERENCE_WIDTH);
        Self {
            method,
            epochs: 3,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            learning_rate,
            warmup_ratio: 0.05,
            schedule: Schedule::Cosine,
            adamw: AdamWConfig::default(),
            seed: 42,
            max_seq_len: 1024,
            pack: false,
            eval_every: 0,
            checkpoint_every: 0,
            early_stopping_patience: None,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, m: String| {
            Err(TrainError::Config {
                field: field.into(),
                message: m,
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "batch_size must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "grad_accum must be at least 1".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "epochs must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("learning_rate must be positive, got {}", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "warmup_ratio must be in [0, 1)".into());
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len", "max_seq_len must be at least 2".into());
        }
        // The method's own rules, as the jobs API applies them.
        if let Err(FieldError { param, message }) = self.method.validate("", &lora::check_targets) {
            return bad(&param, message);
        }
        if self.pack && matches!(self.method, Method::PromptTuning(_)) {
            return bad("pack", "packing is not supported with prompt tuning (the soft prompt belongs to each example)".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("no training examples")]
    NoData,
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Peft(#[from] peft::PeftError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Cancel and pause, checked between optimizer steps; shared with whoever runs the job.
#[derive(Default)]
pub struct TrainControl {
    pub cancel: AtomicBool,
    pub pause: AtomicBool,
    /// Called before every micro-batch; may block to give the device to serving for a while
    /// (the daemon's scheduler, `jobs::runner`). Must return soon once `cancel` is set.
    #[allow(clippy::type_complexity)]
    pub throttle: Option<Box<dyn Fn(&TrainControl) + Send + Sync>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub mean_token_accuracy: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub trained_tokens: u64,
    pub eta_secs: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub step: usize,
    pub valid_loss: f64,
    pub valid_mean_token_accuracy: f64,
}

#[derive(Debug, Clone)]
pub enum TrainEvent {
    Step(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint { step: usize, path: PathBuf },
    Message(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Completed,
    EarlyStopped,
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub finish: Finish,
    pub steps: usize,
    pub trained_tokens: u64,
    pub last_loss: Option<f64>,
    pub last_eval: Option<EvalMetrics>,
}

/// What the optimizer updates, per method.
enum Trainable {
    Adapter(Adapter),
    Prefix(PrefixTuningConfig, PrefixParams),
    Full(Transformer),
}

/// Saved beside each checkpoint's weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    cursor: BatchCursor,
    trained_tokens: u64,
    best_valid: Option<f64>,
    evals_without_improvement: usize,
    adam_t: u64,
    method: String,
}

pub struct Trainer<'m> {
    base: &'m Transformer,
    /// Needed to write full-SFT results as a complete model directory.
    text: Option<&'m TextSpec>,
    base_name: String,
    pub config: TrainConfig,
    trainable: Trainable,
    params: Vec<Param>,
    opt: AdamW,
    batcher: Batcher,
    valid: Vec<Example>,
    state: TrainerState,
    total_steps: usize,
    /// The frozen base's LM head as a plain tensor, made once per job when the base holds it
    /// in quantized blocks. Every step needs the whole matrix (forward and backward of the
    /// loss), so keeping it between steps costs no peak memory, and it saves dequantizing it
    /// again — and, at ~110 MB, faulting its fresh pages in again — on every step.
    base_head: std::sync::OnceLock<Tensor>,
}

fn var_of(t: &Tensor) -> candle_core::Result<(Var, Tensor)> {
    let v = Var::from_tensor(t)?;
    let t = v.as_tensor().clone();
    Ok((v, t))
}

impl<'m> Trainer<'m> {
    /// `init_ids`: the tokenized init text (`Method::init_text`): prompt tuning's with
    /// `init: text`, and the text a prefix starts from (after BOS, taken from `text`).
    pub fn new(
        base: &'m Transformer,
        text: Option<&'m TextSpec>,
        base_name: &str,
        config: TrainConfig,
        train: Vec<Example>,
        valid: Vec<Example>,
        init_ids: &[u32],
    ) -> Result<Self, TrainError> {
        config.validate()?;
        if train.is_empty() {
            return Err(TrainError::NoData);
        }
        let dev = base.device().clone();
        let mut params = Vec::new();
        let trainable = match &config.method {
            Method::Lora(c) => {
                let mut lora = Lora::init(&base.cfg, c.clone(), config.seed, &dev)?;
                for (&(layer, proj), pair) in lora.pairs.iter_mut() {
                    let name = crate::adapters::lora::peft_prefix(layer, proj);
                    let (va, a) = var_of(&pair.a)?;
                    let (vb, b) = var_of(&pair.b)?;
                    params.push(Param {
                        name: format!("{name}.lora_A.weight"),
                        var: va,
                        decay: true,
                    });
                    params.push(Param {
                        name: format!("{name}.lora_B.weight"),
                        var: vb,
                        decay: true,
                    });
                    *pair = LoraPair { a, b };
                }
                lora.training = true;
                Trainable::Adapter(Adapter::Lora(lora))
            }
            Method::PromptTuning(c) => {
                let mut soft = SoftPrompt::init(base, c.clone(), init_ids, config.seed)?;
                let (v, t) = var_of(&soft.embeddings)?;
                params.push(Param {
                    name: "prompt_embeddings".into(),
                    var: v,
                    decay: false,
                });
                soft.embeddings = t;
                Trainable::Adapter(Adapter::Prompt(soft))
            }
            Method::PrefixTuning(c) => {
                let bos = text.and_then(|t| t.bos_id);
                let ids: Vec<u32> = bos.into_iter().chain(init_ids.iter().copied()).collect();
                let mut p = PrefixParams::init(base, c, &ids, config.seed)?;
                let (v, t) = var_of(&p.embedding)?;
                params.push(Param {
                    name: "prefix.embedding".into(),
                    var: v,
                    decay: false,
                });
                p.embedding = t;
                if let Some(mlp) = p.mlp.as_mut() {
                    for (i, w) in mlp.iter_mut().enumerate() {
                        let (v, t) = var_of(w)?;
                        // weights decay, biases do not
                        params.push(Param {
                            name: format!("prefix.mlp.{i}"),
                            var: v,
                            decay: i % 2 == 0,
                        });
                        *w = t;
                    }
                }
                Trainable::Prefix(c.clone(), p)
            }
            Method::Full => {
                // Full fine-tuning updates the base itself: it needs every weight in f32, not a
                // dequantized copy of a quantized or half base made behind the user's back.
                if !base.is_dense() {
                    return Err(TrainError::Config {
                        field: "model.weights".into(),
                        message: "full fine-tuning needs the base in f32: start with \
                                  --weights f32 (ITAMAE_WEIGHTS=f32)"
                            .into(),
                    });
                }
                let mut weights = HashMap::new();
                for (name, t) in base.named_weights()? {
                    let (v, t) = var_of(&t)?;
                    let decay = t.rank() == 2 && !name.contains("norm");
                    params.push(Param {
                        name: name.clone(),
                        var: v,
                        decay,
                    });
                    weights.insert(name, t);
                }
                Trainable::Full(base.with_weights(weights)?)
            }
        };
        let opt = AdamW::new(config.adamw, &params)?;
        let batcher = Batcher::new(Arc::new(train), batch_options(&config, config.pack))?;
        let micro = batcher.total_steps(config.epochs as u64) as usize;
        let total_steps = config
            .max_steps
            .unwrap_or(micro.div_ceil(config.grad_accum))
            .max(1);
        let state = TrainerState {
            step: 0,
            cursor: batcher.cursor(),
            trained_tokens: 0,
            best_valid: None,
            evals_without_improvement: 0,
            adam_t: 0,
            method: config.method.name().into(),
        };
        Ok(Self {
            base,
            text,
            base_name: base_name.to_string(),
            config,
            trainable,
            params,
            opt,
            batcher,
            valid,
            state,
            total_steps,
            base_head: std::sync::OnceLock::new(),
        })
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Sum of weighted token NLLs, sum of weights, correct argmax predictions among them, for
    /// `model` with `adapter` applied (a soft prompt is prepended, other kinds hook the forward).
    fn loss(
        &self,
        model: &Transformer,
        adapter: Option<&Adapter>,
        batch: &Batch,
    ) -> candle_core::Result<(Tensor, f64, usize)> {
        let (inputs, targets, weights, packed) = batch.to_tensors(model.device())?;
        let (b, l) = inputs.dims2()?;
        let x = model.embed(&inputs)?;
        let hidden = match adapter {
            Some(Adapter::Prompt(soft)) => {
                let h = model.forward_hidden(&soft.prepend(&x)?, Ctx::default())?;
                h.narrow(1, soft.len(), l)?
            }
            hooks => model.forward_hidden(
                &x,
                Ctx {
                    hooks: hooks.map(|a| a as &dyn crate::model::layers::ForwardHooks),
                    packed: packed.as_ref(),
                    ..Default::default()
                },
            )?,
        };
        let h = hidden.reshape((b * l, hidden.dim(2)?))?;
        let head = if std::ptr::eq(model, self.base) {
            self.base_head(h.dtype())?
        } else {
            model.lm_head.to_dense(h.dtype())?
        };
        lm_loss(&h, &head, &targets.flatten_all()?, &weights.flatten_all()?)
    }

    /// The base's LM head as a `dtype` tensor; see `base_head`.
    fn base_head(&self, dtype: DType) -> candle_core::Result<Tensor> {
        if let Some(t) = self.base_head.get().filter(|t| t.dtype() == dtype) {
            return Ok(t.clone());
        }
        let t = self.base.lm_head.to_dense(dtype)?;
        let _ = self.base_head.set(t.clone());
        Ok(t)
    }

    /// Loss of one micro-batch on the trainable parameters (gradients tracked).
    fn train_loss(&self, batch: &Batch) -> candle_core::Result<(Tensor, f64, usize)> {
        match &self.trainable {
            Trainable::Full(m) => self.loss(m, None, batch),
            Trainable::Adapter(a) => self.loss(self.base, Some(a), batch),
            Trainable::Prefix(c, p) => {
                let prefix =
                    Adapter::Prefix(Prefix::from_flat(&self.base.cfg, c.clone(), p.project()?)?);
                self.loss(self.base, Some(&prefix), batch)
            }
        }
    }

    fn set_dropout_seed(&self, micro: u64) {
        if let Trainable::Adapter(Adapter::Lora(l)) = &self.trainable {
            let s = self.config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
                ^ (self.state.step as u64) << 16
                ^ micro;
            l.dropout_seed.store(s, Ordering::Relaxed);
        }
    }

    /// Validation loss and mean token accuracy over the whole validation set, on detached
    /// tensors so the serving kernels run and no graph is kept; quantized products take their
    /// exact path, so the figure is comparable with the training loss.
    pub fn evaluate(&self) -> Result<Option<EvalMetrics>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let full;
        let (model, adapter) = match &self.trainable {
            Trainable::Full(m) => {
                full = m.with_weights(
                    m.named_weights()?
                        .into_iter()
                        .map(|(n, t)| (n, t.detach()))
                        .collect(),
                )?;
                (&full, None)
            }
            _ => (self.base, self.adapter()?),
        };
        let mut sum = 0f64;
        let mut count = 0f64;
        let mut correct = 0usize;
        // One epoch covers every validation example once; the order does not matter for a sum.
        let mut batches = Batcher::new(
            Arc::new(self.valid.clone()),
            batch_options(&self.config, false),
        )?;
        for _ in 0..batches.steps_per_epoch() {
            let batch = batches.next_batch();
            let (loss, n, c) = ops::quant::exact(|| self.loss(model, adapter.as_ref(), &batch))?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            count += n;
            correct += c;
        }
        Ok(Some(EvalMetrics {
            step: self.state.step,
            valid_loss: sum / count.max(1.0),
            valid_mean_token_accuracy: correct as f64 / count.max(1.0),
        }))
    }

    /// Validation loss of another adapter on this trainer's validation set (checks and tools).
    pub fn loss_of_adapter(&self, adapter: &Adapter) -> Result<f64, TrainError> {
        let mut batches = Batcher::new(
            Arc::new(self.valid.clone()),
            batch_options(&self.config, false),
        )?;
        let (mut sum, mut count) = (0f64, 0f64);
        for _ in 0..batches.steps_per_epoch() {
            let (loss, n, _) = self.loss(self.base, Some(adapter), &batches.next_batch())?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            count += n;
        }
        Ok(sum / count.max(1.0))
    }

    /// Runs until done, cancelled or early-stopped. `on_event` sees progress as it happens.
    pub fn run(
        &mut self,
        out_dir: Option<&Path>,
        control: &TrainControl,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome, TrainError> {
        let warmup = (self.config.warmup_ratio * self.total_steps as f64).round() as usize;
        // Steps reuse their freed working set: serving's prefills must not return it meanwhile.
        let _hold = crate::alloc::hold_working_set();
        let started = Instant::now();
        let start_step = self.state.step;
        let mut tokens_since_start = 0u64;
        let mut last_loss = None;
        let mut last_eval = None;
        let mut finish = Finish::Completed;
        while self.state.step < self.total_steps {
            while control.pause.load(Ordering::Relaxed) && !control.cancel.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if control.cancel.load(Ordering::Relaxed) {
                finish = Finish::Cancelled;
                break;
            }
            let lr = lr_at(
                self.config.schedule,
                self.config.learning_rate,
                warmup,
                self.total_steps,
                self.state.step,
            );
            let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
            let mut loss_sum = 0f64;
            let mut count = 0f64;
            let mut correct = 0usize;
            let mut real_tokens = 0usize;
            for micro in 0..self.config.grad_accum {
                if let Some(throttle) = &control.throttle {
                    throttle(control);
                }
                let batch = self.batcher.next_batch();
                real_tokens += batch.tokens;
                self.set_dropout_seed(micro as u64);
                let (loss, n, c) = self.train_loss(&batch)?;
                loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                count += n;
                correct += c;
                let g = loss.backward()?;
                for (slot, p) in grads.iter_mut().zip(&self.params) {
                    if let Some(gp) = g.get(p.var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + gp)?,
                            None => gp.clone(),
                        });
                    }
                }
            }
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&self.params)
                .map(|(g, p)| g.map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            let grad_norm = self.opt.step(&self.params, &grads, count, lr)?;
            self.state.step += 1;
            self.state.trained_tokens += real_tokens as u64;
            self.state.cursor = self.batcher.cursor();
            tokens_since_start += real_tokens as u64;
            let loss = loss_sum / count.max(1.0);
            last_loss = Some(loss);
            let elapsed = started.elapsed().as_secs_f64();
            let done = (self.state.step - start_step) as f64;
            let tps = tokens_since_start as f64 / elapsed.max(1e-9);
            on_event(&TrainEvent::Step(StepMetrics {
                step: self.state.step,
                total_steps: self.total_steps,
                epoch: self.state.cursor.epoch as usize,
                loss,
                mean_token_accuracy: correct as f64 / count.max(1.0),
                learning_rate: lr,
                grad_norm,
                tokens_per_sec: tps,
                trained_tokens: self.state.trained_tokens,
                eta_secs: elapsed / done * (self.total_steps - self.state.step) as f64,
            }));
            let at_end = self.state.step == self.total_steps;
            let eval_now = at_end
                || (self.config.eval_every > 0
                    && self.state.step.is_multiple_of(self.config.eval_every));
            if eval_now {
                if let Some(m) = self.evaluate()? {
                    on_event(&TrainEvent::Eval(m));
                    last_eval = Some(m);
                    let improved = self.state.best_valid.is_none_or(|b| m.valid_loss < b);
                    if improved {
                        self.state.best_valid = Some(m.valid_loss);
                        self.state.evals_without_improvement = 0;
                    } else {
                        self.state.evals_without_improvement += 1;
                    }
                    if let Some(p) = self.config.early_stopping_patience {
                        if !at_end && self.state.evals_without_improvement >= p {
                            on_event(&TrainEvent::Message(format!(
                                "early stopping: validation loss has not improved for {p} evaluations"
                            )));
                            finish = Finish::EarlyStopped;
                        }
                    }
                }
            }
            if let Some(dir) = out_dir {
                if self.config.checkpoint_every > 0
                    && self.state.step.is_multiple_of(self.config.checkpoint_every)
                    && !at_end
                {
                    let path = dir
                        .join("checkpoints")
                        .join(format!("step-{}", self.state.step));
                    self.save_checkpoint(&path)?;
                    on_event(&TrainEvent::Checkpoint {
                        step: self.state.step,
                        path,
                    });
                }
            }
            if finish == Finish::EarlyStopped {
                break;
            }
        }
        if let Some(dir) = out_dir {
            if finish != Finish::Cancelled {
                self.save_result(dir)?;
            }
        }
        Ok(TrainOutcome {
            finish,
            steps: self.state.step,
            trained_tokens: self.state.trained_tokens,
            last_loss,
            last_eval,
        })
    }

    /// The trained variant as a servable adapter (detached from the training graph).
    /// None for full SFT, whose result is a model directory.
    pub fn adapter(&self) -> Result<Option<Adapter>, TrainError> {
        Ok(match &self.trainable {
            Trainable::Adapter(a) => Some(a.detached(&self.base.cfg)?),
            Trainable::Prefix(c, p) => Some(Adapter::Prefix(Prefix::from_flat(
                &self.base.cfg,
                c.clone(),
                p.project()?.detach(),
            )?)),
            Trainable::Full(_) => None,
        })
    }

    /// Writes the final result: a PEFT adapter directory, or for full SFT an HF model directory.
    pub fn save_result(&self, dir: &Path) -> Result<(), TrainError> {
        match (&self.trainable, self.adapter()?) {
            (_, Some(a)) => peft::save(dir, &a, &self.base.cfg, &self.base_name)?,
            (Trainable::Full(m), None) => {
                let text = self.text.ok_or_else(|| TrainError::Config {
                    field: "method".into(),
                    message: "saving a full fine-tune needs the base model's tokenizer".into(),
                })?;
                crate::model::hf::save_model_dir(dir, m, text)?
            }
            _ => {}
        }
        Ok(())
    }

    /// Adapter (servable) + trainable params + optimizer moments + trainer state (cursor, step).
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), TrainError> {
        let params: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect();
        let opt = self.opt.state_tensors(&self.params);
        let mut state = self.state.clone();
        state.adam_t = self.opt.t;
        let state_json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let adapter = self.adapter()?;
        let model_cfg = self.base.cfg.clone();
        let base_name = self.base_name.clone();
        peft::write_atomically(path, |tmp| {
            let err = |e: candle_core::Error| peft::PeftError::Weights(e.to_string());
            if let Some(a) = &adapter {
                // Servable as is: the PEFT files sit at the checkpoint's top level.
                let cfg = serde_json::to_vec_pretty(&peft::config_json(a, &model_cfg, &base_name))
                    .map_err(|e| peft::PeftError::Config(e.to_string()))?;
                let p = tmp.join(peft::CONFIG_FILE);
                std::fs::write(&p, cfg).map_err(|source| peft::PeftError::Io {
                    path: p.clone(),
                    source,
                })?;
                let tensors: HashMap<String, Tensor> = a.tensors().into_iter().collect();
                candle_core::safetensors::save(&tensors, tmp.join(peft::WEIGHTS_FILE))
                    .map_err(err)?;
            }
            candle_core::safetensors::save(&params, tmp.join("trainable.safetensors"))
                .map_err(err)?;
            candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors")).map_err(err)?;
            let p = tmp.join("trainer_state.json");
            std::fs::write(&p, &state_json).map_err(|source| peft::PeftError::Io {
                path: p.clone(),
                source,
            })?;
            let entries = std::fs::read_dir(tmp).map_err(|source| peft::PeftError::Io {
                path: tmp.to_path_buf(),
                source,
            })?;
            for f in entries.flatten() {
                let _ = std::fs::File::open(f.path()).and_then(|h| h.sync_all());
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Starts from the adapter saved in the PEFT directory `dir` (its weights file), as
    /// [`Self::init_from`]: `itamaed train --init-adapter` and continued fine-tuning jobs.
    pub fn init_from_dir(&mut self, dir: &Path) -> Result<(), TrainError> {
        let file = dir.join(peft::WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&file, self.base.device()).map_err(|e| {
            TrainError::Config {
                field: "init_adapter".into(),
                message: format!("reading {}: {e}", file.display()),
            }
        })?;
        self.init_from(&tensors)
    }

    /// Continues exactly where the checkpoint at `path` left off.
    /// Starts from an adapter's weights (PEFT's `adapter_model.safetensors` keys) instead of
    /// the method's fresh init, e.g. the very init PEFT drew, to compare training curves.
    /// LoRA, prompt tuning and prefix tuning without projection (a saved prefix holds the MLP's
    /// output, not the MLP).
    pub fn init_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let bad = |message: String| TrainError::Config {
            field: "init_adapter".into(),
            message,
        };
        if matches!(&self.trainable, Trainable::Full(_))
            || matches!(&self.trainable, Trainable::Prefix(_, p) if p.mlp.is_some())
        {
            return Err(bad(format!(
                "{} cannot start from a saved adapter",
                self.config.method.name()
            )));
        }
        for p in &self.params {
            let key = if p.name == "prefix.embedding" {
                "prompt_embeddings"
            } else {
                p.name.as_str()
            };
            let t = tensors
                .get(key)
                .ok_or_else(|| bad(format!("the adapter lacks `{key}`")))?;
            if t.dims() != p.var.dims() {
                return Err(bad(format!(
                    "`{key}` has shape {:?}, the method needs {:?}",
                    t.dims(),
                    p.var.dims()
                )));
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    pub fn resume_from(&mut self, path: &Path) -> Result<(), TrainError> {
        let ck = |message: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let sp = path.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| ck(e.to_string()))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| ck(e.to_string()))?;
        if state.method != self.config.method.name() {
            return Err(ck(format!(
                "made by method {}, not {}",
                state.method,
                self.config.method.name()
            )));
        }
        let dev = self.base.device();
        let params = candle_core::safetensors::load(path.join("trainable.safetensors"), dev)
            .map_err(|e| ck(e.to_string()))?;
        for p in &self.params {
            let t = params
                .get(&p.name)
                .ok_or_else(|| ck(format!("lacks parameter `{}`", p.name)))?;
            if t.dims() != p.var.dims() {
                return Err(ck(format!("parameter `{}` has the wrong shape", p.name)));
            }
            p.var.set(t)?;
        }
        let opt = candle_core::safetensors::load(path.join("optimizer.safetensors"), dev)
            .map_err(|e| ck(e.to_string()))?;
        self.opt.load_state(&self.params, state.adam_t, &opt)?;
        self.batcher.seek(state.cursor)?;
        self.state = state;
        Ok(())
    }
}

fn batch_options(c: &TrainConfig, pack: bool) -> BatchOptions {
    BatchOptions {
        batch_size: c.batch_size,
        max_seq_len: c.max_seq_len,
        pack,
        seed: c.seed,
    }
}

/// LM-head cross-entropy without materialising the logits: weighted NLL sum (a scalar tensor
/// carrying the gradient), weight sum, correct argmax predictions among weighted tokens.
fn lm_loss(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<(Tensor, f64, usize)> {
    let (loss, stats) = ops::loss::lm_head_cross_entropy(hidden, head, targets, weights)?;
    Ok((loss, stats.weight_sum, stats.correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{LoraConfig, PromptInit, PromptTuningConfig};
    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;
    use candle_core::Device;

    /// LoRA's "auto" rate: the reference at 7B-class widths, up to 5x it on narrow models;
    /// the other methods' rates do not depend on the width.
    #[test]
    fn lora_default_rate_grows_as_the_model_narrows() {
        let lora = Method::Lora(Default::default());
        let rate = |h| default_learning_rate(&lora, h);
        assert_eq!(rate(4096), 2e-4);
        assert_eq!(rate(8192), 2e-4);
        assert!((rate(2048) - 4e-4).abs() < 1e-12);
        assert!((rate(896) - 2e-4 * 4096.0 / 896.0).abs() < 1e-12);
        assert!((rate(576) - 1e-3).abs() < 1e-12);
        assert!((rate(64) - 1e-3).abs() < 1e-12);
        let prompt = Method::PromptTuning(Default::default());
        assert_eq!(
            default_learning_rate(&prompt, 576),
            default_learning_rate(&prompt, 4096)
        );
    }

    fn examples(n: usize, seed: u32) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let len = 5 + (i % 4);
                let ids: Vec<u32> = (0..len)
                    .map(|j| ((i as u32 * 7 + j as u32 * 3 + seed) % 60) + 1)
                    .collect();
                let mut weights = vec![1.0; len];
                weights[0] = 0.0;
                weights[1] = 0.0;
                Example { ids, weights }
            })
            .collect()
    }

    fn tiny_text() -> TextSpec {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1},"unk_token":"<unk>"}}"#;
        TextSpec {
            tokenizer: json.parse().unwrap(),
            chat_template: None,
            bos_token: None,
            bos_id: None,
            eos_token: None,
            eos_ids: vec![0],
            add_bos: false,
        }
    }

    fn methods() -> Vec<Method> {
        vec![
            Method::Lora(LoraConfig {
                r: Some(4),
                alpha: Some(8.0),
                dropout: Some(0.1),
                target_modules: Some(vec!["all-linear".into()]),
                use_rslora: Some(false),
            }),
            Method::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: Some(4),
                init: Some(PromptInit::SampleVocab),
                init_text: None,
            }),
            Method::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: Some(3),
                prefix_projection: Some(true),
                encoder_hidden_size: Some(16),
            }),
            Method::Full,
        ]
    }

    fn config(method: Method) -> TrainConfig {
        let lr = match method {
            Method::Full => 3e-3,
            Method::Lora(_) => 1e-2,
            _ => 5e-2,
        };
        TrainConfig {
            epochs: 1,
            max_steps: Some(30),
            batch_size: 4,
            learning_rate: lr,
            warmup_ratio: 0.0,
            schedule: Schedule::Constant,
            ..TrainConfig::new(method)
        }
    }

    #[test]
    fn every_method_overfits_a_batch_and_leaves_the_base_untouched() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let before: Vec<Vec<f32>> = m
            .named_weights()
            .unwrap()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        for method in methods() {
            let name = method.name();
            let mut t = Trainer::new(
                &m,
                None,
                "tiny",
                // the model is random (unseeded): enough steps that every draw gets there
                TrainConfig {
                    max_steps: Some(60),
                    ..config(method)
                },
                examples(4, 0),
                vec![],
                &[1, 2, 3],
            )
            .unwrap();
            let mut losses = Vec::new();
            t.run(None, &TrainControl::default(), &mut |e| {
                if let TrainEvent::Step(s) = e {
                    losses.push(s.loss)
                }
            })
            .unwrap();
            let (first, last) = (losses[0], *losses.last().unwrap());
            assert!(last < 0.7 * first, "{name}: loss {first} -> {last}");
            // every trainable tensor moved
            for p in &t.params {
                let init_is_zero = p.name.contains("lora_B");
                let _ = init_is_zero;
                let n = p
                    .var
                    .as_tensor()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{name}: {} is all zeros", p.name);
            }
        }
        let after: Vec<Vec<f32>> = m
            .named_weights()
            .unwrap()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        assert!(before == after, "frozen base weights changed");
    }

    #[test]
    fn gradients_reach_every_trainable_tensor() {
        let m = Transformer::random(tiny_config(Arch::Qwen2), &Device::Cpu).unwrap();
        for method in methods() {
            let name = method.name();
            let mut cfg = config(method);
            cfg.max_steps = Some(2);
            let mut t =
                Trainer::new(&m, None, "tiny", cfg, examples(4, 1), vec![], &[1, 2, 3]).unwrap();
            let start: Vec<Vec<f32>> = t
                .params
                .iter()
                .map(|p| {
                    p.var
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            t.run(None, &TrainControl::default(), &mut |_| {}).unwrap();
            for (p, s) in t.params.iter().zip(&start) {
                let now = p
                    .var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(&now != s, "{name}: {} did not change", p.name);
            }
        }
    }

    #[test]
    fn resume_matches_an_uninterrupted_run() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("itamae-resume-{}", rand::random::<u64>()));
        for method in methods() {
            let name = method.name();
            let mut cfg = config(method);
            cfg.max_steps = Some(8);
            cfg.batch_size = 2;
            cfg.grad_accum = 2;
            cfg.schedule = Schedule::Cosine;
            cfg.warmup_ratio = 0.25;
            cfg.checkpoint_every = 3;
            let data = examples(7, 2);
            let record = |t: &mut Trainer, stop_at: Option<usize>| {
                let control = TrainControl::default();
                let mut losses = Vec::new();
                t.run(Some(&dir), &control, &mut |e| {
                    if let TrainEvent::Step(s) = e {
                        losses.push((s.step, s.loss));
                        if Some(s.step) == stop_at {
                            control.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                })
                .unwrap();
                losses
            };
            let text = tiny_text();
            let new = || {
                Trainer::new(
                    &m,
                    Some(&text),
                    "tiny",
                    cfg.clone(),
                    data.clone(),
                    vec![],
                    &[1, 2, 3],
                )
                .unwrap()
            };
            let mut full = new();
            let all = record(&mut full, None);
            let mut first = new();
            let head = record(&mut first, Some(4));
            assert_eq!(head.len(), 4, "{name}: cancel stops between steps");
            // resume from the step-3 checkpoint (step 4 ran past it and is redone)
            let mut resumed = new();
            resumed
                .resume_from(&dir.join("checkpoints").join("step-3"))
                .unwrap();
            let tail = record(&mut resumed, None);
            assert_eq!(tail.first().map(|x| x.0), Some(4));
            for (a, b) in all[3..].iter().zip(&tail) {
                assert_eq!(a.0, b.0);
                assert!(
                    (a.1 - b.1).abs() < 1e-5,
                    "{name}: step {} loss {} vs resumed {}",
                    a.0,
                    a.1,
                    b.1
                );
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    #[test]
    fn evaluation_and_saved_adapter_agree() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("itamae-save-{}", rand::random::<u64>()));
        for method in methods().into_iter().take(3) {
            let mut cfg = config(method);
            cfg.max_steps = Some(5);
            let mut t = Trainer::new(
                &m,
                None,
                "tiny",
                cfg,
                examples(4, 3),
                examples(3, 9),
                &[1, 2, 3],
            )
            .unwrap();
            let out = t
                .run(Some(&dir), &TrainControl::default(), &mut |_| {})
                .unwrap();
            let eval = out.last_eval.unwrap();
            // the saved adapter, loaded back, gives the same validation loss
            let a = crate::adapters::peft::load(&dir, &m.cfg, &Device::Cpu).unwrap();
            let again = t.loss_of_adapter(&a).unwrap();
            assert!(
                (again - eval.valid_loss).abs() < 1e-5,
                "{} vs {}",
                again,
                eval.valid_loss
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_configs_name_the_field() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let mut c = config(methods().remove(1));
        c.pack = true;
        let e = Trainer::new(&m, None, "tiny", c, examples(2, 0), vec![], &[1, 2, 3])
            .err()
            .unwrap();
        assert!(e.to_string().contains("`pack`"), "{e}");
        let mut c = config(methods().remove(0));
        c.batch_size = 0;
        let e = Trainer::new(&m, None, "tiny", c, examples(2, 0), vec![], &[1, 2, 3])
            .err()
            .unwrap();
        assert!(e.to_string().contains("batch_size"), "{e}");
    }
}
