//! End to end: `DELETE /v1/models/{id}` against `itamaed serve` on the real SmolLM2 GGUF. A tiny
//! LoRA job makes a result and checkpoints; the result is deleted while a stream on it runs (the
//! stream completes, new requests get 404 at once, its files are gone, the job's record still
//! names it), a checkpoint is deleted, and the refusals: the base model (403), an inference
//! key (403), an unknown model (404).
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `scripts/fetch-model.sh`), or a GGUF path
//! in `ITAMAE_TEST_MODEL`.
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{multipart, Daemon, TempDir, WORKSPACE};
use reqwest::blocking::RequestBuilder;
use serde_json::{json, Value};

const ADMIN: &str = "admin-key-modeldel-0123456789";
const INFER: &str = "infer-key-modeldel-0123456789";

fn send(req: RequestBuilder, key: &str) -> (u16, Value) {
    let res = req.bearer_auth(key).send().expect("request");
    let status = res.status().as_u16();
    let text = res.text().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, v)
}

#[test]
fn deleting_fine_tuned_models() {
    let dir = TempDir::new("e2e-modeldel");
    let keys = format!("admin:{ADMIN}, inference:{INFER}");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[
            ("ITAMAE_API_KEYS", Some(&keys)),
            ("ITAMAE_CONFIG", None),
            (
                "ITAMAE_MODEL_HUB_ID",
                Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
            ),
        ],
        Duration::from_secs(900),
    );
    d.wait_ready();
    let get = |path: &str, key: &str| send(d.http.get(d.url(path)), key);
    let delete = |path: &str, key: &str| send(d.http.delete(d.url(path)), key);
    let (s, models) = get("/v1/models", INFER);
    assert_eq!(s, 200, "{models}");
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();

    // ---- a tiny job: a result and two checkpoints ----
    let train = std::fs::read(Path::new(WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("test data");
    let (ct, body) = multipart(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some("persona_train.jsonl"), &train),
    ]);
    let (s, file) = send(
        d.http
            .post(d.url("/v1/files"))
            .header("content-type", ct)
            .body(body),
        ADMIN,
    );
    assert_eq!(s, 200, "{file}");
    let job = json!({
        "model": base, "training_file": file["id"], "suffix": "gone", "seed": 3,
        "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_len": 64,
                                "checkpoint_every": 1},
            "adapter": {"type": "lora", "r": 4, "alpha": 8}}}
    });
    let (s, job) = send(d.http.post(d.url("/v1/fine_tuning/jobs")).json(&job), ADMIN);
    assert_eq!(s, 200, "{job}");
    let job_id = job["id"].as_str().expect("job id").to_string();
    let started = Instant::now();
    let job = loop {
        let (_, j) = get(&format!("/v1/fine_tuning/jobs/{job_id}"), ADMIN);
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            break j;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "job still {}; log:\n{}",
            j["status"],
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(job["status"], "succeeded", "{job}\n{}", d.log_tail());
    let tuned = job["fine_tuned_model"].as_str().expect("tuned").to_string();
    let (_, cks) = get(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"), ADMIN);
    let ck = cks["data"][0]["fine_tuned_model_checkpoint"]
        .as_str()
        .expect("a checkpoint")
        .to_string();
    let ck_step = cks["data"][0]["step_number"].as_u64().expect("step");
    let jobs_dir = dir.path().join("data/jobs").join(&job_id);
    assert!(jobs_dir.join("model").is_dir());
    let ck_dir = jobs_dir.join(format!("checkpoints/step-{ck_step}"));
    assert!(ck_dir.is_dir(), "{}", ck_dir.display());

    // ---- refusals ----
    let (s, v) = delete(&format!("/v1/models/{}", base), ADMIN);
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("base model"),
        "{v}"
    );
    let (s, v) = delete(&format!("/v1/models/{}", tuned), INFER);
    assert_eq!(
        (s, &v["error"]["code"]),
        (403, &json!("permission_denied")),
        "{v}"
    );
    let (s, v) = delete("/v1/models/ft:no-such-model", ADMIN);
    assert_eq!(
        (s, &v["error"]["code"]),
        (404, &json!("model_not_found")),
        "{v}"
    );

    // ---- delete the result while a stream on it runs ----
    let res = d
        .http
        .post(d.url("/v1/chat/completions"))
        .bearer_auth(INFER)
        .json(
            &json!({"model": tuned, "stream": true, "max_tokens": 48, "ignore_eos": true,
                      "temperature": 0,
                      "messages": [{"role": "user", "content": "Tell me about your day."}]}),
        )
        .send()
        .expect("stream");
    assert_eq!(res.status().as_u16(), 200);
    let mut lines = BufReader::new(res).lines();
    let mut events: Vec<Value> = Vec::new();
    // The first event arrives: the request is running on the variant.
    for line in lines.by_ref() {
        let line = line.expect("read the stream");
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(serde_json::from_str(data).expect("an event"));
            break;
        }
    }
    let (s, v) = delete(&format!("/v1/models/{}", tuned), ADMIN);
    assert_eq!(
        (s, v),
        (
            200,
            json!({"id": tuned, "object": "model", "deleted": true})
        )
    );
    // New requests: 404 at once, while the stream above is still going.
    let (s, v) = send(
        d.http
            .post(d.url("/v1/chat/completions"))
            .json(&json!({"model": tuned, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]})),
        INFER,
    );
    assert_eq!(
        (s, &v["error"]["code"]),
        (404, &json!("model_not_found")),
        "{v}"
    );
    let (s, _) = get(&format!("/v1/models/{}", tuned), INFER);
    assert_eq!(s, 404);
    let mut done = false;
    for line in lines {
        let line = line.expect("read the stream");
        match line.strip_prefix("data: ") {
            Some("[DONE]") => {
                done = true;
                break;
            }
            Some(data) => events.push(serde_json::from_str(data).expect("an event")),
            None => {}
        }
    }
    assert!(done, "the stream ended without [DONE]");
    let finish = events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str());
    assert_eq!(
        finish,
        Some("length"),
        "the running stream completed: {events:?}"
    );
    assert!(!jobs_dir.join("model").exists(), "its files are removed");
    let (_, j) = get(&format!("/v1/fine_tuning/jobs/{job_id}"), ADMIN);
    assert_eq!(
        j["fine_tuned_model"],
        tuned.as_str(),
        "the job's record stays"
    );
    let (s, _) = delete(&format!("/v1/models/{}", tuned), ADMIN);
    assert_eq!(s, 404, "deleted twice");

    // ---- a checkpoint ----
    let (s, v) = get(&format!("/v1/models/{}", ck), INFER);
    assert_eq!(s, 200, "{v}");
    let (s, v) = delete(&format!("/v1/models/{}", ck), ADMIN);
    assert_eq!((s, &v["deleted"]), (200, &json!(true)), "{v}");
    let (s, _) = get(&format!("/v1/models/{}", ck), INFER);
    assert_eq!(s, 404);
    assert!(!ck_dir.exists());
    let (_, listed) = get("/v1/models", INFER);
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        !ids.contains(&tuned.as_str()) && !ids.contains(&ck.as_str()),
        "{ids:?}"
    );

    // ---- after a restart the deleted models stay deleted ----
    d.sigterm();
    d.wait_exit(Duration::from_secs(60));
    let mut d2 = Daemon::start(
        dir.path(),
        "itamaed-2.log",
        &[],
        &[
            ("ITAMAE_API_KEYS", Some(&keys)),
            ("ITAMAE_CONFIG", None),
            (
                "ITAMAE_MODEL_HUB_ID",
                Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
            ),
        ],
        Duration::from_secs(900),
    );
    d2.wait_ready();
    for id in [&tuned, &ck] {
        let (s, _) = send(d2.http.get(d2.url(&format!("/v1/models/{id}"))), INFER);
        assert_eq!(s, 404, "{id} after restart");
    }
}
