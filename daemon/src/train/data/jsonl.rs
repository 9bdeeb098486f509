//! Reading a JSONL dataset: line by line within the byte and count limits of [`DataOptions`],
//! the format detected from the first valid line, each line checked for shape (chat lines by the
//! shared chat-message parser plus the conversation order training needs), then handed to
//! [`masks`](super::masks) for tokenization. Every bad line is collected and reported at once,
//! with its number.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::masks::{Example, Tokenize};
use crate::model::chat::{self, type_name, ChatMessage, Dialect, Role};
use crate::model::{ChatTemplate, TextSpec};

/// How many bad lines [`DataError::Invalid`]'s message spells out before "and N more".
const SHOWN_ERRORS: usize = 20;

/// Dataset layout, detected per file from its first valid line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `{"messages": [{"role", "content", "weight"?}, ...], "tools"?}`
    Chat,
    /// `{"prompt", "completion"}`
    PromptCompletion,
    /// `{"text"}`
    Text,
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Chat => "chat (`messages`)",
            Self::PromptCompletion => "prompt-completion (`prompt`/`completion`)",
            Self::Text => "text (`text`)",
        })
    }
}

/// Limits and shaping of a dataset. The byte and count limits exist because datasets arrive
/// through the API: a hostile or broken upload must fail early instead of exhausting memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// Longest example in tokens (before the shift for next-token prediction).
    pub max_seq_len: usize,
    /// Cut over-long examples to `max_seq_len` instead of rejecting them.
    pub truncation: bool,
    /// Pack several examples per row when batching (see [`BatchOptions::from_data`]).
    pub pack: bool,
    pub max_file_bytes: u64,
    pub max_line_bytes: usize,
    pub max_examples: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 1024,
            truncation: true,
            pack: false,
            max_file_bytes: 512 << 20,
            max_line_bytes: 1 << 20,
            max_examples: 1_000_000,
        }
    }
}

/// A bad line, 1-based.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// What loading a dataset found; returned with the examples, or inside [`DataError::Invalid`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// `None` when no line was valid enough to tell.
    pub format: Option<DataFormat>,
    pub examples: usize,
    /// Tokens over all examples, after truncation.
    pub tokens: usize,
    pub trainable_tokens: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    pub errors: Vec<LineError>,
}

/// Which limit of [`DataOptions`] was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    FileBytes,
    LineBytes { line: usize },
    Examples,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", invalid_summary(.0))]
    Invalid(DataReport),
    #[error("{}", limit_message(*limit, *max))]
    TooLarge { limit: Limit, max: u64 },
    #[error("the dataset contains no examples")]
    Empty,
    #[error("invalid data options: {0}")]
    Options(String),
}

fn invalid_summary(report: &DataReport) -> String {
    let n = report.errors.len();
    let mut out = format!(
        "invalid training data ({n} bad line{})",
        if n == 1 { "" } else { "s" }
    );
    for (i, e) in report.errors.iter().take(SHOWN_ERRORS).enumerate() {
        out.push_str(if i == 0 { ": " } else { "; " });
        out.push_str(&format!("line {}: {}", e.line, e.message));
    }
    if n > SHOWN_ERRORS {
        out.push_str(&format!("; and {} more", n - SHOWN_ERRORS));
    }
    out
}

fn limit_message(limit: Limit, max: u64) -> String {
    match limit {
        Limit::FileBytes => format!("the file is larger than the limit of {max} bytes"),
        Limit::LineBytes { line } => {
            format!("line {line} is longer than the limit of {max} bytes")
        }
        Limit::Examples => format!("the file has more than the limit of {max} examples"),
    }
}

/// Reads, validates and tokenizes a JSONL dataset file.
///
/// `template` is required for chat datasets. Every bad line is reported at once in
/// [`DataError::Invalid`]; a dataset without any example is [`DataError::Empty`].
pub fn load_jsonl(
    path: &Path,
    text: &TextSpec,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataReport), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > opts.max_file_bytes {
        return Err(DataError::TooLarge {
            limit: Limit::FileBytes,
            max: opts.max_file_bytes,
        });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    parse(file, path, text, template, opts)
}

