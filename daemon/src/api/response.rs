//! Response bodies: whole `chat.completion` / `text_completion` objects, and the server-sent event
//! stream of chunks built from the engine's [`GenEvent`]s. A request of `n` choices arrives as
//! one stream of events tagged with their choice's index ([`Tagged`]); the prompt counts once in
//! `usage`, the completion tokens of every choice add up.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::logprobs;
use crate::engine::logprobs::TokenLogprob;
use crate::engine::tools::ToolCall;
use crate::engine::{FinishReason, GenEvent, Usage};

/// An engine event and the index of the choice it belongs to.
pub type Tagged = (usize, GenEvent);

/// Which endpoint the response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// What every chunk and response of one request shares.
#[derive(Debug, Clone)]
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Streaming only: send a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    pub started: Instant,
    /// The request asked for logprobs: choices carry a `logprobs` object instead of `null`.
    pub logprobs: bool,
    /// Choices generated (`n`).
    pub n: usize,
}

impl Meta {
    pub fn new(kind: Kind, model: String, include_usage: bool) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Self {
            kind,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: unix_now(),
            model,
            include_usage,
            started: Instant::now(),
            logprobs: false,
            n: 1,
        }
    }

    fn object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Text => "text_completion",
        }
    }

    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        }
    }

    fn log_done(&self, reasons: &[FinishReason], usage: &Usage) {
        tracing::info!(
            id = %self.id,
            model = %self.model,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            finish_reason = ?reasons,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "generation finished"
        );
    }
}

/// The usage of a whole request from its choices' own: the prompt and its cached tokens once
/// (every choice reports the same prompt), the completion tokens of all.
pub fn total_usage<'a>(choices: impl IntoIterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage::default();
    for u in choices {
        total.prompt_tokens = u.prompt_tokens;
        total.prompt_tokens_details = u.prompt_tokens_details;
        total.completion_tokens += u.completion_tokens;
    }
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    total
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The result of a whole (non-streamed) generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    /// Tool calls parsed out of the output (requests with tools).
    pub tool_calls: Vec<ToolCall>,
    pub reason: FinishReason,
    pub usage: Usage,
    /// Per token of `text` (echoed prompt first), when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// Logs a generation abandoned by its client (the future or stream dropped before the end).
struct CancelLog<'a> {
    id: &'a str,
    armed: bool,
}

impl Drop for CancelLog<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(id = %self.id, "client went away; generation cancelled");
        }
    }
}

/// Waits for every choice of a generation to finish and gathers their texts, in choice order.
pub async fn collect(
    rx: &mut UnboundedReceiver<Tagged>,
    meta: &Meta,
) -> Result<Vec<Generated>, ApiError> {
    let mut guard = CancelLog {
        id: &meta.id,
        armed: true,
    };
    let result = gather(rx, meta).await;
    guard.armed = false;
    result
}

async fn gather(
    rx: &mut UnboundedReceiver<Tagged>,
    meta: &Meta,
) -> Result<Vec<Generated>, ApiError> {
    #[derive(Default)]
    struct Partial {
        text: String,
        tool_calls: Vec<ToolCall>,
        lps: Vec<TokenLogprob>,
        done: Option<(FinishReason, Usage)>,
    }
    let n = meta.n.max(1);
    let mut parts: Vec<Partial> = (0..n).map(|_| Partial::default()).collect();
    let mut finished = 0;
    while let Some((i, event)) = rx.recv().await {
        let Some(p) = parts.get_mut(i) else {
            return Err(ApiError::internal(format!(
                "The engine sent an event for choice {i} of {n}"
            )));
        };
        match event {
            GenEvent::Text(t) => p.text.push_str(&t),
            GenEvent::ToolCall(c) => p.tool_calls.push(c),
            GenEvent::Echo { text: t, logprobs } => {
                p.text.insert_str(0, &t);
                p.lps.splice(0..0, logprobs.unwrap_or_default());
            }
            GenEvent::Token(t) => p.lps.push(t),
            GenEvent::Finished { reason, usage } => {
                if p.done.replace((reason, usage)).is_none() {
                    finished += 1;
                }
                if finished < n {
                    continue;
                }
                let out: Vec<Generated> = parts
                    .into_iter()
                    .filter_map(|p| {
                        let (reason, usage) = p.done?;
                        Some(Generated {
                            text: p.text,
                            tool_calls: p.tool_calls,
                            reason,
                            usage,
                            logprobs: p.lps,
                        })
                    })
                    .collect();
                let reasons: Vec<FinishReason> = out.iter().map(|g| g.reason).collect();
                meta.log_done(&reasons, &total_usage(out.iter().map(|g| &g.usage)));
                return Ok(out);
            }
            GenEvent::Failed(msg) => {
                tracing::warn!(id = %meta.id, "generation failed: {msg}");
                return Err(ApiError::internal(format!("Generation failed: {msg}")));
            }
        }
    }
    Err(ApiError::internal(ENDED_EARLY))
}

