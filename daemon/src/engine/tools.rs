//! Tool calling: the request's tool definitions and choice, the grammar that forces a call
//! (`tool_choice: "required"` or a named function), and the parser that lifts calls out of the
//! generated text.
//!
//! The format is Qwen2.5's (Hermes'): each call is `<tool_call>\n{"name": …, "arguments": …}\n
//! </tool_call>`, which is also how those chat templates print an assistant's `tool_calls`, so a
//! model trained on tool-call conversations here produces what is parsed here. The parser runs on
//! the engine thread on the text as it streams (after stop strings), holding back only what may
//! be the start of a call, so plain text streams at once and each call goes out whole, as soon as
//! its closing tag arrives.
use serde_json::{json, Value};

use super::constraint::{Constraint, ConstraintKind};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text; tools are still shown to it (as vLLM does) and calls are
    /// not parsed.
    None,
    /// The model decides.
    Auto,
    /// At least one call, of any tool.
    Required,
    /// One call of this function.
    Function(String),
}

/// The tools of a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// OpenAI tool definitions as sent (`{"type": "function", "function": {...}}`): the chat
    /// template prints them.
    pub defs: Vec<Value>,
    pub choice: ToolChoice,
    /// Whether more than one call may come in one turn (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

impl Tools {
    /// The function names defined, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.defs
            .iter()
            .filter_map(|d| d.pointer("/function/name").and_then(Value::as_str))
    }

    /// Whether the output is parsed for calls.
    pub fn parses_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces calls, for `required` and a named function: the tag, then JSON
    /// whose `name` is the tool's and whose `arguments` match its parameters schema.
    pub fn forced(&self) -> Option<Constraint> {
        let call = |def: &Value| {
            let f = def.get("function")?;
            let name = f.get("name")?.as_str()?;
            let params = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            Some(json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }))
        };
        let schema = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => {
                let any: Vec<Value> = self.defs.iter().filter_map(call).collect();
                json!({"anyOf": any})
            }
            ToolChoice::Function(name) => {
                let def = self
                    .defs
                    .iter()
                    .find(|d| d.pointer("/function/name").and_then(Value::as_str) == Some(name))?;
                call(def)?
            }
        };
        let mut schema = schema;
        schema["x-guidance"] =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let call_rule = format!("{OPEN}\\n\" %json {schema} \"\\n{CLOSE}");
        let repeat = if self.parallel && self.choice == ToolChoice::Required {
            "(\"\\n\" call)*"
        } else {
            ""
        };
        Some(Constraint {
            kind: ConstraintKind::Lark(format!("start: call {repeat}\ncall: \"{call_rule}\"\n")),
            param: "tool_choice".into(),
        })
    }
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// `call_` and 24 random characters, as OpenAI's.
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub arguments: String,
}

/// What the parser lets out.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// Splits streamed text into plain text and tool calls.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    buf: String,
    in_call: bool,
    calls: usize,
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many calls were parsed so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes new text; returns what can go out now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else {
                    break;
                };
                let body = self.buf[..end].to_string();
                self.buf.drain(..end + CLOSE.len());
                self.in_call = false;
                out.push(self.call_or_text(&body, true));
            } else if let Some(start) = self.buf.find(OPEN) {
                let before: String = self.buf.drain(..start).collect();
                self.text(before, &mut out);
                self.buf.drain(..OPEN.len());
                self.in_call = true;
            } else {
                // Keep back a tail that could be the start of the tag.
                let keep = (1..OPEN.len().min(self.buf.len() + 1))
                    .rev()
                    .find(|&k| {
                        self.buf.is_char_boundary(self.buf.len() - k)
                            && OPEN.starts_with(&self.buf[self.buf.len() - k..])
                    })
                    .unwrap_or(0);
                let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.text(text, &mut out);
                break;
            }
        }
        out
    }

    /// The end of the generation: a call left open is taken if its JSON is complete (a model may
    /// stop right after it), else returned as text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        if self.in_call {
            self.in_call = false;
            out.push(self.call_or_text(&rest, false));
        } else {
            self.text(rest, &mut out);
        }
        out
    }

    /// Text between calls is only whitespace the format puts there; before any call it is the
    /// model's answer.
    fn text(&self, text: String, out: &mut Vec<Piece>) {
        if !text.is_empty() && (self.calls == 0 || !text.trim().is_empty()) {
            out.push(Piece::Text(text));
        }
    }

    fn call_or_text(&mut self, body: &str, closed: bool) -> Piece {
        match parse_call(body) {
            Some((name, arguments)) => {
                self.calls += 1;
                Piece::Call(ToolCall {
                    id: call_id(),
                    name,
                    arguments,
                })
            }
            None => Piece::Text(format!("{OPEN}{body}{}", if closed { CLOSE } else { "" })),
        }
    }
}

