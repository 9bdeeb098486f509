//! The `logprobs` objects of responses, in OpenAI's two shapes: chat's
//! `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}` and the legacy
//! completions' parallel arrays `{tokens, token_logprobs, top_logprobs, text_offset}`.
use serde_json::{json, Map, Value};

use crate::engine::logprobs::TokenLogprob;

/// What OpenAI reports for a token the model gives no chance at all (JSON has no −∞).
const FLOOR: f32 = -9999.0;

fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp.max(FLOOR)
    } else {
        FLOOR
    }
}

/// Chat: one entry per token.
pub fn chat(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| json!({"token": a.token, "logprob": finite(a.logprob), "bytes": a.bytes}))
                .collect();
            json!({
                "token": t.token,
                "logprob": finite(t.logprob.unwrap_or(FLOOR)),
                "bytes": t.bytes,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions. `offset` is where the first token starts in the choice's whole text
/// (echoed prompt included) and advances past the tokens. `top_logprobs` holds the
/// alternatives and the chosen token, as OpenAI's does; a token nothing predicts (the first
/// of an echoed prompt) has `null` in both lists.
pub fn legacy(tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut out_tokens = Vec::with_capacity(tokens.len());
    let mut lps = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        out_tokens.push(json!(t.token));
        offsets.push(json!(*offset));
        *offset += t.token.chars().count();
        match t.logprob {
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
            Some(lp) => {
                lps.push(json!(finite(lp)));
                let mut top = Map::new();
                for a in &t.top {
                    top.entry(a.token.clone())
                        .or_insert_with(|| json!(finite(a.logprob)));
                }
                top.entry(t.token.clone())
                    .or_insert_with(|| json!(finite(lp)));
                tops.push(Value::Object(top));
            }
        }
    }
    json!({
        "tokens": out_tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::logprobs::TopLogprob;

    fn tok(token: &str, logprob: Option<f32>, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            id: 0,
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
            top: top
                .iter()
                .map(|(t, lp)| TopLogprob {
                    token: t.to_string(),
                    bytes: t.as_bytes().to_vec(),
                    logprob: *lp,
                })
                .collect(),
        }
    }

    #[test]
    fn chat_shape() {
        let v = chat(&[tok("Hi", Some(-0.5), &[("Hi", -0.5), ("Yo", -1.0)])]);
        assert_eq!(
            v,
            json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                 {"token": "Yo", "logprob": -1.0, "bytes": [89, 111]}]}],
                   "refusal": null})
        );
        let v = chat(&[tok("x", Some(f32::NEG_INFINITY), &[])]);
        assert_eq!(v["content"][0]["logprob"], json!(-9999.0));
    }

    #[test]
    fn legacy_shape_with_echo() {
        let mut offset = 0;
        let v = legacy(
            &[
                tok("Once", None, &[]),
                tok(" upon", Some(-2.0), &[(" a", -0.25)]),
            ],
            &mut offset,
        );
        assert_eq!(
            v,
            json!({"tokens": ["Once", " upon"], "token_logprobs": [null, -2.0],
                   "top_logprobs": [null, {" a": -0.25, " upon": -2.0}],
                   "text_offset": [0, 4]})
        );
        assert_eq!(offset, 9);
    }
}
