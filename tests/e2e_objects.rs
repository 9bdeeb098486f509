//! End to end: `itamaed` with `storage.objects = s3://…` on a real S3-protocol server (s3s-fs,
//! started by `scripts/services/s3.sh`): upload a file, import an adapter and train a tiny LoRA
//! job (its checkpoints and result land in the bucket: listed here), then restart the daemon on
//! an EMPTY data directory holding only a copy of the database (rows and adapter registry): the
//! tuned variant, its checkpoint and the imported adapter still answer (fetched from the bucket),
//! the uploaded file comes back byte-identical and the checkpoints are listed. Before that
//! restart, another replica's import of the adapter's next generation "dies" between its upload
//! and its commit: the restarted daemon still serves the committed generation's bytes, and the
//! import done again then replaces the dead one's upload.
//!
//! The server: `ITAMAE_TEST_S3_ENDPOINT` (+ `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `ITAMAE_TEST_S3_BUCKET`) when set, else the one `make test` shares, else one started for this
//! test binary. Needs the SmolLM2 GGUF like the other e2e tests.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    build_lora, crashed_import, env_var as var, multipart, replica_blob, s3_daemon_env, s3_env,
    Daemon, TempDir, WORKSPACE,
};
use futures::TryStreamExt;
use object_store::ObjectStore;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// The keys under `prefix` in the bucket, listed through the S3 API.
fn list_bucket(env: &[(String, String)], prefix: &str) -> Vec<String> {
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(var(env, "ITAMAE_TEST_S3_BUCKET"))
        .with_endpoint(var(env, "ITAMAE_TEST_S3_ENDPOINT"))
        .with_access_key_id(var(env, "AWS_ACCESS_KEY_ID"))
        .with_secret_access_key(var(env, "AWS_SECRET_ACCESS_KEY"))
        .with_region("us-east-1")
        .with_allow_http(true)
        .build()
        .expect("an S3 client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let p = object_store::path::Path::from(prefix);
    let mut keys: Vec<String> = rt
        .block_on(store.list(Some(&p)).try_collect::<Vec<_>>())
        .expect("list the bucket")
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    keys.sort();
    keys
}

fn start(dir: &Path, log: &str, objects: &str, env: &[(String, String)]) -> Daemon {
    let s3 = s3_daemon_env(env);
    let mut envs: Vec<(&str, Option<&str>)> = vec![
        ("ITAMAE_OBJECTS", Some(objects)),
        ("ITAMAE_MAX_UPLOAD_BYTES", Some("2000000")),
        (
            "ITAMAE_MODEL_HUB_ID",
            Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
        ("ITAMAE_CONFIG", None),
        ("ITAMAE_API_KEYS", None),
    ];
    envs.extend(s3.iter().map(|(k, v)| (*k, v.as_deref())));
    let mut d = Daemon::start(dir, log, &[], &envs, Duration::from_secs(900));
    d.wait_ready();
    d
}

fn json_of(res: reqwest::blocking::Response, what: &str) -> Value {
    let status = res.status().as_u16();
    let text = res.text().unwrap_or_default();
    // 201 for what a request creates (an imported adapter), 200 otherwise.
    assert!(status == 200 || status == 201, "{what}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

fn get(d: &Daemon, path: &str) -> Value {
    json_of(d.http.get(d.url(path)).send().expect("GET"), path)
}

fn post(d: &Daemon, path: &str, body: &Value) -> Value {
    json_of(
        d.http.post(d.url(path)).json(body).send().expect("POST"),
        path,
    )
}

fn chat(d: &Daemon, model: &str) -> String {
    let v = post(
        d,
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 8, "temperature": 0,
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

#[test]
fn variants_files_and_checkpoints_survive_an_empty_data_dir_through_s3() {
    let env = s3_env();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let prefix = format!("e2e-{}-{nanos}", std::process::id());
    let objects = format!("s3://{}/{prefix}", var(&env, "ITAMAE_TEST_S3_BUCKET"));

    let first = TempDir::new("e2e-objects-a");
    let mut d = start(first.path(), "itamaed-a.log", &objects, &env);
    let base = get(&d, "/v1/models")["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();

    // An upload, and an imported adapter.
    let train = std::fs::read(Path::new(WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("test data");
    let (ct, body) = multipart(&[
        ("purpose", None, &b"fine-tune"[..]),
        ("file", Some("train.jsonl"), train.as_slice()),
    ]);
    let file = json_of(
        d.http
            .post(d.url("/v1/files"))
            .header("content-type", ct)
            .body(body)
            .send()
            .expect("upload"),
        "upload",
    );
    let file_id = file["id"].as_str().expect("file id").to_string();
    let lora = build_lora(first.path());
    let (ct, body) = lora.import_body("imported-lora", None);
    json_of(
        d.http
            .post(d.url("/v1/adapters"))
            .header("content-type", ct)
            .body(body)
            .send()
            .expect("import"),
        "import",
    );
    let imported_before = chat(&d, "imported-lora");

    // A tiny LoRA job with a checkpoint.
    let job = post(
        &d,
        "/v1/fine_tuning/jobs",
        &json!({"model": base, "training_file": file_id, "suffix": "s3", "seed": 3,
                "method": {"type": "supervised", "supervised": {
                    "hyperparameters": {"max_steps": 4, "batch_size": 2, "max_seq_len": 64,
                                        "checkpoint_every": 2},
                    "adapter": {"type": "lora", "r": 4, "alpha": 8,
                                "target_modules": ["q_proj", "v_proj"]}}}}),
    );
    let job_id = job["id"].as_str().expect("job id").to_string();
    let started = Instant::now();
    let job = loop {
        let j = get(&d, &format!("/v1/fine_tuning/jobs/{job_id}"));
        let s = j["status"].as_str().unwrap_or("").to_string();
        if ["succeeded", "failed", "cancelled"].contains(&s.as_str()) {
            break j;
        }
        assert!(
            started.elapsed() < JOB_TIMEOUT,
            "job still {s}; log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(job["status"], "succeeded", "{job}\nlog:\n{}", d.log_tail());
    let variant = job["fine_tuned_model"].as_str().expect("model").to_string();
    let tuned_before = chat(&d, &variant);
    let ckpts = get(&d, &format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"));
    let ck_models: Vec<String> = ckpts["data"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .map(|c| {
            c["fine_tuned_model_checkpoint"]
                .as_str()
                .expect("name")
                .to_string()
        })
        .collect();
    assert!(!ck_models.is_empty(), "{ckpts}");

    // What landed in the bucket: the upload, the adapter, every checkpoint and the result, each
    // directory with its completion marker.
    let keys = list_bucket(&env, &prefix);
    eprintln!("bucket after the job:\n{}", keys.join("\n"));
    for want in [
        format!("{prefix}/files/{file_id}"),
        format!("{prefix}/adapters/imported-lora/gen-1/adapter_model.safetensors"),
        format!("{prefix}/adapters/imported-lora/gen-1/_COMPLETE"),
        format!("{prefix}/jobs/{job_id}/model/adapter_model.safetensors"),
        format!("{prefix}/jobs/{job_id}/model/_COMPLETE"),
        format!("{prefix}/jobs/{job_id}/checkpoints/step-2/_COMPLETE"),
        format!("{prefix}/jobs/{job_id}/checkpoints/step-2/trainer_state.json"),
    ] {
        assert!(keys.contains(&want), "{want} is not in the bucket");
    }

    // Another replica imports generation 2 of the adapter and dies after its upload, before
    // its commit: the registry still names generation 1.
    crashed_import(&env, &objects, first.path(), "imported-lora", 2);
    let keys = list_bucket(&env, &format!("{prefix}/adapters/imported-lora"));
    assert!(
        keys.contains(&format!("{prefix}/adapters/imported-lora/gen-2/_COMPLETE")),
        "{keys:?}"
    );

    // Stop, and start again on an empty data dir with only the rows: the database, which holds
    // the adapter registry too (a shared database holds both in a scaled-out deployment).
    d.sigterm();
    d.wait_exit(Duration::from_secs(120));
    drop(d);
    let second = TempDir::new("e2e-objects-b");
    let data = second.path().join("data");
    std::fs::create_dir_all(data.join("adapters")).expect("data dir");
    for entry in std::fs::read_dir(first.path().join("data")).expect("old data dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("itamae.db") {
            std::fs::copy(entry.path(), data.join(&name)).expect("copy the database");
        }
    }
    let d = start(second.path(), "itamaed-b.log", &objects, &env);

    // The bytes come from the bucket: byte-identical upload, same answers from the variants.
    let content = d
        .http
        .get(d.url(&format!("/v1/files/{file_id}/content")))
        .send()
        .expect("file content");
    assert_eq!(content.status().as_u16(), 200);
    assert!(
        content.bytes().expect("bytes").as_ref() == train.as_slice(),
        "the uploaded file came back different"
    );
    assert_eq!(
        chat(&d, &variant),
        tuned_before,
        "the tuned variant changed"
    );
    assert_eq!(
        chat(&d, "imported-lora"),
        imported_before,
        "the imported adapter changed"
    );
    // Generation 1's bytes, not those the dead import uploaded.
    let weights = |d: &Daemon| {
        let res = d
            .http
            .get(d.url("/v1/adapters/imported-lora/files/adapter_model.safetensors"))
            .send()
            .expect("adapter file");
        assert_eq!(res.status().as_u16(), 200);
        res.bytes().expect("bytes").to_vec()
    };
    assert!(
        weights(&d) == lora.weights,
        "generation 1's weights changed"
    );
    assert_eq!(get(&d, "/v1/adapters/imported-lora")["generation"], 1);
    // The import done again is generation 2 too, and replaces the dead one's upload.
    let (ct, body) = lora.import_body("imported-lora", Some("1"));
    let again = json_of(
        d.http
            .post(d.url("/v1/adapters"))
            .header("content-type", ct)
            .body(body)
            .send()
            .expect("import"),
        "import again",
    );
    assert_eq!(again["generation"], 2, "{again}");
    assert!(weights(&d) == lora.weights);
    {
        use itamae::jobs::backend::BlobStore;
        let (blob, rt) = replica_blob(&env, &objects, &second.path().join("fresh-replica"));
        let dir = blob
            .materialise_adapter("imported-lora", 2)
            .expect("download")
            .expect("generation 2 is stored");
        let stored = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
        assert!(
            stored == lora.weights,
            "generation 2 holds the dead import's bytes"
        );
        drop(blob);
        rt.shutdown_background();
    }
    assert_eq!(chat(&d, "imported-lora"), imported_before);
    for ck in &ck_models {
        chat(&d, ck);
    }
    let again = get(&d, &format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"));
    assert_eq!(
        again["data"].as_array().map(Vec::len),
        Some(ck_models.len())
    );
    assert!(
        data.join("cache/jobs")
            .join(&job_id)
            .join("model/adapter_model.safetensors")
            .is_file(),
        "the result was not fetched into the cache"
    );

    // A deleted variant is gone from the bucket too.
    let res = d
        .http
        .delete(d.url(&format!("/v1/models/{variant}")))
        .send()
        .expect("delete");
    assert_eq!(
        res.status().as_u16(),
        200,
        "{}",
        res.text().unwrap_or_default()
    );
    let keys = list_bucket(&env, &format!("{prefix}/jobs/{job_id}/model"));
    assert!(keys.is_empty(), "{keys:?}");
}