/// `{"name": "f", "arguments": {...}}` (some models say `parameters`); arguments given as a
/// string are kept as they are.
fn parse_call(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some((name, arguments))
}

fn call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts_and_calls(pieces: &[Piece]) -> (String, Vec<(String, String)>) {
        let mut text = String::new();
        let mut calls = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(t) => text.push_str(t),
                Piece::Call(c) => {
                    assert!(c.id.starts_with("call_") && c.id.len() == 29, "{}", c.id);
                    calls.push((c.name.clone(), c.arguments.clone()));
                }
            }
        }
        (text, calls)
    }

    #[test]
    fn calls_are_lifted_out_of_streamed_text() {
        let out = "Let me check.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Kyoto\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": \"{}\"}\n</tool_call>";
        // every split point, char by char, gives the same result
        for step in [1, 2, 5, 1000] {
            let mut p = ToolCallParser::new();
            let mut pieces = Vec::new();
            let chars: Vec<char> = out.chars().collect();
            for chunk in chars.chunks(step) {
                pieces.extend(p.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(p.finish());
            let (text, calls) = texts_and_calls(&pieces);
            assert_eq!(text, "Let me check.");
            assert_eq!(
                calls,
                [
                    ("weather".to_string(), r#"{"city":"Kyoto"}"#.to_string()),
                    ("time".to_string(), "{}".to_string())
                ]
            );
            assert_eq!(p.calls(), 2);
        }
    }

    #[test]
    fn plain_text_streams_and_broken_calls_stay_text() {
        let mut p = ToolCallParser::new();
        assert_eq!(p.push("a < b"), [Piece::Text("a < b".into())]);
        // a possible tag start is held back, then released
        assert_eq!(p.push(" <tool"), [Piece::Text(" ".into())]);
        assert_eq!(p.push("s>"), [Piece::Text("<tools>".into())]);
        let mut p = ToolCallParser::new();
        let mut pieces = p.push("<tool_call>{not json}</tool_call>");
        pieces.extend(p.finish());
        assert_eq!(
            pieces,
            [Piece::Text("<tool_call>{not json}</tool_call>".into())]
        );
        // an unclosed call whose JSON is complete counts
        let mut p = ToolCallParser::new();
        let mut pieces = p.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}");
        pieces.extend(p.finish());
        assert_eq!(texts_and_calls(&pieces).1, [("f".into(), "{}".into())]);
    }

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            defs: vec![
                json!({"type": "function", "function": {"name": "weather", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}}}),
                json!({"type": "function", "function": {"name": "time"}}),
            ],
            choice,
            parallel: true,
        }
    }

    #[test]
    fn only_required_and_named_choices_force_a_call() {
        assert!(tools(ToolChoice::Auto).forced().is_none());
        assert!(tools(ToolChoice::None).forced().is_none());
        let Some(Constraint {
            kind: ConstraintKind::Lark(g),
            ..
        }) = tools(ToolChoice::Function("weather".into())).forced()
        else {
            panic!("no grammar");
        };
        assert!(
            g.contains(r#""const":"weather""#) && !g.contains("time"),
            "{g}"
        );
        assert_eq!(
            tools(ToolChoice::Auto).names().collect::<Vec<_>>(),
            ["weather", "time"]
        );
    }
}