const ENDED_EARLY: &str = "The engine stopped before the generation finished";

/// The whole response object of a non-streamed request: `choices[i]` is choice `i`.
pub fn full_response(meta: &Meta, generated: &[Generated]) -> Value {
    let choices: Vec<Value> = generated
        .iter()
        .enumerate()
        .map(|(index, g)| {
            let lps = Pending::default().render(meta, &g.logprobs);
            match meta.kind {
                Kind::Chat => json!({
                    "index": index,
                    "message": message(g),
                    "finish_reason": g.reason,
                    "logprobs": lps,
                }),
                Kind::Text => json!({
                    "index": index,
                    "text": g.text,
                    "finish_reason": g.reason,
                    "logprobs": lps,
                }),
            }
        })
        .collect();
    json!({
        "id": meta.id,
        "object": meta.object(),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": total_usage(generated.iter().map(|g| &g.usage)),
    })
}

/// The assistant message: with tool calls, `content` is null unless the model also wrote text.
fn message(g: &Generated) -> Value {
    if g.tool_calls.is_empty() {
        return json!({"role": "assistant", "content": g.text});
    }
    let calls: Vec<Value> = g
        .tool_calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let content = (!g.text.trim().is_empty()).then_some(g.text.as_str());
    json!({"role": "assistant", "content": content, "tool_calls": calls})
}

/// A tool call streamed as OpenAI does: a delta with its index, id, type and name (arguments
/// empty), then a delta with the arguments.
fn tool_call_chunks(
    meta: &Meta,
    choice: usize,
    index: usize,
    c: &ToolCall,
    out: &mut VecDeque<Bytes>,
) {
    let deltas = [
        json!({"index": index, "id": c.id, "type": "function",
               "function": {"name": c.name, "arguments": ""}}),
        json!({"index": index, "function": {"arguments": c.arguments}}),
    ];
    for d in deltas {
        let choice = json!({"index": choice, "delta": {"tool_calls": [d]}, "logprobs": null,
                            "finish_reason": null});
        out.push_back(frame(&chunk(meta, json!([choice]), None)));
    }
}

fn chunk(meta: &Meta, choices: Value, usage: Option<&Usage>) -> Value {
    let mut c = json!({
        "id": meta.id,
        "object": meta.chunk_object(),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    });
    if meta.include_usage {
        // As OpenAI: every chunk carries `usage`, null but on the last one.
        c["usage"] = json!(usage);
    }
    c
}

/// Streaming: token logprobs waiting for the chunk that carries their text, and where the
/// next token starts in the whole text (legacy `text_offset`).
#[derive(Default)]
struct Pending {
    tokens: Vec<TokenLogprob>,
    offset: usize,
}

/// Streaming: what one choice has sent so far.
#[derive(Default)]
struct ChoiceState {
    pending: Pending,
    /// Tool calls streamed so far (the next one's index).
    calls: usize,
    /// Its usage once finished.
    usage: Option<Usage>,
    reason: Option<FinishReason>,
}

impl Pending {
    /// The `logprobs` value for `tokens` (`null` when the request did not ask).
    fn render(&mut self, meta: &Meta, tokens: &[TokenLogprob]) -> Value {
        match (meta.logprobs, meta.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => logprobs::chat(tokens),
            (true, Kind::Text) => logprobs::legacy(tokens, &mut self.offset),
        }
    }

    /// The `logprobs` of the next chunk: every token seen since the last one.
    fn take(&mut self, meta: &Meta) -> Value {
        let tokens = std::mem::take(&mut self.tokens);
        if tokens.is_empty() {
            return Value::Null;
        }
        self.render(meta, &tokens)
    }
}

