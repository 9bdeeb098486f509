//! Tokenizer and chat template built from the real SmolLM2-135M-Instruct GGUF, checked against the
//! ids and strings the reference implementation (HF `tokenizers` / `transformers`) produces.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use itamae::model::tokenizer::{self, TextSpec};
use itamae::model::ChatTemplate;
use serde_json::json;

fn model_path() -> PathBuf {
    match std::env::var_os("ITAMAE_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

fn metadata() -> &'static HashMap<String, gguf_file::Value> {
    static META: OnceLock<HashMap<String, gguf_file::Value>> = OnceLock::new();
    META.get_or_init(|| {
        let path = model_path();
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "test model {} is missing ({e}): run scripts/fetch-model.sh \
                 (or point ITAMAE_TEST_MODEL at the GGUF)",
                path.display()
            )
        });
        gguf_file::Content::read(&mut file)
            .unwrap_or_else(|e| panic!("{} is not a readable GGUF: {e}", path.display()))
            .metadata
    })
}

fn spec() -> TextSpec {
    tokenizer::from_gguf(metadata()).expect("tokenizer from GGUF metadata")
}

fn encode(spec: &TextSpec, text: &str) -> Vec<u32> {
    spec.tokenizer
        .encode(text, false)
        .expect("encode")
        .get_ids()
        .to_vec()
}

#[test]
fn reference_chatml_ids() {
    let spec = spec();
    assert_eq!(
        encode(&spec, "<|im_start|>system\nYou are helpful<|im_end|>"),
        vec![1, 9690, 198, 2683, 359, 5356, 2]
    );
}

#[test]
fn special_ids_and_flags() {
    let spec = spec();
    assert_eq!(spec.bos_id, Some(1));
    assert_eq!(spec.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(spec.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(spec.eos_ids, vec![2]);
    assert!(!spec.add_bos);
    assert_eq!(spec.tokenizer.get_vocab_size(true), 49152);
}

#[test]
fn round_trip_is_identity() {
    let spec = spec();
    let samples = [
        "fn main() {\n\tprintln!(\"hi\");\n}",
        "tabs\there\t\tand\tthere",
        "emoji 🍣👍🏽 done",
        "板前さん、寿司を握る",
        "numbers 12345 and 3.14159",
        "  mixed \t whitespace\n\n  \r\n end  ",
        "<|im_start|>user\nHi 🍣<|im_end|>\n",
    ];
    for text in samples {
        let ids = encode(&spec, text);
        let back = spec.tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(back, text, "ids {ids:?}");
    }
}

#[test]
fn digits_are_split_individually() {
    let spec = spec();
    let ids = encode(&spec, "12345");
    assert_eq!(ids.len(), 5, "{ids:?}");
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| spec.tokenizer.id_to_token(id).unwrap_or_default())
        .collect();
    assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
}

#[test]
fn chat_template_from_file_renders_chatml() {
    let spec = spec();
    let source = spec
        .chat_template
        .as_deref()
        .expect("GGUF ships a chat template");
    let template = ChatTemplate::new(
        source,
        spec.bos_token.as_deref().unwrap_or(""),
        spec.eos_token.as_deref().unwrap_or(""),
    )
    .expect("compile");
    let messages = [
        json!({"role": "system", "content": "You are helpful"}),
        json!({"role": "user", "content": "What is the capital of France?"}),
    ];
    let prompt = template.render(&messages, true).expect("render");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are helpful<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The rendered prompt must tokenize with its markers as single special tokens.
    let ids = encode(&spec, &prompt);
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}

/// The same tokenizer saved as `tokenizer.json` and read back through the HF-directory loader
/// encodes identically: the two loaders agree.
#[test]
fn hf_dir_loader_agrees_with_gguf() {
    let spec = spec();
    let dir = std::env::temp_dir().join(format!("itamae-real-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    spec.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    let config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": spec.chat_template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write config");
    let hf = tokenizer::from_hf_dir(&dir).expect("hf dir");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(hf.bos_id, Some(1));
    assert_eq!(hf.eos_ids, vec![2]);
    assert_eq!(hf.chat_template, spec.chat_template);
    let text = "<|im_start|>user\nfn main() { 12345 🍣 }<|im_end|>";
    assert_eq!(encode(&hf, text), encode(&spec, text));
}
