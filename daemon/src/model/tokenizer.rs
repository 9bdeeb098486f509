//! Text side of a model: the `tokenizers::Tokenizer` (built from GGUF metadata or read from an HF
//! `tokenizer.json`), special tokens, EOS ids and the chat template source.
//!
//! GGUF files carry no `tokenizer.json`; llama.cpp's converter flattens it into `tokenizer.ggml.*`
//! keys and keeps only the *name* of the pre-tokenizer (`tokenizer.ggml.pre`). This module rebuilds
//! an equivalent HF tokenizer from those keys, so both loaders hand the engine the same type.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{ModelError, Result};

/// Everything text-side a loaded model needs.
pub struct TextSpec {
    pub tokenizer: tokenizers::Tokenizer,
    /// Jinja source of the chat template, if the model ships one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (template EOS, generation_config eos_token_id, ...), deduplicated.
    pub eos_ids: Vec<u32>,
    /// Whether a BOS token must be prepended when encoding raw text.
    pub add_bos: bool,
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Qwen2 pre-tokenizer split (from its `tokenizer.json`): single digits, letters with one leading
/// non-letter, punctuation runs with trailing newlines.
pub const QWEN2_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3 (`llama-bpe`) pre-tokenizer split: as Qwen2 but digits in groups of up to three.
pub const LLAMA3_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the text side from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
///
/// Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported, with the pre-tokenizers
/// `smollm`, `qwen2`, `llama-bpe`, `gpt2` and `default`. Control tokens (type 3) become special
/// added tokens, user-defined tokens (type 4) plain added tokens. EOS ids are
/// `tokenizer.ggml.eos_token_id` plus `tokenizer.ggml.eot_token_id` when present.
pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>) -> Result<TextSpec> {
    let model = meta_str(metadata, "tokenizer.ggml.model")?
        .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(ModelError::UnsupportedTokenizer(model.to_string()));
    }
    // llama.cpp falls back to its default pre-tokenizer when the key is absent (old conversions).
    let pre = meta_str(metadata, "tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer_for(pre)?;

    let tokens = meta_str_array(metadata, "tokenizer.ggml.tokens")?
        .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.tokens".into()))?;
    let merges = meta_str_array(metadata, "tokenizer.ggml.merges")?
        .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.merges".into()))?;
    let token_types = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => int_array(v, "tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };

    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        let id = u32::try_from(id)
            .map_err(|_| ModelError::Tokenizer("vocabulary larger than u32::MAX".into()))?;
        // Some conversions repeat a token string (padding slots); the first id wins, as in llama.cpp.
        vocab.entry(tok.to_string()).or_insert(id);
    }
    let merges = merges
        .iter()
        .map(|m| split_merge(m))
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(false)
        .ignore_merges(false)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("building BPE from GGUF: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    // Offsets only: the post-processor must not add anything, BOS is the caller's decision (add_bos).
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));

    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (tok, ty) in tokens.iter().zip(token_types.iter()) {
        match *ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(tok.to_string(), true)),
            TOKEN_TYPE_USER_DEFINED => {
                user_defined.push(AddedToken::from(tok.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user_defined);

    let token_at = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(id) = meta_u32(metadata, key)? else {
            return Ok(None);
        };
        let tok = tokens.get(id as usize).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "`{key}` = {id} is outside the vocabulary ({} tokens)",
                tokens.len()
            ))
        })?;
        Ok(Some((id, tok.to_string())))
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let eot = token_at("tokenizer.ggml.eot_token_id")?;
    let eos_ids = dedup(eos.iter().chain(eot.iter()).map(|(id, _)| *id));

    let add_bos = match metadata.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v
            .to_bool()
            .map_err(|e| bad_value("tokenizer.ggml.add_bos_token", e))?,
        // gpt2-style vocabularies do not prepend BOS unless told to.
        None => false,
    };
    let chat_template = meta_str(metadata, "tokenizer.chat_template")?.map(str::to_string);

    Ok(TextSpec {
        tokenizer,
        chat_template,
        bos_token: bos.as_ref().map(|(_, t)| t.clone()),
        bos_id: bos.map(|(id, _)| id),
        eos_token: eos.map(|(_, t)| t),
        eos_ids,
        add_bos,
    })
}

