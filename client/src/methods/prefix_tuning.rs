//! Prefix tuning's config: trained key/value prefixes ahead of the real tokens in every layer.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{get_bool, get_usize, FieldError, DEFAULT_NUM_VIRTUAL_TOKENS};

/// The method's name (its `type`).
pub const NAME: &str = "prefix_tuning";
/// The text whose keys and values (the model's own, after BOS) a fresh prefix starts as.
pub const INIT_TEXT: &str = super::prompt_tuning::DEFAULT_INIT_TEXT;
/// Its fields besides `type`, as the API spells them.
pub const FIELDS: &[&str] = &[
    "num_virtual_tokens",
    "prefix_projection",
    "encoder_hidden_size",
];

/// `{"type": "prefix_tuning", ...}`. As flags (`itamaed train`): `--prefix-projection`,
/// `--encoder-hidden-size`; `--num-virtual-tokens` is shared with prompt tuning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct PrefixTuningConfig {
    /// Virtual tokens, 1 to 512 (default 20).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_virtual_tokens: Option<usize>,
    /// Train through a projection MLP (PEFT's `PrefixEncoder`) (default false).
    #[arg(long, action = clap::ArgAction::SetTrue)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    /// The projection's hidden width, 1 to 65536 (default: the model's key/value width).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
}

impl PrefixTuningConfig {
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
            .unwrap_or(DEFAULT_NUM_VIRTUAL_TOKENS)
    }

    pub fn prefix_projection(&self) -> bool {
        self.prefix_projection.unwrap_or(false)
    }

    /// The projection's width on a model whose key/value width is `kv_dim`.
    pub fn encoder_hidden_size(&self, kv_dim: usize) -> usize {
        self.encoder_hidden_size.unwrap_or(kv_dim)
    }

    /// The fields of an adapter object at `prefix`; defaults filled in but
    /// `encoder_hidden_size`'s, which depends on the model.
    pub fn parse(a: &Map<String, Value>, prefix: &str) -> Result<Self, FieldError> {
        Ok(Self {
            num_virtual_tokens: Some(
                get_usize(a, "num_virtual_tokens", prefix, 1..=512)?
                    .unwrap_or(DEFAULT_NUM_VIRTUAL_TOKENS),
            ),
            prefix_projection: Some(get_bool(a, "prefix_projection", prefix)?),
            encoder_hidden_size: get_usize(a, "encoder_hidden_size", prefix, 1..=65_536)?,
        })
    }

    /// As a job echoes it (`encoder_hidden_size` null for the model's width).
    pub fn to_json(&self) -> Value {
        json!({
            "type": NAME, "num_virtual_tokens": self.num_virtual_tokens(),
            "prefix_projection": self.prefix_projection(),
            "encoder_hidden_size": self.encoder_hidden_size,
        })
    }
}
