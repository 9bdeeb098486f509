//! Training data: JSONL datasets (OpenAI chat, prompt-completion, plain text) validated line by
//! line, tokenized into examples with per-token loss weights, split into train/validation sets,
//! and served as deterministic, resumable, optionally packed batches shifted for next-token
//! prediction.
//!
//! Assistant tokens of a chat are located by rendering the conversation with the model's own chat
//! template and comparing renders of its prefixes, never by guessing at the template's markup: what
//! the model is trained on is exactly what it will see when serving.
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::llama::Packed;
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

/// One tokenized example. `weights[i]` is 1 when token `i` is a training target (predicted from
/// the tokens before it), else 0; `weights[0]` is always 0 since nothing precedes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    /// Number of tokens that carry loss.
    pub fn trainable(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
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
enum Record {
    Chat {
        /// Messages as the template sees them (without the training-only `weight`).
        messages: Vec<Value>,
        /// Indices of assistant messages that carry loss.
        trained: Vec<usize>,
        tools: Option<Vec<Value>>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text(String),
}

struct Parsed {
    /// The format the line's keys point at, even when the line is otherwise bad: a line of another
    /// format is then reported as such rather than by its first missing field.
    format: Option<DataFormat>,
    record: Result<Record, String>,
}

fn parse_line(bytes: &[u8]) -> Parsed {
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
            format!("expected a JSON object, found {}", kind(&value)),
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

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

fn parse_chat(obj: &Map<String, Value>) -> Result<Record, String> {
    let list = match obj.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "`messages` must be an array, found {}",
                kind(other)
            ))
        }
        None => return Err("missing field `messages`".to_string()),
    };
    if list.is_empty() {
        return Err("`messages` is empty".to_string());
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t.clone()),
        Some(other) => return Err(format!("`tools` must be an array, found {}", kind(other))),
    };

    let mut messages = Vec::with_capacity(list.len());
    let mut trained = Vec::new();
    let mut prev: Option<Role> = None;
    let (mut users, mut assistants) = (0usize, 0usize);
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "messages[{i}] must be an object, found {}",
                kind(m)
            ));
        };
        let role = match m.get("role") {
            None => return Err(format!("messages[{i}]: missing field `role`")),
            Some(Value::String(r)) => match r.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(format!(
                        "messages[{i}]: unknown role `{other}` (expected system, user, assistant or tool)"
                    ))
                }
            },
            Some(other) => {
                return Err(format!(
                    "messages[{i}]: `role` must be a string, found {}",
                    kind(other)
                ))
            }
        };
        // An assistant turn that only calls tools legitimately has no text.
        let calls_tools = role == Role::Assistant
            && matches!(m.get("tool_calls"), Some(Value::Array(c)) if !c.is_empty());
        match m.get("content") {
            Some(Value::String(s)) if s.trim().is_empty() && !calls_tools => {
                return Err(format!("messages[{i}] ({}): empty content", role.name()))
            }
            Some(Value::String(_)) => {}
            None | Some(Value::Null) if calls_tools => {}
            None => return Err(format!("messages[{i}]: missing field `content`")),
            Some(other) => {
                return Err(format!(
                    "messages[{i}]: `content` must be a string, found {}",
                    kind(other)
                ))
            }
        }
        let weight = match m.get("weight") {
            None => 1.0,
            Some(_) if role != Role::Assistant => {
                return Err(format!(
                    "messages[{i}]: `weight` is only allowed on assistant messages"
                ))
            }
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => {
                n.as_f64().unwrap_or(1.0)
            }
            Some(other) => {
                return Err(format!(
                    "messages[{i}]: `weight` must be 0 or 1, found {other}"
                ))
            }
        };

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
            Role::Assistant => {
                assistants += 1;
                if weight != 0.0 {
                    trained.push(i);
                }
            }
            Role::System | Role::Tool => {}
        }

        let mut m = m.clone();
        m.remove("weight");
        messages.push(Value::Object(m));
    }
    if users == 0 || assistants == 0 {
        return Err(
            "the conversation needs at least one user and one assistant message".to_string(),
        );
    }
    Ok(Record::Chat {
        messages,
        trained,
        tools,
    })
}

/// Turns checked records into examples.
struct Tokenize<'a> {
    text: &'a TextSpec,
    template: Option<&'a ChatTemplate>,
    opts: &'a DataOptions,
}

