//! End to end: what happens around a request or a job rather than inside it, on `itamaed serve`
//! with the real SmolLM2 GGUF (or `ITAMAE_TEST_MODEL`):
//! - a client that disconnects mid-generation (streamed or not) frees its sequence at the next
//!   engine step instead of generating to `max_tokens`;
//! - SIGTERM: new connections are refused, running streams finish, the running job is
//!   checkpointed, the process exits 0, and the next start resumes the job from that checkpoint.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{build_prompt, Daemon, PeftFiles, TempDir};
use serde_json::{json, Value};

const RUNNING: &str = "itamae_num_requests_running";

/// Starts a daemon on `<dir>/data` with `envs` set and waits until it is ready.
fn start(dir: &Path, log: &str, envs: &[(&str, &str)]) -> Daemon {
    let mut all: Vec<(&str, Option<&str>)> =
        vec![("ITAMAE_CONFIG", None), ("ITAMAE_API_KEYS", None)];
    all.extend(envs.iter().map(|(k, v)| (*k, Some(*v))));
    let mut d = Daemon::start(dir, log, &[], &all, Duration::from_secs(600));
    d.wait_ready();
    d
}

fn base_model(d: &Daemon) -> String {
    let v: Value = d
        .http
        .get(d.url("/v1/models"))
        .send()
        .and_then(|r| r.json())
        .expect("GET /v1/models");
    v["data"][0]["id"].as_str().expect("a model id").to_string()
}

/// A chat request long enough to run for minutes unless it is cancelled.
fn long_chat(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
        "max_tokens": 4000,
        "temperature": 1.0,
        "seed": 7,
        "stream": stream,
    })
}

/// Opens a raw HTTP/1.1 connection and sends a POST; the caller reads (or not) and drops it.
fn raw_post(d: &Daemon, path: &str, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect(d.addr()).expect("connect to itamaed");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        d.addr(),
        body.len()
    )
    .expect("send the request");
    s
}

/// Reads from a streamed response until `n` SSE data frames have arrived.
fn read_frames(s: &mut TcpStream, n: usize) {
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < n {
        let k = s.read(&mut buf).expect("read the stream");
        assert!(
            k > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..k]);
    }
}

#[test]
fn disconnected_clients_are_cancelled() {
    let dir = TempDir::new("e2e-cancel");
    let d = start(dir.path(), "itamaed.log", &[]);
    let model = base_model(&d);
    let cancelled = format!("itamae_requests_cancelled_total{{model=\"{model}\"}}");

    // Streamed: read a few tokens, then hang up.
    let mut s = raw_post(&d, "/v1/chat/completions", &long_chat(&model, true));
    read_frames(&mut s, 4);
    assert_eq!(d.metric(RUNNING), 1.0, "one sequence generating");
    drop(s);
    let took = d.wait_metric(RUNNING, Duration::from_secs(10), |v| v == 0.0);
    eprintln!("streamed request dropped {took:?} after the client hung up");
    assert_eq!(d.metric(&cancelled), 1.0);

    // Not streamed: hang up while the server is still generating the whole answer.
    let s = raw_post(&d, "/v1/chat/completions", &long_chat(&model, false));
    d.wait_metric(RUNNING, Duration::from_secs(60), |v| v == 1.0);
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let took = d.wait_metric(RUNNING, Duration::from_secs(10), |v| v == 0.0);
    eprintln!("non-streamed request dropped {took:?} after the client hung up");
    assert_eq!(d.metric(&cancelled), 2.0);

    // The engine is free again: a short request is answered at once.
    let started = Instant::now();
    let res = d
        .http
        .post(d.url("/v1/chat/completions"))
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "temperature": 0}),
        )
        .send()
        .expect("short chat");
    assert_eq!(res.status(), 200);
    eprintln!("next request answered in {:?}", started.elapsed());
}

// ---- fine-tuning helpers ----

fn get_json(d: &Daemon, path: &str) -> Value {
    let res = d.http.get(d.url(path)).send().expect("GET");
    let status = res.status().as_u16();
    let v: Value = res.json().unwrap_or(Value::Null);
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

fn post_json(d: &Daemon, path: &str, body: &Value) -> Value {
    let res = d.http.post(d.url(path)).json(body).send().expect("POST");
    let status = res.status().as_u16();
    let v: Value = res.json().unwrap_or(Value::Null);
    assert_eq!(status, 200, "POST {path}: {v}");
    v
}

/// Uploads `tests/data/{name}` for fine-tuning; returns the file id.
fn upload(d: &Daemon, name: &str) -> String {
    let bytes = std::fs::read(Path::new(common::WORKSPACE).join("tests/data").join(name))
        .expect("test data");
    let (content_type, body) = common::multipart(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some(name), &bytes),
    ]);
    let res = d
        .http
        .post(d.url("/v1/files"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .expect("upload");
    let v: Value = res.json().expect("file object");
    v["id"].as_str().expect("file id").to_string()
}

/// Creates a LoRA job; returns its id.
fn create_job(d: &Daemon, base: &str, file: &str, suffix: &str, hp: Value) -> String {
    let v = post_json(
        d,
        "/v1/fine_tuning/jobs",
        &json!({
            "model": base, "training_file": file, "suffix": suffix, "seed": 7,
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": hp,
                "adapter": {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}}}
        }),
    );
    v["id"].as_str().expect("job id").to_string()
}

