//! Structured outputs on the real SmolLM2-135M-Instruct GGUF (run in release mode): whatever the
//! model would say, the output parses and validates against the schema, is one of the choices,
//! matches the regex — also when constrained and unconstrained requests share a batch.
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use itamae::engine::constraint::{Constraint, ConstraintKind};
use itamae::engine::{
    EngineHandle, FinishReason, GenEvent, GenerationRequest, Guided, PromptInput, SamplingParams,
};
use itamae::model::chat::{ChatMessage, Role};
use serde_json::{json, Value};

fn engine() -> &'static EngineHandle {
    static E: OnceLock<EngineHandle> = OnceLock::new();
    E.get_or_init(|| {
        let p = std::env::var_os("ITAMAE_TEST_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
                ))
            });
        assert!(
            p.exists(),
            "{} is missing: run scripts/fetch-model.sh",
            p.display()
        );
        EngineHandle::from_loaded(
            itamae::model::load(&p, &Device::Cpu, itamae::model::WeightsMode::default())
                .expect("loading the GGUF"),
        )
    })
}

fn request(prompt: &str, constraint: Option<Constraint>, seed: u64) -> GenerationRequest {
    let e = engine();
    GenerationRequest {
        model: e.models()[0].id.clone(),
        input: PromptInput::Chat {
            messages: vec![ChatMessage::new(Role::User, prompt)],
        },
        sampling: SamplingParams {
            temperature: 0.7,
            seed: Some(seed),
            ..Default::default()
        },
        max_tokens: Some(200),
        stop: vec![],
        guided: Guided {
            constraint,
            tools: None,
        },
        n: 1,
    }
}

/// Runs the requests in one batch; returns each one's text and finish reason.
fn run(reqs: Vec<GenerationRequest>) -> Vec<(String, FinishReason)> {
    let e = engine();
    let rxs: Vec<_> = reqs
        .into_iter()
        .map(|r| e.submit(e.prepare(r).expect("prepare")).expect("submit"))
        .collect();
    rxs.into_iter()
        .map(|mut rx| {
            let mut text = String::new();
            loop {
                match rx.blocking_recv().expect("engine stopped") {
                    GenEvent::Text(t) => text.push_str(&t),
                    GenEvent::Finished { reason, .. } => return (text, reason),
                    GenEvent::Failed(e) => panic!("generation failed: {e}"),
                    GenEvent::ToolCall(c) => panic!("no tools were given: {c:?}"),
                    GenEvent::Echo { .. } | GenEvent::Token(_) => panic!("not asked for"),
                }
            }
        })
        .collect()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["chef", "waiter", "owner"]}
        },
        "required": ["name", "age", "role"],
        "additionalProperties": false
    })
}

#[test]
fn schema_choice_and_regex_hold_in_a_mixed_batch() {
    let schema = person_schema();
    let c = |kind, param: &str| {
        Some(Constraint {
            kind,
            param: param.into(),
        })
    };
    let mut reqs = Vec::new();
    for seed in 0..3 {
        reqs.push(request(
            "Describe a person who works in a sushi restaurant as JSON.",
            c(
                ConstraintKind::JsonSchema(schema.clone()),
                "response_format.json_schema.schema",
            ),
            seed,
        ));
    }
    let choices = vec!["positive".to_string(), "negative".to_string()];
    reqs.push(request(
        "Is 'the fish was wonderful' positive or negative?",
        c(ConstraintKind::Choice(choices.clone()), "guided_choice"),
        1,
    ));
    reqs.push(request(
        "Give me a date.",
        c(
            ConstraintKind::Regex(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]".into()),
            "guided_regex",
        ),
        2,
    ));
    reqs.push(request("Say hello.", None, 3));
    reqs.push(request(
        "Any JSON object about tea.",
        c(ConstraintKind::JsonObject, "response_format"),
        4,
    ));
    let out = run(reqs);
    for (text, reason) in &out[..3] {
        assert_eq!(*reason, FinishReason::Stop, "{text}");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(jsonschema::is_valid(&schema, &v), "{text}");
    }
    assert!(choices.contains(&out[3].0), "{:?}", out[3]);
    let rx = regex::Regex::new(r"^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$").expect("regex");
    assert!(rx.is_match(&out[4].0), "{:?}", out[4]);
    assert!(!out[5].0.is_empty());
    // Free-form JSON may ramble past max_tokens: cut there, it is an object's start; ended by
    // the model, it is a whole object.
    let (text, reason) = &out[6];
    assert!(text.starts_with('{'), "{text}");
    if *reason == FinishReason::Stop {
        let obj: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(obj.is_object());
    }
}

