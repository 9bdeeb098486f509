//! The one place that decides which request fields a route takes. Every JSON body, multipart
//! form and query string is checked against its route's [`Fields`] before it is parsed, so a
//! field we do not act on is answered with a 400 naming it instead of being dropped without a
//! word. A field is either *accepted* (the parser reads it), *inert* (the OpenAI API defines it
//! but it cannot change what we return, e.g. `user`), or *unsupported*: allowed only at its
//! default value, since an SDK may send the default explicitly. Anything else is unknown and
//! rejected unless it is `null`.
use serde_json::{Map, Value};

use super::error::ApiError;

/// A field allowed only at its default value.
#[derive(Debug, Clone, Copy)]
pub struct Unsupported {
    pub name: &'static str,
    /// Values that mean "not used" besides `null` (numbers compare by value, so `1` = `1.0`).
    pub defaults: &'static [DefaultValue],
    /// What to tell the caller (why, or what to use instead).
    pub why: &'static str,
}

/// A default value of an unsupported field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    Bool(bool),
    Num(f64),
    Str(&'static str),
    EmptyArray,
    EmptyObject,
    /// An object whose `type` is this string and that holds nothing else.
    Type(&'static str),
}

impl DefaultValue {
    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Self::Bool(b), Value::Bool(x)) => b == x,
            (Self::Num(n), Value::Number(x)) => x.as_f64() == Some(*n),
            (Self::Str(s), Value::String(x)) => s == x,
            (Self::EmptyArray, Value::Array(a)) => a.is_empty(),
            (Self::EmptyObject, Value::Object(o)) => o.is_empty(),
            (Self::Type(t), Value::Object(o)) => {
                o.len() == 1 && o.get("type").and_then(Value::as_str) == Some(t)
            }
            _ => false,
        }
    }
}

/// The fields of one request type.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// What the request is called in messages ("chat completion request").
    pub what: &'static str,
    pub accepted: &'static [&'static str],
    pub inert: &'static [&'static str],
    pub unsupported: &'static [&'static [Unsupported]],
}

impl Fields {
    /// Checks every key of a JSON body.
    pub fn check_object(&self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        obj.iter().try_for_each(|(k, v)| self.check(k, v))
    }

    /// Checks one field (a multipart part or query parameter comes as a string; a bracketed
    /// name such as `expires_after[anchor]` or `metadata[team]`, as SDKs encode nested
    /// values, is the field before the bracket).
    pub fn check(&self, key: &str, value: &Value) -> Result<(), ApiError> {
        let name = key.split('[').next().unwrap_or(key);
        if value.is_null() || self.accepted.contains(&name) || self.inert.contains(&name) {
            return Ok(());
        }
        let known = self.unsupported.iter().flat_map(|l| l.iter());
        match known.into_iter().find(|u| u.name == name) {
            Some(u) if u.defaults.iter().any(|d| d.matches(value)) => Ok(()),
            Some(u) => Err(ApiError::invalid(
                name,
                format!("`{name}` is not supported by this server: {}", u.why),
            )),
            None => Err(ApiError::invalid(
                name,
                format!(
                    "Unrecognized request argument supplied: `{name}` (a {} takes {})",
                    self.what,
                    self.accepted.join(", ")
                ),
            )),
        }
    }
}

use DefaultValue::*;

const fn u(
    name: &'static str,
    defaults: &'static [DefaultValue],
    why: &'static str,
) -> Unsupported {
    Unsupported {
        name,
        defaults,
        why,
    }
}

/// Superseded OpenAI fields: callers are pointed at their replacements.
pub const DEPRECATED: &[Unsupported] = &[
    u("functions", &[EmptyArray], "use `tools` (deprecated field)"),
    u(
        "function_call",
        &[Str("none")],
        "use `tool_choice` (deprecated field)",
    ),
];

/// Output constraints (structured outputs), read by both generation parsers.
const GUIDED: &[&str] = &[
    "response_format",
    "guided_json",
    "guided_choice",
    "guided_regex",
    "guided_grammar",
];

