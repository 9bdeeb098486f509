//! The scripted session on `itamaed serve` with the real SmolLM2 GGUF (or `ITAMAE_TEST_MODEL`):
//! every response's status and content type must be documented for its operation, and JSON
//! bodies (and each SSE event, where the spec names an `x-event-schema`) must validate against
//! the documented schema, `$ref`s resolved inside the spec.
mod common;
mod openapi_spec;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, PeftFiles, TempDir, WORKSPACE};
use openapi_spec::*;
use serde_json::{json, Value};

#[test]
fn scripted_session_conforms_to_the_spec() {
    let spec = load_spec();
    let dir = TempDir::new("openapi");
    let keys = format!("admin:{ADMIN},inference:{INFER}");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[("ITAMAE_API_KEYS", Some(&keys)), ("ITAMAE_CONFIG", None)],
        Duration::from_secs(300),
    );
    d.wait_ready();
    let mut s = Session {
        d: &d,
        spec: &spec,
        checked: BTreeSet::new(),
    };

    // Health and models.
    for p in ["/healthz", "/readyz"] {
        let b = s.req("GET", p, None);
        assert_eq!(s.send("GET", p, b).status, 200);
    }
    let models = s.expect(200, "GET", "/v1/models", "/v1/models", None);
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();
    // The base reports how its weights are held and their size (the test server's default mode).
    assert_eq!(models["data"][0]["weights"], "auto", "{models}");
    assert!(
        models["data"][0]["weight_bytes"].as_u64().unwrap_or(0) > 0,
        "{models}"
    );
    s.expect(
        200,
        "GET",
        "/v1/models/{id}",
        &format!("/v1/models/{base}"),
        None,
    );
    // The base model cannot be deleted; an unknown one is not found.
    let refused = s.expect(
        403,
        "DELETE",
        "/v1/models/{id}",
        &format!("/v1/models/{base}"),
        None,
    );
    assert_eq!(refused["error"]["code"], "permission_denied");
    s.expect(
        404,
        "DELETE",
        "/v1/models/{id}",
        "/v1/models/ft:no-such-model",
        None,
    );

    // Generation, plain and streamed.
    let chat = json!({"model": base, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "temperature": 0});
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&chat),
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let a = s.call(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&streamed),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let cmpl = json!({"model": base, "prompt": "The capital of France is", "max_tokens": 4});
    s.expect(
        200,
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&cmpl),
    );
    let mut streamed = cmpl.clone();
    streamed["stream"] = json!(true);
    let a = s.call(
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&streamed),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));

    // Structured outputs: the output validates; an invalid schema names the path at fault.
    let schema = json!({"type": "object", "properties": {"dish": {"type": "string", "maxLength": 12},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["dish", "stars"],
        "additionalProperties": false});
    let mut structured = chat.clone();
    structured["max_tokens"] = json!(60);
    structured["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "review", "strict": true, "schema": schema}});
    let r = s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&structured),
    );
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    if r["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(content).expect("JSON output");
        assert!(jsonschema::is_valid(&schema, &v), "{content}");
    }
    let mut choice = cmpl.clone();
    choice["guided_choice"] = json!(["yes", "no"]);
    let r = s.expect(
        200,
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&choice),
    );
    assert!(["yes", "no"].contains(&r["choices"][0]["text"].as_str().expect("text")));
    let mut bad_schema = structured.clone();
    bad_schema["response_format"]["json_schema"]["schema"]["properties"]["stars"]["type"] =
        json!("integr");
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&bad_schema),
    );
    assert_eq!(
        e["error"]["param"],
        "response_format.json_schema.schema.properties.stars.type"
    );
    // SmolLM2's chat template does not print tools: refused, naming `tools`.
    let mut tools = chat.clone();
    tools["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    tools["tool_choice"] = json!("auto");
    tools["parallel_tool_calls"] = json!(true);
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&tools),
    );
    assert_eq!(e["error"]["param"], "tools");
    // Logprobs and bias, plain and streamed; echo with logprobs.
    let mut lp = chat.clone();
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(2);
    lp["logit_bias"] = json!({"1000": -5});
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&lp),
    );
    lp["stream"] = json!(true);
    let a = s.call(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&lp),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let mut lp = cmpl.clone();
    lp["logprobs"] = json!(2);
    lp["echo"] = json!(true);
    s.expect(200, "POST", "/v1/completions", "/v1/completions", Some(&lp));
    lp["stream"] = json!(true);
    let a = s.call("POST", "/v1/completions", "/v1/completions", Some(&lp));
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));

    // Errors: 400, 401, 403, 404.
    let mut bad = chat.clone();
    bad["temperature"] = json!(9);
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&bad),
    );
    assert_eq!(e["error"]["param"], "temperature");
    let mut unknown = chat.clone();
    unknown["model"] = json!("no-such-model");
    s.expect(
        404,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&unknown),
    );
    let b = s.req("GET", "/v1/models", None);
    assert_eq!(s.send("GET", "/v1/models", b).status, 401);
    let b = s.req("GET", "/v1/models", Some("not-a-key-0123456789"));
    assert_eq!(s.send("GET", "/v1/models", b).status, 401);
    let b = s.req("GET", "/v1/files", Some(INFER));
    assert_eq!(s.send("GET", "/v1/files", b).status, 403);
    s.expect(
        404,
        "GET",
        "/v1/files/{file_id}",
        "/v1/files/file-doesnotexist",
        None,
    );
    s.expect(
        400,
        "GET",
        "/v1/files/{file_id}",
        "/v1/files/not-a-file-id",
        None,
    );

    // Files.
    let train = std::fs::read(Path::new(WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("persona_train.jsonl");
    let file = s.upload("persona_train.jsonl", &train);
    let file_id = file["id"].as_str().expect("file id").to_string();
    let list = s.expect(200, "GET", "/v1/files", "/v1/files", None);
    assert!(list["data"].as_array().is_some_and(|d| d.len() == 1));
    let fpath = format!("/v1/files/{file_id}");
    s.expect(200, "GET", "/v1/files/{file_id}", &fpath, None);
    let a = s.call(
        "GET",
        "/v1/files/{file_id}/content",
        &format!("{fpath}/content"),
        None,
    );
    assert_eq!((a.status, a.body == train), (200, true));
    let spare = s.upload("spare.jsonl", &train[..200]);
    let spare_path = format!("/v1/files/{}", spare["id"].as_str().expect("id"));
    let del = s.expect(200, "DELETE", "/v1/files/{file_id}", &spare_path, None);
    assert_eq!(del["deleted"], true);
    s.expect(404, "GET", "/v1/files/{file_id}", &spare_path, None);

    // A tiny fine-tuning job, run to the end.
    let jobs = "/v1/fine_tuning/jobs";
    let job_t = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
    let hp = json!({"max_steps": 2, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 1});
    let create = json!({"model": base, "training_file": file_id, "suffix": "spec",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp,
                   "adapter": {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}}}});
    let job = s.expect(200, "POST", jobs, jobs, Some(&create));
    let job_id = job["id"].as_str().expect("job id").to_string();
    let jpath = format!("{jobs}/{job_id}");
    s.expect(200, "GET", jobs, &format!("{jobs}?limit=5"), None);
    let mut bad_job = create.clone();
    bad_job["training_file"] = json!("file-doesnotexist");
    let e = s.expect(400, "POST", jobs, jobs, Some(&bad_job));
    assert_eq!(e["error"]["param"], "training_file");
    let done = s.wait_job(&job_id);
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\nlog:\n{}",
        d.log_tail()
    );
    let variant = done["fine_tuned_model"]
        .as_str()
        .expect("variant")
        .to_string();
    let events = s.expect(
        200,
        "GET",
        &format!("{job_t}/events"),
        &format!("{jpath}/events?limit=50"),
        None,
    );
    assert!(events["data"].as_array().is_some_and(|e| !e.is_empty()));
    let a = s.call(
        "GET",
        &format!("{job_t}/events"),
        &format!("{jpath}/events?stream=true"),
        None,
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let ckpts = s.expect(
        200,
        "GET",
        &format!("{job_t}/checkpoints"),
        &format!("{jpath}/checkpoints"),
        None,
    );
    assert!(ckpts["data"].as_array().is_some_and(|c| !c.is_empty()));
    // A finished job cannot be cancelled, paused or resumed.
    for action in ["cancel", "pause", "resume"] {
        s.expect(
            400,
            "POST",
            &format!("{job_t}/{action}"),
            &format!("{jpath}/{action}"),
            None,
        );
    }
    // A second job cancelled before it runs.
    let second = s.expect(200, "POST", jobs, jobs, Some(&create));
    let second_path = format!("{jobs}/{}", second["id"].as_str().expect("id"));
    let cancelled = s.expect(
        200,
        "POST",
        &format!("{job_t}/cancel"),
        &format!("{second_path}/cancel"),
        None,
    );
    assert_eq!(cancelled["status"], "cancelled");
    s.expect(200, "GET", job_t, &second_path, None);
    s.expect(
        404,
        "GET",
        job_t,
        &format!("{jobs}/ftjob-doesnotexist"),
        None,
    );

    // Adapters: the job's result, exported and imported again under a new name.
    let ad = "/v1/adapters";
    let ad_t = "/v1/adapters/{adapter_id}";
    let listed = s.expect(200, "GET", ad, ad, None);
    assert!(listed["data"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["id"] == variant.as_str())));
    let vpath = format!("{ad}/{variant}");
    s.expect(200, "GET", ad_t, &vpath, None);
    s.expect(404, "GET", ad_t, &format!("{ad}/no-such-adapter"), None);
    let files_t = format!("{ad_t}/files/{{file_name}}");
    let mut peft = Vec::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let a = s.call("GET", &files_t, &format!("{vpath}/files/{name}"), None);
        assert_eq!(a.status, 200, "{name}");
        peft.push(a.body);
    }
    let (weights, config) = (
        peft.pop().unwrap_or_default(),
        peft.pop().unwrap_or_default(),
    );
    let (ctype, body) = PeftFiles { config, weights }.import_body("spec-copy", None);
    let b = s
        .req("POST", ad, Some(ADMIN))
        .header("content-type", ctype)
        .body(body);
    let a = s.send("POST", ad, b);
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let copy = format!("{ad}/spec-copy");
    let un = s.expect(
        200,
        "POST",
        &format!("{ad_t}/unload"),
        &format!("{copy}/unload"),
        None,
    );
    assert_eq!(un["resident"], false);
    let ld = s.expect(
        200,
        "POST",
        &format!("{ad_t}/load"),
        &format!("{copy}/load"),
        None,
    );
    assert_eq!(ld["resident"], true);
    let mut on_copy = chat.clone();
    on_copy["model"] = json!("spec-copy");
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&on_copy),
    );
    s.expect(200, "DELETE", ad_t, &copy, None);
    s.expect(404, "GET", ad_t, &copy, None);

    // Metrics.
    let a = s.call("GET", "/metrics", "/metrics", None);
    assert_eq!((a.status, a.media.as_str()), (200, "text/plain"));

    // Every operation in the spec is routed: probed with ids that do not exist, it must reach
    // its handler (no 405, no fallback 404) and answer as documented. Each served path also
    // refuses PUT with 405, which cross-checks the routes read from the sources.
    let fallback = "Invalid URL (";
    let mut probed = 0;
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let path = template
            .replace("{id}", &base)
            .replace("{file_id}", "file-doesnotexist")
            .replace("{fine_tuning_job_id}", "ftjob-doesnotexist")
            .replace("{adapter_id}", "no-such-adapter")
            .replace("{file_name}", "adapter_config.json")
            .replace("{asset_name}", "app.js");
        for m in METHODS {
            if item.get(m).is_none() {
                continue;
            }
            let method = m.to_uppercase();
            let mut b = s.req(&method, &path, Some(ADMIN));
            if method == "POST" {
                b = b.json(&json!({}));
            }
            let a = s.send(&method, template, b);
            let text = String::from_utf8_lossy(&a.body);
            assert!(
                a.status != 405 && !(a.status == 404 && text.contains(fallback)),
                "{method} {path}: not routed ({}): {text}",
                a.status
            );
            probed += 1;
        }
        if item.get("put").is_none() {
            let a = s.req("PUT", &path, Some(ADMIN)).send().expect("PUT");
            assert_eq!(a.status().as_u16(), 405, "PUT {path} should be refused");
        }
    }
    assert_eq!(probed, spec_routes(&spec).len());
    eprintln!(
        "{} (operation, status) pairs checked against the spec",
        s.checked.len()
    );
    // The session must have seen every operation at least once.
    let seen: BTreeSet<(String, String)> = s
        .checked
        .iter()
        .map(|(m, t, _)| (m.clone(), normalize(t)))
        .collect();
    let missed: Vec<_> = spec_routes(&spec).difference(&seen).cloned().collect();
    assert!(missed.is_empty(), "operations never exercised: {missed:?}");
}
