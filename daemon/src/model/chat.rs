//! The chat message: one type and one parser for what `/v1/chat/completions` receives and what a
//! chat training dataset holds, so that a conversation is read by the same rules, and rendered
//! through the same [`ChatTemplate`](super::ChatTemplate) call, whether it is served or trained on.
//! Were the two read differently, a model would be trained on prompts it is never served.
//!
//! Messages arrive as untyped JSON so that every error can name the exact field at fault
//! (`messages[1].content[0].type`). The rules are the API's: roles `system`, `developer` (read as
//! `system`), `user`, `assistant` and `tool`; content as a string or as `text` parts joined with
//! newlines; an assistant turn that only calls tools may omit its content. Training adds what it
//! needs on top ([`Dialect::Training`]): a per-assistant `weight` of 0 or 1 and no blank turns.
//! The two surfaces word their errors differently (the API names a `param`, training data a line
//! of a file), so [`Dialect`] also picks the wording; the rules do not depend on it otherwise,
//! except that the API reads `null` as absent, as OpenAI SDKs expect.
use serde::Serialize;
use serde_json::{Map, Value};

/// Who speaks a message. `developer` (OpenAI's newer name for `system`) is read as [`Role::System`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The name a chat template sees.
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "system" | "developer" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            "tool" => Some(Self::Tool),
            _ => None,
        }
    }
}

/// The role names a message may carry, in the order error messages list them.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// One message of a conversation, normalised. It serializes to what the chat template reads:
/// `{"role", "content"}` plus `name`, `tool_calls` and `tool_call_id` when the message has them;
/// `weight` is training bookkeeping and never reaches the template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Text parts already joined; empty for an assistant turn that only called tools.
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// OpenAI-style tool calls of an assistant turn, as sent except that an `arguments` string
    /// holding a JSON object becomes that object (see `arguments_as_json`): the template decides
    /// how to print them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Training only: 0 excludes an assistant turn from the loss, 1 (the default) trains it.
    #[serde(skip)]
    pub weight: f32,
}

impl ChatMessage {
    /// A plain message with just a role and its text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            weight: 1.0,
        }
    }

    /// An assistant turn that calls tools (non-empty `tool_calls`), which may then have no text.
    pub fn calls_tools(&self) -> bool {
        self.role == Role::Assistant && self.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
    }
}

/// Which surface reads the messages: it picks the error wording and the training-only rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// A request body: `null` counts as absent; errors name the request field (`param`).
    Api,
    /// A line of a chat dataset: adds `weight` (assistant messages only, 0 or 1) and rejects
    /// blank turns that call no tool; errors are sentences reported with the line number.
    Training,
}

/// A message list that breaks the rules: `path` is the field at fault inside the request or line
/// (`messages`, `messages[1].content[0].type`), `message` the sentence to show, worded for the
/// [`Dialect`] that parsed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ChatError {
    pub path: String,
    pub message: String,
}

/// What is wrong with a field.
enum Fault<'a> {
    Missing,
    WrongType {
        expected: &'static str,
        got: &'a Value,
    },
    Empty,
    UnknownRole(&'a str),
    UnsupportedPart(&'a str),
    /// Training: blank content on a turn that calls no tool.
    BlankContent(Role),
    WeightNotAllowed,
    BadWeight(&'a Value),
}

/// How errors name a JSON value's type ("a string", "an array"), here and wherever requests
/// and datasets are checked.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where a fault is: the message list itself, or message `index` (and a `field` inside it, such
/// as `role` or `content[0].type`).
#[derive(Clone, Copy)]
struct At<'a> {
    index: Option<usize>,
    field: Option<&'a str>,
}

impl Dialect {
    fn error(self, at: At<'_>, fault: Fault<'_>) -> ChatError {
        let msg_path = at.index.map(|i| format!("messages[{i}]"));
        let path = match (&msg_path, at.field) {
            (None, _) => "messages".to_string(),
            (Some(m), None) => m.clone(),
            (Some(m), Some(f)) => format!("{m}.{f}"),
        };
        let message = match self {
            Self::Api => api_message(&path, at, fault),
            Self::Training => training_message(msg_path.as_deref(), at.field, fault),
        };
        ChatError { path, message }
    }

    /// A present field; the API reads `null` as absent.
    fn field<'a>(self, obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
        match self {
            Self::Api => obj.get(key).filter(|v| !v.is_null()),
            Self::Training => obj.get(key),
        }
    }
}

