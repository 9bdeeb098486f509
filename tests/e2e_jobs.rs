//! End to end: the OpenAI-shaped fine-tuning flow against `itamaed serve` on the real SmolLM2
//! GGUF: upload JSONL files, create LoRA and prompt-tuning jobs, follow them (paged events and
//! the live SSE stream), chat with the tuned variants and a checkpoint the moment they exist,
//! bad inputs, and a `kill -9` mid-training after which the restarted daemon resumes the job
//! from its checkpoint and still serves what had succeeded before.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `scripts/fetch-model.sh`), or a GGUF path
//! in `ITAMAE_TEST_MODEL`. One test drives everything in sequence (training is CPU-bound: jobs
//! in parallel tests would only slow each other down).
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, TempDir, WORKSPACE};
use reqwest::blocking::Response;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(600);
const HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Starts a daemon on `<dir>/data` (a dir it does not own), logging to `itamaed-{n}.log`, and
/// waits until it is ready.
fn start(dir: &Path, n: usize) -> Daemon {
    let mut d = Daemon::start(
        dir,
        &format!("itamaed-{n}.log"),
        &[],
        &[
            ("ITAMAE_MAX_UPLOAD_BYTES", Some("1000000")),
            // the GGUF names no hub id: saved adapters take this one
            ("ITAMAE_MODEL_HUB_ID", Some(HUB_ID)),
        ],
        Duration::from_secs(900),
    );
    d.wait_ready();
    d
}

/// The test's own requests, on top of the shared daemon guard.
impl Daemon {
    fn json(&self, res: Response, what: &str) -> (u16, Value) {
        let status = res.status().as_u16();
        let text = res.text().unwrap_or_default();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
        (status, v)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let res = self.http.get(self.url(path)).send().expect("GET");
        self.json(res, path)
    }

    fn get_ok(&self, path: &str) -> Value {
        let (s, v) = self.get(path);
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .expect("POST");
        self.json(res, path)
    }

    fn post_ok(&self, path: &str, body: &Value) -> Value {
        let (s, v) = self.post(path, body);
        assert_eq!(s, 200, "POST {path} {body}: {v}\nlog:\n{}", self.log_tail());
        v
    }

