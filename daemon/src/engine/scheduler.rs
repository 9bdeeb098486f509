//! The engine thread: continuous batching of the running sequences, grouped prefills, sampling,
//! detokenizing and streaming [`GenEvent`]s back to each request.
use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::constraint::Guide;
use super::detok::{Detokenizer, Filtered, StopFilter};
use super::handle::Job;
use super::logprobs::{self, TokenLogprob};
use super::prompt_cache::VariantKey;
use super::sampling::Sampler;
use super::tools::{Piece, ToolCallParser};
use super::Shared;
use super::{FinishReason, GenEvent, PromptTokensDetails, Usage};
use crate::adapters::Adapter;
use crate::model::layers::{Ctx, ForwardHooks};
use crate::model::{KvCache, Transformer};

/// One sequence being generated: one choice of a request.
struct Seq {
    job: Job,
    /// Which choice of its request this is (OpenAI `choices[i].index`).
    choice: usize,
    /// Before the prefill: the channels and grammars of the request's further choices, which
    /// become sequences of their own on copies of the prefilled cache ([`Seq::fork`]).
    forks: Vec<(UnboundedSender<GenEvent>, Option<Guide>)>,
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
    /// The output grammar (structured outputs, forced tool calls).
    guide: Option<Guide>,
    /// Lifts tool calls out of the text (requests with tools).
    tool_calls: Option<ToolCallParser>,
    /// The prompt's tokens with their logprobs (echo with logprobs), taken by the prefill.
    prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// Prompt tokens whose keys and values the prompt cache provided (`cache` starts with
    /// them); only the rest is prefilled.
    cached: usize,
    /// Set once the prompt cache was asked (a sequence looks up once, when it nears the
    /// front of the queue).
    looked_up: bool,
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
pub(super) fn run(model: Arc<Transformer>, sh: Arc<Shared>, rx: std_mpsc::Receiver<Job>) {
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
    // The base model's preamble first, so even the first chat after start-up reuses it.
    let base = VariantKey {
        model: sh.id.clone(),
        generation: None,
    };
    warm(&model, &sh, base, None, &sh.preamble);
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
        // A request's choices all join the batch at once, each in a slot of its own.
        let mut group: Vec<Seq> = Vec::new();
        let mut group_tokens = 0;
        let mut slots = running.len();
        while let Some(next) = waiting.front_mut() {
            // Asked here rather than on arrival: a prompt prefilled since (the one ahead, a
            // warm-up) may have become its prefix.
            next.reuse_cached(&sh);
            let next = &*next;
            let fits = slots + next.choices() <= MAX_BATCH
                && match group.first() {
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
            slots += seq.choices();
            group.push(seq);
        }
        let prefilled = !group.is_empty();
        if prefilled {
            crate::metrics::global().observe_prefill_batch(group.len());
        }
        if group.len() == 1 {
            let mut seq = group.remove(0);
            match seq.prefill(&model, &sh) {
                Ok(logits) => start(seq, logits, &sh, &mut running),
                Err(e) => seq.fail(&e),
            }
        } else if !group.is_empty() {
            match prefill_group(&model, &sh, &mut group) {
                Ok(rows) => {
                    for (seq, row) in group.into_iter().zip(rows) {
                        start(seq, row, &sh, &mut running);
                    }
                }
                Err(e) => {
                    // Not one request's fault as far as we know: each gets its own prefill
                    // (on a fresh cache), so only a request that fails alone fails.
                    tracing::warn!("prefill of {} prompts together failed: {e}", group.len());
                    for mut seq in group {
                        seq.cache = KvCache::new(&model.cfg, seq.cache_capacity());
                        match seq.prefill(&model, &sh) {
                            Ok(logits) => start(seq, logits, &sh, &mut running),
                            Err(e) => seq.fail(&e),
                        }
                    }
                }
            }
        }
        if prefilled {
            // A long prompt's attention transients would otherwise stay resident.
            crate::alloc::release_after_burst();
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

/// Prefills `tokens` on a variant into a fresh cache and keeps it in the prompt cache (nothing
/// is generated). Skipped when the cache is off, already holds them, or the variant was
/// replaced or removed since the warm-up was asked for. Runs on the exact kernels whatever
/// its length: the prompts that reuse it are longer, and prefill those exactly. Any thread may
/// call it (the model is shared read-only, as with the trainer): the engine thread at start,
/// whoever adds a variant otherwise.
pub(super) fn warm(
    model: &Transformer,
    sh: &Shared,
    key: VariantKey,
    adapter: Option<Arc<Adapter>>,
    tokens: &[u32],
) {
    if tokens.is_empty()
        || !sh.is_current(&key)
        || sh.prompt_cache(|pc| !pc.enabled() || pc.covers(&key, tokens))
    {
        return;
    }
    let started = std::time::Instant::now();
    let prefilled = (|| -> candle_core::Result<KvCache> {
        let input = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
        let x = with_soft_prompt(model.embed(&input)?, adapter.as_deref())?;
        let virtual_len = adapter.as_deref().map_or(0, |a| a.prefix_len());
        let mut cache = KvCache::new(&model.cfg, x.dim(1)? + virtual_len);
        let ctx = Ctx {
            cache: Some(&mut cache),
            hooks: adapter.as_deref().map(|a| a as &dyn ForwardHooks),
            packed: None,
        };
        rayon::scope(|_| crate::ops::quant::exact(|| model.forward_hidden(&x, ctx)))?;
        Ok(cache)
    })();
    match prefilled.and_then(|cache| {
        sh.count_prefill(tokens.len());
        sh.prompt_cache(|pc| pc.insert(key.clone(), tokens, &cache))
    }) {
        Ok(()) => tracing::debug!(
            model = %key.model,
            tokens = tokens.len(),
            ms = started.elapsed().as_millis() as u64,
            "prompt cache warmed with the chat template's preamble"
        ),
        Err(e) => tracing::warn!(model = %key.model, "warming the prompt cache failed: {e}"),
    }
}

/// `x (1, l, hidden)` after the soft prompt of a prompt-tuned variant.
fn with_soft_prompt(x: Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor> {
    match adapter.and_then(Adapter::soft_prompt) {
        Some(soft) => Tensor::cat(&[&soft.unsqueeze(0)?, &x], 1),
        None => Ok(x),
    }
}

/// A prefilled sequence's first token: its further choices split off on copies of its cache,
/// then every choice samples from the prompt's logits on its own, and those that go on join
/// the running batch. The prompt's cache is kept for later requests first.
fn start(mut seq: Seq, logits: Vec<f32>, sh: &Shared, running: &mut Vec<Seq>) {
    seq.remember(sh);
    let forks = match seq.fork() {
        Ok(forks) => forks,
        Err(e) => {
            seq.fail(&e);
            return;
        }
    };
    let mut rows = std::iter::repeat_n(logits, forks.len() + 1);
    for mut s in std::iter::once(seq).chain(forks) {
        let Some(row) = rows.next() else { break };
        if let Step::Continue = s.accept(row, sh) {
            running.push(s);
        }
    }
}

/// Prefills sequences (see [`Seq::joins_prefill`]) in one forward; returns each one's logits.
fn prefill_group(
    model: &Transformer,
    sh: &Shared,
    group: &mut [Seq],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let xs = group
        .iter()
        .map(|s| s.prompt_embeddings(model))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tokens: usize = group.iter().map(|s| s.job.p.tokens.len()).sum();
    sh.count_prefill(tokens);
    let adapters = adapters_of(group);
    let hooks = hooks_of(&adapters);
    let mut caches: Vec<&mut KvCache> = group.iter_mut().map(|s| &mut s.cache).collect();
    let logits = rayon::scope(|_| model.prefill_batch(&xs, &mut caches, &hooks))?;
    crate::model::layers::rows_f32(&logits)
}

/// One token for every running sequence.
fn decode_step(
    model: &Transformer,
    sh: &Shared,
    running: &mut Vec<Seq>,
) -> candle_core::Result<()> {
    let tokens: Vec<u32> = running.iter().map(|s| s.next).collect();
    let adapters = adapters_of(running);
    let hooks = hooks_of(&adapters);
    let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|s| &mut s.cache).collect();
    // On a pool thread: the kernels of the step fork onto the pool many times, and from
    // outside it every fork also parks and wakes this thread.
    let logits = rayon::scope(|_| model.decode_batch(&tokens, &mut caches, &hooks))?;
    let rows = crate::model::layers::rows_f32(&logits)?;
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
    fn new(mut job: Job, model: &Transformer) -> Self {
        let cache = KvCache::new(&model.cfg, Self::capacity_for(&job));
        let mut guides = std::mem::take(&mut job.p.guides).into_iter();
        let guide = guides.next();
        let forks = std::mem::take(&mut job.choices)
            .into_iter()
            .map(|tx| (tx, guides.next()))
            .collect();
        Self {
            choice: 0,
            forks,
            guide,
            tool_calls: job.p.tool_calls.then(ToolCallParser::new),
            ids: job.p.tokens.clone(),
            next: 0,
            last_token: None,
            generated: 0,
            counts: HashMap::new(),
            sampler: Sampler::new(job.p.sampling.clone()),
            detok: Detokenizer::new(),
            stop: StopFilter::new(job.p.stop.clone()),
            prompt_logprobs: None,
            cached: 0,
            looked_up: false,
            cache,
            job,
        }
    }

    /// Starts the cache from the longest cached prefix of the prompt on its variant, if any
    /// (once; never for an echo with logprobs, which needs every prompt position's logits).
    fn reuse_cached(&mut self, sh: &Shared) {
        if std::mem::replace(&mut self.looked_up, true)
            || self.wants_prompt_logprobs()
            || !self.cache.is_empty()
        {
            return;
        }
        let capacity = self.cache_capacity() + self.virtual_len();
        let key = &self.job.p.cache_key;
        match sh.prompt_cache(|pc| pc.lookup(key, &self.job.p.tokens, capacity)) {
            Ok(Some(hit)) => {
                crate::metrics::global().prompt_cache_hit(hit.tokens);
                self.cache = hit.cache;
                self.cached = hit.tokens;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("prompt cache lookup failed: {e}"),
        }
    }

    /// Positions the variant puts ahead of the prompt (soft prompt or KV prefix).
    fn virtual_len(&self) -> usize {
        self.job.p.adapter.as_deref().map_or(0, |a| {
            a.prefix_len() + a.soft_prompt().map_or(0, |s| s.dim(0).unwrap_or(0))
        })
    }

    /// Keeps the just-prefilled prompt's cache for later requests (unless its variant was
    /// replaced or removed meanwhile: nothing could match it again).
    fn remember(&self, sh: &Shared) {
        let key = &self.job.p.cache_key;
        if self.cache.len() < self.job.p.tokens.len() || !sh.is_current(key) {
            return;
        }
        if let Err(e) =
            sh.prompt_cache(|pc| pc.insert(key.clone(), &self.job.p.tokens, &self.cache))
        {
            tracing::warn!("keeping the prompt in the prompt cache failed: {e}");
        }
    }

    /// The KV cache size a request needs: prompt, generation budget and a margin.
    fn capacity_for(job: &Job) -> usize {
        job.p.prompt_tokens + job.p.max_tokens + 64
    }

    fn cache_capacity(&self) -> usize {
        Self::capacity_for(&self.job)
    }

    /// Batch slots the request takes once prefilled: one per choice.
    fn choices(&self) -> usize {
        1 + self.forks.len()
    }

    /// The request's further choices as sequences of their own, each on a copy of this
    /// sequence's prefilled cache, with its own sampler stream and grammar state.
    fn fork(&mut self) -> candle_core::Result<Vec<Seq>> {
        let forks = std::mem::take(&mut self.forks);
        let mut out = Vec::with_capacity(forks.len());
        for (i, (events, guide)) in forks.into_iter().enumerate() {
            let job = Job {
                p: self.job.p.for_choice(),
                events,
                choices: Vec::new(),
                submitted: self.job.submitted,
            };
            let choice = i + 1;
            out.push(Seq {
                cache: self.cache.fork(self.cache_capacity())?,
                choice,
                forks: Vec::new(),
                guide,
                tool_calls: job.p.tool_calls.then(ToolCallParser::new),
                ids: job.p.tokens.clone(),
                next: 0,
                last_token: None,
                generated: 0,
                counts: HashMap::new(),
                sampler: Sampler::for_choice(job.p.sampling.clone(), choice),
                detok: Detokenizer::new(),
                stop: StopFilter::new(job.p.stop.clone()),
                prompt_logprobs: self.prompt_logprobs.clone(),
                cached: self.cached,
                looked_up: true,
                job,
            });
        }
        Ok(out)
    }

    /// True when the client dropped every receiver of the sequence (disconnected); a
    /// cancelled request is counted once (by its first choice), since the caller drops the
    /// sequence right after.
    fn client_gone(&self) -> bool {
        let gone = self.job.events.is_closed() && self.forks.iter().all(|f| f.0.is_closed());
        if gone && self.choice == 0 {
            crate::metrics::global().request_cancelled(&self.job.p.model);
        }
        gone
    }

    /// Fails this sequence and the choices not yet split off it.
    fn fail(&self, e: &candle_core::Error) {
        tracing::error!("generation failed: {e}");
        let _ = self.job.events.send(GenEvent::Failed(e.to_string()));
        for (tx, _) in &self.forks {
            let _ = tx.send(GenEvent::Failed(e.to_string()));
        }
    }

    /// The prompt's embeddings `(1, l, hidden)`, after the soft prompt of a prompt-tuned
    /// variant.
    fn prompt_embeddings(&self, model: &Transformer) -> candle_core::Result<Tensor> {
        let input = Tensor::new(self.job.p.tokens.as_slice(), model.device())?.unsqueeze(0)?;
        with_soft_prompt(model.embed(&input)?, self.job.p.adapter.as_deref())
    }

    /// Whether this sequence can be prefilled in one forward with others: any mix of the base
    /// model and variants, except prefix-tuned ones (their prefix goes into the cache first).
    fn joins_prefill(&self) -> bool {
        !self.wants_prompt_logprobs()
            && self.cache.is_empty()
            && self
                .job
                .p
                .adapter
                .as_deref()
                .is_none_or(|a| a.prefix_len() == 0)
    }

    /// Echo with logprobs needs the logits of every prompt position, not just the last.
    fn wants_prompt_logprobs(&self) -> bool {
        self.job.p.echo.is_some() && self.job.p.sampling.logprobs.is_some()
    }

    /// Runs the prompt (after the soft prompt of a prompt-tuned variant; a prefix-tuned
    /// variant's prefix is written into the cache by the model); returns the logits of the
    /// first token.
    fn prefill(&mut self, model: &Transformer, sh: &Shared) -> candle_core::Result<Vec<f32>> {
        if self.cached > 0 {
            return self.prefill_rest(model, sh);
        }
        let x = self.prompt_embeddings(model)?;
        sh.count_prefill(self.job.p.tokens.len());
        if self.wants_prompt_logprobs() {
            return self.prefill_all_positions(model, sh, &x);
        }
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
        rayon::scope(|_| model.last_logits(&x, ctx))?
            .squeeze(0)?
            .to_vec1::<f32>()
    }

    /// The prefill of a prompt whose first [`Self::cached`] tokens the cache already holds:
    /// only the rest runs, at the positions after them. A prefill's products compute every row on
    /// its own, whatever the row count (ops::quant), so the rest's rows come out as they would in
    /// the whole prompt's prefill.
    fn prefill_rest(&mut self, model: &Transformer, sh: &Shared) -> candle_core::Result<Vec<f32>> {
        let rest = &self.job.p.tokens[self.cached..];
        let input = Tensor::new(rest, model.device())?.unsqueeze(0)?;
        let x = model.embed(&input)?;
        sh.count_prefill(rest.len());
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
        let h = rayon::scope(|_| model.forward_hidden(&x, ctx))?;
        // The LM head on the last position alone, as in any prefill's `last_logits`.
        let last = h.dim(1)? - 1;
        model
            .logits(&h.narrow(1, last, 1)?.squeeze(1)?)?
            .squeeze(0)?
            .to_vec1::<f32>()
    }

    /// A prefill that keeps every position's logits: the prompt's logprobs are stored for the
    /// echo and the last position's logits returned. The LM head runs on slices of positions,
    /// so a long prompt never holds `length × vocabulary` floats at once.
    fn prefill_all_positions(
        &mut self,
        model: &Transformer,
        sh: &Shared,
        x: &Tensor,
    ) -> candle_core::Result<Vec<f32>> {
        const SLICE: usize = 64;
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
        let h = rayon::scope(|_| model.forward_hidden(x, ctx))?.squeeze(0)?;
        let total = h.dim(0)?;
        let n = self.job.p.tokens.len();
        // A soft prompt's virtual tokens come first; the prompt's own rows follow.
        let first = total - n;
        let mut rows = Vec::with_capacity(n);
        let mut start = first;
        while start < total {
            let len = SLICE.min(total - start);
            let logits = model.logits(&h.narrow(0, start, len)?)?;
            rows.extend(crate::model::layers::rows_f32(&logits)?);
            start += len;
        }
        let last = rows.pop().unwrap_or_default();
        let k = self.job.p.sampling.logprobs.unwrap_or(0);
        self.prompt_logprobs = Some(logprobs::prompt_logprobs(
            &sh.base.text.tokenizer,
            &self.job.p.tokens,
            &rows,
            k,
        ));
        Ok(last)
    }

    fn finish(&mut self, mut reason: FinishReason) -> Step {
        if let Some(mut parser) = self.tool_calls.take() {
            let pieces = parser.finish();
            self.send(pieces);
            if parser.calls() > 0 && reason == FinishReason::Stop {
                reason = FinishReason::ToolCalls;
            }
        }
        let usage = Usage {
            prompt_tokens: self.job.p.prompt_tokens,
            completion_tokens: self.generated,
            total_tokens: self.job.p.prompt_tokens + self.generated,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached,
            },
        };
        let _ = self.job.events.send(GenEvent::Finished { reason, usage });
        Step::Done
    }

    fn emit(&mut self, text: String) -> bool {
        if text.is_empty() {
            return true;
        }
        match &mut self.tool_calls {
            None => self.job.events.send(GenEvent::Text(text)).is_ok(),
            Some(parser) => {
                let pieces = parser.push(&text);
                self.send(pieces)
            }
        }
    }

    fn send(&self, pieces: Vec<Piece>) -> bool {
        pieces.into_iter().all(|p| {
            let event = match p {
                Piece::Text(t) => GenEvent::Text(t),
                Piece::Call(c) => GenEvent::ToolCall(c),
            };
            self.job.events.send(event).is_ok()
        })
    }

    /// Fails the sequence on a grammar error.
    fn fail_guided(&mut self, e: String) -> Step {
        self.fail(&candle_core::Error::Msg(e));
        Step::Done
    }

    /// Samples the next token from `logits` and streams what it completes.
    fn accept(&mut self, mut logits: Vec<f32>, sh: &Shared) -> Step {
        if self.client_gone() {
            return Step::Done;
        }
        if let Some(text) = self.job.p.echo.take() {
            let logprobs = self.prompt_logprobs.take();
            let _ = self.job.events.send(GenEvent::Echo { text, logprobs });
        }
        if let Some(guide) = &mut self.guide {
            if let Err(e) = guide.apply(&mut logits) {
                return self.fail_guided(e);
            }
        }
        self.sampler.adjust(&mut logits, &self.ids, &self.counts);
        // The distribution before the sampler reshapes it (or overwrites it) is what's reported.
        let offered = self.job.p.sampling.logprobs.map(|k| (k, logits.clone()));
        let id = self.sampler.choose(&mut logits);
        self.next = id;
        let now = std::time::Instant::now();
        if let Some(prev) = self.last_token.replace(now) {
            crate::metrics::global().observe_itl(&self.job.p.model, (now - prev).as_secs_f64());
        }
        // A grammar allows EOS only where the output may end: there it always ends.
        let eos = sh.base.text.eos_ids.contains(&id);
        if eos && (!self.job.p.sampling.ignore_eos || self.guide.is_some()) {
            let rest = self.detok.flush(&sh.base.text.tokenizer) + &self.stop.flush();
            self.emit(rest);
            return self.finish(FinishReason::Stop);
        }
        let complete = match self.guide.as_mut().map(|g| g.commit(id)) {
            Some(Err(e)) => return self.fail_guided(e),
            Some(Ok(done)) => done,
            None => false,
        };
        if let Some((k, offered)) = offered {
            let lp = logprobs::describe(&sh.base.text.tokenizer, &offered, id, k);
            let _ = self.job.events.send(GenEvent::Token(lp));
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
                    if self.choice == 0 {
                        crate::metrics::global().request_cancelled(&self.job.p.model);
                    }
                    return Step::Done;
                }
            }
        }
        if complete || self.generated >= self.job.p.max_tokens {
            let rest = self.detok.flush(&sh.base.text.tokenizer);
            let rest = match self.stop.push(&rest) {
                Filtered::Stop(t) => {
                    self.emit(t);
                    return self.finish(FinishReason::Stop);
                }
                Filtered::Emit(t) => t + &self.stop.flush(),
            };
            self.emit(rest);
            let reason = if complete {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            return self.finish(reason);
        }
        Step::Continue
    }
}
