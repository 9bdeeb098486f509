//! The worked examples' datasets (examples/*/) pass the daemon's own dataset validation through
//! the real tokenizer and chat template, stay short, keep validation and held-out prompts apart
//! from training, and name a method the API accepts; and `itamaed eval` measures exactly what a
//! job's eval reports, so the base-vs-tuned losses the examples print compare like with like.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[allow(dead_code)]
mod common;

use itamae::adapters::{LoraConfig, PrefixTuningConfig, PromptInit, PromptTuningConfig};
use itamae::model::LoadedModel;
use itamae::train::data::{load_jsonl, DataFormat, DataOptions, Example};
use itamae::train::{Method, TrainConfig, Trainer};

/// Keeps each training step small enough for a 2-core CPU: a few dozen examples train in minutes.
const MAX_EXAMPLE_TOKENS: usize = 256;

fn workspace() -> PathBuf {
    PathBuf::from(common::WORKSPACE)
}

/// The user turns of a chat JSONL file, one per example.
fn user_turns(path: &Path) -> Vec<String> {
    common::role_contents(path, "user")
        .into_iter()
        .map(|t| t.join("\n"))
        .collect()
}

fn example_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(workspace().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("train.jsonl").exists())
        .collect();
    dirs.sort();
    dirs
}

fn load(m: &LoadedModel, path: &Path) -> Vec<Example> {
    let (examples, report) =
        load_jsonl(path, &m.text, m.template.as_ref(), &DataOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        report.errors.is_empty(),
        "{}: {:?}",
        path.display(),
        report.errors
    );
    assert_eq!(report.format, Some(DataFormat::Chat), "{}", path.display());
    assert_eq!(report.truncated, 0, "{}", path.display());
    let lines = std::fs::read_to_string(path).expect("read");
    assert_eq!(
        examples.len(),
        lines.lines().filter(|l| !l.trim().is_empty()).count(),
        "{}: every line is one example",
        path.display()
    );
    for (i, ex) in examples.iter().enumerate() {
        assert!(
            ex.ids.len() <= MAX_EXAMPLE_TOKENS,
            "{} line {}: {} tokens, over {MAX_EXAMPLE_TOKENS}",
            path.display(),
            i + 1,
            ex.ids.len()
        );
        assert!(
            ex.trainable() > 0,
            "{} line {}: nothing to train on",
            path.display(),
            i + 1
        );
    }
    examples
}

/// The user turns of a chat JSONL file, one per line.
fn hparam(dir: &Path, key: &str) -> Option<String> {
    std::fs::read_to_string(dir.join("hparams"))
        .unwrap_or_else(|e| panic!("{}/hparams: {e}", dir.display()))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

#[test]
fn every_example_dataset_is_valid_short_and_disjoint() {
    let m = common::load_model();
    let dirs = example_dirs();
    assert_eq!(dirs.len(), 4, "four worked examples: {dirs:?}");
    let mut methods = Vec::new();
    for dir in &dirs {
        let train = load(&m, &dir.join("train.jsonl"));
        let valid = load(&m, &dir.join("valid.jsonl"));
        let share = valid.len() as f64 / (train.len() + valid.len()) as f64;
        assert!(
            (0.12..=0.25).contains(&share),
            "{}: validation is {:.0}% of the data",
            dir.display(),
            share * 100.0
        );
        let train_q: HashSet<String> = user_turns(&dir.join("train.jsonl")).into_iter().collect();
        let valid_q = user_turns(&dir.join("valid.jsonl"));
        for q in &valid_q {
            assert!(
                !train_q.contains(q),
                "{}: `{q}` is in train and valid",
                dir.display()
            );
        }
        let prompts = std::fs::read_to_string(dir.join("prompts.txt")).expect("prompts.txt");
        let prompts: Vec<&str> = prompts.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            prompts.len() >= 5,
            "{}: too few held-out prompts",
            dir.display()
        );
        for p in prompts {
            assert!(
                !train_q.contains(p) && !valid_q.iter().any(|q| q == p),
                "{}: held-out prompt `{p}` is in the data",
                dir.display()
            );
        }
        let method = hparam(dir, "METHOD").expect("METHOD in hparams");
        assert!(
            ["lora", "prompt_tuning", "prefix_tuning"].contains(&method.as_str()),
            "{}: method {method}",
            dir.display()
        );
        // EPOCHS is optional: without it the job's n_epochs is "auto".
        if let Some(e) = hparam(dir, "EPOCHS") {
            let epochs: usize = e.parse().expect("EPOCHS is a number");
            assert!(
                (1..=20).contains(&epochs),
                "{}: EPOCHS {epochs}",
                dir.display()
            );
        }
        methods.push(method);
    }
    methods.sort();
    assert_eq!(methods, ["lora", "lora", "prefix_tuning", "prompt_tuning"]);
}

/// `itamaed eval` scores the base model as a job's eval scores an untrained LoRA (which is the
/// base exactly), and an adapter as the trainer scores it.
#[test]
fn eval_command_measures_what_the_trainer_reports() {
    let m = common::load_model();
    let valid = load(&m, &workspace().join("examples/company-faq/valid.jsonl"));
    let valid: Vec<Example> = valid.into_iter().take(4).collect();
    let methods = [
        Method::Lora(LoraConfig::default()),
        Method::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: Some(4),
            init: Some(PromptInit::SampleVocab),
            init_text: None,
        }),
        Method::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: Some(4),
            prefix_projection: Some(false),
            encoder_hidden_size: Some(m.model.cfg.kv_dim()),
        }),
    ];
    let mut base_loss = None;
    for method in methods {
        let name = method.name();
        let trainer = Trainer::new(
            &m.model,
            Some(&m.text),
            &m.name,
            TrainConfig::new(method),
            valid.clone(),
            valid.clone(),
            &[],
        )
        .expect("trainer");
        let reported = trainer
            .evaluate()
            .expect("evaluate")
            .expect("has validation data");
        let adapter = trainer.adapter().expect("adapter");
        let lora = matches!(adapter, Some(itamae::adapters::Adapter::Lora(_)));
        // An untrained LoRA is the base model, so the eval command scores it without the adapter.
        let scored = itamae::eval::score(
            &m.model,
            if lora { None } else { adapter.as_ref() },
            &valid,
            3,
            1024,
        )
        .expect("score");
        assert!(
            (scored.loss - reported.valid_loss).abs() < 1e-3,
            "{name}: eval {} vs trainer {}",
            scored.loss,
            reported.valid_loss
        );
        assert!(
            (scored.mean_token_accuracy - reported.valid_mean_token_accuracy).abs() < 1e-6,
            "{name}: accuracy {} vs {}",
            scored.mean_token_accuracy,
            reported.valid_mean_token_accuracy
        );
        if lora {
            base_loss = Some(scored.loss);
        } else if let Some(base) = base_loss {
            // A random soft prompt or prefix must change the score, or the adapter was ignored.
            assert!(
                (scored.loss - base).abs() > 1e-3,
                "{name}: adapter had no effect"
            );
        }
    }
}
