//! Parsing and validation of request bodies. Bodies arrive as untyped JSON so that every error can
//! name the exact field at fault (`messages[1].content[0].type`); fields the parsers do not read
//! are refused first, by `super::fields`, and `null` counts as absent, as OpenAI SDKs expect.
use serde_json::{Map, Value};

use super::error::ApiError;
use super::fields::{CHAT_REQUEST, COMPLETION_REQUEST};
use crate::engine::{GenerationRequest, Guided, PromptInput, SamplingParams};
use crate::model::chat::{self, type_name, ChatMessage, Dialect};

/// At most this many stop sequences (as OpenAI).
pub const MAX_STOP: usize = 4;
/// Most alternatives per token of `/v1/completions` `logprobs` (as OpenAI).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;
/// `max_tokens` of `/v1/completions` when the request has none (as OpenAI).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// Options shared by both generation endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    pub model: String,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    /// The request field `max_tokens` came from (`max_completion_tokens` in chat requests).
    pub max_tokens_param: &'static str,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Output constraint and (chat) tools: [`super::guided`].
    pub guided: Guided,
    /// Choices to generate (`n`).
    pub n: usize,
}

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub common: Common,
    /// Normalised messages (`developer` read as `system`, content parts joined).
    pub messages: Vec<ChatMessage>,
}

/// A validated `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub common: Common,
    pub prompt: String,
}

impl ChatRequest {
    pub fn generation(&self) -> GenerationRequest {
        self.common.generation(PromptInput::Chat {
            messages: self.messages.clone(),
        })
    }
}

impl CompletionRequest {
    pub fn generation(&self) -> GenerationRequest {
        self.common
            .generation(PromptInput::Text(self.prompt.clone()))
    }
}

impl Common {
    fn generation(&self, input: PromptInput) -> GenerationRequest {
        GenerationRequest {
            model: self.model.clone(),
            input,
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            guided: self.guided.clone(),
            n: self.n,
        }
    }
}

/// Parses and validates a chat completion request body.
pub fn parse_chat(body: &Value) -> Result<ChatRequest, ApiError> {
    let obj = as_object(body)?;
    CHAT_REQUEST.check_object(obj)?;
    let model = parse_model(obj)?;
    let messages = parse_messages(obj)?;
    let (max_tokens, max_tokens_param) = match opt_uint(obj, "max_completion_tokens")? {
        Some(n) => (
            Some(check_max_tokens("max_completion_tokens", n)?),
            "max_completion_tokens",
        ),
        None => (
            opt_uint(obj, "max_tokens")?
                .map(|n| check_max_tokens("max_tokens", n))
                .transpose()?,
            "max_tokens",
        ),
    };
    let mut common = parse_common(obj, model, max_tokens)?;
    common.max_tokens_param = max_tokens_param;
    let top = opt_uint(obj, "top_logprobs")?;
    common.sampling.logprobs = match (opt_bool(obj, "logprobs")?, top) {
        (Some(true), top) => Some(usize::try_from(top.unwrap_or(0)).unwrap_or(usize::MAX)),
        (_, None) => None,
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
    };
    common.sampling.validate()?;
    common.guided = super::guided::parse(obj, true)?;
    Ok(ChatRequest { common, messages })
}

/// Parses and validates a (legacy) text completion request body.
pub fn parse_completion(body: &Value) -> Result<CompletionRequest, ApiError> {
    let obj = as_object(body)?;
    COMPLETION_REQUEST.check_object(obj)?;
    let model = parse_model(obj)?;
    let prompt = parse_prompt(obj)?;
    let max_tokens = match opt_uint(obj, "max_tokens")? {
        Some(n) => check_max_tokens("max_tokens", n)?,
        None => DEFAULT_COMPLETION_MAX_TOKENS,
    };
    let mut common = parse_common(obj, model, Some(max_tokens))?;
    common.sampling.logprobs = match opt_uint(obj, "logprobs")? {
        Some(k) if k > MAX_COMPLETION_LOGPROBS as u64 => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"),
            ))
        }
        k => k.map(|k| k as usize),
    };
    common.sampling.echo = opt_bool(obj, "echo")?.unwrap_or(false);
    common.guided = super::guided::parse(obj, false)?;
    Ok(CompletionRequest { common, prompt })
}

fn as_object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object"))
}

/// A present, non-null field.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        param,
        format!("`{param}` must be {expected}, got {}", type_name(got)),
    )
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(key, "a string", v)),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(key, "a boolean", v)),
    }
}

fn opt_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| ApiError::invalid(key, format!("`{key}` is not a valid number"))),
        Some(v) => Err(wrong_type(key, "a number", v)),
    }
}