/// As [`load_jsonl`], from any reader (an upload, a test string). The same limits apply, the file
/// size one counted while reading.
pub fn read_jsonl<R: Read>(
    reader: R,
    text: &TextSpec,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataReport), DataError> {
    parse(reader, Path::new("<input>"), text, template, opts)
}

fn parse<R: Read>(
    reader: R,
    path: &Path,
    text: &TextSpec,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataReport), DataError> {
    if opts.max_seq_len < 2 {
        return Err(DataError::Options(format!(
            "max_seq_len must be at least 2 (one input and one target), got {}",
            opts.max_seq_len
        )));
    }
    let mut collector = Collector {
        tok: Tokenize {
            text,
            template,
            opts,
        },
        format: None,
        pending: Vec::new(),
        examples: Vec::new(),
        report: DataReport::default(),
    };
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut total: u64 = 0;
    let mut line = 0usize;
    let mut non_blank = 0usize;
    // The longest allowed content plus its newline: that many bytes without a newline prove the
    // line too long, and nothing longer is ever buffered.
    let max_read = opts.max_line_bytes as u64 + 1;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(max_read)
            .read_until(b'\n', &mut buf)
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > opts.max_file_bytes {
            return Err(DataError::TooLarge {
                limit: Limit::FileBytes,
                max: opts.max_file_bytes,
            });
        }
        line += 1;
        let content = match buf.strip_suffix(b"\n") {
            Some(c) => c,
            None if n as u64 == max_read => {
                return Err(DataError::TooLarge {
                    limit: Limit::LineBytes { line },
                    max: opts.max_line_bytes as u64,
                })
            }
            None => &buf[..],
        };
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        // Editors on some systems start UTF-8 files with a byte-order mark.
        let content = match line {
            1 => content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content),
            _ => content,
        };
        if content.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        non_blank += 1;
        if non_blank > opts.max_examples {
            return Err(DataError::TooLarge {
                limit: Limit::Examples,
                max: opts.max_examples as u64,
            });
        }
        collector.accept(line, parse_line(content));
    }
    collector.finish()
}

/// A line's content, checked for shape but not yet tokenized.
pub(super) enum Record {
    Chat {
        /// The conversation; assistant turns with `weight` 0 carry no loss.
        messages: Vec<ChatMessage>,
        tools: Option<Vec<Value>>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text(String),
}

pub(super) struct Parsed {
    /// The format the line's keys point at, even when the line is otherwise bad: a line of another
    /// format is then reported as such rather than by its first missing field.
    pub format: Option<DataFormat>,
    pub record: Result<Record, String>,
}

pub(super) fn parse_line(bytes: &[u8]) -> Parsed {
    let fail = |format, msg: String| Parsed {
        format,
        record: Err(msg),
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return fail(None, format!("not valid UTF-8: {e}")),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return fail(None, format!("invalid JSON: {e}")),
    };
    let Value::Object(obj) = value else {
        return fail(
            None,
            format!("expected a JSON object, found {}", type_name(&value)),
        );
    };
    let format = if obj.contains_key("messages") {
        DataFormat::Chat
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        DataFormat::PromptCompletion
    } else if obj.contains_key("text") {
        DataFormat::Text
    } else {
        return fail(
            None,
            "missing field: expected `messages` (chat), `prompt` and `completion`, or `text`"
                .to_string(),
        );
    };
    let record = match format {
        DataFormat::Chat => parse_chat(&obj),
        DataFormat::PromptCompletion => parse_prompt_completion(&obj),
        DataFormat::Text => string_field(&obj, "text", false).map(|t| Record::Text(t.to_string())),
    };
    Parsed {
        format: Some(format),
        record,
    }
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    allow_empty: bool,
) -> Result<&'a str, String> {
    match obj.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) if !allow_empty && s.trim().is_empty() => {
            Err(format!("empty `{key}`"))
        }
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "`{key}` must be a string, found {}",
            type_name(other)
        )),
    }
}

