//! [`EngineHandle`]: what HTTP workers and the jobs runner hold. It starts the engine thread,
//! prepares requests on the caller's side and queues them, and manages the served variants.
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::prompt_cache::VariantKey;
use super::registry::Variant;
use super::scheduler::{run, warm, MAX_WAITING};
use super::{now, split, BaseModel, Shared};
use super::{EngineError, GenEvent, GenerationRequest, ModelCard, PromptInput, SamplingParams};
use crate::adapters::Adapter;
use crate::model::{self, LoadedModel};

/// A validated, tokenized request ready to run.
pub struct Prepared {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Choices to generate (OpenAI `n`): one prefill, then one sequence each.
    pub n: usize,
    /// The served model id asked for (metrics label).
    pub(super) model: String,
    pub(super) adapter: Option<Arc<Adapter>>,
    /// Which weights the prompt runs through (the prompt cache's key).
    pub(super) cache_key: VariantKey,
    pub(super) tokens: Vec<u32>,
    pub(super) sampling: SamplingParams,
    pub(super) stop: Vec<String>,
    /// The output grammar of each choice (empty: none), their first masks already under way.
    pub(super) guides: Vec<super::constraint::Guide>,
    /// Set when tool calls are parsed out of the output.
    pub(super) tool_calls: bool,
    /// The prompt as given, when it is to be echoed back (completions `echo`).
    pub(super) echo: Option<String>,
}

impl Prepared {
    /// What a further choice of this request runs with: the same prompt, variant and
    /// parameters (its grammar state is its own, taken from [`Self::guides`]).
    pub(super) fn for_choice(&self) -> Prepared {
        Prepared {
            prompt_tokens: self.prompt_tokens,
            max_tokens: self.max_tokens,
            n: 1,
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            cache_key: self.cache_key.clone(),
            tokens: self.tokens.clone(),
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            guides: Vec::new(),
            tool_calls: self.tool_calls,
            echo: self.echo.clone(),
        }
    }
}

/// A prepared request queued to the engine thread, with the channels its events go to.
pub(super) struct Job {
    pub(super) p: Prepared,
    /// Choice 0's events.
    pub(super) events: UnboundedSender<GenEvent>,
    /// The events of choices 1..n, in order.
    pub(super) choices: Vec<UnboundedSender<GenEvent>>,
    pub(super) submitted: std::time::Instant,
}

/// Cheap to clone; shared by every HTTP worker.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<OnceLock<Result<Arc<Shared>, String>>>,
    queue: std_mpsc::Sender<Job>,
}

impl EngineHandle {
    /// Starts the engine thread, which loads the model from `path` (GGUF file or HF directory)
    /// and then serves, holding the weights as `weights` says. [`Self::wait_loaded`] tells how
    /// the load went.
    pub fn start(path: PathBuf, device: Device, weights: model::WeightsMode) -> Self {
        let shared = Arc::new(OnceLock::new());
        let (tx, rx) = std_mpsc::channel();
        let slot = shared.clone();
        std::thread::Builder::new()
            .name("itamae-engine".into())
            .spawn(move || match model::load(&path, &device, weights) {
                Ok(loaded) => {
                    let (model, sh) = split(loaded);
                    let sh = Arc::new(sh);
                    let _ = slot.set(Ok(sh.clone()));
                    tracing::info!(
                        model = %sh.id,
                        context = sh.context,
                        weights = %sh.base.weights,
                        weight_bytes = sh.base.model.weight_bytes(),
                        "model loaded"
                    );
                    run(model, sh, rx);
                }
                Err(e) => {
                    let msg = format!("cannot load model {}: {e}", path.display());
                    tracing::error!("{msg}");
                    let _ = slot.set(Err(msg));
                }
            })
            .expect("spawning the engine thread");
        Self { shared, queue: tx }
    }

    /// Serves an already loaded model (tests, benchmarks).
    pub fn from_loaded(loaded: LoadedModel) -> Self {
        let (model, sh) = split(loaded);
        let sh = Arc::new(sh);
        let (tx, rx) = std_mpsc::channel();
        let run_sh = sh.clone();
        std::thread::Builder::new()
            .name("itamae-engine".into())
            .spawn(move || run(model, run_sh, rx))
            .expect("spawning the engine thread");
        Self {
            shared: Arc::new(OnceLock::from(Ok(sh))),
            queue: tx,
        }
    }

