//! Calls that load generators and benchmarks (`itamae-bench`) need beyond the CLI's: readiness,
//! streamed chats with a sampling seed and the usage chunk, each chunk handed over as it arrives
//! (for first-token times), and a job's event stream that the caller may leave early.
use std::ops::ControlFlow;

use reqwest::Method;
use serde::Serialize;
use serde_json::Value;

use crate::{api_error, read_sse, ChatRequest, Client, Error, JobEvent, Result};

/// `POST /v1/chat/completions` with `stream: true`, a sampling seed and
/// `stream_options.include_usage` (the final chunk then carries the token counts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamChatRequest {
    #[serde(flatten)]
    pub chat: ChatRequest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub stream_options: StreamOptions,
}

/// `stream_options` of a streamed chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

impl StreamChatRequest {
    /// A streamed chat that reports usage at the end.
    pub fn new(chat: ChatRequest) -> Self {
        Self {
            chat,
            seed: None,
            stream_options: StreamOptions {
                include_usage: true,
            },
        }
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

/// One `chat.completion.chunk`, reduced to what a load generator counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatChunk {
    /// The first choice's delta text (empty for role-only and usage chunks).
    pub content: String,
    /// `usage.completion_tokens`, on the usage chunk.
    pub completion_tokens: Option<u64>,
}

impl ChatChunk {
    /// Parses one event's data; an `error` object in the stream becomes [`Error::Api`].
    pub fn parse(data: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Error::Protocol(format!("bad stream event {data:?}: {e}")))?;
        if v.get("error").is_some() {
            return Err(api_error(200, data));
        }
        Ok(Self {
            content: v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            completion_tokens: v["usage"]["completion_tokens"].as_u64(),
        })
    }
}

impl Client {
    /// `GET /readyz` succeeded: the model is loaded and requests are served.
    pub fn ready(&self) -> Result<()> {
        self.send(self.request(Method::GET, &["readyz"]))?;
        Ok(())
    }

    /// Streams `req`, calling `on_chunk` with each chunk as it arrives; Ok once the server said
    /// the stream is done.
    pub fn chat_stream_chunks(
        &self,
        req: &StreamChatRequest,
        mut on_chunk: impl FnMut(&ChatChunk),
    ) -> Result<()> {
        let mut body = req.clone();
        body.chat.stream = true;
        let res = self.send(
            self.request(Method::POST, &["v1", "chat", "completions"])
                .json(&body),
        )?;
        read_sse(res, |data| {
            on_chunk(&ChatChunk::parse(data)?);
            Ok(())
        })
    }

    /// Follows `GET /v1/fine_tuning/jobs/{id}/events?stream=true` until `on_event` breaks (the
    /// connection is then closed at once) or the server ends the stream. Returns whether
    /// `on_event` broke.
    pub fn follow_job_events(
        &self,
        id: &str,
        mut on_event: impl FnMut(&JobEvent) -> ControlFlow<()>,
    ) -> Result<bool> {
        let rb = self
            .request(Method::GET, &["v1", "fine_tuning", "jobs", id, "events"])
            .query(&[("stream", "true")]);
        let res = self.send(rb)?;
        let mut stopped = false;
        let read = read_sse(res, |data| {
            let ev: JobEvent = serde_json::from_str(data)
                .map_err(|e| Error::Protocol(format!("bad job event {data:?}: {e}")))?;
            if on_event(&ev).is_break() {
                stopped = true;
                // Ends the read; told apart from a real error by `stopped`.
                return Err(Error::Protocol(String::new()));
            }
            Ok(())
        });
        match read {
            Err(_) if stopped => Ok(true),
            Err(e) => Err(e),
            Ok(()) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn stream_request_shape() {
        let req = StreamChatRequest::new(
            ChatRequest::new("m", vec![Message::user("hi")])
                .max_tokens(8)
                .temperature(0.8),
        )
        .seed(7);
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["seed"], 7);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["role"], "user");
    }

    #[test]
    fn chunks() {
        let c = ChatChunk::parse(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#).unwrap();
        assert_eq!(c.content, "Hi");
        assert_eq!(c.completion_tokens, None);
        let c = ChatChunk::parse(r#"{"choices":[],"usage":{"completion_tokens":5}}"#).unwrap();
        assert_eq!((c.content.as_str(), c.completion_tokens), ("", Some(5)));
        let e = ChatChunk::parse(r#"{"error":{"message":"boom"}}"#).unwrap_err();
        assert_eq!(e.to_string(), "boom");
        assert!(ChatChunk::parse("not json").is_err());
    }
}
