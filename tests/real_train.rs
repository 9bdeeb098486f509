//! Real-model training tests on SmolLM2 (release mode, a few dozen short steps): a LoRA run and a
//! prompt-tuning run each lower the validation loss on tests/data, and the saved adapter serves.
use std::path::PathBuf;

use candle_core::Device;
use itamae::adapters::{peft, LoraConfig, PromptInit, PromptTuningConfig};
use itamae::model::{self, LoadedModel};
use itamae::train::data::{self, DataOptions};
use itamae::train::optim::Schedule;
use itamae::train::{Method, TrainConfig, TrainControl, TrainEvent, Trainer};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn load() -> LoadedModel {
    let p = std::env::var_os("ITAMAE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    model::load(&p, &Device::Cpu, itamae::model::WeightsMode::default()).unwrap()
}

fn run(method: Method, lr: f64, steps: usize) -> (f64, f64, PathBuf) {
    let m = load();
    let opts = DataOptions {
        max_seq_len: 128,
        ..Default::default()
    };
    let tpl = m.template.as_ref();
    let (train, _) = data::load_jsonl(
        &root().join("tests/data/persona_train.jsonl"),
        &m.text,
        tpl,
        &opts,
    )
    .unwrap();
    let (valid, _) = data::load_jsonl(
        &root().join("tests/data/persona_valid.jsonl"),
        &m.text,
        tpl,
        &opts,
    )
    .unwrap();
    let init_ids = m
        .text
        .tokenizer
        .encode("You are Itamae, a sushi chef.", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let config = TrainConfig {
        max_steps: Some(steps),
        batch_size: 4,
        learning_rate: lr,
        warmup_ratio: 0.1,
        schedule: Schedule::Cosine,
        max_seq_len: 128,
        ..TrainConfig::new(method)
    };
    let mut t = Trainer::new(
        &m.model,
        Some(&m.text),
        &m.name,
        config,
        train,
        valid,
        &init_ids,
    )
    .unwrap();
    let before = t.evaluate().unwrap().unwrap().valid_loss;
    let out = std::env::temp_dir().join(format!("itamae-real-train-{}", rand::random::<u64>()));
    let outcome = t
        .run(Some(&out), &TrainControl::default(), &mut |e| {
            if let TrainEvent::Step(s) = e {
                eprintln!(
                    "step {} loss {:.4} {:.0} tok/s",
                    s.step, s.loss, s.tokens_per_sec
                );
            }
        })
        .unwrap();
    let after = outcome.last_eval.unwrap().valid_loss;
    eprintln!("valid loss {before:.4} -> {after:.4}");
    (before, after, out)
}

#[test]
fn lora_lowers_validation_loss() {
    let method = Method::Lora(LoraConfig {
        r: Some(8),
        alpha: Some(16.0),
        dropout: Some(0.0),
        target_modules: Some(vec!["all-linear".into()]),
        use_rslora: Some(false),
    });
    let (before, after, out) = run(method, 1e-3, 12);
    assert!(after < before - 0.1, "valid loss {before} -> {after}");
    let m = load();
    let a = peft::load(&out, &m.model.cfg, &Device::Cpu).unwrap();
    assert_eq!(a.kind(), "lora");
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn prompt_tuning_lowers_validation_loss() {
    let method = Method::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: Some(8),
        init: Some(PromptInit::Text),
        init_text: Some("You are Itamae, a sushi chef.".into()),
    });
    let (before, after, out) = run(method, 3e-2, 12);
    assert!(after < before - 0.1, "valid loss {before} -> {after}");
    std::fs::remove_dir_all(out).ok();
}