    /// Blocks until the load finished; the error says why it failed.
    pub fn wait_loaded(&self) -> Result<(), String> {
        loop {
            match self.shared.get() {
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => return Err(e.clone()),
                None => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    fn shared(&self) -> Result<&Arc<Shared>, EngineError> {
        match self.shared.get() {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(EngineError::Unavailable(e.clone())),
            None => Err(EngineError::NotReady),
        }
    }

    /// True once the model is loaded and the engine thread runs.
    pub fn is_ready(&self) -> bool {
        matches!(self.shared.get(), Some(Ok(_)))
    }

    /// The base model, then every variant by id.
    pub fn models(&self) -> Vec<ModelCard> {
        let Ok(s) = self.shared() else {
            return Vec::new();
        };
        let mut out = vec![ModelCard {
            id: s.id.clone(),
            created: s.created,
            owned_by: "itamae".into(),
            context_length: s.context,
            parent: None,
            adapter_type: None,
            weights: Some((s.base.weights, s.base.model.weight_bytes() as u64)),
            resident: true,
        }];
        let adapters = s.adapters.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<&String> = adapters.keys().collect();
        ids.sort();
        for id in ids {
            let v = &adapters[id];
            out.push(ModelCard {
                id: id.clone(),
                created: v.created,
                owned_by: "itamae".into(),
                context_length: s.context,
                parent: Some(s.id.clone()),
                adapter_type: Some(v.kind.into()),
                weights: None,
                resident: v.adapter.is_some(),
            });
        }
        out
    }

    /// Serves `adapter` as model `id` from the next request on (replacing a variant of that id).
    /// It stays loaded whatever the budget: without a `source` it could not come back.
    pub fn add_adapter(&self, id: &str, adapter: Adapter) -> Result<(), EngineError> {
        self.insert_variant(id, adapter, None)
    }

    /// As [`Self::add_adapter`], for an adapter read from the PEFT directory `source`: when the
    /// loaded adapters exceed the memory budget, it may be evicted (still listed and servable)
    /// and is read again from `source` by the first request that needs it.
    pub fn add_adapter_from(
        &self,
        id: &str,
        adapter: Adapter,
        source: &std::path::Path,
    ) -> Result<(), EngineError> {
        self.insert_variant(id, adapter, Some(source.to_path_buf()))
    }

    fn insert_variant(
        &self,
        id: &str,
        adapter: Adapter,
        source: Option<PathBuf>,
    ) -> Result<(), EngineError> {
        use std::sync::atomic::Ordering;
        let s = self.shared()?;
        if id == s.id {
            return Err(EngineError::Invalid {
                param: "id".into(),
                message: format!("`{id}` is the base model's id"),
            });
        }
        let mut adapter = adapter;
        adapter
            .prepare_for_serving()
            .map_err(|e| EngineError::Internal(format!("preparing adapter `{id}`: {e}")))?;
        let v = Variant {
            kind: adapter.kind(),
            bytes: adapter.size_bytes() as u64,
            adapter: Some(Arc::new(adapter)),
            created: now(),
            source,
            last_used: s.clock.fetch_add(1, Ordering::Relaxed).into(),
            generation: s.generations.fetch_add(1, Ordering::Relaxed),
        };
        let key = VariantKey {
            model: id.to_string(),
            generation: Some(v.generation),
        };
        let adapter = v.adapter.clone();
        {
            let mut adapters = s.adapters.write().unwrap_or_else(|e| e.into_inner());
            adapters.insert(id.to_string(), v);
            s.enforce_budget(&mut adapters, Some(id));
        }
        // A replaced variant's cached prompts were computed with its old weights.
        s.prompt_cache(|pc| pc.remove_model(id));
        // Its first chat should not pay for the template's preamble. Prefilled here, on the
        // caller's thread (the engine thread keeps serving meanwhile), before returning: a job
        // records its success, and an import answers, only once the variant is warm.
        warm(&s.base.model, s, key, adapter, &s.preamble);
        Ok(())
    }

    /// Stops serving a variant; running requests finish on it. False if it was not served.
    pub fn remove_adapter(&self, id: &str) -> Result<bool, EngineError> {
        let s = self.shared()?;
        let mut adapters = s.adapters.write().unwrap_or_else(|e| e.into_inner());
        let removed = adapters.remove(id).is_some();
        s.publish_resident(&adapters);
        drop(adapters);
        s.prompt_cache(|pc| pc.remove_model(id));
        Ok(removed)
    }

    /// Sets the memory budget of loaded adapters (None: no limit) and evicts down to it.
    pub fn set_adapter_budget(&self, bytes: Option<u64>) -> Result<(), EngineError> {
        let s = self.shared()?;
        *s.budget.write().unwrap_or_else(|e| e.into_inner()) = bytes;
        let mut adapters = s.adapters.write().unwrap_or_else(|e| e.into_inner());
        s.enforce_budget(&mut adapters, None);
        Ok(())
    }

    /// Whether `id` is a served variant (loaded or evicted).
    pub fn is_served(&self, id: &str) -> bool {
        self.shared().is_ok_and(|s| {
            s.adapters
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(id)
        })
    }

    /// Loads an evicted variant again now (blocking; a no-op if it is loaded).
    pub fn make_resident(&self, id: &str) -> Result<(), EngineError> {
        self.shared()?.variant(id).map(|_| ())
    }

    /// Sets the prompt cache's byte budget (0 disables it and drops what it holds).
    pub fn set_prompt_cache_bytes(&self, bytes: u64) -> Result<(), EngineError> {
        let s = self.shared()?;
        let was_on = s.prompt_cache(|pc| {
            let on = pc.enabled();
            pc.set_budget(bytes);
            on
        });
        // Turned on (again): the base's preamble, as at start.
        if !was_on && bytes > 0 {
            let key = VariantKey {
                model: s.id.clone(),
                generation: None,
            };
            warm(&s.base.model, s, key, None, &s.preamble);
        }
        Ok(())
    }

    /// Bytes the prompt cache holds (0 when not loaded).
    pub fn prompt_cache_bytes(&self) -> u64 {
        self.shared().map_or(0, |s| s.prompt_cache(|pc| pc.bytes()))
    }

    /// Generations running or waiting: the load signal the trainer yields to (0 when idle or
    /// not loaded).
    pub fn load(&self) -> usize {
        use std::sync::atomic::Ordering;
        self.shared().map_or(0, |s| {
            s.running.load(Ordering::Acquire) + s.waiting.load(Ordering::Acquire)
        })
    }

    /// Prompt tokens prefilled since the start (0 when not loaded): the model work of
    /// prompts, whatever the number of choices asked of each.
    pub fn prefilled_tokens(&self) -> u64 {
        self.shared().map_or(0, |s| {
            s.prefilled.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Stops the engine thread at its next step: queued and running generations end with an
    /// error event. Waits up to `timeout` for the thread to return; false if it did not.
    /// Called last on shutdown, so that no tensor work (BLAS threads included) is in flight
    /// while the process exits.
    pub fn shutdown(&self, timeout: std::time::Duration) -> bool {
        let Ok(sh) = self.shared() else {
            return true; // never loaded: no thread computes
        };
        sh.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (m, cv) = &sh.stopped;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    /// The resident base model: training borrows these very tensors (no second copy).
    pub fn base(&self) -> Result<BaseModel, EngineError> {
        Ok(self.shared()?.base.clone())
    }

    /// The base model's architecture (for loading adapters against it).
    pub fn model_config(&self) -> Result<model::ModelConfig, EngineError> {
        Ok(self.shared()?.config.clone())
    }

    /// Renders the chat template, tokenizes and checks lengths against the context:
    /// errors name the request field (`messages`, `prompt`, `max_tokens`, `model`, ...).
    pub fn prepare(&self, req: GenerationRequest) -> Result<Prepared, EngineError> {
        let sh = self.shared()?;
        let (adapter, generation) = if req.model == sh.id {
            (None, None)
        } else {
            let (a, generation) = sh.variant(&req.model)?;
            (Some(a), Some(generation))
        };
        let cache_key = VariantKey {
            model: req.model.clone(),
            generation,
        };
        // Virtual tokens (soft prompt or prefix) take context positions too.
        let virtual_tokens = adapter.as_deref().map_or(0, |a| match a {
            Adapter::Prompt(p) => p.len(),
            Adapter::Prefix(p) => p.len(),
            Adapter::Lora(_) => 0,
        });
        req.sampling.validate()?;
        let invalid = |param: &str, message: String| EngineError::Invalid {
            param: param.into(),
            message,
        };
        let (param, text, add_bos) = match &req.input {
            PromptInput::Chat { messages } => {
                if messages.is_empty() {
                    return Err(invalid("messages", "messages must not be empty".into()));
                }
                let tpl = sh.base.template.as_deref().ok_or_else(|| {
                    invalid(
                        "messages",
                        "this model has no chat template; use /v1/completions".into(),
                    )
                })?;
                let tools = req.guided.tools.as_ref().map(|t| t.defs.as_slice());
                if tools.is_some() && !tpl.supports_tools() {
                    return Err(invalid(
                        "tools",
                        "this model's chat template does not support tools".into(),
                    ));
                }
                let text = tpl
                    .render_with_tools(messages, tools, true)
                    .map_err(|e| invalid("messages", e.to_string()))?;
                // The template writes BOS itself when the model wants one.
                ("messages", text, false)
            }
            PromptInput::Text(t) => ("prompt", t.clone(), sh.base.text.add_bos),
        };
        let enc = sh
            .base
            .text
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| EngineError::Internal(format!("tokenizer: {e}")))?;
        let mut tokens = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            tokens.extend(sh.base.text.bos_id);
        }
        tokens.extend_from_slice(enc.get_ids());
        if tokens.is_empty() {
            return Err(invalid(param, format!("{param} is empty")));
        }
        let n = tokens.len();
        let context = sh.context.saturating_sub(virtual_tokens);
        if n >= context {
            return Err(invalid(
                param,
                format!(
                    "the prompt has {n} tokens, but the model's context is {context} tokens (room must be left for at least one generated token)"
                ),
            ));
        }
        let vocab = sh.config.vocab_size;
        if let Some(&(id, _)) = req
            .sampling
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab)
        {
            return Err(invalid(
                "logit_bias",
                format!("logit_bias names token {id}, but the vocabulary has {vocab} tokens (ids 0 to {})", vocab - 1),
            ));
        }
        let room = context - n;
        let max_tokens = match req.max_tokens {
            None => room,
            Some(0) => return Err(invalid("max_tokens", "max_tokens must be at least 1".into())),
            Some(m) if m > room => {
                return Err(invalid(
                    "max_tokens",
                    format!(
                        "max_tokens is {m}, but the prompt ({n} tokens) leaves room for {room} tokens in the model's context of {context}"
                    ),
                ))
            }
            Some(m) => m,
        };
        let tools = req.guided.tools.as_ref();
        let forced = tools.and_then(|t| t.forced());
        let choices = super::types::check_choices(req.n as u64)?;
        let guides = match forced.as_ref().or(req.guided.constraint.as_ref()) {
            Some(c) => (0..choices)
                .map(|_| sh.grammars.compile(c))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let echo = match &req.input {
            PromptInput::Text(t) if req.sampling.echo => Some(t.clone()),
            _ => None,
        };
        Ok(Prepared {
            n: choices,
            guides,
            tool_calls: tools.is_some_and(|t| t.parses_calls()),
            echo,
            prompt_tokens: n,
            max_tokens,
            model: req.model,
            adapter,
            cache_key,
            tokens,
            sampling: req.sampling,
            stop: req.stop,
        })
    }

    /// Queues a prepared single-choice request; events arrive on the returned receiver until
    /// `Finished` or `Failed`. Dropping the receiver cancels the generation.
    pub fn submit(&self, p: Prepared) -> Result<UnboundedReceiver<GenEvent>, EngineError> {
        if p.n != 1 {
            return Err(EngineError::Internal(format!(
                "a request for {} choices goes through submit_choices",
                p.n
            )));
        }
        let mut rxs = self.submit_choices(p)?;
        rxs.pop()
            .ok_or_else(|| EngineError::Internal("no receiver for the request".into()))
    }

    /// Queues a prepared request of `n` choices: one receiver per choice, in choice order,
    /// each getting that choice's events until its `Finished` or `Failed`. A choice whose
    /// receiver is dropped stops; the others go on.
    pub fn submit_choices(
        &self,
        p: Prepared,
    ) -> Result<Vec<UnboundedReceiver<GenEvent>>, EngineError> {
        use std::sync::atomic::Ordering;
        let sh = self.shared()?;
        let admitted = sh
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < MAX_WAITING).then_some(w + 1)
            });
        if admitted.is_err() {
            return Err(EngineError::Overloaded {
                retry_after_secs: 1,
            });
        }
        let (mut txs, rxs): (Vec<_>, Vec<_>) = (0..p.n.max(1)).map(|_| unbounded_channel()).unzip();
        let tx = txs.remove(0);
        let job = Job {
            p,
            events: tx,
            choices: txs,
            submitted: std::time::Instant::now(),
        };
        if self.queue.send(job).is_err() {
            sh.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable(
                "the engine thread has stopped".into(),
            ));
        }
        Ok(rxs)
    }
}

#[cfg(test)]
#[path = "choices_tests.rs"]
mod choices_tests;

#[cfg(test)]
#[path = "prompt_cache_tests.rs"]
mod prompt_cache_tests;
