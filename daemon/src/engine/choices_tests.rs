//! `n` > 1 on a tiny random model: one prefill per request, then independent choices.
use candle_core::Device;

use super::*;
use crate::engine::{
    FinishReason, GenEvent, GenerationRequest, PromptInput, SamplingParams, MAX_CHOICES,
};
use crate::model::arch::Arch;
use crate::model::llama::tests::tiny_config;
use crate::model::tokenizer::TextSpec;
use crate::model::{LoadedModel, Transformer, WeightsMode};

/// A word-level tokenizer of `t0` … `t{vocab_size - 1}` with no template, BOS or EOS.
pub(super) fn word_level_text(vocab_size: usize) -> TextSpec {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    TextSpec {
        tokenizer: json.to_string().parse().expect("tokenizer"),
        chat_template: None,
        bos_token: None,
        bos_id: None,
        eos_token: None,
        eos_ids: Vec::new(),
        add_bos: false,
    }
}

/// A word-level vocabulary of `t0` … `t60` (the tiny model's 61 ids), and no EOS: every
/// choice runs to `max_tokens`.
fn engine() -> EngineHandle {
    // Untied embeddings: a tied random model mostly repeats its last input token.
    let cfg = tiny_config(Arch::Qwen2);
    let text = word_level_text(cfg.vocab_size);
    let model = Transformer::random(cfg, &Device::Cpu).expect("model");
    let e = EngineHandle::from_loaded(LoadedModel {
        model,
        text,
        template: None,
        name: "tiny".into(),
        hub_id: None,
        weights: WeightsMode::default(),
    });
    // These tests count the prompt tokens prefilled: a repeated prompt must not be a cache hit.
    e.set_prompt_cache_bytes(0).expect("prompt cache off");
    e
}

const PROMPT: &str = "t1 t2 t3 t4 t5";

fn request(n: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        model: "tiny".into(),
        input: PromptInput::Text(PROMPT.into()),
        sampling,
        max_tokens: Some(12),
        stop: Vec::new(),
        guided: Default::default(),
        n,
    }
}

/// Each choice's text, with its usage checked: the prompt as given, its own 12 tokens.
fn run(e: &EngineHandle, n: usize, sampling: SamplingParams) -> Vec<String> {
    let p = e.prepare(request(n, sampling)).expect("prepare");
    let rxs = e.submit_choices(p).expect("submit");
    assert_eq!(rxs.len(), n);
    rxs.into_iter()
        .map(|mut rx| {
            let mut text = String::new();
            loop {
                match rx.blocking_recv().expect("an event") {
                    GenEvent::Text(t) => text.push_str(&t),
                    GenEvent::Finished { reason, usage } => {
                        assert_eq!(reason, FinishReason::Length);
                        assert_eq!(usage.prompt_tokens, 5);
                        assert_eq!(usage.completion_tokens, 12);
                        return text;
                    }
                    GenEvent::Failed(m) => panic!("failed: {m}"),
                    _ => {}
                }
            }
        })
        .collect()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

fn seeded(seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed,
        ..Default::default()
    }
}

#[test]
fn greedy_choices_equal_the_single_choice_and_the_prompt_is_prefilled_once() {
    let e = engine();
    let one = run(&e, 1, greedy());
    assert_eq!(e.prefilled_tokens(), 5);
    let three = run(&e, 3, greedy());
    assert_eq!(
        e.prefilled_tokens(),
        10,
        "three choices cost one prefill of the 5-token prompt"
    );
    assert_eq!(three, vec![one[0].clone(); 3]);
    assert!(!one[0].is_empty());
}

#[test]
fn seeded_choices_are_reproducible_and_differ() {
    let e = engine();
    let a = run(&e, 3, seeded(Some(42)));
    let b = run(&e, 3, seeded(Some(42)));
    assert_eq!(a, b, "the same seed gives the same choices");
    assert!(a[0] != a[1] && a[1] != a[2] && a[0] != a[2], "{a:?}");
    let single = run(&e, 1, seeded(Some(42)));
    assert_eq!(single[0], a[0], "choice 0 is the single-choice draw");
    let unseeded = run(&e, 2, seeded(None));
    assert_ne!(unseeded[0], unseeded[1]);
    // four requests, eight choices: four prefills of the 5-token prompt
    assert_eq!(e.prefilled_tokens(), 20);
}

#[test]
fn dropping_one_choice_leaves_the_others_running() {
    let e = engine();
    let p = e.prepare(request(3, greedy())).expect("prepare");
    let mut rxs = e.submit_choices(p).expect("submit");
    drop(rxs.remove(1));
    for mut rx in rxs {
        let mut done = false;
        while let Some(ev) = rx.blocking_recv() {
            if let GenEvent::Finished { usage, .. } = ev {
                assert_eq!(usage.completion_tokens, 12);
                done = true;
                break;
            }
        }
        assert!(done);
    }
}

#[test]
fn n_is_bounded_by_the_batch() {
    let e = engine();
    for n in [0, MAX_CHOICES + 1] {
        match e.prepare(request(n, greedy())) {
            Err(EngineError::Invalid { param, message }) => {
                assert_eq!(param, "n");
                assert!(message.contains("between 1 and 16"), "{message}");
            }
            other => panic!("n={n}: {:?}", other.err()),
        }
    }
    let p = e.prepare(request(2, greedy())).expect("prepare");
    assert!(matches!(e.submit(p), Err(EngineError::Internal(_))));
    let full = run(&e, MAX_CHOICES, greedy());
    assert!(full.iter().all(|t| t == &full[0]));
}
