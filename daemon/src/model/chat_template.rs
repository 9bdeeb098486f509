//! Chat templates rendered with minijinja (HF/Jinja2 compatible), never by string concatenation.
//!
//! The environment mirrors what `transformers` sets up for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, loop controls, Python string/dict methods (`.strip()`, `.items()`, ...), the
//! globals `raise_exception` and `strftime_now`, and a `tojson` that prints like Python's
//! `json.dumps` (minijinja's own escapes `<>&'` for HTML, which would change prompts).
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::{ModelError, Result};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template refers to `tools` at all: one that does not would drop them
    /// silently, so serving refuses tools for it.
    supports_tools: bool,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported as [`ModelError::Template`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Template(describe(&e)))?;
        Ok(Self {
            supports_tools: source.contains("tools"),
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Whether the template prints tool definitions (it refers to `tools`).
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// Renders OpenAI-style messages (`{"role","content",...}` objects): parsed
    /// [`ChatMessage`](super::chat::ChatMessage)s, which is how both serving and training call it
    /// so that a conversation renders identically for both, or raw JSON values.
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// As [`render`](Self::render), with OpenAI-style tool definitions exposed to the template as
    /// `tools` (`none` when absent, as `transformers` passes it).
    pub fn render_with_tools<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        let ctx = context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(ctx)
            .map_err(|e| ModelError::Template(describe(&e)))
    }
}

/// The message a template raised verbatim (it is what the API client must see), otherwise
/// minijinja's description with the template line.
fn describe(err: &Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return raised.0.clone();
        }
        source = e.source();
    }
    err.to_string()
}

/// Carried as the source of the error `raise_exception` returns, so [`describe`] can find it.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
}

/// `strftime_now(fmt)` as `transformers` defines it (Llama 3.x templates print today's date).
/// Time is UTC: a server's local zone is arbitrary.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(&fmt, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A subset of C `strftime` on a UTC Unix time: `%Y %y %m %d %B %b %A %a %H %M %S %j %%`.
/// Other directives are copied through unchanged.
pub fn format_utc(fmt: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days + 3) % 7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday_name}"),
            Some('a') => write!(out, "{}", &weekday_name[..3]),
            Some('H') => write!(out, "{:02}", secs_of_day / 3600),
            Some('M') => write!(out, "{:02}", secs_of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", secs_of_day % 60),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`] for years from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) => match seps.as_slice() {
            [item, key] => (item.clone(), key.clone()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be (item_separator, key_separator)",
                ))
            }
        },
        // Python drops the space after ',' when indenting (newlines separate items instead).
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonOpts {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    depth: usize,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), opts),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, opts, depth, |out, item| {
                write_json(out, item, opts, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            write_container(out, '{', '}', &keys, opts, depth, |out, key| {
                match key.as_str() {
                    Some(s) => write_json_str(out, s, opts),
                    // Python turns non-string keys into strings (`{1: x}` → `{"1": x}`).
                    None => write_json_str(out, &key.to_string(), opts),
                }
                out.push_str(&opts.key_sep);
                write_json(out, &value.get_item(key)?, opts, depth + 1)
            })?;
        }
        _ => write_json_str(out, &value.to_string(), opts),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    items: &[Value],
    opts: &JsonOpts,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &Value) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        opts.newline(out, depth + 1);
        write_item(out, item)?;
    }
    if !items.is_empty() {
        opts.newline(out, depth);
    }
    out.push(close);
    Ok(())
}

