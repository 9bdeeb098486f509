//! Three `itamaed` replicas on one machine, each with a data directory of its own, sharing one
//! real PostgreSQL (`storage.database_url`) and one real S3-protocol server (s3s-fs,
//! `storage.objects = s3://…`), on the SmolLM2 model (docs/scale-out.md):
//!
//! - a job created on A trains on one replica; that replica is killed (SIGKILL) after its first
//!   checkpoint; another one takes it over once the lease expires, resumes from the checkpoint
//!   in S3 and the job succeeds; the variant answers on the two survivors and on the killed one
//!   restarted;
//! - an adapter imported on B and replaced on C: a stale `if_generation` gets 409 on every
//!   replica, and B (which served the old generation) drops it and answers with the new one;
//!   an import of the next generation that dies between its upload and its commit changes
//!   nothing any replica serves;
//! - a delete on C (the adapter, then the tuned model) gives 404 on every replica;
//! - nothing is lost: the uploaded file's bytes are identical from every replica, the
//!   checkpoints are listed everywhere, and every step's metrics event is there (the steps the
//!   killed replica ran after its checkpoint are run again, so those may appear twice).
//!
//! PostgreSQL: `ITAMAE_TEST_PG_URL`, else a throwaway cluster; S3: `ITAMAE_TEST_S3_ENDPOINT`,
//! else the server `make test` shares, else one started here (tests/common).
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{build_prompt, Daemon, TempDir};
use serde_json::{json, Value};

/// Short, so the take-over happens within seconds of the kill.
const LEASE_SECS: &str = "3";
const STEPS: u64 = 8;
/// Longer than the replicas' reconciliation period, for what a lost announcement would delay.
const PROPAGATION: Duration = Duration::from_secs(15);

struct Cluster {
    db: String,
    objects: String,
    s3: Vec<(String, String)>,
}

impl Cluster {
    fn start(&self, dir: &Path, id: &str, log: &str) -> Daemon {
        let s3 = common::s3_daemon_env(&self.s3);
        let mut envs: Vec<(&str, Option<&str>)> = vec![
            ("ITAMAE_CONFIG", None),
            ("ITAMAE_API_KEYS", None),
            ("ITAMAE_DATABASE_URL", Some(&self.db)),
            ("ITAMAE_OBJECTS", Some(&self.objects)),
            ("ITAMAE_REPLICA_ID", Some(id)),
            ("ITAMAE_JOB_LEASE_SECS", Some(LEASE_SECS)),
            (
                "ITAMAE_MODEL_HUB_ID",
                Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
            ),
        ];
        envs.extend(s3.iter().map(|(k, v)| (*k, v.as_deref())));
        Daemon::start(dir, log, &[], &envs, Duration::from_secs(600))
    }
}

fn send(res: reqwest::Result<reqwest::blocking::Response>, what: &str) -> (u16, Value) {
    let res = res.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = res.status().as_u16();
    let text = res.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(d: &Daemon, path: &str) -> (u16, Value) {
    send(d.http.get(d.url(path)).send(), path)
}

fn get_ok(d: &Daemon, path: &str) -> Value {
    let (s, v) = get(d, path);
    assert_eq!(s, 200, "GET {path}: {v}");
    v
}

fn post(d: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    send(d.http.post(d.url(path)).json(body).send(), path)
}

fn chat(d: &Daemon, model: &str) -> (u16, Value) {
    post(
        d,
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "What is your favourite food?"}]}),
    )
}