impl Tokenize<'_> {
    fn encode(&self, s: &str) -> Result<tokenizers::Encoding, String> {
        self.text
            .tokenizer
            .encode(s, false)
            .map_err(|e| format!("tokenizer: {e}"))
    }

    /// Chat templates write BOS themselves; raw text gets it only when the model asks for it.
    fn bos(&self) -> Option<u32> {
        self.text.bos_id.filter(|_| self.text.add_bos)
    }

    /// Returns the example and whether it was truncated.
    fn example(&self, record: &Record) -> Result<(Example, bool), String> {
        let (ids, weights) = match record {
            Record::Chat {
                messages,
                trained,
                tools,
            } => self.chat(messages, trained, tools.as_deref())?,
            Record::PromptCompletion { prompt, completion } => {
                let prompt = self.encode(prompt)?;
                let completion = self.encode(completion)?;
                let mut ids: Vec<u32> = self.bos().into_iter().collect();
                ids.extend_from_slice(prompt.get_ids());
                let mut weights = vec![0.0; ids.len()];
                ids.extend_from_slice(completion.get_ids());
                ids.extend(self.text.eos_ids.first());
                weights.resize(ids.len(), 1.0);
                (ids, weights)
            }
            Record::Text(text) => {
                let enc = self.encode(text)?;
                let mut ids: Vec<u32> = self.bos().into_iter().collect();
                ids.extend_from_slice(enc.get_ids());
                ids.extend(self.text.eos_ids.first());
                let weights = vec![1.0; ids.len()];
                (ids, weights)
            }
        };
        self.finish(ids, weights)
    }

    fn chat(
        &self,
        messages: &[Value],
        trained: &[usize],
        tools: Option<&[Value]>,
    ) -> Result<(Vec<u32>, Vec<f32>), String> {
        let template = self
            .template
            .ok_or("chat data needs a chat template, but the model has none")?;
        if trained.is_empty() {
            return Err("no trainable token: every assistant message has weight 0".into());
        }
        let render = |msgs: &[Value], generation_prompt: bool| {
            template
                .render_with_tools(msgs, tools, generation_prompt)
                .map_err(|e| e.to_string())
        };
        let full = render(messages, false)?;
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(trained.len());
        for &k in trained {
            let before = render(&messages[..k], true)?;
            let upto = render(&messages[..=k], false)?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(format!(
                    "the chat template is not prefix-stable at messages[{k}]: rendering the \
                     conversation up to this assistant message is not a prefix of rendering all \
                     of it, so the assistant's tokens cannot be located"
                ));
            }
            // The turn's end marker is trained (the model must learn to stop) but not the
            // separator the template writes after it, which belongs to the next turn's layout.
            let turn = upto[before.len()..].trim_end();
            spans.push(before.len()..before.len() + turn.len());
        }
        let enc = self.encode(&full)?;
        let weights = enc
            .get_offsets()
            .iter()
            .map(|&(_, end)| {
                // A token straddling a span's start belongs to the span when it ends inside it.
                let inside = spans.iter().any(|s| end > s.start && end <= s.end);
                if inside {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok((enc.get_ids().to_vec(), weights))
    }

    fn finish(&self, mut ids: Vec<u32>, mut weights: Vec<f32>) -> Result<(Example, bool), String> {
        if let Some(w) = weights.first_mut() {
            *w = 0.0;
        }
        if !weights.iter().any(|&w| w > 0.0) {
            return Err("no trainable token".to_string());
        }
        let max = self.opts.max_seq_len;
        let len = ids.len();
        let truncated = len > max;
        if truncated {
            if !self.opts.truncation {
                return Err(format!(
                    "{len} tokens exceed max_seq_len {max} (truncation is off)"
                ));
            }
            ids.truncate(max);
            weights.truncate(max);
            if !weights.iter().any(|&w| w > 0.0) {
                return Err(format!(
                    "no trainable token within the first {max} tokens (max_seq_len) of {len}"
                ));
            }
        }
        Ok((Example { ids, weights }, truncated))
    }
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

/// Splits off a validation set: a deterministic (by `seed`) random `fraction` of the examples, at
/// least one when `fraction > 0` and there are two or more, and never all of them. Both sets keep
/// the original order.
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    // NaN is not greater than zero either.
    if n < 2 || fraction.is_nan() || fraction <= 0.0 {
        return (examples, Vec::new());
    }
    let wanted = (n as f64 * fraction.min(1.0)).round() as usize;
    let n_valid = wanted.clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_valid = vec![false; n];
    for &i in &order[..n_valid] {
        is_valid[i] = true;
    }
    let (mut train, mut valid) = (Vec::with_capacity(n - n_valid), Vec::with_capacity(n_valid));
    for (ex, v) in examples.into_iter().zip(is_valid) {
        if v {
            valid.push(ex);
        } else {
            train.push(ex);
        }
    }
    (train, valid)
}

/// Shaping of the batches a [`Batcher`] produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest row in tokens (inputs after the shift); longer examples are cut.
    pub max_seq_len: usize,
    /// Fill each row with several examples (first fit) instead of one example per row.
    pub pack: bool,
    pub seed: u64,
}

