//! The engine owns the resident model on a dedicated thread, so HTTP workers never run tensor
//! code. Requests are rendered, tokenized and validated on the caller's side
//! ([`EngineHandle::prepare`]: cheap, and errors can still become a 4xx before any streaming
//! starts), then queued to the engine thread ([`EngineHandle::submit`]), which interleaves the
//! active sequences one step at a time (prefill, then one decode step each, round robin), samples,
//! detokenizes and streams text back as [`GenEvent`]s.
pub mod detok;
pub mod sampling;
pub mod types;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::adapters::Adapter;
use crate::model::llama::{Ctx, ForwardHooks};
use crate::model::{self, ChatTemplate, KvCache, Llama, LoadedModel};
use detok::{Detokenizer, Filtered, StopFilter};
use sampling::Sampler;
pub use types::*;

/// What request handlers need of the loaded model, shared read-only with the engine thread.
struct Shared {
    id: String,
    config: model::ModelConfig,
    created: u64,
    base: BaseModel,
    context: usize,
    /// Served variants by id. Requests hold an `Arc` to the adapter they started with, so
    /// replacing, removing or evicting one never disturbs a running generation.
    adapters: RwLock<HashMap<String, Variant>>,
    /// Bytes of adapter weights kept loaded; least recently used variants beyond it are
    /// evicted (None: no limit).
    budget: RwLock<Option<u64>>,
    /// Set when eviction stopped short because every candidate was in use: the engine thread
    /// evicts again once sequences finish.
    over_budget: std::sync::atomic::AtomicBool,
    /// Serialises reloads of evicted variants, so concurrent first uses load once.
    reloading: std::sync::Mutex<()>,
    /// Orders uses for the LRU (a logical clock, bumped by every request's lookup).
    clock: std::sync::atomic::AtomicU64,
    /// Numbers each `add_adapter`, so a reload finishing after a replace is not installed.
    generations: std::sync::atomic::AtomicU64,
    /// Submitted requests not yet prefilled (bounded by [`MAX_WAITING`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Sequences in the running batch after the last step (see [`EngineHandle::load`]).
    running: std::sync::atomic::AtomicUsize,
    /// Set by [`EngineHandle::shutdown`]: the thread fails what it holds and returns.
    stop: std::sync::atomic::AtomicBool,
    /// True once the engine thread has returned.
    stopped: (std::sync::Mutex<bool>, std::sync::Condvar),
}

struct Variant {
    /// None while evicted.
    adapter: Option<Arc<Adapter>>,
    kind: &'static str,
    /// Bytes of the adapter's weights when loaded.
    bytes: u64,
    created: u64,
    /// The PEFT directory to reload it from; None: memory only, never evicted.
    source: Option<PathBuf>,
    last_used: std::sync::atomic::AtomicU64,
    generation: u64,
}

impl Variant {
    /// Loaded, evictable, and no request holds it (a running or prepared sequence owns a
    /// clone of the `Arc`).
    fn evictable(&self) -> bool {
        self.source.is_some()
            && self
                .adapter
                .as_ref()
                .is_some_and(|a| Arc::strong_count(a) == 1)
    }
}

/// The resident base model and its text side, shared (not copied) with whoever trains on it.
#[derive(Clone)]
pub struct BaseModel {
    pub model: Arc<Llama>,
    pub text: Arc<model::TextSpec>,
    pub template: Option<Arc<ChatTemplate>>,
    pub name: String,
    /// The hub id the model files name, if any ([`model::LoadedModel::hub_id`]).
    pub hub_id: Option<String>,
}

/// A validated, tokenized request ready to run.
pub struct Prepared {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// The served model id asked for (metrics label).
    model: String,
    adapter: Option<Arc<Adapter>>,
    tokens: Vec<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
}

struct Job {
    p: Prepared,
    events: UnboundedSender<GenEvent>,
    submitted: std::time::Instant,
}

/// Cheap to clone; shared by every HTTP worker.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<OnceLock<Result<Arc<Shared>, String>>>,
    queue: std_mpsc::Sender<Job>,
}