/// Reads the text side of an HF model directory: `tokenizer.json`, `tokenizer_config.json`
/// (chat template, special tokens) and `generation_config.json` (eos ids).
///
/// The chat template is taken from `tokenizer_config.json`, else from `chat_template.jinja` or
/// `chat_template.json` (newer `transformers` save it there). `add_bos` mirrors
/// `tokenizer_config.json`'s `add_bos_token`; note that a `tokenizer.json` whose post-processor is a
/// template (Llama 3) also inserts BOS itself when encoding with `add_special_tokens = true`.
pub fn from_hf_dir(dir: &Path) -> Result<TextSpec> {
    let tok_path = dir.join("tokenizer.json");
    if let Err(source) = std::fs::metadata(&tok_path) {
        return Err(ModelError::Io {
            path: tok_path,
            source,
        });
    }
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let config_path = dir.join("tokenizer_config.json");
    let config = read_json_opt(&config_path)?.unwrap_or(serde_json::Value::Null);

    let mut chat_template = match config.get("chat_template") {
        Some(v) => template_from_config(v, &config_path)?,
        None => None,
    };
    if chat_template.is_none() {
        chat_template = read_text_opt(&dir.join("chat_template.jinja"))?;
    }
    if chat_template.is_none() {
        let path = dir.join("chat_template.json");
        if let Some(v) = read_json_opt(&path)? {
            if let Some(t) = v.get("chat_template") {
                chat_template = template_from_config(t, &path)?;
            }
        }
    }

    let bos_token = config.get("bos_token").and_then(special_token_content);
    let mut eos_token = config.get("eos_token").and_then(special_token_content);
    let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let add_bos = config
        .get("add_bos_token")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);

    let mut eos_ids: Vec<u32> = eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect();
    let gen_path = dir.join("generation_config.json");
    if let Some(gen) = read_json_opt(&gen_path)? {
        match gen.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(ids)) => {
                for id in ids {
                    eos_ids.push(json_id(id, &gen_path)?);
                }
            }
            Some(id) => eos_ids.push(json_id(id, &gen_path)?),
        }
    }
    let eos_ids = dedup(eos_ids);
    if eos_token.is_none() {
        eos_token = eos_ids.first().and_then(|&id| tokenizer.id_to_token(id));
    }

    Ok(TextSpec {
        tokenizer,
        chat_template,
        bos_token,
        bos_id,
        eos_token,
        eos_ids,
        add_bos,
    })
}

/// The pre-tokenizer llama.cpp means by a `tokenizer.ggml.pre` name, as the original
/// `tokenizer.json` spelled it.
pub fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer `{pre}` regex: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        "smollm" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "gpt2" | "default" => Ok(ByteLevel::new(false, true, true).into()),
        "qwen2" => split_then_bytes(QWEN2_PRE_REGEX),
        "llama-bpe" => split_then_bytes(LLAMA3_PRE_REGEX),
        other => Err(ModelError::UnsupportedPreTokenizer(other.to_string())),
    }
}

fn bad_value(key: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("metadata `{key}`: {e}"))
}

fn meta_str<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<Option<&'a str>> {
    metadata
        .get(key)
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| bad_value(key, e))
        })
        .transpose()
}

fn meta_str_array<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = metadata.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|e| bad_value(key, e))?;
    items
        .iter()
        .map(|item| {
            item.to_string()
                .map(String::as_str)
                .map_err(|e| bad_value(key, e))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Any GGUF integer as i64: writers differ in the integer width they pick for the same key.
fn int_value(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x.into()),
        V::I8(x) => Some(x.into()),
        V::U16(x) => Some(x.into()),
        V::I16(x) => Some(x.into()),
        V::U32(x) => Some(x.into()),
        V::I32(x) => Some(x.into()),
        V::U64(x) => i64::try_from(x).ok(),
        V::I64(x) => Some(x),
        _ => None,
    }
}

fn int_array(v: &gguf_file::Value, key: &str) -> Result<Vec<i64>> {
    v.to_vec()
        .map_err(|e| bad_value(key, e))?
        .iter()
        .map(|item| {
            int_value(item).ok_or_else(|| bad_value(key, format!("not an integer: {item:?}")))
        })
        .collect()
}

fn meta_u32(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<u32>> {
    let Some(v) = metadata.get(key) else {
        return Ok(None);
    };
    int_value(v)
        .and_then(|x| u32::try_from(x).ok())
        .map(Some)
        .ok_or_else(|| bad_value(key, format!("not a token id: {v:?}")))
}

/// GGUF merges are `"left right"`. Byte-level tokens never contain a raw space, but searching
/// from the second byte keeps a (theoretical) leading-space token intact, as llama.cpp does.
fn split_merge(merge: &str) -> Result<(String, String)> {
    let pos = merge
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == ' ')
        .map(|(i, _)| i)
        .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge `{merge}`")))?;
    Ok((merge[..pos].to_string(), merge[pos + 1..].to_string()))
}