fn wait_job(d: &Daemon, id: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    loop {
        let j = get_json(d, &format!("/v1/fine_tuning/jobs/{id}"));
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            eprintln!("job {id} {} after {:.1?}", j["status"], started.elapsed());
            return j;
        }
        assert!(
            started.elapsed() < timeout,
            "job {id} still {} after {timeout:?}; log:\n{}",
            j["status"],
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn job_messages(d: &Daemon, id: &str) -> Vec<String> {
    get_json(d, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"))["data"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Streams a chat to its end; returns the text and whether `[DONE]` arrived.
fn stream_chat(addr: String, model: String, max_tokens: usize) -> (String, bool) {
    let (text, done, _) = timed_stream_chat(&addr, &model, max_tokens);
    (text, done)
}

/// As [`stream_chat`], plus the time to the first content chunk (TTFT as the client sees it).
fn timed_stream_chat(addr: &str, model: &str, max_tokens: usize) -> (String, bool, Duration) {
    let started = Instant::now();
    let mut ttft = None;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(
            &json!({"model": model, "stream": true, "max_tokens": max_tokens,
                      "temperature": 1.0, "seed": 1, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "Tell me a story."}]}),
        )
        .send()
        .expect("stream request");
    assert_eq!(res.status(), 200);
    let mut text = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(res)) {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let elapsed = started.elapsed();
        if data == "[DONE]" {
            return (text, true, ttft.unwrap_or(elapsed));
        }
        let v: Value = serde_json::from_str(data).expect("a chunk");
        assert!(v.get("error").is_none(), "error mid-stream: {v}");
        let delta = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !delta.is_empty() && ttft.is_none() {
            ttft = Some(elapsed);
        }
        text.push_str(delta);
    }
    (text, false, ttft.unwrap_or(started.elapsed()))
}

#[test]
fn sigterm_drains_checkpoints_and_resumes() {
    let dir = TempDir::new("e2e-sigterm");
    let mut d = start(dir.path(), "itamaed-1.log", &[]);
    let base = base_model(&d);
    let file = upload(&d, "persona_train.jsonl");
    // No periodic checkpoint before the end: the only one is the shutdown's.
    let job = create_job(
        &d,
        &base,
        &file,
        "term",
        json!({"max_steps": 10, "batch_size": 2, "max_seq_len": 64, "checkpoint_every": 100}),
    );
    let step = format!("itamae_training_step{{job_id=\"{job}\"}}");
    d.wait_metric(&step, Duration::from_secs(300), |v| v >= 2.0);

    // A stream that is running when the signal arrives must finish.
    d.wait_metric(RUNNING, Duration::from_secs(1), |v| v == 0.0);
    let stream = {
        let (addr, model) = (d.addr().to_string(), base.clone());
        std::thread::spawn(move || stream_chat(addr, model, 48))
    };
    d.wait_metric(RUNNING, Duration::from_secs(60), |v| v == 1.0);
    let signalled = Instant::now();
    d.sigterm();
    // New connections are refused while the stream drains.
    let refused = loop {
        if TcpStream::connect(d.addr()).is_err() {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still accepting connections after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (text, done) = stream.join().expect("stream thread");
    assert!(done, "the stream was cut: {text:?}\n{}", d.log_tail());
    assert!(!text.is_empty());
    let (status, took) = d.wait_exit(Duration::from_secs(180));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        d.log_tail()
    );
    eprintln!("SIGTERM: listener closed after {refused:?}, exit 0 after {took:?}");

    let mut d = start(
        dir.path(),
        "itamaed-2.log",
        &[("ITAMAE_SHUTDOWN_GRACE_SECS", "2")],
    );
    let msgs = job_messages(&d, &job);
    let ckpt = msgs
        .iter()
        .find_map(|m| {
            m.strip_prefix("Checkpoint created at step ")?
                .split_once(" for shutdown")
                .map(|(n, _)| n.to_string())
        })
        .unwrap_or_else(|| panic!("no shutdown checkpoint event: {msgs:?}"));
    let n: usize = ckpt.parse().expect("a step number");
    assert!(n >= 2, "checkpoint at step {n}");
    let j = wait_job(&d, &job, Duration::from_secs(600));
    assert_eq!(j["status"], "succeeded", "{j}");
    let msgs = job_messages(&d, &job);
    let resumed = format!("Resumed from checkpoint step {n} after restart");
    assert!(msgs.contains(&resumed), "{msgs:?}");
    let cks = get_json(&d, &format!("/v1/fine_tuning/jobs/{job}/checkpoints"));
    assert!(
        cks["data"]
            .as_array()
            .expect("checkpoints")
            .iter()
            .any(|c| c["step_number"] == n),
        "{cks}"
    );
    // The resumed run did only the remaining steps.
    let steps = msgs.iter().filter(|m| m.starts_with("Step ")).count();
    assert_eq!(steps, 10, "{msgs:?}");
    // A stream longer than the grace period is cut when it ends, and the exit is still 0.
    let stream = {
        let (addr, model) = (d.addr().to_string(), base.clone());
        std::thread::spawn(move || stream_chat(addr, model, 4000))
    };
    d.wait_metric(RUNNING, Duration::from_secs(60), |v| v == 1.0);
    d.sigterm();
    let (status, took) = d.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    let (_, done) = stream.join().expect("stream thread");
    assert!(
        !done,
        "a 4000-token stream cannot finish in a 2 s grace period"
    );
    eprintln!("SIGTERM with a 2 s grace and a long stream: exit 0 after {took:?}");
}

/// One client per model, each streaming `rounds` chats in a row; every one must succeed.
/// Returns every TTFT, sorted.
fn chat_round(d: &Daemon, models: &[String], rounds: usize) -> Vec<Duration> {
    let threads: Vec<_> = models
        .iter()
        .map(|m| {
            let (addr, m) = (d.addr().to_string(), m.clone());
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|_| {
                        let (text, done, ttft) = timed_stream_chat(&addr, &m, 24);
                        assert!(done && !text.is_empty(), "{m}: {text:?} (done: {done})");
                        ttft
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a chat thread failed"))
        .collect();
    all.sort();
    all
}

fn summary(ttfts: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = ttfts.iter().map(|d| ms(*d)).sum::<f64>() / ttfts.len().max(1) as f64;
    format!(
        "n={} p50={:.0} ms p90={:.0} ms max={:.0} ms mean={mean:.0} ms",
        ttfts.len(),
        ms(ttfts[ttfts.len() / 2]),
        ms(ttfts[ttfts.len() * 9 / 10]),
        ms(ttfts[ttfts.len() - 1]),
    )
}

#[test]
fn serving_keeps_priority_while_training() {
    let dir = TempDir::new("e2e-priority");
    let d = start(dir.path(), "itamaed.log", &[]);
    let base = base_model(&d);
    let file = upload(&d, "persona_train.jsonl");
    let small = json!({"max_steps": 2, "batch_size": 2, "max_seq_len": 64});
    let mut models = vec![base.clone()];
    for suffix in ["one", "two"] {
        let id = create_job(&d, &base, &file, suffix, small.clone());
        let j = wait_job(&d, &id, Duration::from_secs(600));
        assert_eq!(j["status"], "succeeded", "{j}");
        models.push(j["fine_tuned_model"].as_str().expect("model").to_string());
    }

    let idle = chat_round(&d, &models, 4);

    let job = create_job(
        &d,
        &base,
        &file,
        "busy",
        json!({"max_steps": 12, "batch_size": 4, "max_seq_len": 128}),
    );
    let step = format!("itamae_training_step{{job_id=\"{job}\"}}");
    d.wait_metric(&step, Duration::from_secs(300), |v| v >= 1.0);
    let yield_series = format!("itamae_training_yield_seconds_total{{job_id=\"{job}\"}}");
    // Rounds until the trainer has reached a micro-batch boundary while chats ran (a step can
    // outlast a round on a loaded machine) and so yielded; the job must still be training.
    let mut training = Vec::new();
    loop {
        training.extend(chat_round(&d, &models, 2));
        if d.metric(&yield_series) > 0.0 {
            break;
        }
        let j = get_json(&d, &format!("/v1/fine_tuning/jobs/{job}"));
        assert_eq!(
            j["status"],
            "running",
            "the job ended before its trainer ever yielded to the chats; log:\n{}",
            d.log_tail()
        );
    }
    training.sort();
    let step_after = d.metric(&step);
    let yielded = d.metric(&yield_series);
    let j = wait_job(&d, &job, Duration::from_secs(900));
    assert_eq!(j["status"], "succeeded", "{j}");
    eprintln!(
        "TTFT (3 clients: base + 2 variants), idle:          {}",
        summary(&idle)
    );
    eprintln!(
        "TTFT (3 clients: base + 2 variants), while training: {}",
        summary(&training)
    );
    eprintln!(
        "trainer yielded {yielded:.1} s to serving; it was at step {step_after} of 12 when the chats ended"
    );
}

/// `POST /v1/adapters` (multipart); returns the status and the body.
fn import(d: &Daemon, name: &str, files: &PeftFiles, if_generation: Option<u64>) -> (u16, Value) {
    let generation = if_generation.map(|g| g.to_string());
    let (ctype, body) = files.import_body(name, generation.as_deref());
    let res = d
        .http
        .post(d.url("/v1/adapters"))
        .header("content-type", ctype)
        .body(body)
        .send()
        .expect("import");
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn greedy_chat(d: &Daemon, model: &str) -> String {
    let v = post_json(
        d,
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "What is your favourite food?"}]}),
    );
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn resident(d: &Daemon) -> Vec<(String, bool)> {
    let v = get_json(d, "/v1/adapters");
    v["data"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap_or("").to_string(),
                a["resident"].as_bool().expect("resident flag"),
            )
        })
        .collect()
}

#[test]
fn adapter_memory_budget() {
    let dir = TempDir::new("e2e-budget");
    let pirate = build_prompt(
        dir.path(),
        "pirate",
        "You are a pirate captain. Always talk like a pirate and say arr!",
    );
    let french = build_prompt(
        dir.path(),
        "french",
        "Tu es un chef français. Réponds toujours en français, en une phrase.",
    );
    // Room for either adapter, not both.
    let budget = pirate.weights.len().max(french.weights.len());
    let d = start(
        dir.path(),
        "itamaed.log",
        &[("ITAMAE_ADAPTERS_MAX_RESIDENT_BYTES", &budget.to_string())],
    );
    const EVICTIONS: &str = "itamae_adapter_evictions_total";
    assert_eq!(import(&d, "pirate", &pirate, None).0, 201);
    assert_eq!(import(&d, "french", &french, None).0, 201);
    assert_eq!(d.metric(EVICTIONS), 1.0);
    assert_eq!(
        resident(&d),
        vec![("french".to_string(), true), ("pirate".to_string(), false)]
    );
    assert_eq!(d.metric("itamae_adapters_resident"), 1.0);

    // Alternating requests: each one reloads its adapter and evicts the other, transparently.
    let p = greedy_chat(&d, "pirate");
    let f = greedy_chat(&d, "french");
    assert_ne!(p, f, "the two adapters should answer differently");
    for _ in 0..2 {
        assert_eq!(greedy_chat(&d, "pirate"), p);
        assert_eq!(greedy_chat(&d, "french"), f);
    }
    // One at the second import, then one per switch (made by the engine thread right after
    // the previous request's sequence ends, if that is after the next request's load).
    d.wait_metric(EVICTIONS, Duration::from_secs(5), |v| v == 7.0);
    let evictions = d.metric(EVICTIONS);
    // One load at import, then one per switch back.
    assert_eq!(
        d.metric("itamae_adapter_loads_total{model=\"pirate\"}"),
        4.0
    );
    eprintln!(
        "budget {budget} B: 6 alternating chats, {evictions} evictions, {} loads timed",
        d.metric("itamae_adapter_load_seconds_count")
    );

    // An adapter a running sequence uses is never evicted: loading the other one goes over
    // the budget instead, and the other one is evicted once its own request is done.
    let stream = {
        let addr = d.addr().to_string();
        std::thread::spawn(move || stream_chat(addr, "pirate".into(), 4000))
    };
    d.wait_metric(RUNNING, Duration::from_secs(60), |v| v == 1.0);
    assert_eq!(greedy_chat(&d, "french"), f);
    // French made room for the stream's pirate (+1), then went once its request ended (+1).
    d.wait_metric(EVICTIONS, Duration::from_secs(5), |v| v == evictions + 2.0);
    assert_eq!(
        resident(&d),
        vec![("french".to_string(), false), ("pirate".to_string(), true)]
    );
    drop(stream); // detached: it runs until the daemon is killed

    // Replaced while evicted: the new generation is served, nothing of the old one.
    d.wait_metric(RUNNING, Duration::from_secs(1), |v| v == 1.0);
    let (s, v) = import(&d, "french", &pirate, Some(1));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2);
    assert_eq!(greedy_chat(&d, "french"), p);
}