impl BatchOptions {
    pub fn from_data(opts: &DataOptions, batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            max_seq_len: opts.max_seq_len,
            pack: opts.pack,
            seed,
        }
    }
}

/// Where a [`Batcher`] stands: the batch `index` of `epoch` is the next one produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCursor {
    pub epoch: u64,
    pub index: u64,
}

/// Batches shifted for next-token prediction: for a row made of example tokens `x` with weights
/// `w`, `inputs = x[..n-1]`, `targets = x[1..]`, `weights = w[1..]`. Rows are right-padded to the
/// longest with id 0 and weight 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
    /// Packed batches only: each token's example index within its row; padding gets the next id,
    /// so ids never decrease along a row (what [`Packed::from_segments`] expects).
    pub segments: Option<Vec<Vec<u32>>>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Tokens with a non-zero weight.
    pub trainable: usize,
}

impl Batch {
    /// `(inputs u32 (b, l), targets u32 (b, l), weights f32 (b, l), packing)`.
    pub fn to_tensors(
        &self,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor, Option<Packed>)> {
        let b = self.inputs.len();
        let l = self.inputs.first().map_or(0, Vec::len);
        let flat_u32 = |rows: &[Vec<u32>]| rows.concat();
        let inputs = Tensor::from_vec(flat_u32(&self.inputs), (b, l), device)?;
        let targets = Tensor::from_vec(flat_u32(&self.targets), (b, l), device)?;
        let weights = Tensor::from_vec(self.weights.concat(), (b, l), device)?;
        let packed = self
            .segments
            .as_ref()
            .map(|s| Packed::from_segments(s, device))
            .transpose()?;
        Ok((inputs, targets, weights, packed))
    }
}

/// Deterministic, resumable batches over a fixed set of examples.
///
/// Each epoch visits every example exactly once, in an order shuffled by `(seed, epoch)`; the
/// order depends on nothing else, so a run resumed with [`seek`](Self::seek) at a saved
/// [`cursor`](Self::cursor) produces exactly the batches the interrupted run would have.
pub struct Batcher {
    examples: Arc<Vec<Example>>,
    opts: BatchOptions,
    cursor: BatchCursor,
    /// Example indices of each row of the cursor's epoch, in batch order.
    rows: Vec<Vec<usize>>,
}

impl Batcher {
    pub fn new(
        examples: impl Into<Arc<Vec<Example>>>,
        opts: BatchOptions,
    ) -> Result<Self, DataError> {
        let examples = examples.into();
        if examples.is_empty() {
            return Err(DataError::Empty);
        }
        if opts.batch_size == 0 {
            return Err(DataError::Options("batch_size must be at least 1".into()));
        }
        if opts.max_seq_len == 0 {
            return Err(DataError::Options("max_seq_len must be at least 1".into()));
        }
        for (i, ex) in examples.iter().enumerate() {
            if ex.ids.len() < 2 || ex.ids.len() != ex.weights.len() {
                return Err(DataError::Options(format!(
                    "example {i} has {} ids and {} weights (need equal counts, at least 2)",
                    ex.ids.len(),
                    ex.weights.len()
                )));
            }
        }
        let rows = plan_rows(&examples, &opts, 0);
        Ok(Self {
            examples,
            opts,
            cursor: BatchCursor::default(),
            rows,
        })
    }

