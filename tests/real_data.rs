//! Training data through the real SmolLM2-135M-Instruct tokenizer and chat template: the tokens
//! marked trainable must be exactly each assistant reply plus its `<|im_end|>`.
use std::path::Path;

#[allow(dead_code)]
mod common;

use itamae::model::LoadedModel;
use itamae::train::data::{load_jsonl, DataFormat, DataOptions, Example};

fn trained_text(m: &LoadedModel, ex: &Example) -> String {
    let ids: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.weights)
        .filter(|(_, &w)| w > 0.0)
        .map(|(&id, _)| id)
        .collect();
    m.text.tokenizer.decode(&ids, false).expect("decode")
}

#[test]
fn persona_data_trains_exactly_the_assistant_replies() {
    let m = common::load_model();
    let opts = DataOptions::default();
    for name in ["persona_train.jsonl", "persona_valid.jsonl"] {
        let path = Path::new(common::WORKSPACE).join("tests/data").join(name);
        let (examples, report) = load_jsonl(&path, &m.text, m.template.as_ref(), &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.format, Some(DataFormat::Chat));
        assert_eq!(report.truncated, 0);
        let replies: Vec<String> = common::role_contents(&path, "assistant")
            .into_iter()
            .map(|r| r.concat())
            .collect();
        assert_eq!(examples.len(), replies.len(), "{name}");

        assert_eq!(
            trained_text(&m, &examples[0]),
            format!("{}<|im_end|>", replies[0])
        );
        for (i, (ex, reply)) in examples.iter().zip(&replies).enumerate() {
            assert_eq!(
                trained_text(&m, ex),
                format!("{reply}<|im_end|>"),
                "{name} example {i}"
            );
            // Training tests run many steps over these on CPU: keep them short.
            assert!(
                ex.ids.len() < 80,
                "{name} example {i}: {} tokens",
                ex.ids.len()
            );
            // `<|im_end|>` (id 2) is a target; the newline after it is not.
            let last = ex.weights.iter().rposition(|&w| w > 0.0).expect("trained");
            assert_eq!(ex.ids[last], 2, "{name} example {i}");
        }
        eprintln!(
            "{name}: {} examples, {} tokens, {} trainable",
            report.examples, report.tokens, report.trainable_tokens
        );
    }
}