/// An integer (an integral float such as `30.0` is accepted too).
fn opt_int(obj: &Map<String, Value>, key: &str) -> Result<Option<i128>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i as i128))
            } else if let Some(u) = n.as_u64() {
                Ok(Some(u as i128))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => {
                        Ok(Some(f as i128))
                    }
                    _ => Err(ApiError::invalid(
                        key,
                        format!("`{key}` must be an integer, got {n}"),
                    )),
                }
            }
        }
        Some(v) => Err(wrong_type(key, "an integer", v)),
    }
}

/// A non-negative integer.
fn opt_uint(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match opt_int(obj, key)? {
        None => Ok(None),
        Some(i) if i < 0 => Err(ApiError::invalid(
            key,
            format!("`{key}` must not be negative, got {i}"),
        )),
        Some(i) => Ok(Some(u64::try_from(i).unwrap_or(u64::MAX))),
    }
}

fn check_max_tokens(param: &str, n: u64) -> Result<usize, ApiError> {
    if n < 1 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1, got {n}"),
        ));
    }
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn parse_model(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match opt_str(obj, "model")? {
        Some(m) if !m.is_empty() => Ok(m.to_string()),
        _ => Err(ApiError::invalid(
            "model",
            "You must provide a model parameter",
        )),
    }
}

/// The one chat-message parser, its errors mapped to this request's `param`.
fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    chat::parse_messages(obj.get("messages"), Dialect::Api)
        .map_err(|e| ApiError::invalid(e.path, e.message))
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<String, ApiError> {
    let prompt = match field(obj, "prompt") {
        None => {
            return Err(ApiError::invalid(
                "prompt",
                "You must provide a prompt parameter",
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` must not be an empty array",
                ))
            }
            [_] => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` must be a string or an array holding one string (token ids are not supported)",
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "only one prompt per request is supported",
                ))
            }
        },
        Some(v) => return Err(wrong_type("prompt", "a string", v)),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    Ok(prompt)
}

fn parse_stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stop: Vec<String> = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "`stop` may hold at most {MAX_STOP} sequences, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type(&format!("stop[{i}]"), "a string", other)),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop)
}

fn parse_sampling(obj: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
    let mut s = SamplingParams::default();
    let floats: [(&str, &mut f32); 6] = [
        ("temperature", &mut s.temperature),
        ("top_p", &mut s.top_p),
        ("min_p", &mut s.min_p),
        ("repetition_penalty", &mut s.repetition_penalty),
        ("presence_penalty", &mut s.presence_penalty),
        ("frequency_penalty", &mut s.frequency_penalty),
    ];
    for (key, slot) in floats {
        if let Some(v) = opt_f32(obj, key)? {
            *slot = v;
        }
    }
    match opt_int(obj, "top_k")? {
        None | Some(-1) => {}
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1 (off) or a non-negative integer, got {k}"),
            ))
        }
        Some(k) => s.top_k = usize::try_from(k).unwrap_or(usize::MAX),
    }
    // OpenAI seeds are signed 64-bit integers: keep their bits.
    s.seed = opt_int(obj, "seed")?.map(|i| i as u64);
    s.ignore_eos = opt_bool(obj, "ignore_eos")?.unwrap_or(false);
    s.logit_bias = parse_logit_bias(obj)?;
    s.validate()?;
    Ok(s)
}

/// `{"token id": bias}`; the ids are checked against the vocabulary when the request is
/// prepared, the values (−100..100) by [`SamplingParams::validate`].
fn parse_logit_bias(obj: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match field(obj, "logit_bias") {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(wrong_type("logit_bias", "an object", v)),
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias keys must be token ids (non-negative integers), got `{k}`"),
            )
        })?;
        let bias = v.as_f64().ok_or_else(|| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias[{k}] must be a number, got {}", type_name(v)),
            )
        })?;
        out.push((id, bias as f32));
    }
    Ok(out)
}

