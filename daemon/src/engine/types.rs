//! Public request/response types of the engine, independent of HTTP.
use serde::{Deserialize, Serialize};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Chat messages, rendered with the model's chat template (generation prompt added).
    Chat {
        messages: Vec<crate::model::chat::ChatMessage>,
    },
    /// Raw text, tokenized as is (BOS added when the model asks for it).
    Text(String),
}

/// Sampling parameters, named as in the OpenAI API (plus the usual open-model extensions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` or a stop string (as in
    /// vLLM): fixed-length generations for load tests and benchmarks.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Added to the logits of these token ids before sampling (OpenAI `logit_bias`, −100..100).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each generated token's logprob with this many alternatives (None: no logprobs).
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// Completions `echo`: the prompt comes back before the output (with logprobs, per token).
    #[serde(default)]
    pub echo: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            ignore_eos: false,
            logit_bias: Vec::new(),
            logprobs: None,
            echo: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The served model id asked for.
    pub model: String,
    pub input: PromptInput,
    pub sampling: SamplingParams,
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Structured output and tools (both optional).
    pub guided: Guided,
    /// How many choices to generate from the prompt (OpenAI `n`, 1..=[`MAX_CHOICES`]): one
    /// prefill, then each choice samples on its own copy of the prompt's cache.
    pub n: usize,
}

/// Most choices one request may ask for: every choice takes a slot of the decode batch, and
/// all of a request's choices run in the same batch.
pub const MAX_CHOICES: usize = super::scheduler::MAX_BATCH;

/// Checks OpenAI's `n` against [`MAX_CHOICES`]; the error names `n`.
pub fn check_choices(n: u64) -> Result<usize, EngineError> {
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n),
        _ => Err(EngineError::Invalid {
            param: "n".into(),
            message: format!(
                "n must be between 1 and {MAX_CHOICES} (the engine's decode batch size), got {n}"
            ),
        }),
    }
}

/// What shapes a request's output beyond sampling: a grammar the text must match
/// (`response_format`, `guided_*`) and the tools it may call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Guided {
    pub constraint: Option<super::constraint::Constraint>,
    pub tools: Option<super::tools::Tools>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// The turn ended with tool calls.
    ToolCalls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of `usage.prompt_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prompt cache (not prefilled).
    pub cached_tokens: usize,
}

/// Streamed back to the caller of [`super::EngineHandle::submit`], in order.
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// New text (never a split UTF-8 character, never part of a stop string).
    Text(String),
    /// A complete tool call parsed out of the output (only with tools).
    ToolCall(super::tools::ToolCall),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    /// The prompt, echoed before the output (completions `echo`), with its tokens' logprobs
    /// when the request asked for logprobs.
    Echo {
        text: String,
        logprobs: Option<Vec<super::logprobs::TokenLogprob>>,
    },
    /// A generated token's logprob (only when asked for), sent before the text it adds.
    Token(super::logprobs::TokenLogprob),
    /// Generation failed after it started; no further events follow.
    Failed(String),
}

/// A served model as listed by `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub created: u64,
    pub owned_by: String,
    pub context_length: usize,
    /// The model a variant was tuned from (None for the base itself): the base, or for
    /// continued fine-tuning the fine-tuned model its job started from (the API fills that
    /// in from the jobs).
    pub parent: Option<String>,
    /// `lora`, `prompt_tuning` or `prefix_tuning` for variants.
    pub adapter_type: Option<String>,
    /// The base only: how its weights are held (`model.weights`) and their bytes.
    pub weights: Option<(crate::model::WeightsMode, u64)>,
    /// Loaded in memory (false: evicted by the memory budget, reloaded on first use).
    pub resident: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model is still loading")]
    NotReady,
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// A request value is invalid; `param` is the request field at fault (OpenAI naming).
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("the engine has stopped: {0}")]
    Unavailable(String),
    /// Too many requests are already waiting; try again after the given delay.
    #[error("the server is busy: too many requests are waiting, retry in {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl SamplingParams {
    /// Checks ranges; the error names the OpenAI request field.
    pub fn validate(&self) -> Result<(), EngineError> {
        fn bad(param: &str, message: String) -> Result<(), EngineError> {
            Err(EngineError::Invalid {
                param: param.to_string(),
                message,
            })
        }
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return bad(
                "temperature",
                format!("temperature must be between 0 and 2, got {t}"),
            );
        }
        let p = self.top_p;
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {p}"));
        }
        let m = self.min_p;
        if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
            return bad("min_p", format!("min_p must be between 0 and 1, got {m}"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be a positive number, got {r}"),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return bad(name, format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if let Some(k) = self.logprobs {
            if k > super::logprobs::MAX_TOP_LOGPROBS {
                return bad(
                    "top_logprobs",
                    format!(
                        "top_logprobs must be between 0 and {}, got {k}",
                        super::logprobs::MAX_TOP_LOGPROBS
                    ),
                );
            }
        }
        for &(id, b) in &self.logit_bias {
            if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
                return bad(
                    "logit_bias",
                    format!(
                        "logit_bias values must be between -100 and 100, got {b} for token {id}"
                    ),
                );
            }
        }
        Ok(())
    }
}