    pub fn num_examples(&self) -> usize {
        self.examples.len()
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    /// Batches in the cursor's epoch. Without packing every epoch has the same count; with
    /// packing the count depends on how the epoch's order happens to pack.
    pub fn steps_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.opts.batch_size)
    }

    /// Batches in `epoch`.
    pub fn steps_in_epoch(&self, epoch: u64) -> usize {
        if epoch == self.cursor.epoch {
            return self.steps_per_epoch();
        }
        let rows = if self.opts.pack {
            plan_rows(&self.examples, &self.opts, epoch).len()
        } else {
            self.examples.len()
        };
        rows.div_ceil(self.opts.batch_size)
    }

    /// Batches in epochs `0..epochs` (for learning-rate schedules).
    pub fn total_steps(&self, epochs: u64) -> u64 {
        (0..epochs).map(|e| self.steps_in_epoch(e) as u64).sum()
    }

    pub fn cursor(&self) -> BatchCursor {
        self.cursor
    }

    /// Moves to `cursor`, as saved by [`cursor`](Self::cursor) in a run over the same examples
    /// and options. The end of an epoch is accepted as the start of the next.
    pub fn seek(&mut self, cursor: BatchCursor) -> Result<(), DataError> {
        if cursor.epoch != self.cursor.epoch {
            self.rows = plan_rows(&self.examples, &self.opts, cursor.epoch);
        }
        self.cursor = cursor;
        let steps = self.steps_per_epoch() as u64;
        if cursor.index > steps {
            return Err(DataError::Options(format!(
                "cursor index {} is past the {steps} batches of epoch {} (different data or options?)",
                cursor.index, cursor.epoch
            )));
        }
        if cursor.index == steps {
            self.start_epoch(cursor.epoch + 1);
        }
        Ok(())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.rows = plan_rows(&self.examples, &self.opts, epoch);
        self.cursor = BatchCursor { epoch, index: 0 };
    }

    /// The batch at the cursor; then advances, into the next epoch after its last batch.
    pub fn next_batch(&mut self) -> Batch {
        let bs = self.opts.batch_size;
        // The cursor index is below the epoch's step count (seek and the rollover below keep it
        // so), which bounds it by the row count and makes the cast lossless.
        let start = (self.cursor.index as usize) * bs;
        let end = (start + bs).min(self.rows.len());
        let batch = self.make_batch(&self.rows[start..end]);
        self.cursor.index += 1;
        if self.cursor.index as usize >= self.steps_per_epoch() {
            self.start_epoch(self.cursor.epoch + 1);
        }
        batch
    }

    fn make_batch(&self, rows: &[Vec<usize>]) -> Batch {
        let cap = self.opts.max_seq_len;
        let mut inputs = Vec::with_capacity(rows.len());
        let mut targets = Vec::with_capacity(rows.len());
        let mut weights = Vec::with_capacity(rows.len());
        let mut segments = Vec::with_capacity(rows.len());
        let mut tokens = 0;
        for row in rows {
            let (mut inp, mut tgt, mut w, mut seg) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (s, &ex) in row.iter().enumerate() {
                let ex = &self.examples[ex];
                let n = shifted_len(ex, cap);
                inp.extend_from_slice(&ex.ids[..n]);
                tgt.extend_from_slice(&ex.ids[1..=n]);
                w.extend_from_slice(&ex.weights[1..=n]);
                seg.extend(std::iter::repeat_n(s as u32, n));
            }
            tokens += inp.len();
            inputs.push(inp);
            targets.push(tgt);
            weights.push(w);
            segments.push(seg);
        }
        let trainable = weights.iter().flatten().filter(|&&w| w > 0.0).count();
        let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
        for (r, row) in rows.iter().enumerate() {
            inputs[r].resize(width, 0);
            targets[r].resize(width, 0);
            weights[r].resize(width, 0.0);
            segments[r].resize(width, row.len() as u32);
        }
        Batch {
            inputs,
            targets,
            weights,
            segments: self.opts.pack.then_some(segments),
            tokens,
            trainable,
        }
    }
}

/// Tokens an example contributes to a row after the shift, cut to the row capacity.
fn shifted_len(ex: &Example, cap: usize) -> usize {
    (ex.ids.len() - 1).min(cap)
}

fn epoch_rng(seed: u64, epoch: u64) -> StdRng {
    // Mixing (not xor-ing) keeps (seed, epoch) pairs like (0, 1) and (1, 0) apart.
    StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(epoch)))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rows of `epoch`: its shuffled order, one example per row or packed first-fit.
fn plan_rows(examples: &[Example], opts: &BatchOptions, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut epoch_rng(opts.seed, epoch));
    if !opts.pack {
        return order.into_iter().map(|i| vec![i]).collect();
    }
    let cap = opts.max_seq_len;
    first_fit(&order, |i| shifted_len(&examples[i], cap), cap)
}