    fn expect_err(&self, (s, v): (u16, Value), status: &[u16], param: Option<&str>, what: &str) {
        assert!(status.contains(&s), "{what}: status {s}, body {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{what}: {v}");
        }
    }

    /// `POST /v1/files` as multipart/form-data, built by hand.
    fn upload(&self, name: &str, bytes: &[u8], purpose: Option<&str>) -> (u16, Value) {
        let boundary = "itamae-e2e-boundary-7f3a";
        let mut body = Vec::new();
        if let Some(p) = purpose {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{p}\r\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let res = self
            .http
            .post(self.url("/v1/files"))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .expect("upload");
        self.json(res, "upload")
    }

    fn upload_ok(&self, name: &str, bytes: &[u8]) -> String {
        let (s, v) = self.upload(name, bytes, Some("fine-tune"));
        assert_eq!(s, 200, "upload {name}: {v}");
        assert_eq!(v["object"], "file");
        assert_eq!(v["bytes"], bytes.len());
        assert_eq!(v["filename"], name);
        assert_eq!(v["purpose"], "fine-tune");
        v["id"].as_str().expect("file id").to_string()
    }

    fn job(&self, id: &str) -> Value {
        self.get_ok(&format!("/v1/fine_tuning/jobs/{id}"))
    }

    /// Polls until the job is in a terminal state.
    fn wait_job(&self, id: &str) -> Value {
        let started = Instant::now();
        loop {
            let j = self.job(id);
            let s = j["status"].as_str().unwrap_or("").to_string();
            if ["succeeded", "failed", "cancelled"].contains(&s.as_str()) {
                eprintln!("job {id} {s} after {:.1?}", started.elapsed());
                return j;
            }
            assert!(
                started.elapsed() < JOB_TIMEOUT,
                "job {id} still {s} after {JOB_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn messages(&self, id: &str) -> Vec<String> {
        let v = self.get_ok(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"));
        v["data"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn chat(&self, model: &str) -> String {
        let v = self.post_ok(
            "/v1/chat/completions",
            &json!({"model": model, "max_tokens": 12, "temperature": 0,
                    "messages": [{"role": "user", "content": "How are you today?"}]}),
        );
        assert_eq!(v["model"], model);
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(!text.is_empty(), "{model} answered nothing: {v}");
        text
    }

    /// Reads the live event stream to its end; returns the events' messages in order.
    fn stream_events(&self, id: &str) -> Vec<Value> {
        let res = self
            .http
            .get(self.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")))
            .send()
            .expect("stream");
        assert_eq!(res.status().as_u16(), 200);
        assert!(res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream")));
        let mut out = Vec::new();
        for line in BufReader::new(res).lines() {
            let line = line.expect("read the stream");
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(data).expect("an event"));
        }
        panic!("the event stream ended without [DONE]");
    }
}

fn data_file(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(WORKSPACE).join("tests/data").join(name)).expect("test data")
}

fn lora_job(base: &str, train: &str, valid: Option<&str>, suffix: &str, hp: Value) -> Value {
    json!({
        "model": base, "training_file": train, "validation_file": valid, "suffix": suffix,
        "seed": 7, "metadata": {"test": "e2e"},
        "method": {"type": "supervised", "supervised": {
            "hyperparameters": hp,
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}}}
    })
}

#[test]
fn fine_tuning_jobs_end_to_end() {
    let dir = TempDir::new("e2e-jobs");
    let d = start(dir.path(), 1);
    let models = d.get_ok("/v1/models");
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();

    // ---- files ----
    let train_bytes = data_file("persona_train.jsonl");
    let train = d.upload_ok("persona_train.jsonl", &train_bytes);
    let valid = d.upload_ok("persona_valid.jsonl", &data_file("persona_valid.jsonl"));
    let got = d.get_ok(&format!("/v1/files/{train}"));
    assert_eq!(got["id"], train.as_str());
    let listed = d.get_ok("/v1/files");
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["id"], valid.as_str(), "newest first");
    let content = d
        .http
        .get(d.url(&format!("/v1/files/{train}/content")))
        .send()
        .expect("content");
    assert_eq!(content.status().as_u16(), 200);
    assert_eq!(content.bytes().expect("bytes").as_ref(), &train_bytes[..]);
    let scratch = d.upload_ok("scratch.jsonl", b"{}\n");
    let del = d
        .http
        .delete(d.url(&format!("/v1/files/{scratch}")))
        .send()
        .expect("delete");
    let (s, v) = d.json(del, "delete");
    assert_eq!(
        (s, &v),
        (
            200,
            &json!({"id": scratch, "object": "file", "deleted": true})
        )
    );
    d.expect_err(
        d.get(&format!("/v1/files/{scratch}")),
        &[404],
        None,
        "deleted file",
    );

    // ---- bad inputs: each a 4xx, and the daemon keeps serving ----
    d.expect_err(
        d.upload("a.jsonl", b"{}", None),
        &[400],
        Some("purpose"),
        "no purpose",
    );
    d.expect_err(
        d.upload("a.jsonl", b"{}", Some("assistants")),
        &[400],
        Some("purpose"),
        "bad purpose",
    );
    d.expect_err(
        d.upload("big.jsonl", &vec![b'x'; 1_000_001], Some("fine-tune")),
        &[413],
        None,
        "oversized upload",
    );
    d.expect_err(d.post("/v1/files", &json!({})), &[400], None, "JSON upload");
    for path in [
        "/v1/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/files/..%2F..%2Fetc%2Fpasswd/content",
        "/v1/files/file-..%2F..%2Fitamae.db/content",
        "/v1/fine_tuning/jobs/..%2F..%2Fetc",
        "/v1/fine_tuning/jobs/ftjob-..%2F..%2Fx/events",
        "/v1/fine_tuning/jobs/ftjob-..%2F..%2Fx/checkpoints",
    ] {
        d.expect_err(d.get(path), &[400, 404], None, path);
    }
    d.expect_err(
        d.post(
            "/v1/fine_tuning/jobs",
            &lora_job("no-such-model", &train, None, "x", json!({})),
        ),
        &[400, 404],
        Some("model"),
        "unknown model",
    );
    let bad_params = [
        (
            json!({"n_epochs": 0}),
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            json!({"batch_size": "many"}),
            "method.supervised.hyperparameters.batch_size",
        ),
        (
            json!({"learning_rate_multiplier": -1}),
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
    ];
    for (hp, param) in bad_params {
        d.expect_err(
            d.post(
                "/v1/fine_tuning/jobs",
                &lora_job(&base, &train, None, "x", hp),
            ),
            &[400],
            Some(param),
            param,
        );
    }
    let mut long_suffix = lora_job(&base, &train, None, "x", json!({}));
    long_suffix["suffix"] = json!("s".repeat(65));
    d.expect_err(
        d.post("/v1/fine_tuning/jobs", &long_suffix),
        &[400],
        Some("suffix"),
        "suffix",
    );
    let mut bad_adapter = lora_job(&base, &train, None, "x", json!({}));
    bad_adapter["method"]["supervised"]["adapter"] = json!({"type": "lora", "r": 0});
    d.expect_err(
        d.post("/v1/fine_tuning/jobs", &bad_adapter),
        &[400],
        Some("method.supervised.adapter.r"),
        "adapter r",
    );
    // Full fine-tuning is refused at creation (the jobs API offers it on no base) with the
    // command line that does it, which needs the base in f32.
    let mut full = lora_job(&base, &train, None, "x", json!({}));
    full["method"]["supervised"]["adapter"] = json!({"type": "full"});
    let (status, refused) = d.post("/v1/fine_tuning/jobs", &full);
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--weights f32") && message.contains("model.weights"),
        "{refused}"
    );
    d.expect_err(
        (status, refused.clone()),
        &[400],
        Some("method.supervised.adapter.type"),
        "full fine-tuning",
    );
    d.expect_err(
        d.post(
            "/v1/fine_tuning/jobs",
            &lora_job(&base, "file-000000000000000000000000", None, "x", json!({})),
        ),
        &[400],
        Some("training_file"),
        "missing training file",
    );

    // A file with bad lines: the job fails at validation, naming the lines.
    let bad_file = d.upload_ok(
        "bad.jsonl",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
          this is not json\n\
          {\"nothing\": 1}\n",
    );
    let j = d.post_ok(
        "/v1/fine_tuning/jobs",
        &lora_job(&base, &bad_file, None, "bad", json!({"max_steps": 1})),
    );
    assert_eq!(j["status"], "validating_files");
    let j = d.wait_job(j["id"].as_str().expect("id"));
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "invalid_training_file", "{j}");
    assert_eq!(j["error"]["param"], "training_file", "{j}");
    let msg = j["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("line 2") && msg.contains("line 3"), "{msg}");
    assert!(j["fine_tuned_model"].is_null());

    // ---- a LoRA job and a prompt-tuning job, queued one after the other ----
    let tiny = json!({"max_steps": 4, "batch_size": 2, "max_seq_len": 96, "checkpoint_every": 2});
    let lora = d.post_ok(
        "/v1/fine_tuning/jobs",
        &lora_job(&base, &train, Some(&valid), "chef", tiny.clone()),
    );
    let lora_id = lora["id"].as_str().expect("id").to_string();
    assert_eq!(lora["object"], "fine_tuning.job");
    assert_eq!(lora["organization_id"], "itamae");
    assert_eq!(lora["model"], base.as_str());
    assert_eq!(lora["seed"], 7);
    assert_eq!(lora["metadata"], json!({"test": "e2e"}));
    assert_eq!(lora["method"]["supervised"]["adapter"]["r"], 8);
    assert_eq!(lora["hyperparameters"]["n_epochs"], "auto");
    let pt = d.post_ok(
        "/v1/fine_tuning/jobs",
        &json!({"model": base, "training_file": train, "suffix": "soft",
                "method": {"type": "supervised", "supervised": {
                    "hyperparameters": {"max_steps": 3, "batch_size": 2, "max_seq_len": 96,
                                        "learning_rate_multiplier": 2},
                    "adapter": {"type": "prompt_tuning", "num_virtual_tokens": 8,
                                "init": "text", "init_text": "You are a sushi chef."}}}}),
    );
    let pt_id = pt["id"].as_str().expect("id").to_string();
    let listed = d.get_ok("/v1/fine_tuning/jobs?limit=2");
    assert_eq!(listed["data"][0]["id"], pt_id.as_str());
    assert_eq!(listed["data"][1]["id"], lora_id.as_str());
    assert_eq!(listed["has_more"], true);
    let after = d.get_ok(&format!("/v1/fine_tuning/jobs?after={lora_id}"));
    assert_eq!(after["data"].as_array().map(Vec::len), Some(1), "{after}");

    // Follow the LoRA job live: every event, then [DONE] once it has finished.
    let streamed = d.stream_events(&lora_id);
    let msgs: Vec<&str> = streamed
        .iter()
        .map(|e| e["message"].as_str().unwrap_or(""))
        .collect();
    for want in [
        "Validating training file",
        "Files validated, moving job to queued state",
        "Fine-tuning job started",
        "Hyperparameters for",
        "The job has successfully completed",
    ] {
        assert!(
            msgs.iter().any(|m| m.starts_with(want)),
            "{want} not in {msgs:?}"
        );
    }
    let metrics: Vec<&Value> = streamed.iter().filter(|e| e["type"] == "metrics").collect();
    assert!(metrics
        .iter()
        .any(|e| e["data"]["step"] == 4 && e["data"]["train_loss"].is_number()));
    assert!(
        metrics.iter().any(|e| e["data"]["valid_loss"].is_number()),
        "{metrics:?}"
    );
    let j = d.job(&lora_id);
    assert_eq!(j["status"], "succeeded", "{j}");
    let lora_model = format!("ft:{base}:itamae:chef:{lora_id}");
    assert_eq!(j["fine_tuned_model"], lora_model.as_str());
    assert!(j["trained_tokens"].as_i64().is_some_and(|t| t > 0), "{j}");
    assert!(j["finished_at"].is_i64());
    assert_eq!(j["hyperparameters"]["batch_size"], 2, "resolved: {j}");
    assert!(
        j["hyperparameters"]["n_epochs"].is_number(),
        "resolved: {j}"
    );
    eprintln!("lora: {}", d.chat(&lora_model));
    for model in [lora_model.clone(), format!("{lora_model}:ckpt-step-2")] {
        let cfg = d.get_ok(&format!("/v1/adapters/{model}/files/adapter_config.json"));
        assert_eq!(cfg["base_model_name_or_path"], HUB_ID, "{model}: {cfg}");
    }
    let events = d.get_ok(&format!("/v1/fine_tuning/jobs/{lora_id}/events?limit=2"));
    assert_eq!(events["has_more"], true);
    assert_eq!(events["data"][0]["object"], "fine_tuning.job.event");
    assert_eq!(
        events["data"][0]["message"],
        "The job has successfully completed"
    );
    let ckpts = d.get_ok(&format!("/v1/fine_tuning/jobs/{lora_id}/checkpoints"));
    let ck = &ckpts["data"][0];
    assert_eq!(ck["object"], "fine_tuning.job.checkpoint");
    assert_eq!(ck["step_number"], 2);
    assert_eq!(ck["fine_tuning_job_id"], lora_id.as_str());
    assert!(ck["metrics"]["train_loss"].is_number(), "{ck}");
    let ck_model = format!("{lora_model}:ckpt-step-2");
    assert_eq!(ck["fine_tuned_model_checkpoint"], ck_model.as_str());
    eprintln!("checkpoint: {}", d.chat(&ck_model));

    let j = d.wait_job(&pt_id);
    assert_eq!(j["status"], "succeeded", "{j}");
    let pt_model = format!("ft:{base}:itamae:soft:{pt_id}");
    assert_eq!(j["fine_tuned_model"], pt_model.as_str());
    assert_eq!(
        j["method"]["supervised"]["adapter"]["type"],
        "prompt_tuning"
    );
    eprintln!("prompt tuning: {}", d.chat(&pt_model));
    let ids: Vec<String> = d.get_ok("/v1/models")["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    for m in [&lora_model, &pt_model, &ck_model] {
        assert!(ids.contains(m), "{m} not in {ids:?}");
    }
    // Cancel of a finished job is refused.
    d.expect_err(
        d.post(
            &format!("/v1/fine_tuning/jobs/{lora_id}/cancel"),
            &json!({}),
        ),
        &[400, 409],
        None,
        "cancel finished",
    );

    // ---- kill -9 mid-training, restart, resume from the checkpoint ----
    let long = d.post_ok(
        "/v1/fine_tuning/jobs",
        &lora_job(
            &base,
            &train,
            None,
            "crash",
            json!({"max_steps": 8, "batch_size": 2, "max_seq_len": 64, "checkpoint_every": 2}),
        ),
    );
    let long_id = long["id"].as_str().expect("id").to_string();
    let started = Instant::now();
    loop {
        let c = d.get_ok(&format!("/v1/fine_tuning/jobs/{long_id}/checkpoints"));
        if c["data"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            started.elapsed() < JOB_TIMEOUT,
            "no checkpoint; log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(d.job(&long_id)["status"], "running");
    d.kill9();

    let d = start(dir.path(), 2);
    let j = d.wait_job(&long_id);
    assert_eq!(j["status"], "succeeded", "{j}");
    let msgs = d.messages(&long_id);
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Resumed from checkpoint step") && m.ends_with("after restart")),
        "{msgs:?}"
    );
    let long_model = format!("ft:{base}:itamae:crash:{long_id}");
    assert_eq!(j["fine_tuned_model"], long_model.as_str());
    eprintln!("resumed: {}", d.chat(&long_model));
    // What had succeeded before the crash is served again, checkpoints included.
    eprintln!("lora after restart: {}", d.chat(&lora_model));
    eprintln!("prompt tuning after restart: {}", d.chat(&pt_model));
    d.chat(&ck_model);

    // ---- pause, resume and cancel a running job ----
    let slow = d.post_ok(
        "/v1/fine_tuning/jobs",
        &lora_job(
            &base,
            &train,
            None,
            "stop",
            json!({"max_steps": 200, "batch_size": 2, "max_seq_len": 64}),
        ),
    );
    let slow_id = slow["id"].as_str().expect("id").to_string();
    let started = Instant::now();
    while d.job(&slow_id)["status"] != "running" {
        assert!(started.elapsed() < JOB_TIMEOUT, "never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let path = |verb: &str| format!("/v1/fine_tuning/jobs/{slow_id}/{verb}");
    assert_eq!(d.post_ok(&path("pause"), &json!({}))["status"], "paused");
    d.expect_err(
        d.post(
            &path("pause")
                .replace("pause", "resume")
                .replace(&slow_id, &lora_id),
            &json!({}),
        ),
        &[400],
        None,
        "resume finished",
    );
    assert_eq!(d.post_ok(&path("resume"), &json!({}))["status"], "running");
    let j = d.post_ok(&path("cancel"), &json!({}));
    assert_eq!(j["status"], "cancelled");
    let j = d.wait_job(&slow_id);
    assert_eq!(j["status"], "cancelled");
    assert!(j["fine_tuned_model"].is_null());
    let msgs = d.messages(&slow_id);
    for want in [
        "Fine-tuning job paused",
        "Fine-tuning job resumed",
        "Fine-tuning job cancelled",
    ] {
        assert!(msgs.iter().any(|m| m == want), "{want} not in {msgs:?}");
    }
    // The runner is free again: a queued job after a cancelled one still trains.
    let after_cancel = d.post_ok(
        "/v1/fine_tuning/jobs",
        &lora_job(
            &base,
            &train,
            None,
            "next",
            json!({"max_steps": 1, "batch_size": 1, "max_seq_len": 48}),
        ),
    );
    let j = d.wait_job(after_cancel["id"].as_str().expect("id"));
    assert_eq!(j["status"], "succeeded", "{j}");

    // Every job and file is still listed.
    let all = d.get_ok("/v1/fine_tuning/jobs");
    assert_eq!(all["data"].as_array().map(Vec::len), Some(6), "{all}");
    assert_eq!(
        d.get_ok(&format!("/v1/files/{train}"))["bytes"],
        train_bytes.len()
    );
}