fn parse_prompt_completion(obj: &Map<String, Value>) -> Result<Record, String> {
    // An empty prompt is how legacy completion datasets spell unconditional text.
    let prompt = string_field(obj, "prompt", true)?;
    let completion = string_field(obj, "completion", false)?;
    Ok(Record::PromptCompletion {
        prompt: prompt.to_string(),
        completion: completion.to_string(),
    })
}

fn parse_chat(obj: &Map<String, Value>) -> Result<Record, String> {
    let list = chat::message_list(obj.get("messages"), Dialect::Training).map_err(|e| e.message)?;
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t.clone()),
        Some(other) => {
            return Err(format!(
                "`tools` must be an array, found {}",
                type_name(other)
            ))
        }
    };

    let mut messages = Vec::with_capacity(list.len());
    let mut prev: Option<Role> = None;
    let (mut users, mut assistants) = (0usize, 0usize);
    for (i, m) in list.iter().enumerate() {
        let message = chat::parse_message(i, m, Dialect::Training).map_err(|e| e.message)?;
        // Serving takes any order; a training example must read as a real conversation.
        let role = message.role;
        match (prev, role) {
            (Some(_), Role::System) => {
                return Err(format!(
                    "messages[{i}]: a system message may only come first"
                ))
            }
            (None | Some(Role::System), Role::Assistant | Role::Tool) => {
                return Err(format!(
                    "messages[{i}]: the conversation must start with a user message (after an optional system message), found `{}`",
                    role.name()
                ))
            }
            (Some(Role::User), Role::Tool) => {
                return Err(format!(
                    "messages[{i}]: a tool message must follow an assistant message"
                ))
            }
            (Some(p), r) if p == r && r != Role::Tool => {
                return Err(format!(
                    "messages[{i}]: two `{}` messages in a row",
                    r.name()
                ))
            }
            _ => {}
        }
        prev = Some(role);
        match role {
            Role::User => users += 1,
            Role::Assistant => assistants += 1,
            Role::System | Role::Tool => {}
        }
        messages.push(message);
    }
    if users == 0 || assistants == 0 {
        return Err(
            "the conversation needs at least one user and one assistant message".to_string(),
        );
    }
    Ok(Record::Chat { messages, tools })
}

struct Collector<'a> {
    tok: Tokenize<'a>,
    /// The file's format and the line that set it.
    format: Option<(DataFormat, usize)>,
    /// Lines seen before any line was valid: they are judged once the format is known.
    pending: Vec<(usize, Parsed)>,
    examples: Vec<Example>,
    report: DataReport,
}

