//! Real-model tests of the weights modes on SmolLM2 Q4_1 (release mode): `auto` keeps the GGUF
//! blocks resident, answers as the f32 mode does, and trains LoRA, prompt and prefix tuning
//! (QLoRA-style, the base frozen in its blocks) with the losses and gradient norms of the f32
//! base — which is the same GGUF dequantized.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use itamae::adapters::{LoraConfig, PrefixTuningConfig, PromptInit, PromptTuningConfig};
use itamae::engine::sampling::argmax;
use itamae::model::layers::Proj;
use itamae::model::{self, KvCache, LoadedModel, WeightsMode};
use itamae::train::data::{self, DataOptions};
use itamae::train::{Method, TrainConfig, TrainControl, TrainEvent, Trainer};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn load(mode: WeightsMode) -> LoadedModel {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    model::load(&p, &Device::Cpu, mode).expect("loading the GGUF")
}

const PARIS: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

/// Greedy answer through the serving steps (one prefill, then decode batches of one), and the
/// logits of the prefill's last position and of every decode step.
fn greedy(m: &LoadedModel, tokens: usize) -> (String, Vec<Vec<f32>>) {
    let ids = m
        .text
        .tokenizer
        .encode(PARIS, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let model = &m.model;
    let mut cache = KvCache::new(&model.cfg, ids.len() + tokens);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let first = model
        .forward_last(&input, Some(&mut cache))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut next = argmax(&first);
    let mut all = vec![first];
    let mut out = vec![next];
    for _ in 1..tokens {
        let l = model
            .decode_batch(&[next], &mut [&mut cache], &[None])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        next = argmax(&l);
        all.push(l);
        out.push(next);
    }
    (m.text.tokenizer.decode(&out, true).unwrap(), all)
}

#[test]
fn auto_keeps_the_blocks_and_answers_as_f32_does() {
    let f32m = load(WeightsMode::F32);
    let auto = load(WeightsMode::Auto);
    assert!(f32m.model.is_dense());
    assert!(!auto.model.is_dense());
    let q = auto.model.layers[0].linear(Proj::Q).unwrap();
    assert_eq!(
        q.w.type_name(),
        "q4_1",
        "the shipped GGUF's attention blocks"
    );
    let (a, b) = (auto.model.weight_bytes(), f32m.model.weight_bytes());
    eprintln!("weight bytes: auto {a}, f32 {b}");
    assert!(a * 4 < b, "auto {a} bytes vs f32 {b}");

    let (want, lf) = greedy(&f32m, 8);
    let (got, la) = greedy(&auto, 8);
    assert!(got.contains("Paris"), "auto answered {got:?}");
    assert_eq!(got, want);
    // The prefill and the LM head in every step multiply f32 activations with the blocks (the
    // f32 mode's exact weights, another summation order); decode steps' projections run on
    // 8-bit activations. Stated tolerance on logits of magnitude ~20: after the prefill max |Δ|
    // ≤ 1e-3; after a decode step max |Δ| ≤ 1.0 and mean |Δ| ≤ 0.3, with the same greedy token
    // (measured on a Zen 3: < 5e-5 after the prefill, max 0.84 / mean 0.18 after a step).
    for (step, (x, y)) in lf.iter().zip(&la).enumerate() {
        let max = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let mean = x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum::<f32>() / x.len() as f32;
        eprintln!("step {step}: max |Δlogit| {max:.6}, mean {mean:.6}");
        if step == 0 {
            assert!(max <= 1e-3, "prefill: max {max}");
        }
        assert!(
            max <= 1.0 && mean <= 0.3,
            "step {step}: max {max}, mean {mean}"
        );
        assert_eq!(argmax(x), argmax(y), "step {step}");
    }
}

#[test]
fn every_conversion_mode_answers_paris() {
    for mode in [
        WeightsMode::Q8_0,
        WeightsMode::Q4K,
        WeightsMode::Bf16,
        WeightsMode::F16,
    ] {
        let m = load(mode);
        let (text, _) = greedy(&m, 8);
        eprintln!("{mode}: {} bytes, {text:?}", m.model.weight_bytes());
        assert!(text.contains("Paris"), "{mode} answered {text:?}");
    }
}

/// Losses and gradient norms of `steps` optimizer steps, then the validation loss.
fn train(m: &LoadedModel, method: Method, lr: f64, steps: usize) -> (Vec<(f64, f64)>, f64) {
    let opts = DataOptions {
        max_seq_len: 64,
        ..Default::default()
    };
    let tpl = m.template.as_ref();
    let file = |n: &str| root().join(format!("tests/data/{n}"));
    let (train, _) = data::load_jsonl(&file("persona_train.jsonl"), &m.text, tpl, &opts).unwrap();
    let (valid, _) = data::load_jsonl(&file("persona_valid.jsonl"), &m.text, tpl, &opts).unwrap();
    let init_ids = m
        .text
        .tokenizer
        .encode("You are Itamae.", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let config = TrainConfig {
        max_steps: Some(steps),
        batch_size: 2,
        learning_rate: lr,
        warmup_ratio: 0.0,
        max_seq_len: 64,
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
    let mut seen = Vec::new();
    let outcome = t
        .run(None, &TrainControl::default(), &mut |e| {
            if let TrainEvent::Step(s) = e {
                seen.push((s.loss, s.grad_norm));
            }
        })
        .unwrap();
    (seen, outcome.last_eval.unwrap().valid_loss)
}

#[test]
fn qlora_training_on_the_blocks_matches_the_dequantized_f32_base() {
    let f32m = load(WeightsMode::F32);
    let auto = load(WeightsMode::Auto);
    let methods = [
        (
            Method::Lora(LoraConfig {
                r: Some(4),
                alpha: Some(8.0),
                dropout: Some(0.0),
                target_modules: Some(vec!["all-linear".into()]),
                use_rslora: Some(false),
            }),
            1e-3,
        ),
        (
            Method::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: Some(4),
                init: Some(PromptInit::Text),
                init_text: Some("You are Itamae.".into()),
            }),
            3e-2,
        ),
        (
            Method::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: Some(4),
                prefix_projection: Some(false),
                encoder_hidden_size: None,
            }),
            1e-2,
        ),
    ];
    // Training rows run on each layer's blocks dequantized for that call (the f32 base's very
    // weights), so only summation order may differ: relative tolerance 1e-4.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0);
    for (method, lr) in methods {
        let name = format!("{method:?}");
        let (want, want_valid) = train(&f32m, method.clone(), lr, 2);
        let (got, got_valid) = train(&auto, method, lr, 2);
        eprintln!("{name}: f32 {want:?} {want_valid}; auto {got:?} {got_valid}");
        assert_eq!(want.len(), got.len());
        for ((l1, g1), (l2, g2)) in want.iter().zip(&got) {
            assert!(close(*l1, *l2), "{name}: loss {l1} vs {l2}");
            assert!(close(*g1, *g2), "{name}: gradient norm {g1} vs {g2}");
        }
        assert!(
            close(want_valid, got_valid),
            "{name}: valid {want_valid} vs {got_valid}"
        );
    }
}

