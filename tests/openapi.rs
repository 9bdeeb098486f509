//! `openapi/openapi.yaml` against the daemon it describes, and the shipped configs.
//!
//! - The routes registered in `daemon/src/api/*.rs` (read from the sources, cross-checked against
//!   the running server) and the spec's operations are the same set.
//! - Rendered responses the session cannot provoke on SmolLM2 (tool calls, several choices, a
//!   continued model's `parent`) validate against the documented schemas.
//! - The scripted session against a live daemon is `openapi_session.rs`.
//! - Every `configs/*.toml` parses with the daemon's own loader.
//! - The `Adapter` schema and the adapter method configs (`itamae_client::methods`) agree: the
//!   same fields, the same defaults, and serialised configs validate.
// The spec helpers reach the daemon client through it; this crate starts no daemon itself.
#[allow(dead_code)]
mod common;
mod openapi_spec;

use std::collections::BTreeSet;
use std::path::Path;

use common::WORKSPACE;
use openapi_spec::*;
use serde_json::{json, Value};

#[test]
fn spec_operations_are_the_served_routes() {
    let spec = load_spec();
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
    let served = served_routes();
    let documented = spec_routes(&spec);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}\nin openapi.yaml but not served: {unserved:?}"
    );
}

#[test]
fn spec_schemas_compile_and_refs_resolve() {
    let spec = load_spec();
    let text = serde_json::to_string(&spec).expect("spec as JSON");
    let re = regex::Regex::new(r#""\$ref":"([^"]+)""#).expect("regex");
    for cap in re.captures_iter(&text) {
        let r = &cap[1];
        assert!(r.starts_with("#/"), "non-local $ref {r}");
        assert!(
            spec.pointer(&r[1..]).is_some(),
            "$ref {r} points at nothing"
        );
    }
    for name in spec["components"]["schemas"]
        .as_object()
        .expect("components.schemas")
        .keys()
    {
        let fragment = pointer(&["components", "schemas", name]);
        let mut root = spec.clone();
        root["$ref"] = Value::String(fragment.clone());
        if let Err(e) = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
        {
            panic!("{fragment}: {e}");
        }
    }
    // Every operation declares at least one response and the bearer scheme exists.
    assert_eq!(
        spec["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{m} {path}: no responses"
                );
            }
        }
    }
}

/// Property names of a request schema, through `allOf` and `$ref`s.
fn property_names(spec: &Value, schema: &Value) -> BTreeSet<String> {
    let schema = deref(spec, schema);
    let mut out: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(property_names(spec, part));
    }
    out
}

fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a field name").to_string())
        .collect()
}

/// The fields each request type takes (`itamae::api::fields`) are the ones the spec documents,
/// and the fields refused unless at their default are the spec's `x-unsupported-fields`.
#[test]
fn spec_request_fields_are_the_parsed_fields() {
    use itamae::api::fields::{self, Fields};
    let spec = load_spec();
    let schemas = &spec["components"]["schemas"];
    let upload = &spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]
        ["multipart/form-data"]["schema"];
    let op_params = |path: &str| -> (BTreeSet<String>, BTreeSet<String>) {
        let op = &spec["paths"][path]["get"];
        let params = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| deref(&spec, p))
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().expect("name").to_string())
            .collect();
        (params, names(&op["x-unsupported-fields"]))
    };
    let bodies: [(&str, &Value, Fields); 4] = [
        (
            "ChatCompletionRequest",
            &schemas["ChatCompletionRequest"],
            fields::CHAT_REQUEST,
        ),
        (
            "CompletionRequest",
            &schemas["CompletionRequest"],
            fields::COMPLETION_REQUEST,
        ),
        (
            "FineTuningJobRequest",
            &schemas["FineTuningJobRequest"],
            fields::JOB_CREATE,
        ),
        ("POST /v1/files", upload, fields::FILE_UPLOAD),
    ];
    let mut checked = Vec::new();
    for (name, schema, f) in bodies {
        let documented = (
            property_names(&spec, schema),
            names(&deref(&spec, schema)["x-unsupported-fields"]),
        );
        checked.push((name.to_string(), documented, f));
    }
    for (path, f) in [
        ("/v1/files", fields::FILE_LIST),
        ("/v1/fine_tuning/jobs", fields::JOB_LIST),
        (
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
            fields::JOB_EVENTS,
        ),
        (
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            fields::JOB_CHECKPOINTS,
        ),
    ] {
        checked.push((format!("GET {path}"), op_params(path), f));
    }
    for (name, (documented, unsupported), f) in checked {
        let taken: BTreeSet<String> = f
            .accepted
            .iter()
            .chain(f.inert)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(documented, taken, "{name}: spec properties vs fields taken");
        let refused: BTreeSet<String> = f
            .unsupported
            .iter()
            .flat_map(|l| l.iter().map(|u| u.name.to_string()))
            .collect();
        assert_eq!(unsupported, refused, "{name}: x-unsupported-fields");
    }
}

