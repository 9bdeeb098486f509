//! `itamae-bench structured`: aggregate decode tokens/s of concurrent streams constrained by a
//! JSON schema against the same streams unconstrained, in the same run (issue 12's target:
//! constrained ≥ 0.9× unconstrained).
use std::path::Path;
use std::time::Instant;

use itamae::engine::constraint::{Constraint, ConstraintKind};
use itamae::engine::{EngineHandle, GenerationRequest, Guided, PromptInput, SamplingParams};
use itamae::model;
use serde_json::json;

/// The schema keeps every stream inside the grammar for the whole run (64 required items), so
/// both phases generate exactly `tokens` per stream and the batch never shrinks.
fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "notes": {"type": "array", "minItems": 64,
                      "items": {"type": "object", "properties": {
                          "dish": {"type": "string", "maxLength": 24},
                          "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
                      "required": ["dish", "stars"], "additionalProperties": false}}
        },
        "required": ["notes"],
        "additionalProperties": false
    })
}

pub(crate) fn structured(model_path: &Path, streams: usize, tokens: usize) -> anyhow::Result<()> {
    let loaded = model::load(
        model_path,
        &candle_core::Device::Cpu,
        model::WeightsMode::default(),
    )?;
    let base = loaded.name.clone();
    let engine = EngineHandle::from_loaded(loaded);
    let request = |i: usize, constrained: bool| GenerationRequest {
        model: base.clone(),
        input: PromptInput::Text(format!("Review {i} of the sushi bar, as JSON: ")),
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(i as u64),
            // unconstrained streams run the full length too: the same work
            ignore_eos: true,
            ..Default::default()
        },
        max_tokens: Some(tokens),
        stop: vec![],
        guided: Guided {
            constraint: constrained.then(|| Constraint {
                kind: ConstraintKind::JsonSchema(schema()),
                param: "response_format.json_schema.schema".into(),
            }),
            tools: None,
        },
        n: 1,
    };
    // The vocabulary trie and the grammar are built once, before anything is timed.
    let started = Instant::now();
    engine.prepare(request(0, true))?;
    println!(
        "grammar engine build + first compile: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let run = |constrained: bool| -> anyhow::Result<(f64, usize)> {
        let started = Instant::now();
        let mut rxs = Vec::new();
        for i in 0..streams {
            rxs.push(engine.submit(engine.prepare(request(i, constrained))?)?);
        }
        let total = super::batch::completion_tokens(rxs)?;
        Ok((total as f64 / started.elapsed().as_secs_f64(), total))
    };
    let (free_tps, n1) = run(false)?;
    let (json_tps, n2) = run(true)?;
    println!("{streams} streams unconstrained: {free_tps:.1} tok/s aggregate ({n1} tokens)");
    println!("{streams} streams under a JSON schema: {json_tps:.1} tok/s aggregate ({n2} tokens)");
    println!(
        "ratio constrained/unconstrained {:.2}x (target >= 0.90x)",
        json_tps / free_tps
    );
    Ok(())
}