fn api_message(path: &str, at: At<'_>, fault: Fault<'_>) -> String {
    let list = at.index.is_none();
    match fault {
        Fault::Missing if list => "You must provide a messages parameter".to_string(),
        Fault::Missing => format!("`{path}` is missing"),
        Fault::WrongType { expected, got } => {
            format!("`{path}` must be {expected}, got {}", type_name(got))
        }
        Fault::Empty => "`messages` must contain at least one message".to_string(),
        Fault::UnknownRole(role) => {
            format!("`{path}` must be one of {}, got `{role}`", ROLES.join(", "))
        }
        Fault::UnsupportedPart(t) => {
            format!("only `text` content parts are supported, got `{t}`")
        }
        // Training-only rules: the API never checks them.
        Fault::BlankContent(_) | Fault::WeightNotAllowed | Fault::BadWeight(_) => {
            format!("`{path}` is invalid")
        }
    }
}

fn training_message(msg: Option<&str>, field: Option<&str>, fault: Fault<'_>) -> String {
    let Some(msg) = msg else {
        return match fault {
            Fault::Missing => "missing field `messages`".to_string(),
            Fault::WrongType { expected, got } => {
                format!("`messages` must be {expected}, found {}", type_name(got))
            }
            _ => "`messages` is empty".to_string(),
        };
    };
    match (fault, field) {
        (Fault::WrongType { expected, got }, None) => {
            format!("{msg} must be {expected}, found {}", type_name(got))
        }
        (Fault::WrongType { expected, got }, Some(f)) => {
            format!("{msg}: `{f}` must be {expected}, found {}", type_name(got))
        }
        (Fault::Missing, f) => format!("{msg}: missing field `{}`", f.unwrap_or_default()),
        (Fault::UnknownRole(role), _) => format!(
            "{msg}: unknown role `{role}` (expected system, developer, user, assistant or tool)"
        ),
        (Fault::UnsupportedPart(t), f) => format!(
            "{msg}: `{}` is `{t}`, but only `text` content parts are supported",
            f.unwrap_or_default()
        ),
        (Fault::BlankContent(role), _) => format!("{msg} ({}): empty content", role.name()),
        (Fault::WeightNotAllowed, _) => {
            format!("{msg}: `weight` is only allowed on assistant messages")
        }
        (Fault::BadWeight(v), _) => format!("{msg}: `weight` must be 0 or 1, found {v}"),
        (Fault::Empty, _) => format!("{msg}: empty"),
    }
}

/// The list of raw messages under `messages` (`value` is that field, `None` when absent): an
/// array with at least one entry.
pub fn message_list(value: Option<&Value>, dialect: Dialect) -> Result<&[Value], ChatError> {
    let list = At {
        index: None,
        field: None,
    };
    let value = match dialect {
        Dialect::Api => value.filter(|v| !v.is_null()),
        Dialect::Training => value,
    };
    match value {
        None => Err(dialect.error(list, Fault::Missing)),
        Some(Value::Array(items)) if items.is_empty() => Err(dialect.error(list, Fault::Empty)),
        Some(Value::Array(items)) => Ok(items),
        Some(v) => Err(dialect.error(
            list,
            Fault::WrongType {
                expected: "an array",
                got: v,
            },
        )),
    }
}

/// Parses the field `messages` of a request or dataset line (`None` when absent) into messages.
pub fn parse_messages(
    value: Option<&Value>,
    dialect: Dialect,
) -> Result<Vec<ChatMessage>, ChatError> {
    message_list(value, dialect)?
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m, dialect))
        .collect()
}