/// A chunk with one choice: a delta (`text` for completions) and maybe the finish reason.
fn choice_chunk(
    meta: &Meta,
    index: usize,
    text: Option<&str>,
    role: bool,
    reason: Option<FinishReason>,
    lps: Value,
) -> Value {
    let choice = match meta.kind {
        Kind::Chat => {
            let mut delta = json!({});
            if role {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": index, "delta": delta, "logprobs": lps, "finish_reason": reason})
        }
        Kind::Text => json!({
            "index": index,
            "text": text.unwrap_or(""),
            "logprobs": lps,
            "finish_reason": reason,
        }),
    };
    chunk(meta, json!([choice]), None)
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Maps one engine event to the SSE frames it produces; true when the stream is complete
/// (every choice finished, or one failed).
fn event_frames(
    meta: &Meta,
    event: Option<Tagged>,
    choices: &mut [ChoiceState],
    out: &mut VecDeque<Bytes>,
) -> bool {
    let (i, event) = match event {
        Some((i, e)) if i < choices.len() => (i, e),
        Some((i, _)) => {
            let msg = format!(
                "The engine sent an event for choice {i} of {}",
                choices.len()
            );
            out.push_back(frame(&ApiError::internal(msg).body()));
            out.push_back(Bytes::from_static(DONE));
            return true;
        }
        None => {
            out.push_back(frame(&ApiError::internal(ENDED_EARLY).body()));
            out.push_back(Bytes::from_static(DONE));
            return true;
        }
    };
    let st = &mut choices[i];
    match event {
        GenEvent::ToolCall(c) => {
            tool_call_chunks(meta, i, st.calls, &c, out);
            st.calls += 1;
            false
        }
        GenEvent::Text(t) => {
            if !t.is_empty() {
                let lps = st.pending.take(meta);
                out.push_back(frame(&choice_chunk(meta, i, Some(&t), false, None, lps)));
            }
            false
        }
        GenEvent::Token(t) => {
            st.pending.tokens.push(t);
            false
        }
        GenEvent::Echo { text, logprobs } => {
            st.pending.tokens.extend(logprobs.unwrap_or_default());
            let lps = st.pending.take(meta);
            out.push_back(frame(&choice_chunk(meta, i, Some(&text), false, None, lps)));
            false
        }
        GenEvent::Finished { reason, usage } => {
            let text = match meta.kind {
                Kind::Chat => None,
                Kind::Text => Some(""),
            };
            let lps = st.pending.take(meta);
            out.push_back(frame(&choice_chunk(
                meta,
                i,
                text,
                false,
                Some(reason),
                lps,
            )));
            st.usage = Some(usage);
            st.reason = Some(reason);
            if choices.iter().any(|c| c.usage.is_none()) {
                return false;
            }
            let usage = total_usage(choices.iter().filter_map(|c| c.usage.as_ref()));
            let reasons: Vec<FinishReason> = choices.iter().filter_map(|c| c.reason).collect();
            meta.log_done(&reasons, &usage);
            if meta.include_usage {
                out.push_back(frame(&chunk(meta, json!([]), Some(&usage))));
            }
            out.push_back(Bytes::from_static(DONE));
            true
        }
        GenEvent::Failed(msg) => {
            tracing::warn!(id = %meta.id, choice = i, "generation failed mid-stream: {msg}");
            let e = ApiError::internal(format!("Generation failed: {msg}"));
            out.push_back(frame(&e.body()));
            out.push_back(Bytes::from_static(DONE));
            true
        }
    }
}

/// The SSE body of a streamed request. Dropping it (the client went away) drops the receiver,
/// which cancels the generation.
pub fn sse_stream(
    rx: UnboundedReceiver<Tagged>,
    meta: Meta,
) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static {
    struct State {
        rx: UnboundedReceiver<Tagged>,
        meta: Meta,
        queue: VecDeque<Bytes>,
        choices: Vec<ChoiceState>,
        done: bool,
    }
    impl Drop for State {
        fn drop(&mut self) {
            if !self.done {
                tracing::info!(id = %self.meta.id, "client went away; generation cancelled");
            }
        }
    }
    let mut queue = VecDeque::new();
    let n = meta.n.max(1);
    if meta.kind == Kind::Chat {
        // As OpenAI: each choice opens with its role.
        for i in 0..n {
            queue.push_back(frame(&choice_chunk(
                &meta,
                i,
                Some(""),
                true,
                None,
                Value::Null,
            )));
        }
    }
    let state = State {
        rx,
        meta,
        queue,
        choices: (0..n).map(|_| ChoiceState::default()).collect(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(bytes) = st.queue.pop_front() {
                return Some((Ok(bytes), st));
            }
            if st.done {
                return None;
            }
            let event = st.rx.recv().await;
            st.done = event_frames(&st.meta, event, &mut st.choices, &mut st.queue);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn usage(p: usize, c: usize) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            prompt_tokens_details: crate::engine::PromptTokensDetails {
                cached_tokens: p / 2,
            },
        }
    }

    async fn run(
        kind: Kind,
        include_usage: bool,
        events: Vec<GenEvent>,
        close: bool,
    ) -> Vec<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for e in events {
            tx.send((0, e)).unwrap();
        }
        if close {
            drop(tx);
        } else {
            std::mem::forget(tx);
        }
        let meta = Meta::new(kind, "m".into(), include_usage);
        sse_stream(rx, meta)
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect()
            .await
    }

    fn data(frame: &str) -> Value {
        let body = frame
            .strip_prefix("data: ")
            .and_then(|f| f.strip_suffix("\n\n"))
            .expect("an SSE data frame");
        serde_json::from_str(body).expect("JSON")
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = Meta::new(Kind::Chat, "m".into(), false);
        let b = Meta::new(Kind::Chat, "m".into(), false);
        assert!(a.id.starts_with("chatcmpl-") && a.id.len() == 9 + 32);
        assert_ne!(a.id, b.id);
        assert!(Meta::new(Kind::Text, "m".into(), false)
            .id
            .starts_with("cmpl-"));
    }

    #[test]
    fn chat_stream_frames() {
        let events = vec![
            GenEvent::Text("Hel".into()),
            GenEvent::Text("".into()),
            GenEvent::Text("lo".into()),
            GenEvent::Finished {
                reason: FinishReason::Stop,
                usage: usage(5, 2),
            },
        ];
        let frames = rt().block_on(run(Kind::Chat, true, events, false));
        assert_eq!(frames.len(), 6, "{frames:?}");
        let first = data(&frames[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(first["usage"], Value::Null);
        assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(
            data(&frames[1])["choices"][0]["delta"],
            json!({"content": "Hel"})
        );
        assert_eq!(
            data(&frames[2])["choices"][0]["delta"],
            json!({"content": "lo"})
        );
        let fin = data(&frames[3]);
        assert_eq!(fin["choices"][0]["delta"], json!({}));
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        let u = data(&frames[4]);
        assert_eq!(u["choices"], json!([]));
        assert_eq!(
            u["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}})
        );
        assert_eq!(frames[5], "data: [DONE]\n\n");
        // One id for the whole stream.
        assert!(frames[..5].iter().all(|f| data(f)["id"] == first["id"]));
    }

    #[test]
    fn chat_stream_without_usage() {
        let events = vec![
            GenEvent::Text("x".into()),
            GenEvent::Finished {
                reason: FinishReason::Length,
                usage: usage(1, 1),
            },
        ];
        let frames = rt().block_on(run(Kind::Chat, false, events, false));
        assert_eq!(frames.len(), 4);
        assert!(data(&frames[0]).get("usage").is_none());
        assert_eq!(data(&frames[2])["choices"][0]["finish_reason"], "length");
        assert_eq!(frames[3], "data: [DONE]\n\n");
    }

    #[test]
    fn text_stream_frames() {
        let events = vec![
            GenEvent::Text("upon".into()),
            GenEvent::Finished {
                reason: FinishReason::Length,
                usage: usage(2, 1),
            },
        ];
        let frames = rt().block_on(run(Kind::Text, false, events, true));
        assert_eq!(frames.len(), 3, "{frames:?}");
        let c = data(&frames[0]);
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "upon");
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(data(&frames[1])["choices"][0]["finish_reason"], "length");
        assert_eq!(frames[2], "data: [DONE]\n\n");
    }

    #[test]
    fn failure_mid_stream_sends_error_then_done() {
        let events = vec![GenEvent::Text("a".into()), GenEvent::Failed("oom".into())];
        let frames = rt().block_on(run(Kind::Chat, true, events, false));
        assert_eq!(frames.len(), 4);
        let e = data(&frames[2]);
        assert!(e["error"]["message"].as_str().unwrap().contains("oom"));
        assert_eq!(e["error"]["type"], "server_error");
        assert_eq!(frames[3], "data: [DONE]\n\n");
    }

    #[test]
    fn engine_hangup_mid_stream_sends_error_then_done() {
        let frames = rt().block_on(run(
            Kind::Text,
            false,
            vec![GenEvent::Text("a".into())],
            true,
        ));
        assert_eq!(frames.len(), 3);
        assert!(data(&frames[1])["error"]["message"].is_string());
        assert_eq!(frames[2], "data: [DONE]\n\n");
    }

    #[test]
    fn collect_and_full_response() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((0, GenEvent::Text("The capital".into()))).unwrap();
        tx.send((0, GenEvent::Text(" is Paris.".into()))).unwrap();
        tx.send((
            0,
            GenEvent::Finished {
                reason: FinishReason::Stop,
                usage: usage(10, 4),
            },
        ))
        .unwrap();
        let meta = Meta::new(Kind::Chat, "m".into(), false);
        let g = rt().block_on(collect(&mut rx, &meta)).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].text, "The capital is Paris.");
        let v = full_response(&meta, &g);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "m");
        assert_eq!(
            v["choices"][0],
            json!({"index": 0, "message": {"role": "assistant", "content": "The capital is Paris."},
                   "finish_reason": "stop", "logprobs": null})
        );
        assert_eq!(v["usage"]["total_tokens"], 14);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 5);

        let tmeta = Meta::new(Kind::Text, "m".into(), false);
        let t = full_response(&tmeta, &g);
        assert_eq!(t["object"], "text_completion");
        assert_eq!(t["choices"][0]["text"], "The capital is Paris.");
    }

    #[test]
    fn collect_reports_failures() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((0, GenEvent::Failed("boom".into()))).unwrap();
        drop(tx);
        let meta = Meta::new(Kind::Chat, "m".into(), false);
        let e = rt().block_on(collect(&mut rx, &meta)).unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
        assert!(e.message.contains("boom"));
        let e = rt().block_on(collect(&mut rx, &meta)).unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
    }

    fn finished(p: usize, c: usize) -> GenEvent {
        GenEvent::Finished {
            reason: FinishReason::Length,
            usage: usage(p, c),
        }
    }

    #[test]
    fn choices_collect_in_order_and_usage_counts_the_prompt_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Interleaved, and choice 1 ends first.
        for ev in [
            (1, GenEvent::Text("b".into())),
            (0, GenEvent::Text("a".into())),
            (1, finished(7, 1)),
            (2, GenEvent::Text("c".into())),
            (0, GenEvent::Text("a".into())),
            (0, finished(7, 2)),
            (2, finished(7, 3)),
        ] {
            tx.send(ev).unwrap();
        }
        let mut meta = Meta::new(Kind::Text, "m".into(), false);
        meta.n = 3;
        let g = rt().block_on(collect(&mut rx, &meta)).unwrap();
        let texts: Vec<&str> = g.iter().map(|g| g.text.as_str()).collect();
        assert_eq!(texts, ["aa", "b", "c"]);
        let v = full_response(&meta, &g);
        let idx: Vec<u64> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [0, 1, 2]);
        assert_eq!(v["choices"][1]["text"], "b");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 3}})
        );
    }

    #[test]
    fn streamed_choices_carry_their_index_and_end_once() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for ev in [
            (1, GenEvent::Text("b".into())),
            (0, GenEvent::Text("a".into())),
            (1, finished(4, 1)),
            (0, finished(4, 1)),
        ] {
            tx.send(ev).unwrap();
        }
        std::mem::forget(tx);
        let mut meta = Meta::new(Kind::Chat, "m".into(), true);
        meta.n = 2;
        let frames: Vec<String> = rt().block_on(
            sse_stream(rx, meta)
                .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
                .collect(),
        );
        // two role chunks, two texts, two finishes, usage, [DONE]
        assert_eq!(frames.len(), 8, "{frames:?}");
        assert_eq!(data(&frames[0])["choices"][0]["index"], 0);
        assert_eq!(data(&frames[1])["choices"][0]["index"], 1);
        assert_eq!(data(&frames[1])["choices"][0]["delta"]["role"], "assistant");
        let b = data(&frames[2]);
        assert_eq!(b["choices"][0]["index"], 1);
        assert_eq!(b["choices"][0]["delta"]["content"], "b");
        assert_eq!(data(&frames[4])["choices"][0]["index"], 1);
        assert_eq!(data(&frames[4])["choices"][0]["finish_reason"], "length");
        assert_eq!(data(&frames[5])["choices"][0]["index"], 0);
        assert_eq!(
            data(&frames[6])["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 2}})
        );
        assert_eq!(frames[7], "data: [DONE]\n\n");
    }
}