impl EngineHandle {
    /// Starts the engine thread, which loads the model from `path` (GGUF file or HF directory)
    /// and then serves. [`Self::wait_loaded`] tells how the load went.
    pub fn start(path: PathBuf, device: Device) -> Self {
        let shared = Arc::new(OnceLock::new());
        let (tx, rx) = std_mpsc::channel();
        let slot = shared.clone();
        std::thread::Builder::new()
            .name("itamae-engine".into())
            .spawn(move || match model::load(&path, &device) {
                Ok(loaded) => {
                    let (model, sh) = split(loaded);
                    let sh = Arc::new(sh);
                    let _ = slot.set(Ok(sh.clone()));
                    tracing::info!(model = %sh.id, context = sh.context, "model loaded");
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
        let mut adapters = s.adapters.write().unwrap_or_else(|e| e.into_inner());
        adapters.insert(id.to_string(), v);
        s.enforce_budget(&mut adapters, Some(id));
        Ok(())
    }

    /// Stops serving a variant; running requests finish on it. False if it was not served.
    pub fn remove_adapter(&self, id: &str) -> Result<bool, EngineError> {
        let s = self.shared()?;
        let mut adapters = s.adapters.write().unwrap_or_else(|e| e.into_inner());
        let removed = adapters.remove(id).is_some();
        s.publish_resident(&adapters);
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

    /// Generations running or waiting: the load signal the trainer yields to (0 when idle or
    /// not loaded).
    pub fn load(&self) -> usize {
        use std::sync::atomic::Ordering;
        self.shared().map_or(0, |s| {
            s.running.load(Ordering::Acquire) + s.waiting.load(Ordering::Acquire)
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
        let adapter = if req.model == sh.id {
            None
        } else {
            Some(sh.variant(&req.model)?)
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
                let text = tpl
                    .render(messages, true)
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
        Ok(Prepared {
            prompt_tokens: n,
            max_tokens,
            model: req.model,
            adapter,
            tokens,
            sampling: req.sampling,
            stop: req.stop,
        })
    }

    /// Queues a prepared request; events arrive on the returned receiver until `Finished` or `Failed`.
    /// Dropping the receiver cancels the generation.
    pub fn submit(&self, p: Prepared) -> Result<UnboundedReceiver<GenEvent>, EngineError> {
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
        let (tx, rx) = unbounded_channel();
        let job = Job {
            p,
            events: tx,
            submitted: std::time::Instant::now(),
        };
        if self.queue.send(job).is_err() {
            sh.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable(
                "the engine thread has stopped".into(),
            ));
        }
        Ok(rx)
    }
}

impl Shared {
    /// The adapter of variant `id`, read again from its directory first if it was evicted
    /// (blocking: callers run on a blocking thread); marks it used for the LRU.
    fn variant(&self, id: &str) -> Result<Arc<Adapter>, EngineError> {
        use std::sync::atomic::Ordering;
        let source = {
            let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
            let v = adapters
                .get(id)
                .ok_or_else(|| EngineError::ModelNotFound(id.to_string()))?;
            v.last_used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            match &v.adapter {
                Some(a) => return Ok(a.clone()),
                None => v.source.clone(),
            }
        };
        let Some(dir) = source else {
            return Err(EngineError::Internal(format!(
                "variant `{id}` was evicted but has no source to reload from"
            )));
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        // Someone else may have reloaded (or replaced) it while this request waited.
        let generation = {
            let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
            let v = adapters
                .get(id)
                .ok_or_else(|| EngineError::ModelNotFound(id.to_string()))?;
            if let Some(a) = &v.adapter {
                return Ok(a.clone());
            }
            v.generation
        };
        let started = std::time::Instant::now();
        let loaded = crate::adapters::peft::load(&dir, &self.config, self.base.model.device())
            .map_err(|e| e.to_string())
            .and_then(|mut a| {
                a.prepare_for_serving()
                    .map(|()| a)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| {
                EngineError::Internal(format!(
                    "reloading adapter `{id}` from {}: {e}",
                    dir.display()
                ))
            })?;
        let secs = started.elapsed().as_secs_f64();
        crate::metrics::global().adapter_loaded(id, secs);
        tracing::info!(adapter = %id, ms = (secs * 1e3) as u64, "adapter reloaded on demand");
        let loaded = Arc::new(loaded);
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        match adapters.get_mut(id) {
            Some(v) if v.generation == generation => {
                v.adapter = Some(loaded.clone());
                v.last_used.store(
                    self.clock.fetch_add(1, Ordering::Relaxed),
                    Ordering::Relaxed,
                );
            }
            // Replaced while loading: the request started before the replace, so the adapter
            // read now (the new files) is the newer one anyway, but the registry keeps its own.
            Some(v) => {
                if let Some(a) = &v.adapter {
                    return Ok(a.clone());
                }
            }
            None => return Err(EngineError::ModelNotFound(id.to_string())),
        }
        // The request's clone (`loaded`) keeps this one from being evicted right away.
        self.enforce_budget(&mut adapters, Some(id));
        Ok(loaded)
    }

    /// Evicts least recently used variants until the loaded ones fit the budget, never `keep`
    /// and never one a request holds; then publishes the resident gauge.
    fn enforce_budget(&self, adapters: &mut HashMap<String, Variant>, keep: Option<&str>) {
        use std::sync::atomic::Ordering;
        let mut over = false;
        if let Some(budget) = *self.budget.read().unwrap_or_else(|e| e.into_inner()) {
            let mut used: u64 = adapters
                .values()
                .filter(|v| v.adapter.is_some())
                .map(|v| v.bytes)
                .sum();
            while used > budget {
                let victim = adapters
                    .iter()
                    .filter(|(id, v)| Some(id.as_str()) != keep && v.evictable())
                    .min_by_key(|(_, v)| v.last_used.load(Ordering::Relaxed))
                    .map(|(id, _)| id.clone());
                let Some(id) = victim else {
                    over = true;
                    break;
                };
                if let Some(v) = adapters.get_mut(&id) {
                    v.adapter = None;
                    used = used.saturating_sub(v.bytes);
                    crate::metrics::global().adapter_evicted();
                    tracing::info!(adapter = %id, bytes = v.bytes, "adapter evicted (memory budget)");
                }
            }
            if over && !self.over_budget.load(Ordering::Relaxed) {
                tracing::info!(
                    used,
                    budget,
                    "loaded adapters exceed the memory budget until requests using them finish"
                );
            }
        }
        self.over_budget.store(over, Ordering::Relaxed);
        self.publish_resident(adapters);
    }

    fn publish_resident(&self, adapters: &HashMap<String, Variant>) {
        let m = crate::metrics::global();
        let loaded = adapters.values().filter(|v| v.adapter.is_some());
        m.set_adapters_resident(loaded.clone().count());
        m.set_adapters_resident_bytes(loaded.map(|v| v.bytes).sum());
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn split(l: LoadedModel) -> (Arc<Llama>, Shared) {
    let model = Arc::new(l.model);
    let sh = Shared {
        id: l.name.clone(),
        created: now(),
        config: model.cfg.clone(),
        adapters: RwLock::new(HashMap::new()),
        budget: RwLock::new(None),
        over_budget: Default::default(),
        reloading: Default::default(),
        clock: Default::default(),
        generations: Default::default(),
        waiting: Default::default(),
        running: Default::default(),
        stop: Default::default(),
        stopped: Default::default(),
        context: model.cfg.max_position_embeddings,
        base: BaseModel {
            model: model.clone(),
            text: Arc::new(l.text),
            template: l.template.map(Arc::new),
            name: l.name,
            hub_id: l.hub_id,
        },
    };
    (model, sh)
}

/// One sequence being generated.
struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt then generated ids.
    ids: Vec<u32>,
    /// The last sampled id: the next decode step's input.
    next: u32,
    /// When the previous token was streamed (inter-token latency).
    last_token: Option<std::time::Instant>,
    generated: usize,
    counts: HashMap<u32, usize>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopFilter,
}

enum Step {
    Continue,
    Done,
}

/// How often the idle engine thread looks for a shutdown.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Most sequences decoded together in one step; the rest wait (in order) for a slot.
pub const MAX_BATCH: usize = 16;

/// Most prompt tokens prefilled in one forward (a long prompt alone may exceed it): keeps the
/// running sequences' next token from waiting behind a very large prefill.
const PREFILL_BATCH_TOKENS: usize = 512;

/// Requests allowed to wait for a slot before new ones are refused (HTTP 429).
pub const MAX_WAITING: usize = 64;

/// Continuous batching: between two decode steps, at most one waiting sequence is prefilled
/// (so new requests start within one step while running streams keep their pace), then every
/// running sequence advances by one token in a single batched forward.
fn run(model: Arc<Llama>, sh: Arc<Shared>, rx: std_mpsc::Receiver<Job>) {
    struct Stopped<'a>(&'a Shared);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            let (m, cv) = &self.0.stopped;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
    }
    let _stopped = Stopped(&sh);
    let mut running: Vec<Seq> = Vec::new();
    let mut waiting: std::collections::VecDeque<Seq> = std::collections::VecDeque::new();
    loop {
        if sh.stop.load(std::sync::atomic::Ordering::SeqCst) {
            let e = candle_core::Error::Msg("the server is shutting down".into());
            for seq in running.drain(..).chain(waiting.drain(..)) {
                seq.fail(&e);
            }
            tracing::info!("engine stopped");
            return;
        }
        // Block only when idle (waking now and then to see a shutdown); otherwise take
        // whatever arrived since the last step.
        if running.is_empty() && waiting.is_empty() {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(job) => waiting.push_back(Seq::new(job, &model)),
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            waiting.push_back(Seq::new(job, &model));
        }
        // Clients that went away while waiting leave without costing a prefill.
        waiting.retain(|s| {
            let gone = s.client_gone();
            if gone {
                sh.waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            !gone
        });
        // The front of the queue and the requests right behind it, prefilled together (each
        // with its own adapter): a request that arrives while others wait no longer waits
        // for each of their prefills in turn.
        let mut group: Vec<Seq> = Vec::new();
        let mut group_tokens = 0;
        while running.len() + group.len() < MAX_BATCH {
            let Some(next) = waiting.front() else { break };
            let fits = match group.first() {
                None => true,
                Some(first) => {
                    first.joins_prefill()
                        && next.joins_prefill()
                        && group_tokens + next.job.p.prompt_tokens <= PREFILL_BATCH_TOKENS
                }
            };
            if !fits {
                break;
            }
            let Some(seq) = waiting.pop_front() else {
                break;
            };
            sh.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let queued = seq.job.submitted.elapsed().as_secs_f64();
            crate::metrics::global().observe_queue(&seq.job.p.model, queued);
            group_tokens += seq.job.p.prompt_tokens;
            group.push(seq);
        }
        if !group.is_empty() {
            crate::metrics::global().observe_prefill_batch(group.len());
        }
        if group.len() == 1 {
            let mut seq = group.remove(0);
            match seq.prefill(&model, &sh) {
                Ok(Step::Continue) => running.push(seq),
                Ok(Step::Done) => {}
                Err(e) => seq.fail(&e),
            }
        } else if !group.is_empty() {
            match prefill_group(&model, &mut group) {
                Ok(rows) => {
                    for (mut seq, row) in group.into_iter().zip(rows) {
                        if let Step::Continue = seq.accept(row, &sh) {
                            running.push(seq);
                        }
                    }
                }
                Err(e) => {
                    // Not one request's fault as far as we know: each gets its own prefill
                    // (on a fresh cache), so only a request that fails alone fails.
                    tracing::warn!("prefill of {} prompts together failed: {e}", group.len());
                    for mut seq in group {
                        seq.cache = KvCache::new(&model.cfg, seq.cache_capacity());
                        match seq.prefill(&model, &sh) {
                            Ok(Step::Continue) => running.push(seq),
                            Ok(Step::Done) => {}
                            Err(e) => seq.fail(&e),
                        }
                    }
                }
            }
        }
        running.retain(|s| !s.client_gone());
        sh.running
            .store(running.len(), std::sync::atomic::Ordering::Release);
        let m = crate::metrics::global();
        if !running.is_empty() {
            m.observe_batch_size(running.len());
            if let Err(e) = decode_step(&model, &sh, &mut running) {
                for seq in running.drain(..) {
                    seq.fail(&e);
                }
            }
        }
        // Sequences that finished in this step may have held adapters beyond the budget.
        if sh.over_budget.load(std::sync::atomic::Ordering::Relaxed) {
            let mut adapters = sh.adapters.write().unwrap_or_else(|e| e.into_inner());
            sh.enforce_budget(&mut adapters, None);
        }
        // After the step, so the gauges are current when the loop next blocks idle.
        sh.running
            .store(running.len(), std::sync::atomic::Ordering::Release);
        m.set_running(running.len());
        m.set_waiting(waiting.len());
    }
}

/// Each sequence's adapter, held (cloned `Arc`s) while the model borrows them as hooks.
fn adapters_of(seqs: &[Seq]) -> Vec<Option<Arc<Adapter>>> {
    seqs.iter().map(|s| s.job.p.adapter.clone()).collect()
}

fn hooks_of(adapters: &[Option<Arc<Adapter>>]) -> Vec<Option<&dyn ForwardHooks>> {
    adapters
        .iter()
        .map(|a| a.as_deref().map(|a| a as &dyn ForwardHooks))
        .collect()
}

/// Prefills sequences (see [`Seq::joins_prefill`]) in one forward; returns each one's logits.
fn prefill_group(model: &Llama, group: &mut [Seq]) -> candle_core::Result<Vec<Vec<f32>>> {
    let xs = group
        .iter()
        .map(|s| s.prompt_embeddings(model))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let adapters = adapters_of(group);
    let hooks = hooks_of(&adapters);
    let mut caches: Vec<&mut KvCache> = group.iter_mut().map(|s| &mut s.cache).collect();
    let logits = rayon::scope(|_| model.prefill_batch(&xs, &mut caches, &hooks))?;
    crate::model::llama::rows_f32(&logits)
}

/// One token for every running sequence.
fn decode_step(model: &Llama, sh: &Shared, running: &mut Vec<Seq>) -> candle_core::Result<()> {
    let tokens: Vec<u32> = running.iter().map(|s| s.next).collect();
    let adapters = adapters_of(running);
    let hooks = hooks_of(&adapters);
    let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|s| &mut s.cache).collect();
    // On a pool thread: the kernels of the step fork onto the pool many times, and from
    // outside it every fork also parks and wakes this thread.
    let logits = rayon::scope(|_| model.decode_batch(&tokens, &mut caches, &hooks))?;
    let rows = crate::model::llama::rows_f32(&logits)?;
    let mut keep = Vec::with_capacity(running.len());
    for (mut seq, row) in running.drain(..).zip(rows) {
        if let Step::Continue = seq.accept(row, sh) {
            keep.push(seq);
        }
    }
    *running = keep;
    Ok(())
}

impl Seq {
    fn new(job: Job, model: &Llama) -> Self {
        let cache = KvCache::new(&model.cfg, Self::capacity_for(&job));
        Self {
            ids: job.p.tokens.clone(),
            next: 0,
            last_token: None,
            generated: 0,
            counts: HashMap::new(),
            sampler: Sampler::new(job.p.sampling.clone()),
            detok: Detokenizer::new(),
            stop: StopFilter::new(job.p.stop.clone()),
            cache,
            job,
        }
    }

    /// The KV cache size a request needs: prompt, generation budget and a margin.
    fn capacity_for(job: &Job) -> usize {
        job.p.prompt_tokens + job.p.max_tokens + 64
    }

    fn cache_capacity(&self) -> usize {
        Self::capacity_for(&self.job)
    }

    /// True when the client dropped its receiver (disconnected); counted once per sequence,
    /// since the caller drops the sequence right after.
    fn client_gone(&self) -> bool {
        let gone = self.job.events.is_closed();
        if gone {
            crate::metrics::global().request_cancelled(&self.job.p.model);
        }
        gone
    }

    fn fail(&self, e: &candle_core::Error) {
        tracing::error!("generation failed: {e}");
        let _ = self.job.events.send(GenEvent::Failed(e.to_string()));
    }

    /// The prompt's embeddings `(1, l, hidden)`, after the soft prompt of a prompt-tuned
    /// variant.
    fn prompt_embeddings(&self, model: &Llama) -> candle_core::Result<Tensor> {
        let input = Tensor::new(self.job.p.tokens.as_slice(), model.device())?.unsqueeze(0)?;
        let x = model.embed(&input)?;
        match self.job.p.adapter.as_deref().and_then(Adapter::soft_prompt) {
            Some(soft) => Tensor::cat(&[&soft.unsqueeze(0)?, &x], 1),
            None => Ok(x),
        }
    }

    /// Whether this sequence can be prefilled in one forward with others: any mix of the base
    /// model and variants, except prefix-tuned ones (their prefix goes into the cache first).
    fn joins_prefill(&self) -> bool {
        self.cache.is_empty()
            && self
                .job
                .p
                .adapter
                .as_deref()
                .is_none_or(|a| a.prefix_len() == 0)
    }

    /// Runs the prompt (after the soft prompt of a prompt-tuned variant; a prefix-tuned
    /// variant's prefix is written into the cache by the model) and takes the first token.
    fn prefill(&mut self, model: &Llama, sh: &Shared) -> candle_core::Result<Step> {
        let x = self.prompt_embeddings(model)?;
        let ctx = Ctx {
            cache: Some(&mut self.cache),
            hooks: self
                .job
                .p
                .adapter
                .as_deref()
                .map(|a| a as &dyn ForwardHooks),
            packed: None,
        };
        let logits = rayon::scope(|_| model.last_logits(&x, ctx))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(self.accept(logits, sh))
    }

    fn finish(&mut self, reason: FinishReason) -> Step {
        let usage = Usage {
            prompt_tokens: self.job.p.prompt_tokens,
            completion_tokens: self.generated,
            total_tokens: self.job.p.prompt_tokens + self.generated,
        };
        let _ = self.job.events.send(GenEvent::Finished { reason, usage });
        Step::Done
    }

    fn emit(&mut self, text: String) -> bool {
        text.is_empty() || self.job.events.send(GenEvent::Text(text)).is_ok()
    }

    /// Samples the next token from `logits` and streams what it completes.
    fn accept(&mut self, mut logits: Vec<f32>, sh: &Shared) -> Step {
        if self.client_gone() {
            return Step::Done;
        }
        let id = self.sampler.sample(&mut logits, &self.ids, &self.counts);
        self.next = id;
        let now = std::time::Instant::now();
        if let Some(prev) = self.last_token.replace(now) {
            crate::metrics::global().observe_itl(&self.job.p.model, (now - prev).as_secs_f64());
        }
        if sh.base.text.eos_ids.contains(&id) && !self.job.p.sampling.ignore_eos {
            let rest = self.detok.flush(&sh.base.text.tokenizer) + &self.stop.flush();
            self.emit(rest);
            return self.finish(FinishReason::Stop);
        }
        self.generated += 1;
        self.ids.push(id);
        *self.counts.entry(id).or_default() += 1;
        let delta = self.detok.push(&sh.base.text.tokenizer, id);
        match self.stop.push(&delta) {
            Filtered::Stop(text) => {
                self.emit(text);
                return self.finish(FinishReason::Stop);
            }
            Filtered::Emit(text) => {
                if !self.emit(text) {
                    crate::metrics::global().request_cancelled(&self.job.p.model);
                    return Step::Done;
                }
            }
        }
        if self.generated >= self.job.p.max_tokens {
            let rest = self.detok.flush(&sh.base.text.tokenizer);
            let rest = match self.stop.push(&rest) {
                Filtered::Stop(t) => {
                    self.emit(t);
                    return self.finish(FinishReason::Stop);
                }
                Filtered::Emit(t) => t + &self.stop.flush(),
            };
            self.emit(rest);
            return self.finish(FinishReason::Length);
        }
        Step::Continue
    }
}