fn parse_common(
    obj: &Map<String, Value>,
    model: String,
    max_tokens: Option<usize>,
) -> Result<Common, ApiError> {
    let sampling = parse_sampling(obj)?;
    let stop = parse_stop(obj)?;
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let n = match opt_uint(obj, "n")? {
        None => 1,
        Some(n) => crate::engine::check_choices(n)?,
    };
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| ApiError {
                param: Some("stream_options.include_usage".into()),
                ..e
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    Ok(Common {
        model,
        sampling,
        max_tokens,
        max_tokens_param: "max_tokens",
        stop,
        stream,
        include_usage,
        guided: Guided::default(),
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chat::Role;
    use serde_json::json;

    fn chat_err(body: Value) -> ApiError {
        parse_chat(&body).expect_err("should fail")
    }

    fn param(e: &ApiError) -> &str {
        e.param.as_deref().unwrap_or("<none>")
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    #[test]
    fn minimal_chat_gets_defaults() {
        let r = parse_chat(&json!({"model": "m", "messages": [user("hi")]})).unwrap();
        assert_eq!(r.common.model, "m");
        assert_eq!(r.messages, vec![ChatMessage::new(Role::User, "hi")]);
        assert_eq!(r.common.sampling, SamplingParams::default());
        assert_eq!(r.common.max_tokens, None);
        assert_eq!(r.common.max_tokens_param, "max_tokens");
        assert!(r.common.stop.is_empty());
        assert!(!r.common.stream);
        assert!(!r.common.include_usage);
    }

    #[test]
    fn full_chat_request() {
        let r = parse_chat(&json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "x"}]},
                {"role": "tool", "content": "42", "tool_call_id": "x"},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": -1,
            "ignore_eos": true,
            "stop": ["\n\n", "END"],
            "stream": true,
            "stream_options": {"include_usage": true},
            "n": 3,
            "user": "someone",
            "logprobs": false,
        }))
        .unwrap();
        assert_eq!(
            r.messages,
            vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "a\nb"),
                ChatMessage {
                    tool_calls: Some(vec![json!({"id": "x"})]),
                    ..ChatMessage::new(Role::Assistant, "")
                },
                ChatMessage {
                    tool_call_id: Some("x".into()),
                    ..ChatMessage::new(Role::Tool, "42")
                },
            ]
        );
        // What the chat template sees.
        assert_eq!(
            serde_json::to_value(&r.messages).expect("serialize"),
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]},
                {"role": "tool", "content": "42", "tool_call_id": "x"},
            ])
        );
        let c = &r.common;
        assert_eq!(c.max_tokens, Some(7));
        assert_eq!(c.max_tokens_param, "max_completion_tokens");
        assert_eq!(c.sampling.temperature, 0.0);
        assert_eq!(c.sampling.top_p, 0.9);
        assert_eq!(c.sampling.top_k, 40);
        assert_eq!(c.sampling.min_p, 0.05);
        assert_eq!(c.sampling.repetition_penalty, 1.1);
        assert_eq!(c.sampling.presence_penalty, 0.5);
        assert_eq!(c.sampling.frequency_penalty, -0.5);
        assert_eq!(c.sampling.seed, Some(u64::MAX));
        assert!(c.sampling.ignore_eos);
        assert_eq!(c.stop, vec!["\n\n".to_string(), "END".to_string()]);
        assert!(c.stream && c.include_usage);
        let g = r.generation();
        assert_eq!(g.model, "m");
        assert_eq!(g.max_tokens, Some(7));
        assert_eq!(g.n, 3);
        assert!(matches!(g.input, PromptInput::Chat { ref messages } if messages.len() == 4));
    }

    #[test]
    fn nulls_count_as_absent() {
        let r = parse_chat(&json!({
            "model": "m", "messages": [user("hi")], "temperature": null, "stop": null,
            "max_tokens": null, "stream": null, "stream_options": null, "n": null, "seed": null,
        }))
        .unwrap();
        assert_eq!(r.common.sampling, SamplingParams::default());
        assert_eq!(r.common.max_tokens, None);
    }

    #[test]
    fn chat_errors_name_the_field() {
        let cases: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "<none>"),
            (json!({"messages": [user("x")]}), "model"),
            (json!({"model": 3, "messages": [user("x")]}), "model"),
            (json!({"model": "", "messages": [user("x")]}), "model"),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": "hi"}), "messages"),
            (json!({"model": "m", "messages": ["hi"]}), "messages[0]"),
            (
                json!({"model": "m", "messages": [user("a"), {"role": "wizard", "content": "x"}]}),
                "messages[1].role",
            ),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": 1, "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": null}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "messages[0].content[0].text",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
                "messages[0].content[0].text",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "temperature": 5}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "temperature": -0.1}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "top_p": 0}),
                "top_p",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "top_p": 1.5}),
                "top_p",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "min_p": 2}),
                "min_p",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "top_k": -2}),
                "top_k",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "top_k": 1.5}),
                "top_k",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "repetition_penalty": 0}),
                "repetition_penalty",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "presence_penalty": 3}),
                "presence_penalty",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "frequency_penalty": -3}),
                "frequency_penalty",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "seed": "x"}),
                "seed",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "max_tokens": -5}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "max_tokens": "10"}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "max_completion_tokens": 0}),
                "max_completion_tokens",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stop": [1]}),
                "stop[0]",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stop": ""}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stop": 7}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "ignore_eos": 1}),
                "ignore_eos",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stream_options": true}),
                "stream_options",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
            ),
            (json!({"model": "m", "messages": [user("x")], "n": 17}), "n"),
            (json!({"model": "m", "messages": [user("x")], "n": 0}), "n"),
            (json!({"model": "m", "messages": [user("x")], "n": -1}), "n"),
            (
                json!({"model": "m", "messages": [user("x")], "n": "2"}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logprobs": 1}),
                "logprobs",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logit_bias": [1]}),
                "logit_bias",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logit_bias": {"a": 1}}),
                "logit_bias",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logit_bias": {"-3": 1}}),
                "logit_bias",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logit_bias": {"3": 100.5}}),
                "logit_bias",
            ),
            (
                json!({"model": "m", "messages": [user("x")], "logit_bias": {"3": "up"}}),
                "logit_bias",
            ),
        ];
        for (body, want) in cases {
            let e = chat_err(body.clone());
            assert_eq!(param(&e), want, "body {body}: {e:?}");
            assert_eq!(e.status.as_u16(), 400, "body {body}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn logprobs_and_bias_are_read() {
        let r = parse_chat(
            &json!({"model": "m", "messages": [user("x")], "logprobs": true,
            "top_logprobs": 20, "logit_bias": {"7": -100, "12": 2.5}}),
        )
        .unwrap();
        assert_eq!(r.common.sampling.logprobs, Some(20));
        let mut bias = r.common.sampling.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (12, 2.5)]);
        let r =
            parse_chat(&json!({"model": "m", "messages": [user("x")], "logprobs": true})).unwrap();
        assert_eq!(r.common.sampling.logprobs, Some(0));
        let r =
            parse_chat(&json!({"model": "m", "messages": [user("x")], "logprobs": false})).unwrap();
        assert_eq!(r.common.sampling.logprobs, None);
        let r =
            parse_completion(&json!({"model": "m", "prompt": "x", "logprobs": 0, "echo": true}))
                .unwrap();
        assert_eq!(r.common.sampling.logprobs, Some(0));
        assert!(r.common.sampling.echo);
        let e = parse_chat(&json!({"model": "m", "messages": [user("x")],
            "logit_bias": {"3": -101}}))
        .expect_err("out of range");
        assert_eq!(
            e.message,
            "logit_bias values must be between -100 and 100, got -101 for token 3"
        );
    }

    #[test]
    fn unknown_role_message_lists_roles() {
        let e = chat_err(json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}));
        assert!(
            e.message.contains("wizard") && e.message.contains("assistant"),
            "{}",
            e.message
        );
    }

    #[test]
    fn integral_floats_and_top_k_off() {
        let r = parse_chat(&json!({
            "model": "m", "messages": [user("x")], "max_tokens": 30.0, "top_k": -1,
        }))
        .unwrap();
        assert_eq!(r.common.max_tokens, Some(30));
        assert_eq!(r.common.sampling.top_k, 0);
        let huge = parse_chat(&json!({
            "model": "m", "messages": [user("x")], "max_tokens": 18446744073709551615u64,
        }))
        .unwrap();
        assert_eq!(huge.common.max_tokens, Some(usize::MAX));
    }

    #[test]
    fn completion_defaults_and_prompt_forms() {
        let r = parse_completion(&json!({"model": "m", "prompt": "Once"})).unwrap();
        assert_eq!(r.prompt, "Once");
        assert_eq!(r.common.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
        let r = parse_completion(&json!({
            "model": "m", "prompt": ["Once"], "max_tokens": 3, "echo": false, "best_of": 1,
            "suffix": null, "logprobs": null, "stream": true,
        }))
        .unwrap();
        assert_eq!(r.prompt, "Once");
        assert_eq!(r.common.max_tokens, Some(3));
        assert!(r.common.stream);
        assert!(matches!(r.generation().input, PromptInput::Text(ref t) if t == "Once"));
    }

    #[test]
    fn completion_errors_name_the_field() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"prompt": "x"}), "model"),
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": ""}), "prompt"),
            (json!({"model": "m", "prompt": 3}), "prompt"),
            (json!({"model": "m", "prompt": []}), "prompt"),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
            (json!({"model": "m", "prompt": [1, 2, 3]}), "prompt"),
            (json!({"model": "m", "prompt": [[1, 2]]}), "prompt"),
            (json!({"model": "m", "prompt": "x", "echo": "yes"}), "echo"),
            (
                json!({"model": "m", "prompt": "x", "best_of": 3}),
                "best_of",
            ),
            (
                json!({"model": "m", "prompt": "x", "suffix": "end"}),
                "suffix",
            ),
            (
                json!({"model": "m", "prompt": "x", "logprobs": 6}),
                "logprobs",
            ),
            (json!({"model": "m", "prompt": "x", "n": 100}), "n"),
            (
                json!({"model": "m", "prompt": "x", "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "prompt": "x", "temperature": 2.5}),
                "temperature",
            ),
        ];
        for (body, want) in cases {
            let e = parse_completion(&body).expect_err("should fail");
            assert_eq!(param(&e), want, "body {body}: {e:?}");
            assert_eq!(e.status.as_u16(), 400);
        }
    }
}
