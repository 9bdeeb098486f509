//! Prompt tuning's config: `num_virtual_tokens` trained embeddings ahead of the input.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{bad, get_usize, join, FieldError, DEFAULT_NUM_VIRTUAL_TOKENS};

/// The method's name (its `type`).
pub const NAME: &str = "prompt_tuning";
/// Its fields besides `type`, as the API spells them.
pub const FIELDS: &[&str] = &["num_virtual_tokens", "init", "init_text"];
/// What `init: text` starts from when no `init_text` is given.
pub const DEFAULT_INIT_TEXT: &str = "You are a helpful assistant.";

/// How the virtual tokens start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Normal noise with the spread of the model's own embedding table.
    Random,
    /// Embeddings of a tokenized text, repeated or cut to length.
    Text,
    /// Embeddings of random vocabulary entries.
    SampleVocab,
}

impl PromptInit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Text => "text",
            Self::SampleVocab => "sample_vocab",
        }
    }
}

/// `{"type": "prompt_tuning", ...}`. As flags (`itamaed train`): `--prompt-init`,
/// `--prompt-init-text`; `--num-virtual-tokens` is shared with prefix tuning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct PromptTuningConfig {
    /// Virtual tokens, 1 to 512 (default 20).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_virtual_tokens: Option<usize>,
    /// How the virtual tokens start (default text).
    #[arg(
        long = "prompt-init",
        value_name = "PROMPT_INIT",
        value_enum,
        default_value = "text"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PromptInit>,
    /// The text of `init: text`, at most 4096 bytes (default "You are a helpful assistant.").
    #[arg(long = "prompt-init-text", value_name = "PROMPT_INIT_TEXT", default_value = DEFAULT_INIT_TEXT)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_text: Option<String>,
}

impl PromptTuningConfig {
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
            .unwrap_or(DEFAULT_NUM_VIRTUAL_TOKENS)
    }

    pub fn init(&self) -> PromptInit {
        self.init.unwrap_or(PromptInit::Text)
    }

    /// The text a `text`-initialised prompt starts from; None for other inits.
    pub fn init_text(&self) -> Option<&str> {
        (self.init() == PromptInit::Text)
            .then(|| self.init_text.as_deref().unwrap_or(DEFAULT_INIT_TEXT))
    }

    /// The fields of an adapter object at `prefix`; defaults filled in but `init_text`'s, which
    /// only `init: text` reads.
    pub fn parse(a: &Map<String, Value>, prefix: &str) -> Result<Self, FieldError> {
        let init = match a.get("init") {
            None | Some(Value::Null) => PromptInit::Text,
            Some(Value::String(s)) if s == "text" => PromptInit::Text,
            Some(Value::String(s)) if s == "random" => PromptInit::Random,
            Some(Value::String(s)) if s == "sample_vocab" => PromptInit::SampleVocab,
            Some(v) => {
                return bad(
                    &join(prefix, "init"),
                    format!("init must be \"text\", \"random\" or \"sample_vocab\", got {v}"),
                )
            }
        };
        let init_text = match a.get("init_text") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 4096 => Some(s.clone()),
            Some(_) => {
                return bad(
                    &join(prefix, "init_text"),
                    "init_text must be a non-empty string of at most 4096 bytes",
                )
            }
        };
        Ok(Self {
            num_virtual_tokens: Some(
                get_usize(a, "num_virtual_tokens", prefix, 1..=512)?
                    .unwrap_or(DEFAULT_NUM_VIRTUAL_TOKENS),
            ),
            init: Some(init),
            init_text,
        })
    }

    /// As a job echoes it: `init_text` only for `init: text`, defaulted.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"type": NAME, "num_virtual_tokens": self.num_virtual_tokens(),
                           "init": self.init().as_str()});
        if let Some(t) = self.init_text() {
            v["init_text"] = json!(t);
        }
        v
    }
}