fn dedup(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut out = Vec::new();
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    let Some(text) = read_text_opt(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` (else the first)
/// is the one `transformers` uses without an explicit choice.
fn template_from_config(v: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            let chosen = named("default").or_else(|| list.first());
            match chosen.map(|t| t.get("template")) {
                None => Ok(None),
                Some(Some(serde_json::Value::String(s))) => Ok(Some(s.clone())),
                Some(_) => Err(ModelError::Tokenizer(format!(
                    "{}: chat_template entry has no string `template`",
                    path.display()
                ))),
            }
        }
        _ => Err(ModelError::Tokenizer(format!(
            "{}: chat_template is neither a string nor a list",
            path.display()
        ))),
    }
}

/// `bos_token`/`eos_token` are a plain string or an `AddedToken` object with `content`.
fn special_token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn json_id(v: &serde_json::Value, path: &Path) -> Result<u32> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "{}: eos_token_id {v} is not a token id",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value as V;
    use std::path::PathBuf;

    /// A byte-level BPE small enough to reason about: bytes `a b c` plus merges `a b` and `ab c`,
    /// specials `<s>` `</s>` `<eot>`, and one user-defined token.
    fn tiny_metadata() -> HashMap<String, V> {
        let tokens = [
            "<s>", "</s>", "<eot>", "a", "b", "c", "ab", "abc", "Ġ", "1", "2", "<tool>",
        ];
        let types = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4];
        let mut m = HashMap::new();
        let s = |x: &str| V::String(x.to_string());
        m.insert("tokenizer.ggml.model".into(), s("gpt2"));
        m.insert("tokenizer.ggml.pre".into(), s("smollm"));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|&t| V::I32(t)).collect()),
        );
        m.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![s("a b"), s("ab c")]),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), V::U32(0));
        m.insert("tokenizer.ggml.eos_token_id".into(), V::U32(1));
        m.insert("tokenizer.chat_template".into(), s("{{ messages }}"));
        m
    }

    fn ids(spec: &TextSpec, text: &str) -> Vec<u32> {
        spec.tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    #[test]
    fn builds_bpe_with_specials_and_metadata() {
        let spec = from_gguf(&tiny_metadata()).expect("tiny tokenizer");
        assert_eq!(ids(&spec, "abc"), vec![7]);
        assert_eq!(ids(&spec, "<s>ab</s>"), vec![0, 6, 1]);
        assert_eq!(ids(&spec, "12"), vec![9, 10]);
        assert_eq!(ids(&spec, "a<tool>"), vec![3, 11]);
        assert_eq!(spec.bos_id, Some(0));
        assert_eq!(spec.bos_token.as_deref(), Some("<s>"));
        assert_eq!(spec.eos_token.as_deref(), Some("</s>"));
        assert_eq!(spec.eos_ids, vec![1]);
        assert!(!spec.add_bos);
        assert_eq!(spec.chat_template.as_deref(), Some("{{ messages }}"));
        // Control tokens are special (dropped when skipping), user-defined ones are text.
        let decoded = spec.tokenizer.decode(&[0, 7, 11, 1], true).expect("decode");
        assert_eq!(decoded, "abc<tool>");
    }

    #[test]
    fn eot_joins_eos_ids_once() {
        let mut m = tiny_metadata();
        m.insert("tokenizer.ggml.eot_token_id".into(), V::U32(2));
        assert_eq!(from_gguf(&m).expect("tokenizer").eos_ids, vec![1, 2]);
        m.insert("tokenizer.ggml.eot_token_id".into(), V::I32(1));
        assert_eq!(from_gguf(&m).expect("tokenizer").eos_ids, vec![1]);
    }

    #[test]
    fn add_bos_is_read() {
        let mut m = tiny_metadata();
        m.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(true));
        assert!(from_gguf(&m).expect("tokenizer").add_bos);
    }

    #[test]
    fn rejects_unsupported_model_and_pre_tokenizer() {
        let mut m = tiny_metadata();
        m.insert("tokenizer.ggml.model".into(), V::String("llama".into()));
        match from_gguf(&m) {
            Err(ModelError::UnsupportedTokenizer(name)) => assert_eq!(name, "llama"),
            other => panic!("expected UnsupportedTokenizer, got {:?}", other.err()),
        }
        let mut m = tiny_metadata();
        m.insert(
            "tokenizer.ggml.pre".into(),
            V::String("deepseek-coder".into()),
        );
        match from_gguf(&m) {
            Err(ModelError::UnsupportedPreTokenizer(name)) => assert_eq!(name, "deepseek-coder"),
            other => panic!("expected UnsupportedPreTokenizer, got {:?}", other.err()),
        }
    }

    #[test]
    fn missing_keys_and_bad_ids_are_errors() {
        let mut m = tiny_metadata();
        m.remove("tokenizer.ggml.merges");
        assert!(
            matches!(from_gguf(&m), Err(ModelError::MissingKey(k)) if k == "tokenizer.ggml.merges")
        );
        let mut m = tiny_metadata();
        m.insert("tokenizer.ggml.eos_token_id".into(), V::U32(999));
        assert!(matches!(from_gguf(&m), Err(ModelError::Tokenizer(_))));
        let mut m = tiny_metadata();
        m.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![V::String("nospace".into())]),
        );
        assert!(matches!(from_gguf(&m), Err(ModelError::Tokenizer(_))));
    }

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for pre in ["smollm", "gpt2", "default", "qwen2", "llama-bpe"] {
            let mut m = tiny_metadata();
            m.insert("tokenizer.ggml.pre".into(), V::String(pre.into()));
            let spec = from_gguf(&m).unwrap_or_else(|e| panic!("{pre}: {e}"));
            assert_eq!(ids(&spec, "abc"), vec![7], "{pre}");
        }
    }

    #[test]
    fn split_regexes_group_digits_as_their_models_do() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = |pre: &str, text: &str| -> Vec<String> {
            let pt = pre_tokenizer_for(pre).expect("pre-tokenizer");
            let mut s = PreTokenizedString::from(text);
            pt.pre_tokenize(&mut s).expect("pre-tokenize");
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(p, _, _)| p.to_string())
                .collect()
        };
        assert_eq!(pieces("qwen2", "12345"), vec!["1", "2", "3", "4", "5"]);
        assert_eq!(pieces("llama-bpe", "12345"), vec!["123", "45"]);
        assert_eq!(pieces("llama-bpe", "I'm  ok"), vec!["I", "'m", "Ġ", "Ġok"]);
        assert_eq!(pieces("smollm", "x12"), vec!["x", "1", "2"]);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "itamae-tok-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn write_tokenizer_json(dir: &Path) {
        let spec = from_gguf(&tiny_metadata()).expect("tiny tokenizer");
        spec.tokenizer
            .save(dir.join("tokenizer.json"), false)
            .expect("save tokenizer.json");
    }

    #[test]
    fn hf_dir_reads_config_and_generation_config() {
        let dir = temp_dir("cfg");
        write_tokenizer_json(&dir);
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "bos_token": {"content": "<s>", "special": true},
                "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        )
        .expect("write config");
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 1]}"#,
        )
        .expect("write generation config");
        let spec = from_hf_dir(&dir).expect("hf dir");
        assert_eq!(spec.chat_template.as_deref(), Some("D"));
        assert_eq!(spec.bos_token.as_deref(), Some("<s>"));
        assert_eq!(spec.bos_id, Some(0));
        assert_eq!(spec.eos_token.as_deref(), Some("</s>"));
        assert_eq!(spec.eos_ids, vec![1, 2]);
        assert!(spec.add_bos);
        assert_eq!(ids(&spec, "<s>abc"), vec![0, 7]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hf_dir_minimal_and_template_file() {
        let dir = temp_dir("min");
        write_tokenizer_json(&dir);
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#)
            .expect("write generation config");
        std::fs::write(dir.join("chat_template.jinja"), "J").expect("write template");
        let spec = from_hf_dir(&dir).expect("hf dir");
        assert_eq!(spec.chat_template.as_deref(), Some("J"));
        assert_eq!(spec.bos_token, None);
        assert_eq!(spec.eos_ids, vec![2]);
        assert_eq!(spec.eos_token.as_deref(), Some("<eot>"));
        assert!(!spec.add_bos);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hf_dir_without_tokenizer_json_names_the_path() {
        let dir = temp_dir("none");
        match from_hf_dir(&dir) {
            Err(ModelError::Io { path, .. }) => assert_eq!(path, dir.join("tokenizer.json")),
            other => panic!("expected Io error, got {:?}", other.err()),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
