//! End to end: continued fine-tuning against `itamaed serve` on the real SmolLM2 GGUF. A tiny
//! LoRA job trains; a second job whose `model` is the first one's `ft:` model starts from its
//! weights: its first loss is about where the first job ended, well below where the first
//! one began. `/v1/models` names the parent of the continued model (and of its checkpoints);
//! a different method gets a 400 naming `method`, an unknown `ft:` model a 404. Prompt tuning
//! continues the same way.
//!
//! Every step trains on the whole (4-example) file, so the losses of the two jobs are taken
//! on the same data and compare.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `scripts/fetch-model.sh`), or a GGUF path
//! in `ITAMAE_TEST_MODEL`.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{multipart, Daemon, TempDir, WORKSPACE};
use reqwest::blocking::RequestBuilder;
use serde_json::{json, Value};

fn send(req: RequestBuilder) -> (u16, Value) {
    let res = req.send().expect("request");
    let status = res.status().as_u16();
    let text = res.text().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, v)
}

struct Ctx {
    d: Daemon,
    file: String,
}

impl Ctx {
    fn get(&self, path: &str) -> Value {
        let (s, v) = send(self.d.http.get(self.d.url(path)));
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    fn create(&self, model: &str, steps: usize, adapter: Value, lr: f64) -> (u16, Value) {
        let job = json!({
            "model": model, "training_file": self.file, "seed": 5,
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": {"max_steps": steps, "batch_size": 4, "max_seq_len": 96,
                                    "n_epochs": 50, "learning_rate_multiplier": lr},
                "adapter": adapter}}
        });
        send(
            self.d
                .http
                .post(self.d.url("/v1/fine_tuning/jobs"))
                .json(&job),
        )
    }

    /// Waits for the job to succeed; returns it and its train losses by step.
    fn finish(&self, id: &str) -> (Value, Vec<f64>) {
        let started = Instant::now();
        let job = loop {
            let j = self.get(&format!("/v1/fine_tuning/jobs/{id}"));
            let status = j["status"].as_str().unwrap_or("").to_string();
            if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
                break j;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "job {id} still {status}; log:\n{}",
                self.d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(job["status"], "succeeded", "{job}\n{}", self.d.log_tail());
        let events = self.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=200"));
        let mut losses: Vec<(u64, f64)> = events["data"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
            .map(|e| {
                (
                    e["data"]["step"].as_u64().expect("step"),
                    e["data"]["train_loss"].as_f64().expect("loss"),
                )
            })
            .collect();
        losses.sort_by_key(|l| l.0);
        losses.dedup_by_key(|l| l.0);
        assert_eq!(losses.first().map(|l| l.0), Some(1), "{losses:?}");
        (job, losses.into_iter().map(|l| l.1).collect())
    }

    fn model_parent(&self, id: &str) -> Value {
        let models = self.get("/v1/models");
        models["data"]
            .as_array()
            .expect("models")
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {models}"))["parent"]
            .clone()
    }
}

#[test]
fn continued_fine_tuning() {
    let dir = TempDir::new("e2e-continue");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[("ITAMAE_API_KEYS", None), ("ITAMAE_CONFIG", None)],
        Duration::from_secs(900),
    );
    d.wait_ready();
    let (_, models) = send(d.http.get(d.url("/v1/models")));
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();
    let all = std::fs::read_to_string(Path::new(WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("test data");
    let four: String = all.lines().take(4).map(|l| format!("{l}\n")).collect();
    let (ct, body) = multipart(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some("four.jsonl"), four.as_bytes()),
    ]);
    let (s, file) = send(
        d.http
            .post(d.url("/v1/files"))
            .header("content-type", ct)
            .body(body),
    );
    assert_eq!(s, 200, "{file}");
    let ctx = Ctx {
        d,
        file: file["id"].as_str().expect("file id").to_string(),
    };

    // ---- LoRA: a parent, then a job continuing from it ----
    let lora = json!({"type": "lora", "r": 4, "alpha": 8});
    let (s, job) = ctx.create(&base, 6, lora.clone(), 20.0);
    assert_eq!(s, 200, "{job}");
    let (parent_job, parent_losses) = ctx.finish(job["id"].as_str().expect("id"));
    let parent = parent_job["fine_tuned_model"]
        .as_str()
        .expect("tuned")
        .to_string();
    assert_eq!(ctx.model_parent(&parent), base);
    let (first, last) = (parent_losses[0], parent_losses[parent_losses.len() - 1]);
    assert!(last < 0.8 * first, "the parent learned: {parent_losses:?}");

    // refusals: another method, another shape, an unknown ft: model
    let (s, v) = ctx.create(&parent, 1, json!({"type": "prompt_tuning"}), 1.0);
    assert_eq!((s, &v["error"]["param"]), (400, &json!("method")), "{v}");
    let (s, v) = ctx.create(&parent, 1, json!({"type": "lora", "r": 8}), 1.0);
    assert_eq!(
        (s, &v["error"]["param"]),
        (400, &json!("method.supervised.adapter.r")),
        "{v}"
    );
    let (s, v) = ctx.create("ft:no-such-model:itamae::ftjob-x", 1, lora.clone(), 1.0);
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");

    // the continued job: its adapter left out, so the parent's is taken
    let job = json!({
        "model": parent, "training_file": ctx.file, "seed": 5, "suffix": "more",
        "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"max_steps": 2, "batch_size": 4, "max_seq_len": 96,
                                "n_epochs": 50, "learning_rate_multiplier": 20.0,
                                "checkpoint_every": 1}}}
    });
    let (s, job) = send(
        ctx.d
            .http
            .post(ctx.d.url("/v1/fine_tuning/jobs"))
            .json(&job),
    );
    assert_eq!(s, 200, "{job}");
    assert_eq!(
        job["model"], parent,
        "the job keeps the model it was asked for"
    );
    assert_eq!(job["method"]["supervised"]["adapter"]["r"], 4, "{job}");
    let (child_job, child_losses) = ctx.finish(job["id"].as_str().expect("id"));
    let child_first = child_losses[0];
    assert!(
        child_first < 0.8 * first,
        "the continued job starts where the parent got to, not from scratch: \
         parent {parent_losses:?}, continued {child_losses:?}"
    );
    assert!(
        (child_first - last).abs() < 0.25 * first,
        "parent {parent_losses:?}, continued {child_losses:?}"
    );
    let child = child_job["fine_tuned_model"].as_str().expect("tuned");
    assert!(child.starts_with(&format!("ft:{base}:")), "{child}");
    assert_eq!(ctx.model_parent(child), parent);
    let (s, one) = send(ctx.d.http.get(ctx.d.url(&format!("/v1/models/{child}"))));
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["parent"], parent);
    let cks = ctx.get(&format!(
        "/v1/fine_tuning/jobs/{}/checkpoints",
        child_job["id"].as_str().expect("id")
    ));
    let ck = cks["data"][0]["fine_tuned_model_checkpoint"]
        .as_str()
        .expect("a checkpoint");
    assert_eq!(ctx.model_parent(ck), parent);
    let events = ctx.get(&format!(
        "/v1/fine_tuning/jobs/{}/events?limit=200",
        child_job["id"].as_str().expect("id")
    ));
    assert!(
        events["data"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["message"] == format!("Continuing from the weights of {parent}")),
        "{events}"
    );

    // ---- prompt tuning continues the same way ----
    let pt = json!({"type": "prompt_tuning", "num_virtual_tokens": 4, "init": "random"});
    let (s, job) = ctx.create(&base, 4, pt.clone(), 20.0);
    assert_eq!(s, 200, "{job}");
    let (pt_job, pt_losses) = ctx.finish(job["id"].as_str().expect("id"));
    let pt_parent = pt_job["fine_tuned_model"].as_str().expect("tuned");
    let (s, job) = ctx.create(pt_parent, 1, pt, 20.0);
    assert_eq!(s, 200, "{job}");
    let (_, pt_child) = ctx.finish(job["id"].as_str().expect("id"));
    assert!(
        pt_child[0] < pt_losses[0],
        "parent {pt_losses:?}, continued {pt_child:?}"
    );
}
