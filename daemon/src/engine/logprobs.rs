//! Log-probabilities reported with generated tokens (`logprobs`, `top_logprobs`). They are taken
//! from the distribution the model produced for the step *after* the penalties and `logit_bias`
//! are applied and *before* temperature, top-k, top-p and min-p reshape it, as OpenAI and vLLM
//! report them: the numbers describe the model, not the sampler's settings.
use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::Tokenizer;

/// Most alternatives a request may ask for per token (chat `top_logprobs`, as OpenAI).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One alternative at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    /// The token's bytes: a byte-level token may hold part of a UTF-8 character, which
    /// `token` can only show as U+FFFD.
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A token of the output (or of an echoed prompt) with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub bytes: Vec<u8>,
    /// None for the first prompt token, which nothing predicts.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, best first.
    pub top: Vec<TopLogprob>,
}

/// `ln Σ exp(l)`, accumulated in f64 so a 150k-entry vocabulary loses nothing.
pub fn log_normalizer(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits as `(id, logprob)`, best first (ties: lower id first).
pub fn top_k(logits: &[f32], norm: f32, k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by);
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - norm))
        .collect()
}

/// GPT-2's byte-level alphabet reversed: the character a vocabulary entry uses for each byte.
fn byte_of_char() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    u32::from(b)
                } else {
                    next += 1;
                    next - 1
                };
                (char::from_u32(c).unwrap_or('\u{FFFD}'), b)
            })
            .collect()
    })
}

/// The bytes a token stands for. Byte-level BPE vocabularies (the only kind served) spell
/// each byte with one character of GPT-2's alphabet; added tokens such as `<|im_end|>` are
/// plain text and read the same way, except those outside the alphabet, kept as UTF-8.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    let Some(s) = tok.id_to_token(id) else {
        return Vec::new();
    };
    let table = byte_of_char();
    s.chars()
        .map(|c| table.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| s.into_bytes())
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Describes the token `id` chosen from `logits` (already penalised and biased), with the `k`
/// most likely alternatives.
pub fn describe(tok: &Tokenizer, logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let norm = log_normalizer(logits);
    describe_with(tok, logits, norm, id, k)
}

fn describe_with(tok: &Tokenizer, logits: &[f32], norm: f32, id: u32, k: usize) -> TokenLogprob {
    let top = top_k(logits, norm, k)
        .into_iter()
        .map(|(i, logprob)| {
            let bytes = token_bytes(tok, i);
            TopLogprob {
                token: text_of(&bytes),
                bytes,
                logprob,
            }
        })
        .collect();
    let bytes = token_bytes(tok, id);
    TokenLogprob {
        id,
        token: text_of(&bytes),
        bytes,
        logprob: logits.get(id as usize).map(|l| l - norm),
        top,
    }
}

/// The prompt's tokens with their log-probabilities under the model (echo): row `i` of
/// `rows` holds the logits that predict `ids[i + 1]`; the first token has none.
pub fn prompt_logprobs(
    tok: &Tokenizer,
    ids: &[u32],
    rows: &[Vec<f32>],
    k: usize,
) -> Vec<TokenLogprob> {
    let mut out = Vec::with_capacity(ids.len());
    if let Some(&first) = ids.first() {
        let bytes = token_bytes(tok, first);
        out.push(TokenLogprob {
            id: first,
            token: text_of(&bytes),
            bytes,
            logprob: None,
            top: Vec::new(),
        });
    }
    for (row, &id) in rows.iter().zip(ids.iter().skip(1)) {
        out.push(describe(tok, row, id, k));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizer_matches_an_f64_log_softmax() {
        let logits = [1.5f32, -2.0, 0.25, 3.0, 3.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        let norm = log_normalizer(&logits);
        assert!((f64::from(norm) - z).abs() < 1e-6, "{norm} vs {z}");
        let total: f64 = logits.iter().map(|&l| f64::from(l - norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_is_sorted_and_ties_keep_id_order() {
        let logits = [1.5f32, -2.0, 0.25, 3.0, 3.0];
        let norm = log_normalizer(&logits);
        let top = top_k(&logits, norm, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![3, 4, 0]);
        assert!((top[2].1 - (1.5 - norm)).abs() < 1e-6);
        assert_eq!(top_k(&logits, norm, 0), vec![]);
        assert_eq!(top_k(&logits, norm, 99).len(), 5);
    }

    #[test]
    fn byte_level_alphabet_round_trips() {
        let table = byte_of_char();
        assert_eq!(table.len(), 256);
        // 'Ġ' is the space byte, 'Ċ' the newline, as in every GPT-2-style vocabulary.
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
        // The bytes of "é" (0xC3 0xA9) are spelled 'Ã' and '©'.
        assert_eq!(table[&'Ã'], 0xC3);
        assert_eq!(table[&'©'], 0xA9);
    }
}