fn write_number(out: &mut String, value: &Value) -> std::result::Result<(), Error> {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return Ok(());
    }
    let f = f64::try_from(value.clone())?;
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        // Rust's `{:?}` is the shortest round-trip form like Python's `repr`; only the exponent
        // is spelled differently (`1e20`/`1e-7` vs `1e+20`/`1e-07`).
        let s = format!("{f:?}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', exp),
                };
                let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
            }
            None => out.push_str(&s),
        }
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str, opts: &JsonOpts) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (opts.ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Chat templates shared by the tests of this module and of the training data.
#[cfg(test)]
pub(crate) mod fixtures {
    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct, verbatim from the GGUF.
    pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Qwen2.5-style: default system message, tools block through `tojson`, block tags that rely
    /// on `trim_blocks`/`lstrip_blocks`, Python string methods and `raise_exception`.
    pub const QWEN_STYLE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
    {%- if message.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use super::fixtures::{QWEN_STYLE, SMOLLM2};

    fn conv() -> Vec<serde_json::Value> {
        vec![
            json!({"role": "system", "content": "You are helpful"}),
            json!({"role": "user", "content": "Hi"}),
        ]
    }

    #[test]
    fn smollm2_chatml_with_and_without_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").expect("compile");
        let with = t.render(&conv(), true).expect("render");
        assert_eq!(
            with,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let without = t.render(&conv(), false).expect("render");
        assert_eq!(
            without,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        let user_only = t
            .render(&[json!({"role": "user", "content": "Hi"})], false)
            .expect("render");
        assert_eq!(
            user_only,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn qwen_style_default_system_and_strip() {
        let t = ChatTemplate::new(QWEN_STYLE, "", "<|im_end|>").expect("compile");
        let out = t
            .render(
                &[
                    json!({"role": "user", "content": "  2+2?\n"}),
                    json!({"role": "assistant", "content": "4"}),
                ],
                true,
            )
            .expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&conv(), false).expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::new(QWEN_STYLE, "", "").expect("compile");
        match t.render(&[json!({"role": "robot", "content": "x"})], true) {
            Err(ModelError::Template(msg)) => assert_eq!(msg, "Unsupported role: robot"),
            other => panic!(
                "expected a template error, got {other:?}",
                other = other.err()
            ),
        }
    }

    #[test]
    fn tools_render_through_python_style_tojson() {
        let t = ChatTemplate::new(QWEN_STYLE, "", "").expect("compile");
        let tools = [json!({"type": "function", "function": {"name": "f<x>", "parameters": {}}})];
        let out = t
            .render_with_tools(
                &[json!({"role": "user", "content": "go"})],
                Some(&tools),
                false,
            )
            .expect("render");
        // Key order follows serde_json's map: insertion order with its `preserve_order` feature
        // (what Python does), sorted without it.
        let tool_json = [
            r#"{"type": "function", "function": {"name": "f<x>", "parameters": {}}}"#,
            r#"{"function": {"name": "f<x>", "parameters": {}}, "type": "function"}"#,
        ];
        let expected = |tool: &str| {
            format!(
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\
                 \n\n# Tools\n<tools>\n{tool}\n</tools><|im_end|>\n<|im_start|>user\ngo<|im_end|>\n"
            )
        };
        assert!(tool_json.iter().any(|t| out == expected(t)), "{out}");
    }

    #[test]
    fn tojson_matches_json_dumps() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ s | tojson }}|{{ s | tojson(ensure_ascii=true) }}|{{ f | tojson }}",
            "",
            "",
        )
        .expect("compile");
        let env = &t.env;
        let tmpl = env.get_template(TEMPLATE_NAME).expect("template");
        let out = tmpl
            .render(context! {
                x => Value::from_serialize(json!({"a": [1, true, null]})),
                s => "é\"\n<&>",
                f => 1e20,
            })
            .expect("render");
        assert_eq!(
            out,
            "{\"a\": [1, true, null]}|{\n  \"a\": [\n    1,\n    true,\n    null\n  ]\n}|\"é\\\"\\n<&>\"|\"\\u00e9\\\"\\n<&>\"|1e+20"
        );
    }

    #[test]
    fn bos_eos_and_tools_none_are_visible() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% if tools is none %}N{% endif %}{{ messages | length }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .expect("compile");
        assert_eq!(t.render(&conv(), false).expect("render"), "<s>N2</s>");
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        match ChatTemplate::new("{% for m in messages %}", "", "") {
            Err(ModelError::Template(msg)) => assert!(msg.contains("syntax error"), "{msg}"),
            other => panic!(
                "expected a template error, got {:?}",
                other.err().map(|e| e.to_string())
            ),
        }
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        assert_eq!(
            format_utc("%d %b %Y|%B %m %y|%A %a|%H:%M:%S|%j|%%|%Q", 1_709_211_909),
            "29 Feb 2024|February 02 24|Thursday Thu|13:05:09|060|%|%Q"
        );
        assert_eq!(format_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(format_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").expect("compile");
        let year = t.render::<serde_json::Value>(&[], false).expect("render");
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }

    #[test]
    fn template_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }
}