/// Chat features this server does not offer.
const CHAT: &[Unsupported] = &[
    u(
        "audio",
        &[],
        "audio output is not available (text-only models)",
    ),
    u(
        "modalities",
        &[],
        "only text output is available; leave `modalities` out",
    ),
    u("prediction", &[], "predicted outputs are not available"),
    u("web_search_options", &[], "web search is not available"),
    u(
        "store",
        &[Bool(false)],
        "completions are never stored by this server",
    ),
    u(
        "metadata",
        &[EmptyObject],
        "metadata only applies to stored completions, which this server does not keep",
    ),
    u("reasoning_effort", &[], "reasoning effort is not available"),
    u("verbosity", &[], "verbosity is not available"),
    u(
        "service_tier",
        &[Str("auto"), Str("default")],
        "there is one service tier",
    ),
];

/// Legacy completion features this server does not offer.
const COMPLETION: &[Unsupported] = &[
    u("best_of", &[Num(1.0)], "only best_of=1 is supported"),
    u("suffix", &[Str("")], "suffix (insertion) is not supported"),
];

/// Read by both generation parsers.
const SAMPLING: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "stop",
    "stream",
    "stream_options",
    "logit_bias",
    "n",
];

/// Identify the caller or hint at caching; they change nothing we return.
const INERT: &[&str] = &["user", "safety_identifier", "prompt_cache_key"];

const fn concat<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - a.len()];
        i += 1;
    }
    out
}

const GENERATION_ACCEPTED: [&str; SAMPLING.len() + GUIDED.len()] = concat(SAMPLING, GUIDED);
const CHAT_ACCEPTED: [&str; GENERATION_ACCEPTED.len() + 7] = concat(
    &GENERATION_ACCEPTED,
    &[
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    ],
);
const COMPLETION_ACCEPTED: [&str; GENERATION_ACCEPTED.len() + 3] =
    concat(&GENERATION_ACCEPTED, &["prompt", "logprobs", "echo"]);

/// `POST /v1/chat/completions`.
pub const CHAT_REQUEST: Fields = Fields {
    what: "chat completion request",
    accepted: &CHAT_ACCEPTED,
    inert: INERT,
    unsupported: &[DEPRECATED, CHAT],
};

/// `POST /v1/completions`.
pub const COMPLETION_REQUEST: Fields = Fields {
    what: "completion request",
    accepted: &COMPLETION_ACCEPTED,
    inert: INERT,
    unsupported: &[COMPLETION],
};

/// `POST /v1/files` (multipart form fields).
pub const FILE_UPLOAD: Fields = Fields {
    what: "file upload",
    accepted: &["file", "purpose"],
    inert: &[],
    unsupported: &[&[u(
        "expires_after",
        &[],
        "files are kept until deleted (DELETE /v1/files/{id})",
    )]],
};

/// `GET /v1/files` (query).
pub const FILE_LIST: Fields = Fields {
    what: "file list request",
    accepted: &["purpose", "after", "limit", "order"],
    inert: &[],
    unsupported: &[],
};

/// `POST /v1/fine_tuning/jobs`.
pub const JOB_CREATE: Fields = Fields {
    what: "fine-tuning job",
    accepted: &[
        "model",
        "training_file",
        "validation_file",
        "suffix",
        "seed",
        "metadata",
        "hyperparameters",
        "method",
    ],
    inert: &[],
    unsupported: &[&[u(
        "integrations",
        &[EmptyArray],
        "no integrations (such as Weights & Biases) are available; \
         follow a job with its events and metrics",
    )]],
};

/// `GET /v1/fine_tuning/jobs` (query).
pub const JOB_LIST: Fields = Fields {
    what: "fine-tuning job list request",
    accepted: &["after", "limit"],
    inert: &[],
    unsupported: &[&[u(
        "metadata",
        &[],
        "jobs cannot be filtered by metadata; list them all and filter on the client",
    )]],
};