/// Parses message `index` of a list.
pub fn parse_message(index: usize, m: &Value, dialect: Dialect) -> Result<ChatMessage, ChatError> {
    let at = |field| At {
        index: Some(index),
        field,
    };
    let fail = |field, fault| Err(dialect.error(at(field), fault));
    let Some(obj) = m.as_object() else {
        return fail(
            None,
            Fault::WrongType {
                expected: "an object",
                got: m,
            },
        );
    };
    let role = match dialect.field(obj, "role") {
        None => return fail(Some("role"), Fault::Missing),
        Some(Value::String(r)) => match Role::parse(r) {
            Some(role) => role,
            None => return fail(Some("role"), Fault::UnknownRole(r)),
        },
        Some(v) => {
            return fail(
                Some("role"),
                Fault::WrongType {
                    expected: "a string",
                    got: v,
                },
            )
        }
    };
    let tool_calls = match obj.get("tool_calls").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::Array(calls)) => Some(calls.iter().map(arguments_as_json).collect()),
        Some(v) => {
            return fail(
                Some("tool_calls"),
                Fault::WrongType {
                    expected: "an array",
                    got: v,
                },
            )
        }
    };
    let content = match dialect.field(obj, "content") {
        // An assistant turn that only called tools carries no content.
        None | Some(Value::Null) if role == Role::Assistant && tool_calls.is_some() => {
            String::new()
        }
        None => return fail(Some("content"), Fault::Missing),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => join_parts(index, parts, dialect)?,
        Some(v) => {
            return fail(
                Some("content"),
                Fault::WrongType {
                    expected: "a string or an array of content parts",
                    got: v,
                },
            )
        }
    };
    let mut message = ChatMessage {
        role,
        content,
        name: optional_string(index, obj, "name", dialect)?,
        tool_calls,
        tool_call_id: optional_string(index, obj, "tool_call_id", dialect)?,
        weight: 1.0,
    };
    if dialect == Dialect::Training {
        if message.content.trim().is_empty() && !message.calls_tools() {
            return fail(None, Fault::BlankContent(role));
        }
        message.weight = match obj.get("weight") {
            None => 1.0,
            Some(_) if role != Role::Assistant => return fail(None, Fault::WeightNotAllowed),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => 0.0,
            Some(Value::Number(n)) if n.as_f64() == Some(1.0) => 1.0,
            Some(v) => return fail(None, Fault::BadWeight(v)),
        };
    }
    Ok(message)
}

/// OpenAI sends a call's `arguments` as a JSON string; chat templates print them as an object
/// (`tool_call.arguments | tojson`), which is how tool-calling models were trained. As vLLM does,
/// a string that holds a JSON object is read as that object; anything else stays as sent.
fn arguments_as_json(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(args) = call.pointer_mut("/function/arguments") {
        if let Some(parsed) = args
            .as_str()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .filter(Value::is_object)
        {
            *args = parsed;
        }
    }
    call
}

fn optional_string(
    index: usize,
    obj: &Map<String, Value>,
    key: &'static str,
    dialect: Dialect,
) -> Result<Option<String>, ChatError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(dialect.error(
            At {
                index: Some(index),
                field: Some(key),
            },
            Fault::WrongType {
                expected: "a string",
                got: v,
            },
        )),
    }
}