/// The `Adapter` schema's variant for adapter `type` `name`.
fn adapter_variant<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["components"]["schemas"]["Adapter"]["oneOf"]
        .as_array()
        .expect("Adapter.oneOf")
        .iter()
        .find(|v| v["properties"]["type"]["const"] == name)
        .unwrap_or_else(|| panic!("no `{name}` variant under components.schemas.Adapter"))
}

#[test]
fn adapter_schema_matches_the_method_configs() {
    use itamae::adapters::lora::check_targets;
    use itamae::adapters::PromptTuningConfig;
    use itamae::adapters::{AdapterConfig, LoraConfig, PrefixTuningConfig, PromptInit};
    use itamae_client::methods::{lora, prefix_tuning, prompt_tuning};

    let spec = load_spec();
    // Every field set: the literals name every field, so a new one fails to compile here until
    // it is added (and then this test fails until the spec has it too).
    let full = [
        AdapterConfig::Lora(LoraConfig {
            r: Some(8),
            alpha: Some(16.0),
            dropout: Some(0.25),
            target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: Some(true),
        }),
        AdapterConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: Some(8),
            init: Some(PromptInit::Text),
            init_text: Some("You are a sushi chef.".into()),
        }),
        AdapterConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: Some(4),
            prefix_projection: Some(true),
            encoder_hidden_size: Some(64),
        }),
    ];
    let names = [lora::NAME, prompt_tuning::NAME, prefix_tuning::NAME];
    let fields = [lora::FIELDS, prompt_tuning::FIELDS, prefix_tuning::FIELDS];
    for ((config, name), fields) in full.iter().zip(names).zip(fields) {
        assert_eq!(config.name(), name);
        let variant = adapter_variant(&spec, name);
        let documented: BTreeSet<String> = variant["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .filter(|k| *k != "type")
            .cloned()
            .collect();
        let v = serde_json::to_value(config).expect("serialise");
        let serialised: BTreeSet<String> = v
            .as_object()
            .expect("object")
            .keys()
            .filter(|k| *k != "type")
            .cloned()
            .collect();
        let parsed: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        assert_eq!(documented, serialised, "{name}: spec vs struct fields");
        assert_eq!(parsed, serialised, "{name}: parsed vs struct fields");
        validate(&spec, "#/components/schemas/Adapter", &v).unwrap_or_else(|e| panic!("{e}"));
        // Parsed back by the one function the jobs API uses, it is the same config.
        let back = AdapterConfig::parse(&v, "adapter", &check_targets).expect("parses");
        assert_eq!(&back, config);

        // The bare `{"type": name}`: defaults filled in by the parser, as the spec documents.
        let bare = AdapterConfig::parse(&json!({"type": name}), "adapter", &check_targets)
            .expect("bare adapter parses");
        // As a job echoes it (`target_modules` as `"all-linear"`), without its nulls (a request
        // leaves those out), it is a valid request again.
        let echoed = bare.to_json();
        let mut request = echoed.clone();
        request
            .as_object_mut()
            .expect("object")
            .retain(|_, v| !v.is_null());
        validate(&spec, "#/components/schemas/Adapter", &request).unwrap_or_else(|e| panic!("{e}"));
        for (field, schema) in variant["properties"].as_object().expect("properties") {
            let Some(default) = schema.get("default") else {
                continue;
            };
            let same = match (default.as_f64(), echoed[field].as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => *default == echoed[field],
            };
            assert!(
                same,
                "{name}.{field}: spec default {default}, config default {}",
                echoed[field]
            );
        }
    }
    // The default adapter of a plain request is LoRA with its defaults.
    assert_eq!(
        AdapterConfig::default(),
        AdapterConfig::parse(&json!({}), "adapter", &check_targets).expect("parses")
    );
}

