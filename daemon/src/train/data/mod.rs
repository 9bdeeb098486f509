//! Training data: JSONL datasets (OpenAI chat, prompt-completion, plain text) validated line by
//! line, tokenized into examples with per-token loss weights, split into train/validation sets,
//! and served as deterministic, resumable, optionally packed batches shifted for next-token
//! prediction.
//!
//! Assistant tokens of a chat are located by rendering the conversation with the model's own chat
//! template and comparing renders of its prefixes, never by guessing at the template's markup: what
//! the model is trained on is exactly what it will see when serving. Chat lines are read by the
//! same message parser as chat requests ([`crate::model::chat`]), so both accept the same messages.
//!
//! - [`jsonl`]: reading a file line by line within its limits, detecting the format, and checking
//!   each line, with every bad line reported by number.
//! - [`masks`]: tokenization with per-token loss weights, and the train/validation split.
//! - [`batcher`]: shifted, padded, optionally packed batches from a resumable cursor.
pub mod batcher;
pub mod jsonl;
pub mod masks;

pub use batcher::{Batch, BatchCursor, BatchOptions, Batcher};
pub use jsonl::{
    load_jsonl, read_jsonl, DataError, DataFormat, DataOptions, DataReport, Limit, LineError,
};
pub use masks::{split_validation, Example};

/// A tokenizer and templates shared by the tests of the submodules.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::model::tokenizer::pre_tokenizer_for;
    use crate::model::{ChatTemplate, TextSpec};
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::{AddedToken, Tokenizer};

    use crate::model::chat_template::fixtures::{QWEN_STYLE, SMOLLM2};

    pub const EOT: u32 = 0;
    pub const IM_START: u32 = 1;
    pub const IM_END: u32 = 2;

    /// Byte-level BPE without merges: one token per byte, so decoding any subset of tokens shows
    /// exactly which bytes were selected.
    pub fn spec() -> TextSpec {
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

    pub fn chatml() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").expect("template")
    }

    pub fn qwen() -> ChatTemplate {
        ChatTemplate::new(QWEN_STYLE, "", "<|im_end|>").expect("template")
    }

    pub fn load(
        data: &str,
        template: Option<&ChatTemplate>,
        opts: &DataOptions,
    ) -> Result<(Vec<Example>, DataReport), DataError> {
        read_jsonl(data.as_bytes(), &spec(), template, opts)
    }

    pub fn load_ok(data: &str, template: Option<&ChatTemplate>) -> (Vec<Example>, DataReport) {
        match load(data, template, &DataOptions::default()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn errors(
        data: &str,
        template: Option<&ChatTemplate>,
        opts: &DataOptions,
    ) -> Vec<LineError> {
        match load(data, template, opts) {
            Err(DataError::Invalid(report)) => report.errors,
            Err(e) => panic!("expected invalid lines, got {e}"),
            Ok(_) => panic!("expected invalid lines, got examples"),
        }
    }

    /// Decoded runs of consecutive trainable tokens.
    pub fn trained_runs(ex: &Example) -> Vec<String> {
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

    /// Examples whose first token (1000 + i) names them.
    pub fn numbered(n: usize, len: impl Fn(usize) -> usize) -> Vec<Example> {
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
}