fn answer(d: &Daemon, model: &str) -> String {
    let (s, v) = chat(d, model);
    assert_eq!(s, 200, "chat with {model}: {v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn import(d: &Daemon, name: &str, files: &common::PeftFiles, if_generation: &str) -> (u16, Value) {
    let (ctype, body) = files.import_body(name, Some(if_generation));
    send(
        d.http
            .post(d.url("/v1/adapters"))
            .header("content-type", ctype)
            .body(body)
            .send(),
        "import",
    )
}

fn models(d: &Daemon) -> Vec<String> {
    get_ok(d, "/v1/models")["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

fn step_metric(d: &Daemon, job: &str) -> f64 {
    d.metric(&format!("itamae_training_step{{job_id=\"{job}\"}}"))
}

fn status(d: &Daemon, job: &str) -> String {
    get_ok(d, &format!("/v1/fine_tuning/jobs/{job}"))["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn checkpoints(d: &Daemon, job: &str) -> Vec<u64> {
    get_ok(d, &format!("/v1/fine_tuning/jobs/{job}/checkpoints"))["data"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .filter_map(|c| c["step_number"].as_u64())
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{what} after {:.1?}", started.elapsed());
}

#[test]
fn three_replicas_share_jobs_variants_and_the_adapter_registry() {
    let started = Instant::now();
    let s3 = common::s3_env();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let cluster = Cluster {
        db: common::pg_database("scaleout"),
        objects: format!(
            "s3://{}/scaleout-{nanos}",
            common::env_var(&s3, "ITAMAE_TEST_S3_BUCKET")
        ),
        s3,
    };
    let root = TempDir::new("e2e-scaleout");
    let dirs: Vec<_> = ["a", "b", "c"].map(|n| root.path().join(n)).into();
    // Started together: they migrate the empty database at the same time.
    let mut replicas: Vec<Option<Daemon>> = ["a", "b", "c"]
        .iter()
        .zip(&dirs)
        .map(|(n, dir)| Some(cluster.start(dir, &format!("replica-{n}"), "itamaed.log")))
        .collect();
    for d in replicas.iter_mut().flatten() {
        d.wait_ready();
    }

    // ---- a job created on A, its owner killed after the first checkpoint ----
    let a = replicas[0].as_ref().unwrap();
    let data = std::fs::read(Path::new(common::WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("test data");
    let (ctype, body) = common::multipart(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some("persona_train.jsonl"), &data),
    ]);
    let (s, f) = send(
        a.http
            .post(a.url("/v1/files"))
            .header("content-type", ctype)
            .body(body)
            .send(),
        "upload",
    );
    assert_eq!(s, 200, "{f}");
    let file = f["id"].as_str().expect("file id").to_string();
    let base = models(a)[0].clone();
    let (s, j) = post(
        a,
        "/v1/fine_tuning/jobs",
        &json!({
            "model": base, "training_file": file, "suffix": "scale", "seed": 7,
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": {"max_steps": STEPS, "batch_size": 2, "max_seq_len": 48,
                                    "checkpoint_every": 2},
                "adapter": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}}}
        }),
    );
    assert_eq!(s, 200, "{j}");
    let job = j["id"].as_str().expect("job id").to_string();
    let mut owner = None;
    wait_until("the job trains somewhere", Duration::from_secs(300), || {
        owner = replicas
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| step_metric(d, &job) >= 1.0));
        owner.is_some()
    });
    let owner = owner.unwrap();
    {
        let o = replicas[owner].as_ref().unwrap();
        wait_until("its first checkpoint", Duration::from_secs(300), || {
            !checkpoints(o, &job).is_empty()
        });
    }
    let first_checkpoint = *checkpoints(replicas[owner].as_ref().unwrap(), &job)
        .iter()
        .min()
        .unwrap();
    let killed = Instant::now();
    replicas[owner].take().unwrap().kill9();
    eprintln!("killed replica {owner} after checkpoint step {first_checkpoint}");
    let live: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let mut taker = None;
    wait_until(
        "another replica takes the job over",
        Duration::from_secs(120),
        || {
            taker = live
                .iter()
                .copied()
                .find(|&i| step_metric(replicas[i].as_ref().unwrap(), &job) >= 1.0);
            taker.is_some()
        },
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "taken over before the {LEASE_SECS} s lease could expire"
    );
    let ti = taker.unwrap();
    let t = replicas[ti].as_ref().unwrap();
    wait_until("the job ends", Duration::from_secs(600), || {
        matches!(
            status(t, &job).as_str(),
            "succeeded" | "failed" | "cancelled"
        )
    });
    let j = get_ok(t, &format!("/v1/fine_tuning/jobs/{job}"));
    assert_eq!(j["status"], "succeeded", "{j}");
    let tuned = j["fine_tuned_model"]
        .as_str()
        .expect("fine_tuned_model")
        .to_string();

    // The variant answers on the survivors and on the killed replica restarted.
    replicas[owner] = Some(cluster.start(
        &dirs[owner],
        &format!("replica-{owner}-restarted"),
        "restarted.log",
    ));
    replicas[owner].as_mut().unwrap().wait_ready();
    let t = replicas[ti].as_ref().unwrap();
    let answers: Vec<String> = all(&replicas).iter().map(|d| answer(d, &tuned)).collect();
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "one variant, one greedy answer: {answers:?}"
    );

    // ---- nothing lost ----
    let evs = get_ok(t, &format!("/v1/fine_tuning/jobs/{job}/events?limit=1000"))["data"]
        .as_array()
        .expect("events")
        .clone();
    let mut per_step: BTreeMap<u64, usize> = BTreeMap::new();
    for e in evs.iter().filter(|e| e["type"] == "metrics") {
        if let Some(s) = e["data"]["step"].as_u64() {
            *per_step.entry(s).or_default() += 1;
        }
    }
    let msgs: Vec<&str> = evs.iter().filter_map(|e| e["message"].as_str()).collect();
    assert_eq!(
        per_step.keys().copied().collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "{msgs:?}"
    );
    for (step, n) in &per_step {
        // Up to the checkpoint it resumed from, once; after it, once per run that reached it.
        let most = if *step <= first_checkpoint { 1 } else { 2 };
        assert!(*n <= most, "step {step}: {n} metrics events; {msgs:?}");
    }
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Resumed from checkpoint step ")),
        "{msgs:?}"
    );
    let steps = checkpoints(t, &job);
    assert!(steps.contains(&first_checkpoint), "{steps:?}");
    for d in all(&replicas) {
        assert_eq!(checkpoints(d, &job), steps);
        let res = d
            .http
            .get(d.url(&format!("/v1/files/{file}/content")))
            .send()
            .expect("file content");
        assert_eq!(res.status().as_u16(), 200);
        assert!(
            res.bytes().expect("bytes").as_ref() == data.as_slice(),
            "the uploaded bytes differ on a replica"
        );
    }

    // ---- the adapter registry: compare-and-set in the database ----
    let (b, c) = (replicas[1].as_ref().unwrap(), replicas[2].as_ref().unwrap());
    let pirate = build_prompt(
        root.path(),
        "pirate",
        "You are a pirate captain. Always talk like a pirate and say arr!",
    );
    let french = build_prompt(
        root.path(),
        "french",
        "Tu es un chef français. Réponds toujours en français, en une phrase.",
    );
    let (s, v) = import(b, "persona", &pirate, "0");
    assert_eq!((s, v["generation"].as_u64()), (201, Some(1)), "{v}");
    let on_b = answer(b, "persona");
    // C sees generation 1 in the database: "must not exist" is stale there.
    let (s, v) = import(c, "persona", &french, "0");
    assert_eq!(s, 409, "{v}");
    let (s, v) = import(c, "persona", &french, "1");
    assert_eq!((s, v["generation"].as_u64()), (200, Some(2)), "{v}");
    for d in all(&replicas) {
        let (s, v) = import(d, "persona", &pirate, "1");
        assert_eq!(s, 409, "a stale generation must be refused everywhere: {v}");
        assert_eq!(get_ok(d, "/v1/adapters/persona")["generation"], 2);
    }
    // B served generation 1: the announcement makes it drop it; its next request loads 2.
    wait_until("B drops the replaced generation", PROPAGATION, || {
        !models(b).contains(&"persona".to_string())
    });
    let on_c = answer(c, "persona");
    assert_ne!(on_b, on_c, "the two generations should answer differently");
    for d in all(&replicas) {
        assert_eq!(answer(d, "persona"), on_c, "an old generation was served");
    }

    // An import of generation 3 dies after its upload, before its commit: every replica still
    // serves generation 2's bytes, the registry's, and none the upload left behind.
    common::crashed_import(&cluster.s3, &cluster.objects, root.path(), "persona", 3);
    for d in all(&replicas) {
        let res = d
            .http
            .get(d.url("/v1/adapters/persona/files/adapter_model.safetensors"))
            .send()
            .expect("adapter file");
        assert_eq!(res.status().as_u16(), 200);
        assert!(
            res.bytes().expect("bytes").as_ref() == french.weights.as_slice(),
            "a replica serves bytes of an uncommitted generation"
        );
        assert_eq!(get_ok(d, "/v1/adapters/persona")["generation"], 2);
        assert_eq!(answer(d, "persona"), on_c);
    }

    // ---- a delete on C: 404 everywhere ----
    let (s, v) = send(
        c.http.delete(c.url("/v1/adapters/persona")).send(),
        "delete adapter",
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = send(
        c.http.delete(c.url(&format!("/v1/models/{tuned}"))).send(),
        "delete model",
    );
    assert_eq!(s, 200, "{v}");
    for d in all(&replicas) {
        wait_until("the deletes reach a replica", PROPAGATION, || {
            let m = models(d);
            !m.contains(&"persona".to_string()) && !m.contains(&tuned)
        });
        assert_eq!(get(d, "/v1/adapters/persona").0, 404);
        assert_eq!(get(d, &format!("/v1/adapters/{tuned}")).0, 404);
        assert_eq!(get(d, &format!("/v1/models/{tuned}")).0, 404);
        assert_eq!(chat(d, "persona").0, 404);
        assert_eq!(chat(d, &tuned).0, 404);
        // A deleted name starts again from "must not exist", numbered on.
    }
    {
        // Every generation went with the name, the dead import's upload too.
        use itamae::jobs::backend::BlobStore;
        let check = root.path().join("check-replica");
        let (blob, rt) = common::replica_blob(&cluster.s3, &cluster.objects, &check);
        for g in 1..=3 {
            assert_eq!(blob.materialise_adapter("persona", g).expect("store"), None);
        }
        drop(blob);
        rt.shutdown_background();
    }
    let (s, v) = import(a_of(&replicas), "persona", &pirate, "0");
    assert_eq!((s, v["generation"].as_u64()), (201, Some(3)), "{v}");
    eprintln!(
        "three replicas: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

fn all(replicas: &[Option<Daemon>]) -> Vec<&Daemon> {
    replicas
        .iter()
        .map(|d| d.as_ref().expect("a running replica"))
        .collect()
}

fn a_of(replicas: &[Option<Daemon>]) -> &Daemon {
    replicas[0].as_ref().expect("replica A")
}
