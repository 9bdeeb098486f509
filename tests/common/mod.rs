//! Shared by the `e2e_*` tests: the test model, a temporary directory and a running `itamaed`.
//!
//! Each test crate compiles this module on its own, so items one of them does not use carry
//! `#[allow(dead_code)]`.
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::blocking::Client;

#[allow(dead_code)]
pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The GGUF the tests run on: `ITAMAE_TEST_MODEL`, or the SmolLM2 one under `models/`.
pub fn model_path() -> PathBuf {
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

/// The test model, loaded in this process (tests that need no daemon).
#[allow(dead_code)]
pub fn load_model() -> itamae::model::LoadedModel {
    let path = model_path();
    itamae::model::load(
        &path,
        &candle_core::Device::Cpu,
        itamae::model::WeightsMode::default(),
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// For each example of a chat JSONL file, the contents of its messages with `role`.
#[allow(dead_code)]
pub fn role_contents(path: &Path, role: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter(|m| m["role"] == role)
                .map(|m| m["content"].as_str().expect("content").to_string())
                .collect()
        })
        .collect()
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A temporary directory `itamae-{tag}-{pid}-{nanos}`, created now and removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("itamae-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the temporary dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `itamaed serve` on `<dir>/data`, logging to `<dir>/<log_name>`; killed (SIGKILL)
/// on drop, with the log's tail printed if the test is panicking. The directory is not its own.
pub struct Daemon {
    child: Child,
    base: String,
    log: PathBuf,
    pub http: Client,
}

impl Daemon {
    /// Starts the daemon (without waiting for it to be ready) with `args` after the standard
    /// ones, and `envs` set (`Some`) or removed (`None`); `http` times out after `http_timeout`.
    pub fn start(
        dir: &Path,
        log_name: &str,
        args: &[&str],
        envs: &[(&str, Option<&str>)],
        http_timeout: Duration,
    ) -> Self {
        let model = model_path();
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).expect("create the temporary data dir");
        let log = dir.join(log_name);
        let log_file = File::create(&log).expect("create the daemon log");
        let log_err = log_file.try_clone().expect("clone the log handle");
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_itamaed"));
        cmd.arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args);
        for (key, value) in envs {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .expect("start itamaed");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            http: Client::builder()
                .timeout(http_timeout)
                .build()
                .expect("http client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls `/readyz` (which needs no key) until it answers 200; panics if the daemon exits or
    /// is not ready within `READY_TIMEOUT`.
    pub fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("itamaed exited early ({status}); log:\n{}", self.log_tail());
            }
            if let Ok(res) = self.http.get(self.url("/readyz")).send() {
                if res.status() == 200 {
                    eprintln!("itamaed ready after {:.1?}", started.elapsed());
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

    /// The value of one series in `GET /metrics` (e.g. `itamae_num_requests_running` or
    /// `itamae_adapter_loads_total{model="x"}`); 0 when absent, as Prometheus reads it.
    #[allow(dead_code)]
    pub fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("GET /metrics");
        let parsed = itamae::metrics::parse_text(&text).expect("/metrics parses");
        parsed
            .iter()
            .find(|(s, _)| s == series)
            .map_or(0.0, |(_, v)| *v)
    }

    /// Polls `metric(series)` until `ok` holds; panics with the last value after `timeout`.
    /// Returns how long it took.
    #[allow(dead_code)]
    pub fn wait_metric(
        &self,
        series: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let v = self.metric(series);
            if ok(v) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{series} is still {v} after {timeout:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` for raw TCP clients.
    #[allow(dead_code)]
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Sends SIGTERM (an orderly shutdown request).
    #[allow(dead_code)]
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not send SIGTERM to itamaed");
    }

    /// Waits for the process to exit; panics after `timeout`. Returns the exit status and how
    /// long the wait took.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < timeout,
                "itamaed still running {timeout:?} after the signal; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up, as after a crash.
    #[allow(dead_code)]
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// A multipart/form-data body built by hand: `(field, file name, bytes)`.
#[allow(dead_code)]
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "itamae-e2e-boundary-51c2";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        let disp = match filename {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[allow(dead_code)]
pub struct PeftFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

impl PeftFiles {
    /// The multipart body of `POST /v1/adapters` importing these files as `name` (a
    /// compare-and-set on `if_generation` when given): content type and bytes.
    #[allow(dead_code)]
    pub fn import_body(&self, name: &str, if_generation: Option<&str>) -> (String, Vec<u8>) {
        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![
            ("name", None, name.as_bytes()),
            (
                "adapter_config.json",
                Some("adapter_config.json"),
                &self.config,
            ),
            (
                "adapter_model.safetensors",
                Some("adapter_model.safetensors"),
                &self.weights,
            ),
        ];
        if let Some(g) = if_generation {
            parts.push(("if_generation", None, g.as_bytes()));
        }
        multipart(&parts)
    }
}

/// A fresh LoRA (r = 4 on q and v) for the test model, as PEFT files.
#[allow(dead_code)]
pub fn build_lora(dir: &Path) -> PeftFiles {
    use itamae::adapters::{Adapter, Lora, LoraConfig};
    let device = candle_core::Device::Cpu;
    let loaded = itamae::model::load(
        &model_path(),
        &device,
        itamae::model::WeightsMode::default(),
    )
    .expect("load the test model");
    let cfg = loaded.model.cfg.clone();
    let lora_cfg = LoraConfig {
        r: Some(4),
        alpha: Some(8.0),
        target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
        ..Default::default()
    };
    let lora = Lora::init(&cfg, lora_cfg, 7, &device).expect("init LoRA");
    peft_files(&dir.join("lora"), &Adapter::Lora(lora), &loaded)
}

/// A prompt-tuning adapter whose soft prompt is the embedding of `text` (so two texts give two
/// adapters that answer differently), as PEFT files.
#[allow(dead_code)]
pub fn build_prompt(dir: &Path, name: &str, text: &str) -> PeftFiles {
    use itamae::adapters::{Adapter, PromptInit, PromptTuningConfig, SoftPrompt};
    let loaded = itamae::model::load(
        &model_path(),
        &candle_core::Device::Cpu,
        itamae::model::WeightsMode::default(),
    )
    .expect("load the test model");
    let ids = loaded
        .text
        .tokenizer
        .encode(text, false)
        .expect("tokenize")
        .get_ids()
        .to_vec();
    let config = PromptTuningConfig {
        num_virtual_tokens: Some(ids.len()),
        init: Some(PromptInit::Text),
        init_text: Some(text.to_string()),
    };
    let p = SoftPrompt::init(&loaded.model, config, &ids, 7).expect("init the soft prompt");
    peft_files(&dir.join(name), &Adapter::Prompt(p), &loaded)
}

fn peft_files(
    out: &Path,
    adapter: &itamae::adapters::Adapter,
    loaded: &itamae::model::LoadedModel,
) -> PeftFiles {
    use itamae::adapters::peft;
    peft::save(out, adapter, &loaded.model.cfg, &loaded.name).expect("save PEFT");
    PeftFiles {
        config: std::fs::read(out.join(peft::CONFIG_FILE)).expect("config"),
        weights: std::fs::read(out.join(peft::WEIGHTS_FILE)).expect("weights"),
    }
}

/// A fresh PostgreSQL database `itamae_{tag}_{pid}` on `ITAMAE_TEST_PG_URL`, else on a throwaway
/// cluster started for this test binary through `scripts/services/postgres.sh` (stopped when the
/// binary exits); returns its URL.
#[allow(dead_code)]
pub fn pg_database(tag: &str) -> String {
    let server = match std::env::var("ITAMAE_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        Some(u) => u,
        None => {
            let script = Path::new(WORKSPACE).join("scripts/services/postgres.sh");
            let out = Command::new(script)
                .args(["start", "--watch-pid", &std::process::id().to_string()])
                .stderr(Stdio::inherit())
                .output()
                .expect("running scripts/services/postgres.sh");
            assert!(out.status.success(), "postgres.sh start failed");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        }
    };
    let name = format!("itamae_{tag}_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&server).await.unwrap();
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{name}\""),
            format!("CREATE DATABASE \"{name}\""),
        ] {
            sqlx::query(&sql).execute(&mut admin).await.unwrap();
        }
    });
    let base = server.split('?').next().unwrap();
    format!("{}/{name}", &base[..base.rfind('/').unwrap()])
}

/// The S3 test server's environment, `(name, value)`: `ITAMAE_TEST_S3_ENDPOINT` (with
/// `ITAMAE_TEST_S3_BUCKET` and the `AWS_*` credentials) when set, else the server `make test`
/// shares, else one started for this test binary through `scripts/services/s3.sh`.
#[allow(dead_code)]
pub fn s3_env() -> Vec<(String, String)> {
    let keys = [
        "ITAMAE_TEST_S3_ENDPOINT",
        "ITAMAE_TEST_S3_BUCKET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ];
    if std::env::var_os("ITAMAE_TEST_S3_ENDPOINT").is_some() {
        return keys
            .iter()
            .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
            .collect();
    }
    let script = Path::new(WORKSPACE).join("scripts/services/s3.sh");
    let run = |args: &[&str]| {
        Command::new(&script)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/services/s3.sh")
    };
    let mut out = run(&["env", "--shared"]);
    if !out.status.success() {
        out = run(&["start", "--owner", &std::process::id().to_string()]);
        assert!(out.status.success(), "scripts/services/s3.sh start failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One value of [`s3_env`]'s.
#[allow(dead_code)]
pub fn env_var<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} is not set"))
}

/// The environment a daemon needs to reach the S3 server of `env` (`storage.objects` itself is
/// the caller's).
#[allow(dead_code)]
pub fn s3_daemon_env(env: &[(String, String)]) -> Vec<(&'static str, Option<String>)> {
    vec![
        (
            "AWS_ENDPOINT_URL",
            Some(env_var(env, "ITAMAE_TEST_S3_ENDPOINT").to_string()),
        ),
        (
            "AWS_ACCESS_KEY_ID",
            Some(env_var(env, "AWS_ACCESS_KEY_ID").to_string()),
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            Some(env_var(env, "AWS_SECRET_ACCESS_KEY").to_string()),
        ),
        ("AWS_REGION", Some("us-east-1".into())),
        ("AWS_ALLOW_HTTP", Some("true".into())),
        ("AWS_SESSION_TOKEN", None),
    ]
}

/// The daemon's own object-store code on the bucket, caching under `cache` (another replica,
/// in this process), with the runtime it runs on.
#[allow(dead_code)]
pub fn replica_blob(
    env: &[(String, String)],
    objects: &str,
    cache: &Path,
) -> (
    itamae::jobs::object_blob::ObjectBlob,
    tokio::runtime::Runtime,
) {
    let cfg = itamae::jobs::object_blob::ObjectsConfig {
        url: objects.to_string(),
        options: [
            ("aws_endpoint", env_var(env, "ITAMAE_TEST_S3_ENDPOINT")),
            ("aws_access_key_id", env_var(env, "AWS_ACCESS_KEY_ID")),
            (
                "aws_secret_access_key",
                env_var(env, "AWS_SECRET_ACCESS_KEY"),
            ),
            ("aws_region", "us-east-1"),
            ("aws_allow_http", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let blob = itamae::jobs::object_blob::ObjectBlob::open(&cfg, cache, rt.handle().clone())
        .expect("the object store");
    (blob, rt)
}

/// What an import of generation `generation` of `name` leaves in the bucket when its replica
/// dies after uploading the files and before the database commits the generation: the upload,
/// made as the import makes it (here with files that are no adapter at all, so serving them
/// could not go unnoticed).
#[allow(dead_code)]
pub fn crashed_import(
    env: &[(String, String)],
    objects: &str,
    scratch: &Path,
    name: &str,
    generation: u64,
) {
    use itamae::jobs::backend::BlobStore;
    let (blob, rt) = replica_blob(env, objects, &scratch.join("crashed-replica"));
    let dir = blob.local_adapter_dir(name);
    std::fs::create_dir_all(&dir).expect("adapter dir");
    std::fs::write(dir.join("adapter_config.json"), b"{}").expect("config");
    std::fs::write(dir.join("adapter_model.safetensors"), b"never committed").expect("weights");
    blob.publish_adapter(name, generation).expect("the upload");
    drop(blob);
    rt.shutdown_background();
}
