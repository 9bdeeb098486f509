//! End to end: API keys and scopes, `/metrics`, and the adapters endpoints, on `itamaed serve`
//! with the real SmolLM2 GGUF (or `ITAMAE_TEST_MODEL`).
//!
//! One daemon, started with an admin and an inference key through `ITAMAE_API_KEYS`, serves
//! every check in sequence. The LoRA adapter imported over HTTP is built here with the `itamae`
//! library (fresh LoRA, PEFT files) rather than trained, which would take minutes. After every
//! bad input the daemon must still answer.
mod common;

use std::path::Path;
use std::time::Duration;

use common::{build_lora, multipart, Daemon, PeftFiles, TempDir};
use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};

const ADMIN: &str = "e2e-admin-key-0123456789abcdef";
const INFER: &str = "e2e-infer-key-0123456789abcdef";
/// The daemon's upload limit in this test (the adapter built here is ~0.9 MB).
const MAX_UPLOAD: usize = 1_500_000;

/// Starts the daemon with an admin and an inference key and the test's upload limit, and no
/// config file; not yet ready.
fn start(dir: &Path) -> Daemon {
    let keys = format!("admin:{ADMIN}, inference:{INFER}");
    let max_upload = MAX_UPLOAD.to_string();
    Daemon::start(
        dir,
        "itamaed.log",
        &[],
        &[
            ("ITAMAE_API_KEYS", Some(&keys)),
            ("ITAMAE_MAX_UPLOAD_BYTES", Some(&max_upload)),
            ("ITAMAE_CONFIG", None),
        ],
        Duration::from_secs(300),
    )
}

/// The test's own requests, on top of the shared daemon guard.
impl Daemon {
    fn req(&self, method: &str, path: &str, key: Option<&str>) -> RequestBuilder {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let b = self.http.request(m, self.url(path));
        match key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    fn send(&self, b: RequestBuilder, what: &str) -> (u16, String) {
        let res: Response = b.send().unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = res.status().as_u16();
        (status, res.text().unwrap_or_default())
    }

    fn json(&self, b: RequestBuilder, what: &str) -> (u16, Value) {
        let (s, text) = self.send(b, what);
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
        (s, v)
    }

    fn ok(&self, b: RequestBuilder, what: &str) -> Value {
        let (s, v) = self.json(b, what);
        assert!((200..300).contains(&s), "{what}: {s} {v}");
        v
    }

    /// Expects an OpenAI-shaped error with one of `statuses`; then checks the daemon still serves.
    fn err(&self, b: RequestBuilder, statuses: &[u16], what: &str) -> Value {
        let (s, v) = self.json(b, what);
        assert!(
            statuses.contains(&s),
            "{what}: got {s}, want {statuses:?}: {v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        self.alive(what);
        v
    }

    fn alive(&self, after: &str) {
        let (s, _) = self.send(self.req("GET", "/healthz", None), "healthz");
        assert_eq!(s, 200, "daemon stopped serving after {after}");
    }

    fn chat(&self, model: &str, key: &str) -> (u16, Value) {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        });
        self.json(
            self.req("POST", "/v1/chat/completions", Some(key))
                .json(&body),
            &format!("chat {model}"),
        )
    }

    fn metrics(&self) -> String {
        let (s, text) = self.send(self.req("GET", "/metrics", Some(ADMIN)), "metrics");
        assert_eq!(s, 200, "{text}");
        text
    }
}

fn import(
    d: &Daemon,
    key: &str,
    name: &str,
    files: &PeftFiles,
    if_generation: Option<&str>,
) -> RequestBuilder {
    let (ctype, body) = files.import_body(name, if_generation);
    d.req("POST", "/v1/adapters", Some(key))
        .header("content-type", ctype)
        .body(body)
}

/// Every non-comment line is `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    itamae::metrics::parse_text(text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}"))
}