/// First-fit bin packing: each item goes into the earliest row with room, else a new row. A max
/// segment tree over the rows' free space finds that row in O(log n), so packing a million
/// examples stays cheap.
fn first_fit(order: &[usize], len: impl Fn(usize) -> usize, cap: usize) -> Vec<Vec<usize>> {
    let size = order.len().next_power_of_two().max(1);
    // Rows not yet opened have 0 free space and so are never chosen: every item has length >= 1.
    let mut free = vec![0usize; 2 * size];
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &item in order {
        let need = len(item);
        let row = if free[1] >= need {
            let mut node = 1;
            while node < size {
                node = if free[2 * node] >= need {
                    2 * node
                } else {
                    2 * node + 1
                };
            }
            node - size
        } else {
            rows.push(Vec::new());
            let row = rows.len() - 1;
            free[size + row] = cap;
            row
        };
        rows[row].push(item);
        let mut node = size + row;
        free[node] -= need;
        while node > 1 {
            node /= 2;
            free[node] = free[2 * node].max(free[2 * node + 1]);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::pre_tokenizer_for;
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::{AddedToken, Tokenizer};

    use crate::model::chat_template::fixtures::{QWEN_STYLE, SMOLLM2};

    const EOT: u32 = 0;
    const IM_START: u32 = 1;
    const IM_END: u32 = 2;

    /// Byte-level BPE without merges: one token per byte, so decoding any subset of tokens shows
    /// exactly which bytes were selected.
    fn spec() -> TextSpec {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut vocab = Vocab::default();
        for (i, tok) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .enumerate()
        {
            vocab.insert(tok.to_string(), i as u32);
        }
        for (i, c) in alphabet.iter().enumerate() {
            vocab.insert(c.to_string(), i as u32 + 3);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .expect("bpe");
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer_for("gpt2").expect("pre")));
        tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
        tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
        tokenizer.add_special_tokens(&[
            AddedToken::from("<|endoftext|>", true),
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ]);
        TextSpec {
            tokenizer,
            chat_template: None,
            bos_token: Some("<|im_start|>".into()),
            bos_id: Some(IM_START),
            eos_token: Some("<|im_end|>".into()),
            eos_ids: vec![IM_END, EOT],
            add_bos: false,
        }
    }

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").expect("template")
    }

    fn qwen() -> ChatTemplate {
        ChatTemplate::new(QWEN_STYLE, "", "<|im_end|>").expect("template")
    }

    fn load(
        data: &str,
        template: Option<&ChatTemplate>,
        opts: &DataOptions,
    ) -> Result<(Vec<Example>, DataReport), DataError> {
        read_jsonl(data.as_bytes(), &spec(), template, opts)
    }

    fn load_ok(data: &str, template: Option<&ChatTemplate>) -> (Vec<Example>, DataReport) {
        match load(data, template, &DataOptions::default()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn errors(data: &str, template: Option<&ChatTemplate>, opts: &DataOptions) -> Vec<LineError> {
        match load(data, template, opts) {
            Err(DataError::Invalid(report)) => report.errors,
            Err(e) => panic!("expected invalid lines, got {e}"),
            Ok(_) => panic!("expected invalid lines, got examples"),
        }
    }

    /// Decoded runs of consecutive trainable tokens.
    fn trained_runs(ex: &Example) -> Vec<String> {
        let spec = spec();
        let mut runs = Vec::new();
        let mut cur = Vec::new();
        for (&id, &w) in ex.ids.iter().zip(&ex.weights) {
            if w > 0.0 {
                cur.push(id);
            } else if !cur.is_empty() {
                runs.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            runs.push(cur);
        }
        runs.iter()
            .map(|r| spec.tokenizer.decode(r, false).expect("decode"))
            .collect()
    }

    const CONVERSATION: &str = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello there!"},{"role":"user","content":"Fish?"},{"role":"assistant","content":"Tuna, señor 🍣."}]}"#;

    #[test]
    fn chatml_spans_cover_assistant_content_and_end_marker() {
        let (examples, report) = load_ok(CONVERSATION, Some(&chatml()));
        assert_eq!(report.format, Some(DataFormat::Chat));
        assert_eq!(report.examples, 1);
        let ex = &examples[0];
        assert_eq!(
            trained_runs(ex),
            ["Hello there!<|im_end|>", "Tuna, señor 🍣.<|im_end|>"]
        );
        let full = chatml()
            .render(
                &serde_json::from_str::<Value>(CONVERSATION).expect("json")["messages"]
                    .as_array()
                    .expect("messages")
                    .clone(),
                false,
            )
            .expect("render");
        assert_eq!(
            spec().tokenizer.decode(&ex.ids, false).expect("decode"),
            full
        );
        assert_eq!(report.tokens, ex.ids.len());
        assert_eq!(report.trainable_tokens, ex.trainable());
        // The newline after each `<|im_end|>` is not trained.
        for (i, &id) in ex.ids.iter().enumerate() {
            if id == IM_END && ex.weights[i] > 0.0 {
                assert_eq!(ex.weights[i + 1], 0.0);
            }
        }
    }

    #[test]
    fn qwen_spans_follow_the_template_stripping_content() {
        let data = r#"{"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"  four \n"},{"role":"user","content":"and 3+3?"},{"role":"assistant","content":"six"}]}"#;
        let (examples, _) = load_ok(data, Some(&qwen()));
        assert_eq!(
            trained_runs(&examples[0]),
            ["four<|im_end|>", "six<|im_end|>"]
        );
        // The same data through ChatML keeps the content as written.
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(
            trained_runs(&examples[0]),
            ["  four \n<|im_end|>", "six<|im_end|>"]
        );
    }

    #[test]
    fn weight_zero_assistant_messages_are_not_trained() {
        let data = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"skip me","weight":0},{"role":"user","content":"b"},{"role":"assistant","content":"learn me","weight":1}]}"#;
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(trained_runs(&examples[0]), ["learn me<|im_end|>"]);
        let data = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"skip me","weight":0}]}"#;
        let errs = errors(data, Some(&chatml()), &DataOptions::default());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("no trainable token"), "{errs:?}");
    }

    #[test]
    fn tool_turns_are_context_not_targets() {
        let data = r#"{"messages":[{"role":"user","content":"weather?"},{"role":"assistant","content":"","tool_calls":[{"id":"c1","type":"function","function":{"name":"w","arguments":"{}"}}],"weight":0},{"role":"tool","content":"sunny","tool_call_id":"c1"},{"role":"assistant","content":"Sunny."}]}"#;
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(trained_runs(&examples[0]), ["Sunny.<|im_end|>"]);
        // A template that refuses the tool role reports its own message on that line.
        let errs = errors(data, Some(&qwen()), &DataOptions::default());
        assert_eq!(errs[0].line, 1);
        assert!(
            errs[0].message.contains("Unsupported role: tool"),
            "{errs:?}"
        );
    }

    #[test]
    fn template_that_is_not_prefix_stable_is_reported() {
        let t = ChatTemplate::new(
            "{{ messages | length }}{% for m in messages %}[{{ m.content }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            "",
            "",
        )
        .expect("template");
        let errs = errors(CONVERSATION, Some(&t), &DataOptions::default());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("not prefix-stable"), "{errs:?}");
    }

    #[test]
    fn chat_without_template_is_an_error() {
        let errs = errors(CONVERSATION, None, &DataOptions::default());
        assert!(errs[0].message.contains("chat template"), "{errs:?}");
    }

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
    fn prompt_completion_trains_completion_and_eos() {
        let data = "{\"prompt\":\"Q: \",\"completion\":\"A!\"}\n\n\n{\"prompt\":\"\",\"completion\":\"x\"}\n";
        let (examples, report) = load_ok(data, None);
        assert_eq!(report.format, Some(DataFormat::PromptCompletion));
        assert_eq!(report.examples, 2);
        let ex = &examples[0];
        assert_eq!(*ex.ids.last().expect("eos"), IM_END);
        assert_eq!(ex.weights, [0., 0., 0., 1., 1., 1.]);
        assert_eq!(trained_runs(ex), ["A!<|im_end|>"]);
        // Without a prompt the first completion token has nothing to be predicted from.
        assert_eq!(examples[1].weights, [0., 1.]);

        let mut with_bos = spec();
        with_bos.add_bos = true;
        let (examples, _) =
            read_jsonl(data.as_bytes(), &with_bos, None, &DataOptions::default()).expect("load");
        assert_eq!(examples[1].ids.len(), 3);
        assert_eq!(examples[1].ids[0], IM_START);
        assert_eq!(examples[1].ids[2], IM_END);
        assert_eq!(examples[1].weights, [0., 1., 1.]);
    }

    #[test]
    fn text_trains_everything_after_the_first_token() {
        let (examples, report) = load_ok("{\"text\":\"abc\"}", None);
        assert_eq!(report.format, Some(DataFormat::Text));
        assert_eq!(examples[0].ids.len(), 4);
        assert_eq!(examples[0].weights, [0., 1., 1., 1.]);
        assert_eq!(report.trainable_tokens, 3);
        let errs = errors(
            "{\"text\":\"\"}\n{\"text\":7}",
            None,
            &DataOptions::default(),
        );
        assert!(errs[0].message.contains("empty `text`"), "{errs:?}");
        assert!(errs[1].message.contains("must be a string"), "{errs:?}");
    }

    #[test]
    fn truncation_cuts_or_rejects_long_examples() {
        let data = "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"abcdefgh\",\"completion\":\"ij\"}";
        let opts = DataOptions {
            max_seq_len: 6,
            ..Default::default()
        };
        let errs = errors(data, None, &opts);
        // Line 1 keeps trainable tokens after the cut; line 2's completion is cut off entirely.
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 2);
        assert!(errs[0].message.contains("within the first 6"), "{errs:?}");

        let (examples, report) = load(
            "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"a\",\"completion\":\"b\"}",
            None,
            &opts,
        )
        .expect("load");
        assert_eq!(report.truncated, 1);
        assert_eq!(examples[0].ids.len(), 6);
        assert_eq!(examples[0].weights, [0., 0., 1., 1., 1., 1.]);
        assert_eq!(report.tokens, 6 + 3);

        let off = DataOptions {
            truncation: false,
            ..opts
        };
        let errs = errors(
            "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"a\",\"completion\":\"b\"}",
            None,
            &off,
        );
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 1);
        assert!(errs[0].message.contains("exceed max_seq_len 6"), "{errs:?}");
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

    fn numbered(n: usize, len: impl Fn(usize) -> usize) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let l = len(i);
                let mut ids = vec![1000 + i as u32];
                ids.extend((1..l).map(|j| j as u32));
                let mut weights = vec![1.0; l];
                weights[0] = 0.0;
                Example { ids, weights }
            })
            .collect()
    }

    #[test]
    fn split_is_deterministic_and_never_empty() {
        let ex = numbered(10, |_| 3);
        let (t1, v1) = split_validation(ex.clone(), 0.2, 7);
        let (t2, v2) = split_validation(ex.clone(), 0.2, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!((t1.len(), v1.len()), (8, 2));
        let others: Vec<_> = (8..12)
            .map(|seed| split_validation(ex.clone(), 0.2, seed).1)
            .collect();
        assert!(
            others.iter().any(|v| *v != v1),
            "the seed changes the split"
        );
        let (t, v) = split_validation(ex.clone(), 0.01, 1);
        assert_eq!((t.len(), v.len()), (9, 1));
        let (t, v) = split_validation(ex.clone(), 1.0, 1);
        assert_eq!((t.len(), v.len()), (1, 9));
        let (t, v) = split_validation(ex.clone(), 0.0, 1);
        assert_eq!((t.len(), v.len()), (10, 0));
        let (t, v) = split_validation(ex[..1].to_vec(), 0.5, 1);
        assert_eq!((t.len(), v.len()), (1, 0));
    }

    /// Example numbers in a batch, read from each segment's first token.
    fn batch_examples(b: &Batch) -> Vec<usize> {
        let mut out = Vec::new();
        for (r, row) in b.inputs.iter().enumerate() {
            for (i, &id) in row.iter().enumerate() {
                let starts = match &b.segments {
                    Some(s) => i == 0 || s[r][i] != s[r][i - 1],
                    None => i == 0,
                };
                if starts && id >= 1000 {
                    out.push(id as usize - 1000);
                }
            }
        }
        out
    }

    #[test]
    fn batcher_is_deterministic_resumable_and_covers_each_epoch() {
        for pack in [false, true] {
            let ex = Arc::new(numbered(23, |i| 2 + i % 7));
            let opts = BatchOptions {
                batch_size: 4,
                max_seq_len: 12,
                pack,
                seed: 42,
            };
            let mut a = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            let mut all = Vec::new();
            for epoch in 0..3u64 {
                assert_eq!(a.cursor(), BatchCursor { epoch, index: 0 });
                let steps = a.steps_per_epoch();
                assert_eq!(steps, a.steps_in_epoch(epoch));
                let mut seen = Vec::new();
                for _ in 0..steps {
                    let b = a.next_batch();
                    assert!(b.inputs.len() <= 4 && !b.inputs.is_empty());
                    seen.extend(batch_examples(&b));
                    all.push((a.cursor(), b));
                }
                seen.sort_unstable();
                assert_eq!(seen, (0..23).collect::<Vec<_>>(), "pack={pack}");
            }
            if !pack {
                assert_eq!(a.steps_per_epoch(), 6);
                assert_eq!(all[5].1.inputs.len(), 3);
            }
            let fresh = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            assert_eq!(fresh.total_steps(3) as usize, all.len());

            // Same seed, same batches; another seed, another order.
            let mut b = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            for (_, batch) in &all {
                assert_eq!(&b.next_batch(), batch);
            }
            let mut c = Batcher::new(
                ex.clone(),
                BatchOptions {
                    seed: 43,
                    ..opts.clone()
                },
            )
            .expect("batcher");
            assert_ne!(c.next_batch(), all[0].1);

            // Resuming from any saved cursor replays the rest exactly.
            for k in 0..all.len() {
                let mut r = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
                r.seek(all[k].0).expect("seek");
                for (_, batch) in &all[k + 1..] {
                    assert_eq!(&r.next_batch(), batch, "resume after {k}, pack={pack}");
                }
            }
            let mut r = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
            let steps = r.steps_in_epoch(1) as u64;
            assert!(r
                .seek(BatchCursor {
                    epoch: 1,
                    index: steps + 1
                })
                .is_err());
            r.seek(BatchCursor {
                epoch: 1,
                index: steps,
            })
            .expect("end of epoch");
            assert_eq!(r.cursor(), BatchCursor { epoch: 2, index: 0 });
        }
    }

    #[test]
    fn batches_are_shifted_and_padded() {
        let ex = vec![
            Example {
                ids: vec![5, 6, 7, 8],
                weights: vec![0., 0., 1., 1.],
            },
            Example {
                ids: vec![9, 10],
                weights: vec![0., 1.],
            },
        ];
        let opts = BatchOptions {
            batch_size: 2,
            max_seq_len: 16,
            pack: false,
            seed: 0,
        };
        let mut b = Batcher::new(ex, opts).expect("batcher");
        let batch = b.next_batch();
        let long = usize::from(batch.inputs[0][0] != 5);
        let short = 1 - long;
        assert_eq!(batch.inputs[long], [5, 6, 7]);
        assert_eq!(batch.targets[long], [6, 7, 8]);
        assert_eq!(batch.weights[long], [0., 1., 1.]);
        assert_eq!(batch.inputs[short], [9, 0, 0]);
        assert_eq!(batch.targets[short], [10, 0, 0]);
        assert_eq!(batch.weights[short], [1., 0., 0.]);
        assert_eq!((batch.tokens, batch.trainable), (4, 3));
        assert!(batch.segments.is_none());
        let (i, t, w, p) = batch.to_tensors(&Device::Cpu).expect("tensors");
        assert_eq!(i.dims(), [2, 3]);
        assert_eq!(t.dims(), [2, 3]);
        assert_eq!(w.dims(), [2, 3]);
        assert!(p.is_none());
        assert_eq!(
            t.to_vec2::<u32>().expect("targets")[long],
            batch.targets[long]
        );
    }

    #[test]
    fn packed_rows_fit_and_keep_examples_apart() {
        let ex = Arc::new(numbered(40, |i| 2 + (i * 7) % 11));
        let opts = BatchOptions {
            batch_size: 3,
            max_seq_len: 16,
            pack: true,
            seed: 5,
        };
        let mut b = Batcher::new(ex.clone(), opts.clone()).expect("batcher");
        let unpacked_rows = 40;
        let mut rows = 0;
        for _ in 0..b.steps_per_epoch() {
            let batch = b.next_batch();
            let segs = batch.segments.clone().expect("segments");
            let mut real = 0;
            for (r, row) in batch.inputs.iter().enumerate() {
                rows += 1;
                assert!(row.len() <= 16);
                let seg = &segs[r];
                assert_eq!(seg.len(), row.len());
                assert!(seg.windows(2).all(|w| w[0] <= w[1]), "{seg:?}");
                // Within a segment the example's tokens are contiguous: its first token starts
                // it and its targets continue it.
                let mut i = 0;
                while i < row.len() {
                    let s = seg[i];
                    let end = seg[i..]
                        .iter()
                        .position(|&x| x != s)
                        .map_or(row.len(), |p| i + p);
                    if row[i] >= 1000 {
                        real += end - i;
                        assert_eq!(row[i + 1..end], batch.targets[r][i..end - 1]);
                    } else {
                        assert!(batch.weights[r][i..end].iter().all(|&w| w == 0.0));
                    }
                    i = end;
                }
            }
            assert_eq!(real, batch.tokens);
            let (_, _, _, packed) = batch.to_tensors(&Device::Cpu).expect("tensors");
            let packed = packed.expect("packed");
            let l = batch.inputs[0].len();
            assert_eq!(packed.positions.dims(), [batch.inputs.len(), l]);
            // Positions restart at every example.
            let pos = packed.positions.to_vec2::<u32>().expect("positions");
            for (r, seg) in segs.iter().enumerate() {
                for i in 0..l {
                    if i == 0 || seg[i] != seg[i - 1] {
                        assert_eq!(pos[r][i], 0);
                    }
                }
            }
        }
        assert!(rows < unpacked_rows / 2, "{rows} rows");
    }

    #[test]
    fn over_long_examples_are_cut_to_the_row() {
        let ex = numbered(3, |_| 30);
        let mut b = Batcher::new(
            ex,
            BatchOptions {
                batch_size: 3,
                max_seq_len: 8,
                pack: true,
                seed: 1,
            },
        )
        .expect("batcher");
        let batch = b.next_batch();
        assert_eq!(batch.inputs.len(), 3);
        assert!(batch.inputs.iter().all(|r| r.len() == 8));
        assert!(Batcher::new(
            Vec::new(),
            BatchOptions {
                batch_size: 1,
                max_seq_len: 8,
                pack: false,
                seed: 0
            }
        )
        .is_err());
    }

    #[test]
    fn first_fit_uses_the_earliest_row_with_room() {
        let lens = [6, 5, 4, 3, 2, 1];
        let rows = first_fit(&[0, 1, 2, 3, 4, 5], |i| lens[i], 8);
        assert_eq!(rows, vec![vec![0, 4], vec![1, 3], vec![2, 5]]);
    }
}