/// Joins `[{"type":"text","text":...}]` parts with newlines (as vLLM does).
fn join_parts(index: usize, parts: &[Value], dialect: Dialect) -> Result<String, ChatError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let part_path = format!("content[{j}]");
        let type_path = format!("{part_path}.type");
        let text_path = format!("{part_path}.text");
        let fail = |field: &str, fault| {
            Err(dialect.error(
                At {
                    index: Some(index),
                    field: Some(field),
                },
                fault,
            ))
        };
        let Some(obj) = part.as_object() else {
            return fail(
                &part_path,
                Fault::WrongType {
                    expected: "an object",
                    got: part,
                },
            );
        };
        match dialect.field(obj, "type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => return fail(&type_path, Fault::UnsupportedPart(t)),
            Some(v) => {
                return fail(
                    &type_path,
                    Fault::WrongType {
                        expected: "a string",
                        got: v,
                    },
                )
            }
            None => return fail(&type_path, Fault::Missing),
        }
        match dialect.field(obj, "text") {
            Some(Value::String(s)) => texts.push(s.as_str()),
            Some(v) => {
                return fail(
                    &text_path,
                    Fault::WrongType {
                        expected: "a string",
                        got: v,
                    },
                )
            }
            None => return fail(&text_path, Fault::Missing),
        }
    }
    Ok(texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn api_err(messages: Option<Value>) -> (String, String) {
        let e = parse_messages(messages.as_ref(), Dialect::Api).expect_err("should fail");
        (e.path, e.message)
    }

    fn training_err(messages: Value) -> String {
        parse_messages(Some(&messages), Dialect::Training)
            .expect_err("should fail")
            .message
    }

    /// The API's messages, word for word: clients and the OpenAPI examples rely on them.
    #[test]
    fn api_errors_name_the_param_in_the_api_wording() {
        let user = json!({"role": "user", "content": "x"});
        let cases: Vec<(Option<Value>, &str, &str)> = vec![
            (None, "messages", "You must provide a messages parameter"),
            (
                Some(Value::Null),
                "messages",
                "You must provide a messages parameter",
            ),
            (
                Some(json!("hi")),
                "messages",
                "`messages` must be an array, got a string",
            ),
            (
                Some(json!([])),
                "messages",
                "`messages` must contain at least one message",
            ),
            (
                Some(json!(["hi"])),
                "messages[0]",
                "`messages[0]` must be an object, got a string",
            ),
            (
                Some(json!([{"content": "x"}])),
                "messages[0].role",
                "`messages[0].role` is missing",
            ),
            (
                Some(json!([{"role": null, "content": "x"}])),
                "messages[0].role",
                "`messages[0].role` is missing",
            ),
            (
                Some(json!([{"role": 1, "content": "x"}])),
                "messages[0].role",
                "`messages[0].role` must be a string, got a number",
            ),
            (
                Some(json!([user, {"role": "wizard", "content": "x"}])),
                "messages[1].role",
                "`messages[1].role` must be one of system, developer, user, assistant, tool, got `wizard`",
            ),
            (
                Some(json!([{"role": "user"}])),
                "messages[0].content",
                "`messages[0].content` is missing",
            ),
            (
                Some(json!([{"role": "assistant", "content": null}])),
                "messages[0].content",
                "`messages[0].content` is missing",
            ),
            (
                Some(json!([{"role": "user", "content": 5}])),
                "messages[0].content",
                "`messages[0].content` must be a string or an array of content parts, got a number",
            ),
            (
                Some(json!([{"role": "user", "content": ["x"]}])),
                "messages[0].content[0]",
                "`messages[0].content[0]` must be an object, got a string",
            ),
            (
                Some(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
                "messages[0].content[0].type",
                "only `text` content parts are supported, got `image_url`",
            ),
            (
                Some(json!([{"role": "user", "content": [{"text": "x"}]}])),
                "messages[0].content[0].type",
                "`messages[0].content[0].type` is missing",
            ),
            (
                Some(json!([{"role": "user", "content": [{"type": 1, "text": "x"}]}])),
                "messages[0].content[0].type",
                "`messages[0].content[0].type` must be a string, got a number",
            ),
            (
                Some(json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}])),
                "messages[0].content[1].text",
                "`messages[0].content[1].text` is missing",
            ),
            (
                Some(json!([{"role": "user", "content": [{"type": "text", "text": 1}]}])),
                "messages[0].content[0].text",
                "`messages[0].content[0].text` must be a string, got a number",
            ),
            (
                Some(json!([{"role": "assistant", "content": null, "tool_calls": {"id": "x"}}])),
                "messages[0].tool_calls",
                "`messages[0].tool_calls` must be an array, got an object",
            ),
            (
                Some(json!([{"role": "tool", "content": "42", "tool_call_id": 7}])),
                "messages[0].tool_call_id",
                "`messages[0].tool_call_id` must be a string, got a number",
            ),
        ];
        for (messages, path, message) in cases {
            let got = api_err(messages.clone());
            assert_eq!(got, (path.to_string(), message.to_string()), "{messages:?}");
        }
    }

    /// Training data's messages, word for word, for every line it rejected before chat lines
    /// shared the API's parser (only the lists of what is accepted grew).
    #[test]
    fn training_errors_keep_the_dataset_wording() {
        let cases: Vec<(Value, &str)> = vec![
            (json!("hi"), "`messages` must be an array, found a string"),
            (Value::Null, "`messages` must be an array, found null"),
            (json!([]), "`messages` is empty"),
            (json!([3]), "messages[0] must be an object, found a number"),
            (
                json!([{"content": "x"}]),
                "messages[0]: missing field `role`",
            ),
            (
                json!([{"role": null, "content": "x"}]),
                "messages[0]: `role` must be a string, found null",
            ),
            (
                json!([{"role": "robot", "content": "x"}]),
                "messages[0]: unknown role `robot` (expected system, developer, user, assistant or tool)",
            ),
            (
                json!([{"role": "user"}]),
                "messages[0]: missing field `content`",
            ),
            (
                json!([{"role": "user", "content": null}]),
                "messages[0]: `content` must be a string or an array of content parts, found null",
            ),
            (
                json!([{"role": "assistant", "content": 5}]),
                "messages[0]: `content` must be a string or an array of content parts, found a number",
            ),
            (
                json!([{"role": "assistant", "content": " \n"}]),
                "messages[0] (assistant): empty content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": ""}]}]),
                "messages[0] (user): empty content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url"}]}]),
                "messages[0]: `content[0].type` is `image_url`, but only `text` content parts are supported",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages[0]: missing field `content[0].text`",
            ),
            (
                json!([{"role": "user", "content": "a", "weight": 1}]),
                "messages[0]: `weight` is only allowed on assistant messages",
            ),
            (
                json!([{"role": "assistant", "content": "a", "weight": 0.5}]),
                "messages[0]: `weight` must be 0 or 1, found 0.5",
            ),
            (
                json!([{"role": "assistant", "content": "a", "weight": null}]),
                "messages[0]: `weight` must be 0 or 1, found null",
            ),
        ];
        for (messages, message) in cases {
            assert_eq!(training_err(messages.clone()), message, "{messages}");
        }
    }

    #[test]
    fn call_arguments_holding_an_object_reach_the_template_as_that_object() {
        let calls = |args: Value| {
            let m = json!([{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}]);
            let api = parse_messages(Some(&m), Dialect::Api).expect("api");
            assert_eq!(
                api,
                parse_messages(Some(&m), Dialect::Training).expect("training")
            );
            api[0].tool_calls.clone().expect("calls")[0]["function"]["arguments"].clone()
        };
        assert_eq!(
            calls(json!(r#"{"city": "Kyoto"}"#)),
            json!({"city": "Kyoto"})
        );
        // Not an object, or not JSON: kept as sent.
        assert_eq!(calls(json!("[1, 2]")), json!("[1, 2]"));
        assert_eq!(calls(json!("city=Kyoto")), json!("city=Kyoto"));
        assert_eq!(calls(json!({"city": "Kyoto"})), json!({"city": "Kyoto"}));
    }

    #[test]
    fn both_dialects_read_developer_parts_and_tool_turns_alike() {
        let messages = json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
            {"role": "assistant", "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 42.", "weight": 0, "future_field": true},
        ]);
        let api = parse_messages(Some(&messages), Dialect::Api).expect("api");
        let training = parse_messages(Some(&messages), Dialect::Training).expect("training");
        let expected = vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage {
                name: Some("ann".into()),
                ..ChatMessage::new(Role::User, "a\nb")
            },
            ChatMessage {
                tool_calls: Some(vec![json!({"id": "c1"})]),
                ..ChatMessage::new(Role::Assistant, "")
            },
            ChatMessage {
                tool_call_id: Some("c1".into()),
                ..ChatMessage::new(Role::Tool, "42")
            },
            ChatMessage::new(Role::Assistant, "It is 42."),
        ];
        assert_eq!(api, expected);
        // Only training reads `weight`; the API ignores it like any unknown field.
        assert_eq!(training[..4], expected[..4]);
        assert_eq!(training[4].weight, 0.0);
        assert_eq!(training[4].content, "It is 42.");
        assert!(api[2].calls_tools() && !api[4].calls_tools());
        // The template sees the role names it knows, and no `weight`.
        assert_eq!(
            serde_json::to_value(&training).expect("serialize"),
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "a\nb", "name": "ann"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "assistant", "content": "It is 42."},
            ])
        );
    }

    #[test]
    fn api_takes_blank_content_training_does_not() {
        let messages = json!([{"role": "assistant", "content": ""}]);
        let api = parse_messages(Some(&messages), Dialect::Api).expect("api");
        assert_eq!(api, vec![ChatMessage::new(Role::Assistant, "")]);
        assert_eq!(
            training_err(messages),
            "messages[0] (assistant): empty content"
        );
        // A turn that calls tools needs no text in either.
        let calls = json!([{"role": "assistant", "content": " ", "tool_calls": [{"id": "c"}]}]);
        assert!(parse_messages(Some(&calls), Dialect::Training).is_ok());
    }
}