#[test]
fn full_fine_tuning_on_a_quantized_base_is_refused_naming_model_weights() {
    let auto = load(WeightsMode::Auto);
    let opts = DataOptions::default();
    let (train, _) = data::load_jsonl(
        &root().join("tests/data/persona_train.jsonl"),
        &auto.text,
        auto.template.as_ref(),
        &opts,
    )
    .unwrap();
    let err = Trainer::new(
        &auto.model,
        Some(&auto.text),
        &auto.name,
        TrainConfig::new(Method::Full),
        train,
        Vec::new(),
        &[],
    )
    .err()
    .expect("full fine-tuning must be refused")
    .to_string();
    assert!(err.contains("model.weights"), "{err}");
}

/// On a base held in its GGUF blocks (`auto`, the default mode: no `--weights` given),
/// `itamaed train --method full` is refused before its first step, naming `model.weights` and
/// telling the user the flag that makes it work.
#[test]
fn itamaed_train_full_on_a_quantized_base_is_refused_naming_model_weights() {
    let out_dir = std::env::temp_dir().join(format!("itamae-full-refused-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_itamaed"))
        .arg("train")
        .arg("--model")
        .arg(root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg("--data")
        .arg(root().join("tests/data/persona_train.jsonl"))
        .args(["--method", "full", "--max-steps", "1"])
        .arg("--out")
        .arg(&out_dir)
        .env_remove("ITAMAE_WEIGHTS")
        .env_remove("ITAMAE_CONFIG")
        .output()
        .expect("run itamaed train");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "full SFT ran on the default mode: {err}"
    );
    assert!(err.contains("model.weights"), "{err}");
    assert!(err.contains("--weights f32"), "{err}");
    assert!(
        !out_dir.exists(),
        "a refused run wrote {}",
        out_dir.display()
    );
}
