//! End to end: the real `itamae` binary against a real `itamaed serve` on the test model
//! (SmolLM2-135M GGUF): upload a dataset, train a tiny LoRA job and watch it to success, chat
//! with the variant, list/export/import adapters, `--json` output, and bad input giving a
//! non-zero exit with the server's message.
//!
//! `itamaed` is taken from `ITAMAE_DAEMON_BIN`, else from beside the `itamae` binary in the same
//! target profile dir (`cargo test --workspace` builds it for the daemon's own end-to-end tests).
//! The model is `ITAMAE_TEST_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn daemon_bin() -> PathBuf {
    let path = match std::env::var_os("ITAMAE_DAEMON_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_BIN_EXE_itamae")).with_file_name("itamaed"),
    };
    assert!(
        path.is_file(),
        "{} is missing: build it (cargo build -p itamae-daemon, in the same profile) or set \
         ITAMAE_DAEMON_BIN",
        path.display()
    );
    path
}

fn model_path() -> PathBuf {
    let path = match std::env::var_os("ITAMAE_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => Path::new(WORKSPACE).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.is_file(),
        "test model {} is missing: run scripts/fetch-model.sh (or set ITAMAE_TEST_MODEL)",
        path.display()
    );
    path
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("itamae-cli-e2e-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the temporary dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `itamaed`, killed on drop (with its log's tail shown if the test failed).
struct Daemon {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Daemon {
    /// Starts `itamaed` on `<dir>/data` with `api_keys` as `ITAMAE_API_KEYS` (none: open).
    fn start(dir: &Path, api_keys: Option<&str>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("itamaed.log");
        let out = File::create(&log).expect("create the daemon log");
        let err = out.try_clone().expect("clone the log handle");
        let mut cmd = Command::new(daemon_bin());
        match api_keys {
            Some(k) => cmd.env("ITAMAE_API_KEYS", k),
            None => cmd.env_remove("ITAMAE_API_KEYS"),
        };
        let child = cmd
            .arg("serve")
            .arg("--model")
            .arg(model_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env_remove("ITAMAE_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start itamaed");
        let mut d = Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        d.wait_ready();
        d
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn wait_ready(&mut self) {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("itamaed exited early ({status}); log:\n{}", self.log_tail());
            }
            if let Ok(res) = http.get(format!("{}/readyz", self.url)).send() {
                if res.status() == 200 {
                    return;
                }
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "itamaed not ready after {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn itamae(&self, args: &[&str]) -> Run {
        itamae(&self.url, args, None)
    }

    /// Runs it and expects success.
    fn ok(&self, args: &[&str]) -> Run {
        let r = self.itamae(args);
        assert_eq!(r.code, 0, "itamae {args:?} failed: {r:?}");
        r
    }

    /// Runs it with `--json` and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ok(&a);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("itamae {a:?}: stdout is not JSON ({e}): {r:?}"))
    }

    /// Runs it, expects the exit code `code`, and `stderr_has` in its error output.
    fn fails(&self, args: &[&str], code: i32, stderr_has: &str) -> Run {
        let r = self.itamae(args);
        assert_eq!(r.code, code, "itamae {args:?}: {r:?}");
        assert!(
            r.stderr.contains(stderr_has),
            "itamae {args:?}: stderr lacks {stderr_has:?}: {r:?}"
        );
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- itamaed log (tail) ---\n{}", self.log_tail());
        }
    }
}

/// Runs `itamae ARGS` against the daemon at `url`, with `api_key` as `ITAMAE_API_KEY`.
fn itamae(url: &str, args: &[&str], api_key: Option<&str>) -> Run {
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_itamae"));
    match api_key {
        Some(k) => cmd.env("ITAMAE_API_KEY", k),
        None => cmd.env_remove("ITAMAE_API_KEY"),
    };
    let out = cmd
        .args(args)
        .env("ITAMAE_URL", url)
        .stdin(Stdio::null())
        .output()
        .expect("run itamae");
    eprintln!("itamae {} ({:.1?})", args.join(" "), started.elapsed());
    Run::from(out)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn cli_drives_a_real_daemon() {
    let dir = TempDir::new();
    let d = Daemon::start(&dir.0, None);
    let train = Path::new(WORKSPACE).join("tests/data/persona_train.jsonl");
    let train = train.to_str().expect("a UTF-8 path");

    // ---- models, files ----
    let models = d.json(&["models"]);
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();
    let file_id = d.ok(&["files", "upload", train]).stdout.trim().to_string();
    assert!(file_id.starts_with("file-"), "{file_id}");
    assert!(ids(&d.json(&["files", "ls"])).contains(&file_id));
    let f = d.json(&["files", "show", &file_id]);
    assert_eq!(f["filename"], "persona_train.jsonl");
    assert_eq!(
        f["bytes"].as_u64(),
        std::fs::metadata(train).ok().map(|m| m.len())
    );

    let copy = dir.0.join("copy.jsonl");
    d.ok(&[
        "files",
        "download",
        &file_id,
        "-o",
        copy.to_str().expect("path"),
    ]);
    assert_eq!(
        std::fs::read(&copy).expect("downloaded"),
        std::fs::read(train).expect("original")
    );

    // ---- a reader that goes away stops the generation (`itamae chat … | head -c 1`) ----
    {
        use std::io::Read;
        let mut child = Command::new(env!("CARGO_BIN_EXE_itamae"))
            .args(["chat", "-p", "Tell me a very long story about the sea."])
            .args(["--max-tokens", "4000", "--temperature", "1"])
            .env("ITAMAE_URL", &d.url)
            .env_remove("ITAMAE_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run itamae chat");
        let mut first = [0u8; 1];
        let mut out = child.stdout.take().expect("stdout");
        out.read_exact(&mut first).expect("the answer starts");
        drop(out);
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "itamae kept reading after its reader went away"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "a closed pipe is a quiet stop: {status:?}"
        );
        // and the server dropped the sequence instead of generating 4000 tokens for nobody
        let cancelled = loop {
            let m = reqwest::blocking::get(format!("{}/metrics", d.url))
                .and_then(|r| r.text())
                .expect("metrics");
            let n: f64 = m
                .lines()
                .filter(|l| l.starts_with("itamae_requests_cancelled_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if n >= 1.0 || started.elapsed() > Duration::from_secs(60) {
                break n;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(cancelled >= 1.0, "the server did not cancel the stream");
    }

    // ---- bad input: non-zero exit, the server's (or the client's) message ----
    d.fails(
        &["files", "upload", "/no/such/data.jsonl"],
        1,
        "/no/such/data.jsonl",
    );
    d.fails(
        &["jobs", "show", "ftjob-000000000000000000000000"],
        1,
        "No fine-tuning job with id `ftjob-000000000000000000000000`",
    );
    d.fails(
        &[
            "jobs",
            "create",
            "--file-id",
            "file-000000000000000000000000",
        ],
        1,
        "The file `file-000000000000000000000000` does not exist",
    );
    d.fails(
        &[
            "jobs",
            "create",
            "--file-id",
            &file_id,
            "--suffix",
            "no spaces",
        ],
        1,
        "suffix may only contain letters, digits",
    );
    d.fails(
        &["jobs", "create", "--file-id", &file_id, "--r", "0"],
        1,
        "method.supervised.adapter.r",
    );
    d.fails(
        &[
            "jobs",
            "create",
            "--file-id",
            &file_id,
            "--method",
            "prompt_tuning",
            "--r",
            "8",
        ],
        1,
        "--r applies to --method lora",
    );
    d.fails(&["jobs", "create"], 2, "--file");
    d.fails(
        &[
            "chat",
            "-m",
            "no-such-model",
            "-p",
            "hi",
            "--max-tokens",
            "4",
        ],
        1,
        "no-such-model",
    );
    d.fails(&["adapters", "show", "nothing-here"], 1, "No such adapter");
    // Nothing listens on the discard port.
    let nowhere = itamae("http://127.0.0.1:9", &["models"], None);
    assert_eq!(nowhere.code, 1, "{nowhere:?}");
    assert!(
        nowhere.stderr.contains("could not reach the server"),
        "{nowhere:?}"
    );

    // ---- a job whose data is bad fails at validation: watch exits 3 with the reason ----
    let bad = dir.0.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\nnot json\n",
    )
    .expect("write bad.jsonl");
    let r = d.fails(
        &[
            "jobs",
            "create",
            "--file",
            bad.to_str().expect("path"),
            "--max-steps",
            "1",
            "--watch",
        ],
        3,
        "line 2",
    );
    assert!(r.stdout.is_empty(), "no model name for a failed job: {r:?}");

    // ---- a cancelled job: watch exits 4 ----
    let job = d.json(&[
        "jobs",
        "create",
        "--file-id",
        &file_id,
        "--max-steps",
        "500",
        "--max-seq-len",
        "64",
    ]);
    let cancel_id = job["id"].as_str().expect("job id").to_string();
    let c = d.json(&["jobs", "cancel", &cancel_id]);
    assert_eq!(c["status"], "cancelled");
    d.fails(&["jobs", "watch", &cancel_id], 4, "cancelled");

    // ---- a tiny LoRA job, watched to success ----
    let job = d.json(&[
        "jobs",
        "create",
        "--file-id",
        &file_id,
        "--suffix",
        "cli",
        "--r",
        "4",
        "--alpha",
        "8",
        "--target-modules",
        "q_proj,v_proj",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-seq-len",
        "64",
        "--seed",
        "7",
        "--metadata",
        "from=cli",
    ]);
    let job_id = job["id"].as_str().expect("job id").to_string();
    let adapter = &job["method"]["supervised"]["adapter"];
    assert_eq!(adapter["type"], "lora");
    assert_eq!(adapter["r"], 4);
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(job["hyperparameters"]["max_steps"], 2);
    assert_eq!(job["seed"], 7);
    assert_eq!(job["metadata"]["from"], "cli");
    let watched = d.ok(&["jobs", "watch", &job_id]);
    let variant = watched.stdout.trim().to_string();
    assert!(
        variant.starts_with(&format!("ft:{base}:")) && variant.ends_with(&job_id),
        "{watched:?}"
    );
    // Without a terminal, progress goes to stderr one line per step.
    assert!(watched.stderr.contains("step 2/2 loss "), "{watched:?}");
    assert!(watched.stderr.contains("succeeded"), "{watched:?}");
    let shown = d.json(&["jobs", "show", &job_id]);
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["fine_tuned_model"], variant.as_str());
    let events = d.json(&["jobs", "events", &job_id]);
    assert!(
        events["data"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["type"] == "metrics")),
        "{events}"
    );
    assert!(ids(&d.json(&["jobs", "ls", "--all"])).contains(&job_id));
    let cks = d.json(&["jobs", "checkpoints", &job_id]);
    let cks = cks["data"].as_array().expect("checkpoints");
    assert!(!cks.is_empty());
    for c in cks {
        let name = c["fine_tuned_model_checkpoint"].as_str().unwrap_or("");
        assert!(name.starts_with(&format!("{variant}:ckpt-step-")), "{c}");
    }
    // The live stream of a finished job: every event as a JSON line, then it ends.
    let followed = d.ok(&["jobs", "events", &job_id, "--follow", "--json"]);
    let lines: Vec<Value> = followed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON event per line"))
        .collect();
    assert_eq!(
        lines.first().map(|e| e["message"].clone()),
        Some(Value::from(format!("Created fine-tuning job: {job_id}")))
    );
    assert_eq!(
        lines.last().map(|e| e["message"].clone()),
        Some(Value::from("The job has successfully completed"))
    );

    // ---- the variant is served ----
    assert!(d.ok(&["models"]).stdout.contains(&variant));
    let answer = d.ok(&[
        "chat",
        "-m",
        &variant,
        "-p",
        "Who are you?",
        "--max-tokens",
        "8",
    ]);
    assert!(!answer.stdout.trim().is_empty(), "{answer:?}");
    let c = d.json(&[
        "chat",
        "-m",
        &variant,
        "-p",
        "Who are you?",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert_eq!(c["model"], variant.as_str());
    let n = c["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=8).contains(&n), "{c}");

    // ---- adapters: list, unload/load, export, import under a new name, remove ----
    let list = d.json(&["adapters", "ls"]);
    assert!(ids(&list).contains(&variant), "{list}");
    assert_eq!(d.json(&["adapters", "unload", &variant])["resident"], false);
    // Its checkpoints, whose names extend the variant's, stay served.
    assert!(!ids(&d.json(&["models"])).contains(&variant));
    d.fails(
        &["chat", "-m", &variant, "-p", "Hi", "--max-tokens", "4"],
        1,
        &variant,
    );
    assert_eq!(d.json(&["adapters", "load", &variant])["resident"], true);
    assert!(ids(&d.json(&["models"])).contains(&variant));
    let export = dir.0.join("export");
    let export_s = export.to_str().expect("path");
    d.ok(&["adapters", "export", &variant, export_s]);
    let config: Value = serde_json::from_slice(
        &std::fs::read(export.join("adapter_config.json")).expect("exported config"),
    )
    .expect("config is JSON");
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert!(std::fs::metadata(export.join("adapter_model.safetensors")).is_ok_and(|m| m.len() > 0));
    let imported = d.json(&["adapters", "import", export_s, "--name", "cli-copy"]);
    assert_eq!(imported["resident"], true);
    assert!(d.ok(&["models"]).stdout.contains("cli-copy"));
    d.ok(&["chat", "-m", "cli-copy", "-p", "Hi", "--max-tokens", "4"]);
    d.fails(
        &[
            "adapters",
            "import",
            export_s,
            "--name",
            "cli-copy",
            "--if-generation",
            "0",
        ],
        1,
        "generation",
    );
    d.ok(&["adapters", "rm", "cli-copy"]);
    assert!(!ids(&d.json(&["models"])).contains(&"cli-copy".to_string()));
    d.fails(
        &["adapters", "import", dir.0.to_str().expect("path")],
        1,
        "adapter_config.json is missing",
    );

    // ---- completions ----
    let bash = d.ok(&["completions", "bash"]);
    assert!(bash.stdout.contains("itamae") && bash.stdout.contains("watch"));

    // ---- API keys: from ITAMAE_API_KEY or --api-key; the tuned variant outlives a restart ----
    drop(d);
    let key = "cli-e2e-admin-key-0123456789";
    let d = Daemon::start(&dir.0, Some(&format!("admin:{key}")));
    let r = d.fails(&["models"], 1, "You didn't provide an API key");
    assert!(r.stdout.is_empty(), "{r:?}");
    let r = itamae(&d.url, &["models"], Some("wrong-key-wrong-key-wrong"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("Incorrect API key"), "{r:?}");
    let r = itamae(&d.url, &["models"], Some(key));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&variant), "{r:?}");
    d.ok(&["--api-key", key, "jobs", "show", &job_id]);
}
