//! Response bodies: whole `chat.completion` / `text_completion` objects, and the server-sent event
//! stream of chunks built from the engine's [`GenEvent`]s.
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

    fn log_done(&self, reason: FinishReason, usage: &Usage) {
        tracing::info!(
            id = %self.id,
            model = %self.model,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            finish_reason = ?reason,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "generation finished"
        );
    }
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

/// Waits for a generation to finish and gathers its text.
pub async fn collect(
    rx: &mut UnboundedReceiver<GenEvent>,
    meta: &Meta,
) -> Result<Generated, ApiError> {
    let mut guard = CancelLog {
        id: &meta.id,
        armed: true,
    };
    let result = gather(rx, meta).await;
    guard.armed = false;
    result
}

async fn gather(rx: &mut UnboundedReceiver<GenEvent>, meta: &Meta) -> Result<Generated, ApiError> {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    let mut lps = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::ToolCall(c) => tool_calls.push(c),
            GenEvent::Echo { text: t, logprobs } => {
                text.insert_str(0, &t);
                lps.splice(0..0, logprobs.unwrap_or_default());
            }
            GenEvent::Token(t) => lps.push(t),
            GenEvent::Finished { reason, usage } => {
                meta.log_done(reason, &usage);
                return Ok(Generated {
                    text,
                    tool_calls,
                    reason,
                    usage,
                    logprobs: lps,
                });
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

/// The whole response object of a non-streamed request.
pub fn full_response(meta: &Meta, g: &Generated) -> Value {
    let lps = Pending::default().render(meta, &g.logprobs);
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": message(g),
            "finish_reason": g.reason,
            "logprobs": lps,
        }),
        Kind::Text => json!({
            "index": 0,
            "text": g.text,
            "finish_reason": g.reason,
            "logprobs": lps,
        }),
    };
    json!({
        "id": meta.id,
        "object": meta.object(),
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": g.usage,
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
fn tool_call_chunks(meta: &Meta, index: usize, c: &ToolCall, out: &mut VecDeque<Bytes>) {
    let deltas = [
        json!({"index": index, "id": c.id, "type": "function",
               "function": {"name": c.name, "arguments": ""}}),
        json!({"index": index, "function": {"arguments": c.arguments}}),
    ];
    for d in deltas {
        let choice = json!({"index": 0, "delta": {"tool_calls": [d]}, "logprobs": null,
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
            json!({"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason})
        }
        Kind::Text => json!({
            "index": 0,
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

/// Maps one engine event to the SSE frames it produces; true when the stream is complete.
fn event_frames(
    meta: &Meta,
    event: Option<GenEvent>,
    pending: &mut Pending,
    out: &mut VecDeque<Bytes>,
    calls: &mut usize,
) -> bool {
    match event {
        Some(GenEvent::ToolCall(c)) => {
            tool_call_chunks(meta, *calls, &c, out);
            *calls += 1;
            false
        }
        Some(GenEvent::Text(t)) => {
            if !t.is_empty() {
                let lps = pending.take(meta);
                out.push_back(frame(&choice_chunk(meta, Some(&t), false, None, lps)));
            }
            false
        }
        Some(GenEvent::Token(t)) => {
            pending.tokens.push(t);
            false
        }
        Some(GenEvent::Echo { text, logprobs }) => {
            pending.tokens.extend(logprobs.unwrap_or_default());
            let lps = pending.take(meta);
            out.push_back(frame(&choice_chunk(meta, Some(&text), false, None, lps)));
            false
        }
        Some(GenEvent::Finished { reason, usage }) => {
            meta.log_done(reason, &usage);
            let text = match meta.kind {
                Kind::Chat => None,
                Kind::Text => Some(""),
            };
            let lps = pending.take(meta);
            out.push_back(frame(&choice_chunk(meta, text, false, Some(reason), lps)));
            if meta.include_usage {
                out.push_back(frame(&chunk(meta, json!([]), Some(&usage))));
            }
            out.push_back(Bytes::from_static(DONE));
            true
        }
        Some(GenEvent::Failed(msg)) => {
            tracing::warn!(id = %meta.id, "generation failed mid-stream: {msg}");
            let e = ApiError::internal(format!("Generation failed: {msg}"));
            out.push_back(frame(&e.body()));
            out.push_back(Bytes::from_static(DONE));
            true
        }
        None => {
            out.push_back(frame(&ApiError::internal(ENDED_EARLY).body()));
            out.push_back(Bytes::from_static(DONE));
            true
        }
    }
}

/// The SSE body of a streamed request. Dropping it (the client went away) drops the receiver,
/// which cancels the generation.
pub fn sse_stream(
    rx: UnboundedReceiver<GenEvent>,
    meta: Meta,
) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static {
    struct State {
        rx: UnboundedReceiver<GenEvent>,
        meta: Meta,
        queue: VecDeque<Bytes>,
        pending: Pending,
        done: bool,
        /// Tool calls streamed so far (the next one's index).
        calls: usize,
    }
    impl Drop for State {
        fn drop(&mut self) {
            if !self.done {
                tracing::info!(id = %self.meta.id, "client went away; generation cancelled");
            }
        }
    }
    let mut queue = VecDeque::new();
    if meta.kind == Kind::Chat {
        queue.push_back(frame(&choice_chunk(
            &meta,
            Some(""),
            true,
            None,
            Value::Null,
        )));
    }
    let state = State {
        rx,
        meta,
        queue,
        pending: Pending::default(),
        done: false,
        calls: 0,
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
            st.done = event_frames(
                &st.meta,
                event,
                &mut st.pending,
                &mut st.queue,
                &mut st.calls,
            );
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
            tx.send(e).unwrap();
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
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
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
        tx.send(GenEvent::Text("The capital".into())).unwrap();
        tx.send(GenEvent::Text(" is Paris.".into())).unwrap();
        tx.send(GenEvent::Finished {
            reason: FinishReason::Stop,
            usage: usage(10, 4),
        })
        .unwrap();
        let meta = Meta::new(Kind::Chat, "m".into(), false);
        let g = rt().block_on(collect(&mut rx, &meta)).unwrap();
        assert_eq!(g.text, "The capital is Paris.");
        let v = full_response(&meta, &g);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "m");
        assert_eq!(
            v["choices"][0],
            json!({"index": 0, "message": {"role": "assistant", "content": "The capital is Paris."},
                   "finish_reason": "stop", "logprobs": null})
        );
        assert_eq!(v["usage"]["total_tokens"], 14);

        let tmeta = Meta::new(Kind::Text, "m".into(), false);
        let t = full_response(&tmeta, &g);
        assert_eq!(t["object"], "text_completion");
        assert_eq!(t["choices"][0]["text"], "The capital is Paris.");
    }

    #[test]
    fn collect_reports_failures() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(GenEvent::Failed("boom".into())).unwrap();
        drop(tx);
        let meta = Meta::new(Kind::Chat, "m".into(), false);
        let e = rt().block_on(collect(&mut rx, &meta)).unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
        assert!(e.message.contains("boom"));
        let e = rt().block_on(collect(&mut rx, &meta)).unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
    }
}