#[test]
fn an_invalid_schema_names_the_path() {
    let bad = json!({"type": "object", "properties": {"age": {"type": "integr"}}});
    let r = request(
        "x",
        Some(Constraint {
            kind: ConstraintKind::JsonSchema(bad),
            param: "response_format.json_schema.schema".into(),
        }),
        0,
    );
    match engine().prepare(r) {
        Err(itamae::engine::EngineError::Invalid { param, .. }) => {
            assert_eq!(
                param,
                "response_format.json_schema.schema.properties.age.type"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a bad schema was accepted"),
    }
}

/// SmolLM2's weights and vocabulary under the Qwen2.5 chat template (which prints tools): the
/// format end to end, with a real tokenizer that has no `<tool_call>` token of its own.
fn qwen_templated() -> &'static EngineHandle {
    static E: OnceLock<EngineHandle> = OnceLock::new();
    E.get_or_init(|| {
        let p = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        ));
        let mut loaded =
            itamae::model::load(&p, &Device::Cpu, itamae::model::WeightsMode::default())
                .expect("loading the GGUF");
        loaded.template = Some(
            itamae::model::ChatTemplate::new(
                include_str!("fixtures/qwen2.5-chat-template.jinja"),
                "",
                "<|im_end|>",
            )
            .expect("template"),
        );
        EngineHandle::from_loaded(loaded)
    })
}

#[test]
fn required_and_named_tool_choices_force_a_parsed_call() {
    use itamae::engine::tools::{ToolChoice, Tools};
    let params = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false});
    let defs = vec![
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "Current weather of a city", "parameters": params}}),
        json!({"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}),
    ];
    let e = qwen_templated();
    for choice in [
        ToolChoice::Function("get_weather".into()),
        ToolChoice::Required,
    ] {
        let mut r = request("What is the weather in Kyoto?", None, 5);
        r.model = e.models()[0].id.clone();
        r.guided.tools = Some(Tools {
            defs: defs.clone(),
            choice: choice.clone(),
            parallel: false,
        });
        let mut rx = e.submit(e.prepare(r).expect("prepare")).expect("submit");
        let mut calls = Vec::new();
        let reason = loop {
            match rx.blocking_recv().expect("engine stopped") {
                GenEvent::Text(t) => assert!(t.trim().is_empty(), "text {t:?} beside the call"),
                GenEvent::ToolCall(c) => calls.push(c),
                GenEvent::Finished { reason, .. } => break reason,
                GenEvent::Failed(e) => panic!("{e}"),
                GenEvent::Echo { .. } | GenEvent::Token(_) => panic!("not asked for"),
            }
        };
        assert_eq!(reason, FinishReason::ToolCalls, "{choice:?}");
        assert_eq!(calls.len(), 1, "{calls:?}");
        let call = &calls[0];
        assert!(call.id.starts_with("call_"));
        let args: Value = serde_json::from_str(&call.arguments).expect("arguments");
        match call.name.as_str() {
            "get_weather" => assert!(jsonschema::is_valid(&params, &args), "{args}"),
            "get_time" => assert_eq!(args, json!({})),
            other => panic!("unknown tool {other}"),
        }
    }
    // SmolLM2's own template does not print tools: refused, naming `tools`.
    let mut r = request("x", None, 0);
    r.guided.tools = Some(Tools {
        defs,
        choice: ToolChoice::Auto,
        parallel: true,
    });
    match engine().prepare(r) {
        Err(itamae::engine::EngineError::Invalid { param, .. }) => assert_eq!(param, "tools"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("tools were accepted by a template that drops them"),
    }
}