#[test]
fn every_config_parses() {
    let dir = Path::new(WORKSPACE).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("read configs/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        n += 1;
        let file = itamae::config::FileConfig::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cfg = itamae::config::ServeConfig::resolve(file, Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        itamae::api::auth::Auth::from_config(&cfg.auth)
            .unwrap_or_else(|e| panic!("{}: [auth]: {e}", path.display()));
        // A CUDA device cannot be opened in this build, but its name must be well-formed.
        if let Err(itamae::config::ConfigError::Device(d)) = itamae::config::device(&cfg.device) {
            panic!("{}: invalid device {d}", path.display());
        }
    }
    assert!(n >= 3, "expected itamae.toml and the profiles, found {n}");
}

/// The tool-call shapes against the spec: the whole response (`message.tool_calls`, content
/// null, `finish_reason: "tool_calls"`) and the streamed chunks (two `tool_calls` deltas per
/// call), as the response builders produce them from the engine's events.
#[test]
fn tool_call_shapes_conform_to_the_spec() {
    use futures::StreamExt;
    use itamae::api::response::{full_response, sse_stream, Generated, Kind, Meta};
    use itamae::engine::tools::ToolCall;
    use itamae::engine::{FinishReason, GenEvent, PromptTokensDetails, Usage};
    let spec = load_spec();
    let call = |i: usize| ToolCall {
        id: format!("call_{i:024}"),
        name: "get_weather".into(),
        arguments: r#"{"city": "Kyoto"}"#.into(),
    };
    let usage = Usage {
        prompt_tokens: 5,
        completion_tokens: 9,
        total_tokens: 14,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 4 },
    };
    let meta = Meta::new(Kind::Chat, "m".into(), true);
    let whole = full_response(
        &meta,
        &[Generated {
            text: "\n".into(),
            tool_calls: vec![call(0), call(1)],
            reason: FinishReason::ToolCalls,
            usage,
            logprobs: Vec::new(),
        }],
    );
    validate(&spec, "#/components/schemas/ChatCompletion", &whole).expect("response");
    assert_eq!(whole["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        whole["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"],
        r#"{"city": "Kyoto"}"#
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for e in [
        GenEvent::Text("Checking.".into()),
        GenEvent::ToolCall(call(0)),
        GenEvent::ToolCall(call(1)),
        GenEvent::Finished {
            reason: FinishReason::ToolCalls,
            usage,
        },
    ] {
        tx.send((0, e)).expect("send");
    }
    let frames: Vec<String> = futures::executor::block_on(
        sse_stream(rx, meta)
            .map(|b| String::from_utf8(b.expect("frame").to_vec()).expect("utf-8"))
            .collect(),
    );
    let events: Vec<Value> = frames
        .iter()
        .filter_map(|f| f.strip_prefix("data: "))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("JSON event"))
        .collect();
    for e in &events {
        validate(&spec, "#/components/schemas/ChatCompletionChunk", e).expect("chunk");
    }
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(deltas.len(), 4, "{events:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["id"], "call_000000000000000000000000");
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(deltas[1]["function"]["arguments"], r#"{"city": "Kyoto"}"#);
    assert_eq!(deltas[2]["index"], 1);
    assert!(events
        .iter()
        .any(|e| e["choices"][0]["finish_reason"] == "tool_calls"));
}

/// `n` > 1 against the spec: whole chat and completion responses with several choices, the
/// streamed chunks of each choice (its own `index`), and a continued fine-tuning model's
/// object with its `parent`.
#[test]
fn several_choices_and_parents_conform_to_the_spec() {
    use futures::StreamExt;
    use itamae::api::response::{full_response, sse_stream, Generated, Kind, Meta};
    use itamae::engine::{FinishReason, GenEvent, PromptTokensDetails, Usage};
    let spec = load_spec();
    let usage = |c: usize| Usage {
        prompt_tokens: 5,
        completion_tokens: c,
        total_tokens: 5 + c,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 3 },
    };
    let choice = |text: &str, c: usize| Generated {
        text: text.into(),
        tool_calls: Vec::new(),
        reason: FinishReason::Length,
        usage: usage(c),
        logprobs: Vec::new(),
    };
    let generated = [choice("red", 1), choice("blue", 2), choice("green", 3)];
    for (kind, schema) in [
        (Kind::Chat, "#/components/schemas/ChatCompletion"),
        (Kind::Text, "#/components/schemas/Completion"),
    ] {
        let mut meta = Meta::new(kind, "m".into(), false);
        meta.n = 3;
        let whole = full_response(&meta, &generated);
        validate(&spec, schema, &whole).expect("response");
        assert_eq!(whole["choices"][2]["index"], 2);
        assert_eq!(whole["usage"]["prompt_tokens"], 5, "the prompt counts once");
        assert_eq!(whole["usage"]["completion_tokens"], 6);
        assert_eq!(
            whole["usage"]["prompt_tokens_details"]["cached_tokens"], 3,
            "the cached prompt tokens count once"
        );
    }
    for (kind, schema) in [
        (Kind::Chat, "#/components/schemas/ChatCompletionChunk"),
        (Kind::Text, "#/components/schemas/CompletionChunk"),
    ] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for e in [
            (1, GenEvent::Text("blue".into())),
            (0, GenEvent::Text("red".into())),
            (
                0,
                GenEvent::Finished {
                    reason: FinishReason::Length,
                    usage: usage(1),
                },
            ),
            (
                1,
                GenEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: usage(2),
                },
            ),
        ] {
            tx.send(e).expect("send");
        }
        let mut meta = Meta::new(kind, "m".into(), true);
        meta.n = 2;
        let frames: Vec<String> = futures::executor::block_on(
            sse_stream(rx, meta)
                .map(|b| String::from_utf8(b.expect("frame").to_vec()).expect("utf-8"))
                .collect(),
        );
        let events: Vec<Value> = frames
            .iter()
            .filter_map(|f| f.strip_prefix("data: "))
            .map(str::trim)
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("JSON event"))
            .collect();
        for e in &events {
            validate(&spec, schema, e).expect("chunk");
        }
        let indices: std::collections::BTreeSet<u64> = events
            .iter()
            .filter_map(|e| e["choices"][0]["index"].as_u64())
            .collect();
        assert_eq!(indices, [0, 1].into());
        let last = events.last().expect("events");
        assert_eq!(last["usage"]["completion_tokens"], 3, "{last}");
    }
    let continued = json!({
        "id": "ft:m:itamae:more:ftjob-b", "object": "model", "created": 1, "owned_by": "itamae",
        "context_length": 8192, "parent": "ft:m:itamae::ftjob-a", "adapter_type": "lora",
    });
    validate(&spec, "#/components/schemas/Model", &continued).expect("model");
}