#[test]
fn auth_metrics_and_adapters() {
    let dir = TempDir::new("e2e-ops");
    let mut d = start(dir.path());
    // Build the adapter while the daemon loads its model.
    let files = build_lora(dir.path());
    assert!(files.weights.len() < MAX_UPLOAD, "{}", files.weights.len());
    d.wait_ready();

    // --- Auth -------------------------------------------------------------------------------
    let v = d.err(d.req("GET", "/v1/models", None), &[401], "no key");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    d.err(
        d.req("GET", "/v1/models", Some("e2e-wrong-key-0123456789abcdef")),
        &[401],
        "wrong key",
    );
    d.err(
        d.req("GET", "/v1/models", None)
            .header("authorization", format!("Basic {ADMIN}")),
        &[401],
        "other scheme",
    );
    let models = d.ok(d.req("GET", "/v1/models", Some(INFER)), "models");
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base model id")
        .to_string();
    let v = d.err(
        d.req("GET", "/v1/files", Some(INFER)),
        &[403],
        "inference key on files",
    );
    assert_eq!(v["error"]["code"], "permission_denied");
    // The same route spelled with an escape is still the files route.
    d.err(
        d.req("GET", "/v1/%66iles", Some(INFER)),
        &[403],
        "encoded files path",
    );
    for path in ["/v1/fine_tuning/jobs", "/v1/adapters", "/metrics"] {
        d.err(d.req("GET", path, Some(INFER)), &[403], path);
        d.err(d.req("GET", path, None), &[401], path);
    }
    d.ok(d.req("GET", "/v1/files", Some(ADMIN)), "admin files");
    d.ok(d.req("GET", "/v1/models", Some(ADMIN)), "admin models");
    // Unknown routes: any valid key learns it is a 404.
    d.err(
        d.req("GET", "/v1/nope", Some(INFER)),
        &[404],
        "unknown route",
    );

    // --- Metrics ----------------------------------------------------------------------------
    let (s, v) = d.chat(&base, INFER);
    assert_eq!(s, 200, "{v}");
    let streamed = d.send(
        d.req("POST", "/v1/chat/completions", Some(INFER))
            .json(&json!({"model": base, "stream": true, "max_tokens": 4,
                          "messages": [{"role": "user", "content": "Hi"}]})),
        "streamed chat",
    );
    assert_eq!(streamed.0, 200, "{}", streamed.1);
    assert!(streamed.1.contains("[DONE]"));
    let text = d.metrics();
    let parsed = parse_metrics(&text);
    let has = |prefix: &str| parsed.iter().any(|(k, _)| k.starts_with(prefix));
    let ttft = format!("itamae_time_to_first_token_seconds_bucket{{model=\"{base}\"");
    assert!(has(&ttft), "no {ttft} in\n{text}");
    let ttft_count = parsed
        .iter()
        .find(|(k, _)| {
            *k == format!("itamae_time_to_first_token_seconds_count{{model=\"{base}\"}}")
        })
        .map(|(_, v)| *v);
    assert!(ttft_count.is_some_and(|c| c >= 2.0), "{ttft_count:?}");
    for series in [
        "itamae_http_requests_total{",
        "itamae_http_request_duration_seconds_bucket{",
        &format!("itamae_e2e_request_latency_seconds_count{{model=\"{base}\"}}"),
        &format!("itamae_prompt_tokens_total{{model=\"{base}\"}}"),
        &format!("itamae_generation_tokens_total{{model=\"{base}\"}}"),
        "itamae_training_jobs{",
        "itamae_adapters_resident",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(has(series), "no {series} in\n{text}");
    }
    // Routes are labelled by pattern, so 401/403s on /v1/files show up with their status.
    assert!(
        text.contains(r#"itamae_http_requests_total{method="GET",route="/v1/files",status="403"}"#),
        "{text}"
    );
    assert!(!text.contains("%66"), "raw paths must not become labels");

    // --- Adapters ---------------------------------------------------------------------------
    d.err(
        import(&d, INFER, "t-lora", &files, None),
        &[403],
        "import with inference key",
    );
    let v = d.ok(import(&d, ADMIN, "t-lora", &files, None), "import");
    assert_eq!(v["id"], "t-lora");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["type"], "lora");
    assert_eq!(v["resident"], true);
    assert_eq!(
        v["size_bytes"],
        (files.config.len() + files.weights.len()) as u64
    );
    let (s, v) = d.chat("t-lora", INFER);
    assert_eq!(s, 200, "chat with the adapter: {v}");
    assert_eq!(v["model"], "t-lora");
    let models = d.ok(d.req("GET", "/v1/models", Some(INFER)), "models");
    assert!(
        models["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"] == "t-lora" && m["parent"] == base)),
        "{models}"
    );
    let list = d.ok(d.req("GET", "/v1/adapters", Some(ADMIN)), "list");
    let item = list["data"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == "t-lora").cloned())
        .expect("t-lora listed");
    assert_eq!(item["generation"], 1);
    assert_eq!(item["resident"], true);

    // Compare-and-set: stale generation → 409, current → replaced.
    let v = d.err(
        import(&d, ADMIN, "t-lora", &files, Some("0")),
        &[409],
        "stale if_generation",
    );
    assert_eq!(v["error"]["param"], "if_generation");
    d.err(
        import(&d, ADMIN, "t-lora", &files, Some("7")),
        &[409],
        "future if_generation",
    );
    let v = d.ok(import(&d, ADMIN, "t-lora", &files, Some("1")), "replace");
    assert_eq!(v["generation"], 2);
    let (s, v) = d.chat("t-lora", INFER);
    assert_eq!(s, 200, "chat after replace: {v}");

    // Downloads give back the bytes as uploaded.
    let (s, body) = {
        let res = d
            .req(
                "GET",
                "/v1/adapters/t-lora/files/adapter_model.safetensors",
                Some(ADMIN),
            )
            .send()
            .expect("download");
        (res.status().as_u16(), res.bytes().expect("bytes").to_vec())
    };
    assert_eq!(s, 200);
    assert_eq!(body, files.weights);
    let (s, cfg) = d.send(
        d.req(
            "GET",
            "/v1/adapters/t-lora/files/adapter_config.json",
            Some(ADMIN),
        ),
        "download config",
    );
    assert_eq!(s, 200);
    assert_eq!(cfg.as_bytes(), files.config.as_slice());

    // Unload / load.
    let v = d.ok(
        d.req("POST", "/v1/adapters/t-lora/unload", Some(ADMIN)),
        "unload",
    );
    assert_eq!(v["resident"], false);
    let (s, v) = d.chat("t-lora", INFER);
    assert_eq!(s, 404, "chat with an unloaded adapter: {v}");
    let v = d.ok(
        d.req("POST", "/v1/adapters/t-lora/load", Some(ADMIN)),
        "load",
    );
    assert_eq!(v["resident"], true);
    assert_eq!(v["generation"], 2);
    let (s, v) = d.chat("t-lora", INFER);
    assert_eq!(s, 200, "chat after load: {v}");

    // Bad uploads.
    let bad_weights = PeftFiles {
        config: files.config.clone(),
        weights: b"not safetensors".to_vec(),
    };
    let v = d.err(
        import(&d, ADMIN, "t-bad", &bad_weights, None),
        &[400],
        "garbage weights",
    );
    assert_eq!(v["error"]["param"], "adapter_model.safetensors");
    let bad_config = PeftFiles {
        config: br#"{"peft_type": "IA3"}"#.to_vec(),
        weights: files.weights.clone(),
    };
    let v = d.err(
        import(&d, ADMIN, "t-bad", &bad_config, None),
        &[400],
        "unsupported peft type",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("IA3")),
        "{v}"
    );
    let not_json = PeftFiles {
        config: b"{".to_vec(),
        weights: files.weights.clone(),
    };
    d.err(
        import(&d, ADMIN, "t-bad", &not_json, None),
        &[400],
        "config not JSON",
    );
    let (ctype, body) = multipart(&[("name", None, b"t-bad")]);
    d.err(
        d.req("POST", "/v1/adapters", Some(ADMIN))
            .header("content-type", ctype)
            .body(body),
        &[400],
        "no files",
    );
    let big = PeftFiles {
        config: files.config.clone(),
        weights: vec![0u8; MAX_UPLOAD + 100_000],
    };
    d.err(
        import(&d, ADMIN, "t-big", &big, None),
        &[413],
        "oversized weights",
    );
    let huge =
        json!({"model": base, "messages": [{"role": "user", "content": "x".repeat(5 << 20)}]});
    d.err(
        d.req("POST", "/v1/chat/completions", Some(INFER))
            .json(&huge),
        &[413],
        "oversized JSON body",
    );

    // Names: traversal and reserved names.
    for name in [
        "../evil",
        ".hidden",
        "a/b",
        "a..b",
        "ft:base:org::x",
        base.as_str(),
    ] {
        d.err(
            import(&d, ADMIN, name, &files, None),
            &[400],
            &format!("import name {name:?}"),
        );
    }
    for path in [
        "/v1/adapters/..%2F..%2Fitamae.db",
        "/v1/adapters/.hidden",
        "/v1/adapters/a..b/files/adapter_config.json",
        "/v1/adapters/t-lora/files/..%2F..%2Fitamae.db",
        "/v1/adapters/t-lora/files/index.json",
    ] {
        d.err(d.req("GET", path, Some(ADMIN)), &[400, 404], path);
    }
    d.err(
        d.req("GET", "/v1/adapters/nope", Some(ADMIN)),
        &[404],
        "unknown adapter",
    );
    d.err(
        d.req("POST", "/v1/adapters/nope/load", Some(ADMIN)),
        &[404],
        "load unknown",
    );

    // Delete, then re-create: the generation keeps counting.
    let v = d.ok(
        d.req("DELETE", "/v1/adapters/t-lora", Some(ADMIN)),
        "delete",
    );
    assert_eq!(v["deleted"], true);
    d.err(
        d.req("GET", "/v1/adapters/t-lora", Some(ADMIN)),
        &[404],
        "deleted adapter",
    );
    let (s, _) = d.chat("t-lora", INFER);
    assert_eq!(s, 404);
    let v = d.ok(import(&d, ADMIN, "t-lora", &files, Some("0")), "re-create");
    assert_eq!(v["generation"], 3);

    let text = d.metrics();
    parse_metrics(&text);
    for series in [
        r#"itamae_adapter_loads_total{model="t-lora"}"#,
        r#"itamae_adapter_swaps_total{model="t-lora"}"#,
        "itamae_adapter_evictions_total",
        "itamae_adapter_load_seconds_count",
        "itamae_adapters_resident 1",
        r#"itamae_time_to_first_token_seconds_bucket{model="t-lora""#,
    ] {
        assert!(text.contains(series), "no {series} in\n{text}");
    }
    d.alive("the whole run");
}