impl Collector<'_> {
    fn accept(&mut self, line: usize, parsed: Parsed) {
        if self.format.is_none() {
            match (&parsed.record, parsed.format) {
                (Ok(_), Some(format)) => {
                    self.format = Some((format, line));
                    for (l, p) in std::mem::take(&mut self.pending) {
                        self.judge(l, p);
                    }
                }
                _ => {
                    self.pending.push((line, parsed));
                    return;
                }
            }
        }
        self.judge(line, parsed);
    }

    fn judge(&mut self, line: usize, parsed: Parsed) {
        if let (Some((format, from)), Some(this)) = (self.format, parsed.format) {
            if this != format {
                return self.error(
                    line,
                    format!(
                        "this line is {this} but the file is {format} (as line {from} is); \
                         formats cannot be mixed"
                    ),
                );
            }
        }
        let record = match parsed.record {
            Ok(r) => r,
            Err(msg) => return self.error(line, msg),
        };
        match self.tok.example(&record) {
            Ok((example, truncated)) => {
                self.report.examples += 1;
                self.report.tokens += example.ids.len();
                self.report.trainable_tokens += example.trainable();
                self.report.truncated += usize::from(truncated);
                self.examples.push(example);
            }
            Err(msg) => self.error(line, msg),
        }
    }

    fn error(&mut self, line: usize, message: String) {
        self.report.errors.push(LineError { line, message });
    }

    fn finish(mut self) -> Result<(Vec<Example>, DataReport), DataError> {
        for (line, parsed) in std::mem::take(&mut self.pending) {
            self.judge(line, parsed);
        }
        self.report.format = self.format.map(|(f, _)| f);
        if !self.report.errors.is_empty() {
            self.report.errors.sort_by_key(|e| e.line);
            return Err(DataError::Invalid(self.report));
        }
        if self.examples.is_empty() {
            return Err(DataError::Empty);
        }
        Ok((self.examples, self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let data = [
            r#"{"messages":[{"role":"user","content":"ok"},{"role":"assistant","content":"fine"}]}"#,
            r#"{"messages": [ oops"#,
            "",
            r#"[1, 2]"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}"#,
            r#"{"messages":[{"role":"assistant","content":"first"},{"role":"user","content":"b"}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"  "}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","weight":0.5}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"assistant","content":"c"}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"b"},{"role":"assistant","content":"c"}]}"#,
            r#"{"messages":[{"role":"user","content":"a"}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":5}]}"#,
            r#"{"messages":[{"role":"user"},{"role":"assistant","content":"x"}]}"#,
            r#"{"messages":"hello"}"#,
            r#"{"foo":1}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"system","content":"late"}]}"#,
            r#"{"messages":[{"role":"user","content":"a","weight":1},{"role":"assistant","content":"b"}]}"#,
            r#"{"messages":[{"role":"user","content":"ok"},{"role":"assistant","content":"fine"}]}"#,
        ]
        .join("\n");
        let errs = errors(&data, Some(&chatml()), &DataOptions::default());
        let expect: &[(usize, &str)] = &[
            (2, "invalid JSON"),
            (4, "expected a JSON object"),
            (5, "unknown role `robot`"),
            (6, "must start with a user message"),
            (7, "empty content"),
            (8, "`weight` must be 0 or 1"),
            (9, "two `user` messages in a row"),
            (10, "tool message must follow an assistant"),
            (11, "at least one user and one assistant"),
            (12, "`content` must be a string"),
            (13, "missing field `content`"),
            (14, "`messages` must be an array"),
            (15, "missing field"),
            (16, "system message may only come first"),
            (17, "only allowed on assistant"),
        ];
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for (e, (line, needle)) in errs.iter().zip(expect) {
            assert_eq!(e.line, *line, "{e:?}");
            assert!(e.message.contains(needle), "line {line}: {e:?}");
        }
        let msg = DataError::Invalid(DataReport {
            errors: errs,
            ..Default::default()
        })
        .to_string();
        assert!(
            msg.starts_with("invalid training data (15 bad lines): line 2: invalid JSON"),
            "{msg}"
        );
    }

    /// Chat lines follow the API's rules: `developer` is a system message and text content parts
    /// are joined, as in a chat request.
    #[test]
    fn developer_role_and_content_parts_are_accepted() {
        let data = r#"{"messages":[{"role":"developer","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]},{"role":"assistant","content":[{"type":"text","text":"Hello!"}]}]}"#;
        let (examples, report) = load_ok(data, Some(&chatml()));
        assert_eq!(report.format, Some(DataFormat::Chat));
        assert_eq!(trained_runs(&examples[0]), ["Hello!<|im_end|>"]);
        assert_eq!(
            spec()
                .tokenizer
                .decode(&examples[0].ids, false)
                .expect("decode"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
        // A developer message is a system message: it may only come first.
        let late = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"developer","content":"late"}]}"#;
        let errs = errors(late, Some(&chatml()), &DataOptions::default());
        assert!(
            errs[0]
                .message
                .contains("system message may only come first"),
            "{errs:?}"
        );
    }

    #[test]
    fn invalid_summary_lists_twenty_then_counts() {
        let data = vec!["{"; 25].join("\n");
        let err = load(&data, None, &DataOptions::default()).expect_err("invalid");
        let msg = err.to_string();
        assert!(msg.contains("line 20: invalid JSON"), "{msg}");
        assert!(!msg.contains("line 21:"), "{msg}");
        assert!(msg.ends_with("; and 5 more"), "{msg}");
    }

    #[test]
    fn mixed_formats_are_reported_on_the_lines_that_differ() {
        let data = [
            r#"{"prompt": 3, "completion": "x"}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
            r#"{"prompt":"p","completion":"c"}"#,
            r#"{"text":"t"}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
        ]
        .join("\n");
        let report = match load(&data, Some(&chatml()), &DataOptions::default()) {
            Err(DataError::Invalid(r)) => r,
            other => panic!("expected invalid, got {:?}", other.map(|r| r.1)),
        };
        assert_eq!(report.format, Some(DataFormat::Chat));
        assert_eq!(report.examples, 2);
        let lines: Vec<usize> = report.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 3, 4]);
        assert!(report.errors[0].message.contains("line 2"), "{report:?}");
        assert!(report.errors[2].message.contains("text"), "{report:?}");
    }

    #[test]
    fn limits_stop_reading_early() {
        let line = "{\"text\":\"abcdefghij\"}";
        let small = |f: &dyn Fn(&mut DataOptions)| {
            let mut o = DataOptions::default();
            f(&mut o);
            o
        };
        let data = format!("{line}\n{line}\n{line}\n");
        match load(&data, None, &small(&|o| o.max_line_bytes = line.len())) {
            Ok(_) => {}
            Err(e) => panic!("exact fit must pass: {e}"),
        }
        let long = format!("{line}\n{{\"text\":\"{}\"}}\n", "x".repeat(100));
        match load(&long, None, &small(&|o| o.max_line_bytes = 50)) {
            Err(DataError::TooLarge {
                limit: Limit::LineBytes { line: 2 },
                max: 50,
            }) => {}
            other => panic!("{:?}", other.map(|r| r.1)),
        }
        // Also without a final newline.
        match load(
            &long[..long.len() - 1],
            None,
            &small(&|o| o.max_line_bytes = 50),
        ) {
            Err(DataError::TooLarge {
                limit: Limit::LineBytes { line: 2 },
                ..
            }) => {}
            other => panic!("{:?}", other.map(|r| r.1)),
        }
        match load(&data, None, &small(&|o| o.max_file_bytes = 30)) {
            Err(
                e @ DataError::TooLarge {
                    limit: Limit::FileBytes,
                    ..
                },
            ) => assert!(e.to_string().contains("larger than"), "{e}"),
            other => panic!("{:?}", other.map(|r| r.1)),
        }
        match load(&data, None, &small(&|o| o.max_examples = 2)) {
            Err(DataError::TooLarge {
                limit: Limit::Examples,
                max: 2,
            }) => {}
            other => panic!("{:?}", other.map(|r| r.1)),
        }

        let path = std::env::temp_dir().join(format!("itamae-data-{}.jsonl", std::process::id()));
        std::fs::write(&path, &data).expect("write");
        let loaded = load_jsonl(&path, &spec(), None, &DataOptions::default());
        let too_big = load_jsonl(&path, &spec(), None, &small(&|o| o.max_file_bytes = 10));
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded.expect("load").0.len(), 3);
        assert!(matches!(
            too_big,
            Err(DataError::TooLarge {
                limit: Limit::FileBytes,
                ..
            })
        ));
        match load_jsonl(
            Path::new("/nonexistent/x.jsonl"),
            &spec(),
            None,
            &DataOptions::default(),
        ) {
            Err(e @ DataError::Io { .. }) => {
                assert!(e.to_string().contains("/nonexistent/x.jsonl"))
            }
            other => panic!("{:?}", other.map(|r| r.1)),
        }
    }

    #[test]
    fn blank_files_are_empty_and_crlf_and_bom_are_tolerated() {
        assert!(matches!(
            load("\n  \n\r\n", None, &DataOptions::default()),
            Err(DataError::Empty)
        ));
        let (examples, _) = load_ok("\u{feff}{\"text\":\"ab\"}\r\n{\"text\":\"cd\"}\r\n", None);
        assert_eq!(examples.len(), 2);
    }
}
