//! The engine owns the resident model on a dedicated thread, so HTTP workers never run tensor
//! code. Requests are rendered, tokenized and validated on the caller's side
//! ([`EngineHandle::prepare`]: cheap, and errors can still become a 4xx before any streaming
//! starts), then queued to the engine thread ([`EngineHandle::submit`]), which interleaves the
//! active sequences one step at a time (prefill, then one decode step each, round robin), samples,
//! detokenizes and streams text back as [`GenEvent`]s.
//!
//! - `handle`: [`EngineHandle`], what HTTP workers and the jobs runner hold.
//! - `registry`: the served variants and the LRU memory budget that evicts and reloads them.
//! - `scheduler`: the engine thread's loop (continuous batching, prefill groups, sampling).
//! - `constraint`: structured outputs (grammar masks over the vocabulary); `tools`: tool
//!   definitions, forced calls and the parser of calls in the output.
//! - `logprobs`: the logprobs reported with tokens (and with an echoed prompt).
//! - `prompt_cache`: the keys and values of recent prompts, reused by requests that start with
//!   the same tokens on the same variant; warmed with the chat template's preamble.
pub mod constraint;
pub mod detok;
mod handle;
pub mod logprobs;
mod prompt_cache;
mod registry;
pub mod sampling;
mod scheduler;
pub mod tools;
pub mod types;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::{self, ChatTemplate, LoadedModel, Transformer};
pub use handle::{EngineHandle, Prepared};
use registry::Variant;
pub use scheduler::{MAX_BATCH, MAX_WAITING};
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
    /// Prompt tokens run through the model by prefills since the start (a request's `n`
    /// choices share one prefill).
    prefilled: std::sync::atomic::AtomicU64,
    /// Set by [`EngineHandle::shutdown`]: the thread fails what it holds and returns.
    stop: std::sync::atomic::AtomicBool,
    /// True once the engine thread has returned.
    stopped: (std::sync::Mutex<bool>, std::sync::Condvar),
    /// Structured outputs: the vocabulary trie and compiled grammars.
    grammars: constraint::GrammarCache,
    /// Recent prompts' keys and values (see `prompt_cache`).
    prompt_cache: std::sync::Mutex<prompt_cache::PromptCache>,
    /// The chat template's tokens ahead of the first user message's content (its default
    /// system prompt and the user's role header): what every variant's cache is warmed with.
    /// Empty without a template.
    preamble: Vec<u32>,
}

/// The prompt cache's byte budget unless set otherwise (`engine.prompt_cache_mb`).
pub const DEFAULT_PROMPT_CACHE_MB: u64 = 64;

/// The resident base model and its text side, shared (not copied) with whoever trains on it.
#[derive(Clone)]
pub struct BaseModel {
    pub model: Arc<Transformer>,
    pub text: Arc<model::TextSpec>,
    pub template: Option<Arc<ChatTemplate>>,
    pub name: String,
    /// The hub id the model files name, if any ([`model::LoadedModel::hub_id`]).
    pub hub_id: Option<String>,
    /// How the weights are held (`model.weights`).
    pub weights: model::WeightsMode,
}

impl Shared {
    fn count_prefill(&self, tokens: usize) {
        self.prefilled
            .fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `f` on the prompt cache, then publishes its size.
    fn prompt_cache<R>(&self, f: impl FnOnce(&mut prompt_cache::PromptCache) -> R) -> R {
        let mut pc = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut pc);
        crate::metrics::global().set_prompt_cache_bytes(pc.bytes());
        r
    }
}

/// The tokens a chat rendered by `template` starts with before the first user message's
/// content, whatever that content is: the template's default system prompt (if any) and the
/// user's role header. Found by rendering two one-message chats that differ only in their
/// content and keeping the tokens both start with, so a tokenizer merge across the boundary
/// never puts a token in the preamble that a real chat would not start with.
fn chat_preamble(template: &ChatTemplate, text: &model::TextSpec) -> Vec<u32> {
    let tokens = |content: &str| -> Option<Vec<u32>> {
        let chat = [serde_json::json!({"role": "user", "content": content})];
        let rendered = template.render(&chat, true).ok()?;
        let enc = text.tokenizer.encode(rendered.as_str(), false).ok()?;
        Some(enc.get_ids().to_vec())
    };
    match (tokens("Hello there."), tokens("What is 2 + 2?")) {
        (Some(a), Some(b)) => a
            .iter()
            .zip(&b)
            .take_while(|(x, y)| x == y)
            .map(|(x, _)| *x)
            .collect(),
        _ => Vec::new(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn split(l: LoadedModel) -> (Arc<Transformer>, Shared) {
    let model = Arc::new(l.model);
    let text = Arc::new(l.text);
    crate::metrics::global().set_model_weight_bytes(model.weight_bytes() as u64);
    let template = l.template.map(Arc::new);
    let preamble = template
        .as_deref()
        .map_or_else(Vec::new, |t| chat_preamble(t, &text));
    let sh = Shared {
        prompt_cache: std::sync::Mutex::new(prompt_cache::PromptCache::new(
            DEFAULT_PROMPT_CACHE_MB << 20,
        )),
        preamble,
        grammars: constraint::GrammarCache::new(text.clone(), model.cfg.vocab_size),
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
        prefilled: Default::default(),
        stop: Default::default(),
        stopped: Default::default(),
        context: model.cfg.max_position_embeddings,
        base: BaseModel {
            model: model.clone(),
            text,
            template,
            name: l.name,
            hub_id: l.hub_id,
            weights: l.weights,
        },
    };
    (model, sh)
}
