//! A typed, blocking client for the `itamaed` HTTP API (OpenAI-style).
//!
//! ```no_run
//! use itamae_client::{Client, Message};
//! let client = Client::new("http://127.0.0.1:8080", None)?;
//! let model = client.models()?.remove(0).id;
//! let answer = client.chat(&model, &[Message::user("Hi!")], Some(30), Some(0.0))?;
//! println!("{answer}");
//! # Ok::<(), itamae_client::Error>(())
//! ```
use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body; `message` is its `error.message`.
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        kind: Option<String>,
        param: Option<String>,
        code: Option<String>,
    },
    /// The connection failed (daemon not running, wrong URL, ...).
    #[error("could not reach the server: {0}")]
    Http(#[from] reqwest::Error),
    /// Reading a streamed response failed.
    #[error("reading the response failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered something this client does not understand.
    #[error("unexpected response from the server: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A served model as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
    #[serde(default)]
    pub context_length: Option<u64>,
}

/// A blocking client for one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    api_key: Option<String>,
    http: reqwest::blocking::Client,
}

impl Client {
    /// `base_url` such as `http://127.0.0.1:8080` (a trailing `/` or `/v1` is accepted).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self> {
        let mut base = base_url.trim_end_matches('/').to_string();
        if let Some(stripped) = base.strip_suffix("/v1") {
            base = stripped.to_string();
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Generations can take long; streaming keeps the connection busy.
            .timeout(None)
            .build()?;
        Ok(Self {
            base,
            api_key,
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        rb
    }

    /// Sends a request; a non-2xx answer becomes [`Error::Api`].
    fn send(&self, rb: reqwest::blocking::RequestBuilder) -> Result<reqwest::blocking::Response> {
        let res = rb.send()?;
        if res.status().is_success() {
            Ok(res)
        } else {
            let status = res.status().as_u16();
            let text = res.text().unwrap_or_default();
            Err(api_error(status, &text))
        }
    }

    /// `GET /healthz` succeeded.
    pub fn health(&self) -> Result<()> {
        self.send(self.request(reqwest::Method::GET, "/healthz"))?;
        Ok(())
    }

    /// `GET /v1/models`.
    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        #[derive(Deserialize)]
        struct List {
            data: Vec<ModelInfo>,
        }
        let res = self.send(self.request(reqwest::Method::GET, "/v1/models"))?;
        let list: List = res
            .json()
            .map_err(|e| Error::Protocol(format!("model list: {e}")))?;
        Ok(list.data)
    }

    fn chat_body(
        model: &str,
        messages: &[Message],
        max_tokens: Option<u32>,
        temperature: Option<f32>,
        stream: bool,
    ) -> Value {
        let mut body = json!({"model": model, "messages": messages, "stream": stream});
        if let Some(n) = max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = temperature {
            body["temperature"] = json!(t);
        }
        body
    }

    /// `POST /v1/chat/completions`: the assistant's answer.
    pub fn chat(
        &self,
        model: &str,
        messages: &[Message],
        max_tokens: Option<u32>,
        temperature: Option<f32>,
    ) -> Result<String> {
        let body = Self::chat_body(model, messages, max_tokens, temperature, false);
        let res = self.send(
            self.request(reqwest::Method::POST, "/v1/chat/completions")
                .json(&body),
        )?;
        let v: Value = res
            .json()
            .map_err(|e| Error::Protocol(format!("chat completion: {e}")))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Protocol(format!("no message content in {v}")))
    }

    /// `POST /v1/chat/completions` with `stream: true`: calls `on_delta` with each piece of text
    /// as it arrives and returns the whole answer.
    pub fn chat_stream(
        &self,
        model: &str,
        messages: &[Message],
        max_tokens: Option<u32>,
        temperature: Option<f32>,
        mut on_delta: impl FnMut(&str),
    ) -> Result<String> {
        let body = Self::chat_body(model, messages, max_tokens, temperature, true);
        let res = self.send(
            self.request(reqwest::Method::POST, "/v1/chat/completions")
                .json(&body),
        )?;
        let mut text = String::new();
        read_sse(BufReader::new(res), |data| {
            let v: Value = serde_json::from_str(data)
                .map_err(|e| Error::Protocol(format!("bad stream event {data:?}: {e}")))?;
            if v.get("error").is_some() {
                return Err(api_error(200, data));
            }
            if let Some(delta) = v["choices"][0]["delta"]["content"].as_str() {
                if !delta.is_empty() {
                    on_delta(delta);
                    text.push_str(delta);
                }
            }
            Ok(())
        })?;
        Ok(text)
    }
}

/// Reads `data:` lines of a server-sent event stream until `[DONE]`, passing each payload on.
pub fn read_sse(reader: impl BufRead, mut on_data: impl FnMut(&str) -> Result<()>) -> Result<()> {
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data:") else {
            continue; // blank separators, comments, other fields
        };
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(());
        }
        on_data(data)?;
    }
    Err(Error::Protocol(
        "the stream ended without [DONE]".to_string(),
    ))
}

/// Builds [`Error::Api`] from an error body, falling back to the raw text.
fn api_error(status: u16, body: &str) -> Error {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |k: &str| {
        err.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = field("message").unwrap_or_else(|| {
        if body.trim().is_empty() {
            format!("the server answered HTTP {status}")
        } else {
            format!("HTTP {status}: {}", body.trim())
        }
    });
    Error::Api {
        status,
        message,
        kind: field("type"),
        param: field("param"),
        code: field("code"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_normalised() {
        for url in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            assert_eq!(Client::new(url, None).unwrap().base_url(), "http://h:1");
        }
    }

    #[test]
    fn api_errors_carry_the_server_message() {
        let e = api_error(
            400,
            r#"{"error":{"message":"bad role","type":"invalid_request_error","param":"messages[0].role","code":null}}"#,
        );
        assert_eq!(e.to_string(), "bad role");
        match e {
            Error::Api {
                status,
                param,
                kind,
                code,
                ..
            } => {
                assert_eq!(status, 400);
                assert_eq!(param.as_deref(), Some("messages[0].role"));
                assert_eq!(kind.as_deref(), Some("invalid_request_error"));
                assert_eq!(code, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            api_error(502, "").to_string(),
            "the server answered HTTP 502"
        );
        assert_eq!(api_error(500, "oops").to_string(), "HTTP 500: oops");
    }

    #[test]
    fn sse_reading() {
        let stream =
            "data: {\"a\":1}\n\n: comment\ndata:{\"a\":2}\n\ndata: [DONE]\n\ndata: {\"a\":3}\n\n";
        let mut seen = Vec::new();
        read_sse(stream.as_bytes(), |d| {
            seen.push(d.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec!["{\"a\":1}", "{\"a\":2}"]);
        let cut = read_sse("data: {}\n\n".as_bytes(), |_| Ok(()));
        assert!(matches!(cut, Err(Error::Protocol(_))));
    }

    #[test]
    fn chat_body_shape() {
        let b = Client::chat_body("m", &[Message::user("hi")], Some(5), Some(0.0), true);
        assert_eq!(
            b,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "stream": true, "max_tokens": 5, "temperature": 0.0})
        );
        let b = Client::chat_body("m", &[], None, None, false);
        assert!(b.get("max_tokens").is_none() && b.get("temperature").is_none());
    }
}