/// `GET /v1/fine_tuning/jobs/{id}/events` (query).
pub const JOB_EVENTS: Fields = Fields {
    what: "job events request",
    accepted: &["after", "limit", "stream"],
    inert: &[],
    unsupported: &[],
};

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints` (query).
pub const JOB_CHECKPOINTS: Fields = Fields {
    what: "job checkpoints request",
    accepted: &["after", "limit"],
    inert: &[],
    unsupported: &[],
};

/// Checks a query string already split into a map.
pub fn check_query(
    fields: &Fields,
    q: &std::collections::HashMap<String, String>,
) -> Result<(), ApiError> {
    // Sorted, so the field named is the same on every run.
    let mut keys: Vec<_> = q.iter().collect();
    keys.sort();
    keys.into_iter()
        .try_for_each(|(k, v)| fields.check(k, &Value::String(v.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(f: &Fields, body: Value) -> ApiError {
        f.check_object(body.as_object().expect("object"))
            .expect_err("should be refused")
    }

    #[test]
    fn every_list_is_disjoint() {
        for f in [
            CHAT_REQUEST,
            COMPLETION_REQUEST,
            FILE_UPLOAD,
            FILE_LIST,
            JOB_CREATE,
            JOB_LIST,
            JOB_EVENTS,
            JOB_CHECKPOINTS,
        ] {
            let mut names: Vec<&str> = f.accepted.to_vec();
            names.extend(f.inert);
            names.extend(f.unsupported.iter().flat_map(|l| l.iter().map(|u| u.name)));
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "{} names a field twice", f.what);
        }
    }

    #[test]
    fn defaults_and_nulls_pass() {
        let ok = json!({
            "model": "m", "messages": [], "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "n": 1.0, "logprobs": false,
            "top_logprobs": 0, "store": false, "metadata": {}, "service_tier": "auto",
            "logit_bias": {}, "audio": null, "user": "u", "something_new": null,
        });
        CHAT_REQUEST
            .check_object(ok.as_object().expect("object"))
            .expect("defaults pass");
        let ok = json!({"model": "m", "prompt": "p", "echo": false, "best_of": 1,
                        "suffix": "", "logprobs": null});
        COMPLETION_REQUEST
            .check_object(ok.as_object().expect("object"))
            .expect("defaults pass");
        let ok = json!({"model": "m", "training_file": "f", "integrations": []});
        JOB_CREATE
            .check_object(ok.as_object().expect("object"))
            .expect("defaults pass");
    }

    #[test]
    fn messages_are_pinned() {
        let e = err(&CHAT_REQUEST, json!({"audio": {"voice": "alloy"}}));
        assert_eq!(e.status.as_u16(), 400);
        assert_eq!(e.param.as_deref(), Some("audio"));
        assert_eq!(
            e.message,
            "`audio` is not supported by this server: audio output is not available (text-only models)"
        );
        let e = err(&CHAT_REQUEST, json!({"colour": "red"}));
        assert_eq!(e.param.as_deref(), Some("colour"));
        assert!(
            e.message
                .starts_with("Unrecognized request argument supplied: `colour` (a chat completion request takes model, max_tokens,"),
            "{}",
            e.message
        );
        let e = err(&JOB_CREATE, json!({"integrations": [{"type": "wandb"}]}));
        assert_eq!(e.param.as_deref(), Some("integrations"));
        assert_eq!(
            e.message,
            "`integrations` is not supported by this server: no integrations (such as Weights \
             & Biases) are available; follow a job with its events and metrics"
        );
        let e = FILE_UPLOAD
            .check("expires_after[anchor]", &json!("created_at"))
            .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("expires_after"));
        assert_eq!(
            e.message,
            "`expires_after` is not supported by this server: files are kept until deleted \
             (DELETE /v1/files/{id})"
        );
        let q = std::collections::HashMap::from([
            ("limit".to_string(), "3".to_string()),
            ("metadata[team]".to_string(), "a".to_string()),
        ]);
        let e = check_query(&JOB_LIST, &q).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("metadata"));
        assert_eq!(
            e.message,
            "`metadata` is not supported by this server: jobs cannot be filtered by metadata; \
             list them all and filter on the client"
        );
    }

    #[test]
    fn non_defaults_of_the_issue_are_refused() {
        let cases = [
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            json!({"modalities": ["text"]}),
            json!({"prediction": {"type": "content", "content": "x"}}),
            json!({"web_search_options": {}}),
            json!({"functions": [{"name": "f"}]}),
            json!({"function_call": "auto"}),
            json!({"store": true}),
            json!({"metadata": {"k": "v"}}),
            json!({"service_tier": "flex"}),
        ];
        for body in cases {
            let key = body
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .expect("one key");
            let e = err(&CHAT_REQUEST, body.clone());
            assert_eq!(e.param.as_deref(), Some(key.as_str()), "{body}");
            assert!(e.message.contains(&format!("`{key}`")), "{}", e.message);
        }
        for body in [
            json!({"best_of": 2}),
            json!({"suffix": "end"}),
            json!({"messages": []}),
        ] {
            let key = body
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .expect("one key");
            let e = err(&COMPLETION_REQUEST, body.clone());
            assert_eq!(e.param.as_deref(), Some(key.as_str()), "{body}");
        }
    }
}
