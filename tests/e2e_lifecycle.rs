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

use common::{Daemon, TempDir};
use serde_json::{json, Value};

const RUNNING: &str = "itamae_num_requests_running";

fn start(dir: &Path, log: &str, args: &[&str]) -> Daemon {
    let mut d = Daemon::start(
        dir,
        log,
        args,
        &[("ITAMAE_CONFIG", None), ("ITAMAE_API_KEYS", None)],
        Duration::from_secs(600),
    );
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
