//! `openapi/openapi.yaml` against the daemon it describes, and the shipped configs.
//!
//! - The routes registered in `daemon/src/api/*.rs` (read from the sources, cross-checked against
//!   the running server) and the spec's operations are the same set.
//! - A scripted session on `itamaed serve` with the real SmolLM2 GGUF (or `ITAMAE_TEST_MODEL`):
//!   every response's status and content type must be documented for its operation, and JSON
//!   bodies (and each SSE event, where the spec names an `x-event-schema`) must validate against
//!   the documented schema, `$ref`s resolved inside the spec.
//! - Every `configs/*.toml` parses with the daemon's own loader.
//! - The `Adapter` schema and the adapter method configs (`itamae_client::methods`) agree: the
//!   same fields, the same defaults, and serialised configs validate.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{multipart, Daemon, PeftFiles, TempDir, WORKSPACE};
use reqwest::blocking::RequestBuilder;
use serde_json::{json, Value};

const ADMIN: &str = "openapi-admin-key-0123456789";
const INFER: &str = "openapi-infer-key-0123456789";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn load_spec() -> Value {
    let path = Path::new(WORKSPACE).join("openapi/openapi.yaml");
    let text = std::fs::read_to_string(&path).expect("read openapi/openapi.yaml");
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("openapi.yaml: {e}"))
}

/// A path template with every parameter written `{}`, so that actix's `{id:.+}` and the spec's
/// `{fine_tuning_job_id}` compare equal.
fn normalize(path: &str) -> String {
    let re = regex::Regex::new(r"\{[^}]*\}").expect("regex");
    re.replace_all(path, "{}").into_owned()
}

/// `(METHOD, normalized path)` of every route registered in `daemon/src/api/*.rs`: each
/// `resource("…")` and the `web::get()`/`post()`/… routes chained on it, up to the next
/// resource. Test modules are cut off first.
fn served_routes() -> BTreeSet<(String, String)> {
    let dir = Path::new(WORKSPACE).join("daemon/src/api");
    let resource = regex::Regex::new(r#"resource\(\s*"([^"]+)"\s*\)"#).expect("regex");
    let method = regex::Regex::new(r"web::(get|post|put|patch|delete|head)\(\)").expect("regex");
    let mut out = BTreeSet::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("read daemon/src/api")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read api source");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let starts: Vec<_> = resource.captures_iter(code).collect();
        for (i, cap) in starts.iter().enumerate() {
            let whole = cap.get(0).expect("match");
            let end = starts
                .get(i + 1)
                .map(|c| c.get(0).expect("match").start())
                .unwrap_or(code.len());
            let chain = &code[whole.end()..end];
            let mut n = 0;
            for m in method.captures_iter(chain) {
                out.insert((m[1].to_uppercase(), normalize(&cap[1])));
                n += 1;
            }
            assert!(
                n > 0,
                "{}: resource {} has no route",
                file.display(),
                &cap[1]
            );
        }
    }
    assert!(
        out.len() >= 10,
        "only {} routes found in daemon/src/api: has the registration code changed shape?",
        out.len()
    );
    out
}

/// `(METHOD, normalized path)` of every operation in the spec.
fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), normalize(path)));
            }
        }
    }
    out
}

/// A JSON pointer as a URI fragment: `~0`/`~1` escapes, then percent-encoding of what a
/// fragment may not hold (`{`, `}`).
fn pointer(tokens: &[&str]) -> String {
    let mut s = String::from("#");
    for t in tokens {
        s.push('/');
        for c in t.replace('~', "~0").replace('/', "~1").chars() {
            if c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c) {
                s.push(c);
            } else {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    s.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    s
}

/// Follows a `$ref` to `#/components/…` (responses, parameters) inside the spec.
fn deref<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => spec
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => v,
    }
}

/// Validates `instance` against the schema at `fragment` (a URI fragment into the spec). The
/// whole spec is the root document, so its internal `$ref`s resolve; OpenAPI 3.1 schemas are
/// JSON Schema 2020-12.
fn validate(spec: &Value, fragment: &str, instance: &Value) -> Result<(), String> {
    let mut root = spec.clone();
    root["$ref"] = Value::String(fragment.to_string());
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .map_err(|e| format!("schema {fragment} does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("against {fragment}: {}", errors.join("; ")))
    }
}

/// What a response looked like on the wire.
struct Answer {
    status: u16,
    media: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Checks one answer of `METHOD template` against the spec: the status must be documented
/// (exactly, as `4XX`/`5XX`, or `default`), the media type must be one of its contents, and the
/// body must validate against that content's schema. SSE bodies are split into `data:` events,
/// each checked against `x-event-schema` when the spec names one.
fn conform(spec: &Value, method: &str, template: &str, a: &Answer) -> Result<(), String> {
    let m = method.to_lowercase();
    let what = format!("{method} {template} → {}", a.status);
    let op = spec["paths"]
        .get(template)
        .and_then(|p| p.get(&m))
        .ok_or_else(|| format!("{what}: no such operation in the spec"))?;
    let responses = &op["responses"];
    let status = a.status.to_string();
    let class = format!("{}XX", a.status / 100);
    let key = [status.as_str(), class.as_str(), "default"]
        .into_iter()
        .find(|k| responses.get(*k).is_some())
        .ok_or_else(|| format!("{what}: status not documented"))?;
    let resp = deref(spec, &responses[key]);
    // The fragment of the response object, so schema pointers can be built from it.
    let base: Vec<String> = match responses[key].get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .trim_start_matches("#/")
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
        None => ["paths", template, &m, "responses", key]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let Some(content) = resp.get("content").and_then(Value::as_object) else {
        return if a.body.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: the spec documents no body"))
        };
    };
    if !content.contains_key(&a.media) {
        return Err(format!(
            "{what}: content type {:?} not among {:?}",
            a.media,
            content.keys().collect::<Vec<_>>()
        ));
    }
    let mut tokens: Vec<&str> = base.iter().map(String::as_str).collect();
    tokens.extend(["content", a.media.as_str()]);
    match a.media.as_str() {
        "application/json" => {
            let body: Value = serde_json::from_slice(&a.body)
                .map_err(|e| format!("{what}: body is not JSON: {e}"))?;
            tokens.push("schema");
            validate(spec, &pointer(&tokens), &body).map_err(|e| format!("{what}: {e}"))
        }
        "text/event-stream" => {
            let text = String::from_utf8_lossy(&a.body);
            let events: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if events.last() != Some(&"[DONE]") {
                return Err(format!("{what}: stream does not end with [DONE]: {text}"));
            }
            if content[&a.media].get("x-event-schema").is_none() {
                return Ok(());
            }
            tokens.push("x-event-schema");
            let fragment = pointer(&tokens);
            for e in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(e)
                    .map_err(|err| format!("{what}: event is not JSON ({err}): {e}"))?;
                validate(spec, &fragment, &v).map_err(|err| format!("{what}: event {e}: {err}"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The session's client: every call is checked against the spec before it is returned.
struct Session<'a> {
    d: &'a Daemon,
    spec: &'a Value,
    checked: BTreeSet<(String, String, u16)>,
}

impl Session<'_> {
    fn send(&mut self, method: &str, template: &str, b: RequestBuilder) -> Answer {
        let what = format!("{method} {template}");
        let res = b.send().unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = res.status().as_u16();
        let media = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let body = res.bytes().map(|b| b.to_vec()).unwrap_or_default();
        let a = Answer {
            status,
            media,
            body,
        };
        if let Err(e) = conform(self.spec, method, template, &a) {
            panic!(
                "spec violation: {e}\nbody: {}\nlog:\n{}",
                String::from_utf8_lossy(&a.body),
                self.d.log_tail()
            );
        }
        self.checked
            .insert((method.to_string(), template.to_string(), status));
        a
    }

    /// `METHOD path` (the template with its parameters filled in) with `key`.
    fn req(&self, method: &str, path: &str, key: Option<&str>) -> RequestBuilder {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let b = self.d.http.request(m, self.d.url(path));
        match key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    fn call(&mut self, method: &str, template: &str, path: &str, body: Option<&Value>) -> Answer {
        let key = if ["/v1/chat/completions", "/v1/completions"].contains(&template) {
            INFER
        } else {
            ADMIN
        };
        let mut b = self.req(method, path, Some(key));
        if let Some(v) = body {
            b = b.json(v);
        }
        self.send(method, template, b)
    }

    /// A call that must answer `status`; returns its JSON body.
    fn expect(
        &mut self,
        status: u16,
        method: &str,
        template: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Value {
        let a = self.call(method, template, path, body);
        assert_eq!(
            a.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    fn upload(&mut self, name: &str, bytes: &[u8]) -> Value {
        let (ctype, body) = multipart(&[
            ("purpose", None, b"fine-tune".as_slice()),
            ("file", Some(name), bytes),
        ]);
        let b = self
            .req("POST", "/v1/files", Some(ADMIN))
            .header("content-type", ctype)
            .body(body);
        let a = self.send("POST", "/v1/files", b);
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        a.json()
    }

    fn wait_job(&mut self, id: &str) -> Value {
        let template = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
        let path = format!("/v1/fine_tuning/jobs/{id}");
        let started = Instant::now();
        loop {
            let j = self.expect(200, "GET", template, &path, None);
            if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
                return j;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "job {id} did not end: {j}\nlog:\n{}",
                self.d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[test]
fn spec_operations_are_the_served_routes() {
    let spec = load_spec();
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
    let served = served_routes();
    let documented = spec_routes(&spec);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}\nin openapi.yaml but not served: {unserved:?}"
    );
}

#[test]
fn spec_schemas_compile_and_refs_resolve() {
    let spec = load_spec();
    let text = serde_json::to_string(&spec).expect("spec as JSON");
    let re = regex::Regex::new(r#""\$ref":"([^"]+)""#).expect("regex");
    for cap in re.captures_iter(&text) {
        let r = &cap[1];
        assert!(r.starts_with("#/"), "non-local $ref {r}");
        assert!(
            spec.pointer(&r[1..]).is_some(),
            "$ref {r} points at nothing"
        );
    }
    for name in spec["components"]["schemas"]
        .as_object()
        .expect("components.schemas")
        .keys()
    {
        let fragment = pointer(&["components", "schemas", name]);
        let mut root = spec.clone();
        root["$ref"] = Value::String(fragment.clone());
        if let Err(e) = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
        {
            panic!("{fragment}: {e}");
        }
    }
    // Every operation declares at least one response and the bearer scheme exists.
    assert_eq!(
        spec["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{m} {path}: no responses"
                );
            }
        }
    }
}

/// Property names of a request schema, through `allOf` and `$ref`s.
fn property_names(spec: &Value, schema: &Value) -> BTreeSet<String> {
    let schema = deref(spec, schema);
    let mut out: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(property_names(spec, part));
    }
    out
}

fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a field name").to_string())
        .collect()
}

/// The fields each request type takes (`itamae::api::fields`) are the ones the spec documents,
/// and the fields refused unless at their default are the spec's `x-unsupported-fields`.
#[test]
fn spec_request_fields_are_the_parsed_fields() {
    use itamae::api::fields::{self, Fields};
    let spec = load_spec();
    let schemas = &spec["components"]["schemas"];
    let upload = &spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]
        ["multipart/form-data"]["schema"];
    let op_params = |path: &str| -> (BTreeSet<String>, BTreeSet<String>) {
        let op = &spec["paths"][path]["get"];
        let params = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| deref(&spec, p))
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().expect("name").to_string())
            .collect();
        (params, names(&op["x-unsupported-fields"]))
    };
    let bodies: [(&str, &Value, Fields); 4] = [
        (
            "ChatCompletionRequest",
            &schemas["ChatCompletionRequest"],
            fields::CHAT_REQUEST,
        ),
        (
            "CompletionRequest",
            &schemas["CompletionRequest"],
            fields::COMPLETION_REQUEST,
        ),
        (
            "FineTuningJobRequest",
            &schemas["FineTuningJobRequest"],
            fields::JOB_CREATE,
        ),
        ("POST /v1/files", upload, fields::FILE_UPLOAD),
    ];
    let mut checked = Vec::new();
    for (name, schema, f) in bodies {
        let documented = (
            property_names(&spec, schema),
            names(&deref(&spec, schema)["x-unsupported-fields"]),
        );
        checked.push((name.to_string(), documented, f));
    }
    for (path, f) in [
        ("/v1/files", fields::FILE_LIST),
        ("/v1/fine_tuning/jobs", fields::JOB_LIST),
        (
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
            fields::JOB_EVENTS,
        ),
        (
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            fields::JOB_CHECKPOINTS,
        ),
    ] {
        checked.push((format!("GET {path}"), op_params(path), f));
    }
    for (name, (documented, unsupported), f) in checked {
        let taken: BTreeSet<String> = f
            .accepted
            .iter()
            .chain(f.inert)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(documented, taken, "{name}: spec properties vs fields taken");
        let refused: BTreeSet<String> = f
            .unsupported
            .iter()
            .flat_map(|l| l.iter().map(|u| u.name.to_string()))
            .collect();
        assert_eq!(unsupported, refused, "{name}: x-unsupported-fields");
    }
}

/// The `Adapter` schema's variant for adapter `type` `name`.
fn adapter_variant<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["components"]["schemas"]["Adapter"]["oneOf"]
        .as_array()
        .expect("Adapter.oneOf")
        .iter()
        .find(|v| v["properties"]["type"]["const"] == name)
        .unwrap_or_else(|| panic!("no `{name}` variant under components.schemas.Adapter"))
}

#[test]
fn adapter_schema_matches_the_method_configs() {
    use itamae::adapters::lora::check_targets;
    use itamae::adapters::PromptTuningConfig;
    use itamae::adapters::{AdapterConfig, LoraConfig, PrefixTuningConfig, PromptInit};
    use itamae_client::methods::{lora, prefix_tuning, prompt_tuning};

    let spec = load_spec();
    // Every field set: the literals name every field, so a new one fails to compile here until
    // it is added (and then this test fails until the spec has it too).
    let full = [
        AdapterConfig::Lora(LoraConfig {
            r: Some(8),
            alpha: Some(16.0),
            dropout: Some(0.25),
            target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: Some(true),
        }),
        AdapterConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: Some(8),
            init: Some(PromptInit::Text),
            init_text: Some("You are a sushi chef.".into()),
        }),
        AdapterConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: Some(4),
            prefix_projection: Some(true),
            encoder_hidden_size: Some(64),
        }),
    ];
    let names = [lora::NAME, prompt_tuning::NAME, prefix_tuning::NAME];
    let fields = [lora::FIELDS, prompt_tuning::FIELDS, prefix_tuning::FIELDS];
    for ((config, name), fields) in full.iter().zip(names).zip(fields) {
        assert_eq!(config.name(), name);
        let variant = adapter_variant(&spec, name);
        let documented: BTreeSet<String> = variant["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .filter(|k| *k != "type")
            .cloned()
            .collect();
        let v = serde_json::to_value(config).expect("serialise");
        let serialised: BTreeSet<String> = v
            .as_object()
            .expect("object")
            .keys()
            .filter(|k| *k != "type")
            .cloned()
            .collect();
        let parsed: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        assert_eq!(documented, serialised, "{name}: spec vs struct fields");
        assert_eq!(parsed, serialised, "{name}: parsed vs struct fields");
        validate(&spec, "#/components/schemas/Adapter", &v).unwrap_or_else(|e| panic!("{e}"));
        // Parsed back by the one function the jobs API uses, it is the same config.
        let back = AdapterConfig::parse(&v, "adapter", &check_targets).expect("parses");
        assert_eq!(&back, config);

        // The bare `{"type": name}`: defaults filled in by the parser, as the spec documents.
        let bare = AdapterConfig::parse(&json!({"type": name}), "adapter", &check_targets)
            .expect("bare adapter parses");
        // As a job echoes it (`target_modules` as `"all-linear"`), without its nulls (a request
        // leaves those out), it is a valid request again.
        let echoed = bare.to_json();
        let mut request = echoed.clone();
        request
            .as_object_mut()
            .expect("object")
            .retain(|_, v| !v.is_null());
        validate(&spec, "#/components/schemas/Adapter", &request).unwrap_or_else(|e| panic!("{e}"));
        for (field, schema) in variant["properties"].as_object().expect("properties") {
            let Some(default) = schema.get("default") else {
                continue;
            };
            let same = match (default.as_f64(), echoed[field].as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => *default == echoed[field],
            };
            assert!(
                same,
                "{name}.{field}: spec default {default}, config default {}",
                echoed[field]
            );
        }
    }
    // The default adapter of a plain request is LoRA with its defaults.
    assert_eq!(
        AdapterConfig::default(),
        AdapterConfig::parse(&json!({}), "adapter", &check_targets).expect("parses")
    );
}

#[test]
fn every_config_parses() {
    let dir = Path::new(WORKSPACE).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("read configs/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        n += 1;
        let file = itamae::config::FileConfig::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cfg = itamae::config::ServeConfig::resolve(file, Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        itamae::api::auth::Auth::from_config(&cfg.auth)
            .unwrap_or_else(|e| panic!("{}: [auth]: {e}", path.display()));
        // A CUDA device cannot be opened in this build, but its name must be well-formed.
        if let Err(itamae::config::ConfigError::Device(d)) = itamae::config::device(&cfg.device) {
            panic!("{}: invalid device {d}", path.display());
        }
    }
    assert!(n >= 3, "expected itamae.toml and the profiles, found {n}");
}

#[test]
fn scripted_session_conforms_to_the_spec() {
    let spec = load_spec();
    let dir = TempDir::new("openapi");
    let keys = format!("admin:{ADMIN},inference:{INFER}");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[("ITAMAE_API_KEYS", Some(&keys)), ("ITAMAE_CONFIG", None)],
        Duration::from_secs(300),
    );
    d.wait_ready();
    let mut s = Session {
        d: &d,
        spec: &spec,
        checked: BTreeSet::new(),
    };

    // Health and models.
    for p in ["/healthz", "/readyz"] {
        let b = s.req("GET", p, None);
        assert_eq!(s.send("GET", p, b).status, 200);
    }
    let models = s.expect(200, "GET", "/v1/models", "/v1/models", None);
    let base = models["data"][0]["id"]
        .as_str()
        .expect("base id")
        .to_string();
    // The base reports how its weights are held and their size (the test server's default mode).
    assert_eq!(models["data"][0]["weights"], "f32", "{models}");
    assert!(
        models["data"][0]["weight_bytes"].as_u64().unwrap_or(0) > 0,
        "{models}"
    );
    s.expect(
        200,
        "GET",
        "/v1/models/{id}",
        &format!("/v1/models/{base}"),
        None,
    );
    // The base model cannot be deleted; an unknown one is not found.
    let refused = s.expect(
        403,
        "DELETE",
        "/v1/models/{id}",
        &format!("/v1/models/{base}"),
        None,
    );
    assert_eq!(refused["error"]["code"], "permission_denied");
    s.expect(
        404,
        "DELETE",
        "/v1/models/{id}",
        "/v1/models/ft:no-such-model",
        None,
    );

    // Generation, plain and streamed.
    let chat = json!({"model": base, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "temperature": 0});
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&chat),
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let a = s.call(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&streamed),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let cmpl = json!({"model": base, "prompt": "The capital of France is", "max_tokens": 4});
    s.expect(
        200,
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&cmpl),
    );
    let mut streamed = cmpl.clone();
    streamed["stream"] = json!(true);
    let a = s.call(
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&streamed),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));

    // Structured outputs: the output validates; an invalid schema names the path at fault.
    let schema = json!({"type": "object", "properties": {"dish": {"type": "string", "maxLength": 12},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["dish", "stars"],
        "additionalProperties": false});
    let mut structured = chat.clone();
    structured["max_tokens"] = json!(60);
    structured["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "review", "strict": true, "schema": schema}});
    let r = s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&structured),
    );
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    if r["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(content).expect("JSON output");
        assert!(jsonschema::is_valid(&schema, &v), "{content}");
    }
    let mut choice = cmpl.clone();
    choice["guided_choice"] = json!(["yes", "no"]);
    let r = s.expect(
        200,
        "POST",
        "/v1/completions",
        "/v1/completions",
        Some(&choice),
    );
    assert!(["yes", "no"].contains(&r["choices"][0]["text"].as_str().expect("text")));
    let mut bad_schema = structured.clone();
    bad_schema["response_format"]["json_schema"]["schema"]["properties"]["stars"]["type"] =
        json!("integr");
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&bad_schema),
    );
    assert_eq!(
        e["error"]["param"],
        "response_format.json_schema.schema.properties.stars.type"
    );
    // SmolLM2's chat template does not print tools: refused, naming `tools`.
    let mut tools = chat.clone();
    tools["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    tools["tool_choice"] = json!("auto");
    tools["parallel_tool_calls"] = json!(true);
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&tools),
    );
    assert_eq!(e["error"]["param"], "tools");
    // Logprobs and bias, plain and streamed; echo with logprobs.
    let mut lp = chat.clone();
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(2);
    lp["logit_bias"] = json!({"1000": -5});
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&lp),
    );
    lp["stream"] = json!(true);
    let a = s.call(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&lp),
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let mut lp = cmpl.clone();
    lp["logprobs"] = json!(2);
    lp["echo"] = json!(true);
    s.expect(200, "POST", "/v1/completions", "/v1/completions", Some(&lp));
    lp["stream"] = json!(true);
    let a = s.call("POST", "/v1/completions", "/v1/completions", Some(&lp));
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));

    // Errors: 400, 401, 403, 404.
    let mut bad = chat.clone();
    bad["temperature"] = json!(9);
    let e = s.expect(
        400,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&bad),
    );
    assert_eq!(e["error"]["param"], "temperature");
    let mut unknown = chat.clone();
    unknown["model"] = json!("no-such-model");
    s.expect(
        404,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&unknown),
    );
    let b = s.req("GET", "/v1/models", None);
    assert_eq!(s.send("GET", "/v1/models", b).status, 401);
    let b = s.req("GET", "/v1/models", Some("not-a-key-0123456789"));
    assert_eq!(s.send("GET", "/v1/models", b).status, 401);
    let b = s.req("GET", "/v1/files", Some(INFER));
    assert_eq!(s.send("GET", "/v1/files", b).status, 403);
    s.expect(
        404,
        "GET",
        "/v1/files/{file_id}",
        "/v1/files/file-doesnotexist",
        None,
    );
    s.expect(
        400,
        "GET",
        "/v1/files/{file_id}",
        "/v1/files/not-a-file-id",
        None,
    );

    // Files.
    let train = std::fs::read(Path::new(WORKSPACE).join("tests/data/persona_train.jsonl"))
        .expect("persona_train.jsonl");
    let file = s.upload("persona_train.jsonl", &train);
    let file_id = file["id"].as_str().expect("file id").to_string();
    let list = s.expect(200, "GET", "/v1/files", "/v1/files", None);
    assert!(list["data"].as_array().is_some_and(|d| d.len() == 1));
    let fpath = format!("/v1/files/{file_id}");
    s.expect(200, "GET", "/v1/files/{file_id}", &fpath, None);
    let a = s.call(
        "GET",
        "/v1/files/{file_id}/content",
        &format!("{fpath}/content"),
        None,
    );
    assert_eq!((a.status, a.body == train), (200, true));
    let spare = s.upload("spare.jsonl", &train[..200]);
    let spare_path = format!("/v1/files/{}", spare["id"].as_str().expect("id"));
    let del = s.expect(200, "DELETE", "/v1/files/{file_id}", &spare_path, None);
    assert_eq!(del["deleted"], true);
    s.expect(404, "GET", "/v1/files/{file_id}", &spare_path, None);

    // A tiny fine-tuning job, run to the end.
    let jobs = "/v1/fine_tuning/jobs";
    let job_t = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
    let hp = json!({"max_steps": 2, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 1});
    let create = json!({"model": base, "training_file": file_id, "suffix": "spec",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp,
                   "adapter": {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}}}});
    let job = s.expect(200, "POST", jobs, jobs, Some(&create));
    let job_id = job["id"].as_str().expect("job id").to_string();
    let jpath = format!("{jobs}/{job_id}");
    s.expect(200, "GET", jobs, &format!("{jobs}?limit=5"), None);
    let mut bad_job = create.clone();
    bad_job["training_file"] = json!("file-doesnotexist");
    let e = s.expect(400, "POST", jobs, jobs, Some(&bad_job));
    assert_eq!(e["error"]["param"], "training_file");
    let done = s.wait_job(&job_id);
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\nlog:\n{}",
        d.log_tail()
    );
    let variant = done["fine_tuned_model"]
        .as_str()
        .expect("variant")
        .to_string();
    let events = s.expect(
        200,
        "GET",
        &format!("{job_t}/events"),
        &format!("{jpath}/events?limit=50"),
        None,
    );
    assert!(events["data"].as_array().is_some_and(|e| !e.is_empty()));
    let a = s.call(
        "GET",
        &format!("{job_t}/events"),
        &format!("{jpath}/events?stream=true"),
        None,
    );
    assert_eq!((a.status, a.media.as_str()), (200, "text/event-stream"));
    let ckpts = s.expect(
        200,
        "GET",
        &format!("{job_t}/checkpoints"),
        &format!("{jpath}/checkpoints"),
        None,
    );
    assert!(ckpts["data"].as_array().is_some_and(|c| !c.is_empty()));
    // A finished job cannot be cancelled, paused or resumed.
    for action in ["cancel", "pause", "resume"] {
        s.expect(
            400,
            "POST",
            &format!("{job_t}/{action}"),
            &format!("{jpath}/{action}"),
            None,
        );
    }
    // A second job cancelled before it runs.
    let second = s.expect(200, "POST", jobs, jobs, Some(&create));
    let second_path = format!("{jobs}/{}", second["id"].as_str().expect("id"));
    let cancelled = s.expect(
        200,
        "POST",
        &format!("{job_t}/cancel"),
        &format!("{second_path}/cancel"),
        None,
    );
    assert_eq!(cancelled["status"], "cancelled");
    s.expect(200, "GET", job_t, &second_path, None);
    s.expect(
        404,
        "GET",
        job_t,
        &format!("{jobs}/ftjob-doesnotexist"),
        None,
    );

    // Adapters: the job's result, exported and imported again under a new name.
    let ad = "/v1/adapters";
    let ad_t = "/v1/adapters/{adapter_id}";
    let listed = s.expect(200, "GET", ad, ad, None);
    assert!(listed["data"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["id"] == variant.as_str())));
    let vpath = format!("{ad}/{variant}");
    s.expect(200, "GET", ad_t, &vpath, None);
    s.expect(404, "GET", ad_t, &format!("{ad}/no-such-adapter"), None);
    let files_t = format!("{ad_t}/files/{{file_name}}");
    let mut peft = Vec::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let a = s.call("GET", &files_t, &format!("{vpath}/files/{name}"), None);
        assert_eq!(a.status, 200, "{name}");
        peft.push(a.body);
    }
    let (weights, config) = (
        peft.pop().unwrap_or_default(),
        peft.pop().unwrap_or_default(),
    );
    let (ctype, body) = PeftFiles { config, weights }.import_body("spec-copy", None);
    let b = s
        .req("POST", ad, Some(ADMIN))
        .header("content-type", ctype)
        .body(body);
    let a = s.send("POST", ad, b);
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let copy = format!("{ad}/spec-copy");
    let un = s.expect(
        200,
        "POST",
        &format!("{ad_t}/unload"),
        &format!("{copy}/unload"),
        None,
    );
    assert_eq!(un["resident"], false);
    let ld = s.expect(
        200,
        "POST",
        &format!("{ad_t}/load"),
        &format!("{copy}/load"),
        None,
    );
    assert_eq!(ld["resident"], true);
    let mut on_copy = chat.clone();
    on_copy["model"] = json!("spec-copy");
    s.expect(
        200,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(&on_copy),
    );
    s.expect(200, "DELETE", ad_t, &copy, None);
    s.expect(404, "GET", ad_t, &copy, None);

    // Metrics.
    let a = s.call("GET", "/metrics", "/metrics", None);
    assert_eq!((a.status, a.media.as_str()), (200, "text/plain"));

    // Every operation in the spec is routed: probed with ids that do not exist, it must reach
    // its handler (no 405, no fallback 404) and answer as documented. Each served path also
    // refuses PUT with 405, which cross-checks the routes read from the sources.
    let fallback = "Invalid URL (";
    let mut probed = 0;
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let path = template
            .replace("{id}", &base)
            .replace("{file_id}", "file-doesnotexist")
            .replace("{fine_tuning_job_id}", "ftjob-doesnotexist")
            .replace("{adapter_id}", "no-such-adapter")
            .replace("{file_name}", "adapter_config.json")
            .replace("{asset_name}", "app.js");
        for m in METHODS {
            if item.get(m).is_none() {
                continue;
            }
            let method = m.to_uppercase();
            let mut b = s.req(&method, &path, Some(ADMIN));
            if method == "POST" {
                b = b.json(&json!({}));
            }
            let a = s.send(&method, template, b);
            let text = String::from_utf8_lossy(&a.body);
            assert!(
                a.status != 405 && !(a.status == 404 && text.contains(fallback)),
                "{method} {path}: not routed ({}): {text}",
                a.status
            );
            probed += 1;
        }
        if item.get("put").is_none() {
            let a = s.req("PUT", &path, Some(ADMIN)).send().expect("PUT");
            assert_eq!(a.status().as_u16(), 405, "PUT {path} should be refused");
        }
    }
    assert_eq!(probed, spec_routes(&spec).len());
    eprintln!(
        "{} (operation, status) pairs checked against the spec",
        s.checked.len()
    );
    // The session must have seen every operation at least once.
    let seen: BTreeSet<(String, String)> = s
        .checked
        .iter()
        .map(|(m, t, _)| (m.clone(), normalize(t)))
        .collect();
    let missed: Vec<_> = spec_routes(&spec).difference(&seen).cloned().collect();
    assert!(missed.is_empty(), "operations never exercised: {missed:?}");
}

/// The tool-call shapes against the spec: the whole response (`message.tool_calls`, content
/// null, `finish_reason: "tool_calls"`) and the streamed chunks (two `tool_calls` deltas per
/// call), as the response builders produce them from the engine's events.
#[test]
fn tool_call_shapes_conform_to_the_spec() {
    use futures::StreamExt;
    use itamae::api::response::{full_response, sse_stream, Generated, Kind, Meta};
    use itamae::engine::tools::ToolCall;
    use itamae::engine::{FinishReason, GenEvent, Usage};
    let spec = load_spec();
    let call = |i: usize| ToolCall {
        id: format!("call_{i:024}"),
        name: "get_weather".into(),
        arguments: r#"{"city": "Kyoto"}"#.into(),
    };
    let usage = Usage {
        prompt_tokens: 5,
        completion_tokens: 9,
        total_tokens: 14,
    };
    let meta = Meta::new(Kind::Chat, "m".into(), true);
    let whole = full_response(
        &meta,
        &[Generated {
            text: "\n".into(),
            tool_calls: vec![call(0), call(1)],
            reason: FinishReason::ToolCalls,
            usage,
            logprobs: Vec::new(),
        }],
    );
    validate(&spec, "#/components/schemas/ChatCompletion", &whole).expect("response");
    assert_eq!(whole["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        whole["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"],
        r#"{"city": "Kyoto"}"#
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for e in [
        GenEvent::Text("Checking.".into()),
        GenEvent::ToolCall(call(0)),
        GenEvent::ToolCall(call(1)),
        GenEvent::Finished {
            reason: FinishReason::ToolCalls,
            usage,
        },
    ] {
        tx.send((0, e)).expect("send");
    }
    let frames: Vec<String> = futures::executor::block_on(
        sse_stream(rx, meta)
            .map(|b| String::from_utf8(b.expect("frame").to_vec()).expect("utf-8"))
            .collect(),
    );
    let events: Vec<Value> = frames
        .iter()
        .filter_map(|f| f.strip_prefix("data: "))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("JSON event"))
        .collect();
    for e in &events {
        validate(&spec, "#/components/schemas/ChatCompletionChunk", e).expect("chunk");
    }
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(deltas.len(), 4, "{events:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["id"], "call_000000000000000000000000");
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(deltas[1]["function"]["arguments"], r#"{"city": "Kyoto"}"#);
    assert_eq!(deltas[2]["index"], 1);
    assert!(events
        .iter()
        .any(|e| e["choices"][0]["finish_reason"] == "tool_calls"));
}

/// `n` > 1 against the spec: whole chat and completion responses with several choices, the
/// streamed chunks of each choice (its own `index`), and a continued fine-tuning model's
/// object with its `parent`.
#[test]
fn several_choices_and_parents_conform_to_the_spec() {
    use futures::StreamExt;
    use itamae::api::response::{full_response, sse_stream, Generated, Kind, Meta};
    use itamae::engine::{FinishReason, GenEvent, Usage};
    let spec = load_spec();
    let usage = |c: usize| Usage {
        prompt_tokens: 5,
        completion_tokens: c,
        total_tokens: 5 + c,
    };
    let choice = |text: &str, c: usize| Generated {
        text: text.into(),
        tool_calls: Vec::new(),
        reason: FinishReason::Length,
        usage: usage(c),
        logprobs: Vec::new(),
    };
    let generated = [choice("red", 1), choice("blue", 2), choice("green", 3)];
    for (kind, schema) in [
        (Kind::Chat, "#/components/schemas/ChatCompletion"),
        (Kind::Text, "#/components/schemas/Completion"),
    ] {
        let mut meta = Meta::new(kind, "m".into(), false);
        meta.n = 3;
        let whole = full_response(&meta, &generated);
        validate(&spec, schema, &whole).expect("response");
        assert_eq!(whole["choices"][2]["index"], 2);
        assert_eq!(whole["usage"]["prompt_tokens"], 5, "the prompt counts once");
        assert_eq!(whole["usage"]["completion_tokens"], 6);
    }
    for (kind, schema) in [
        (Kind::Chat, "#/components/schemas/ChatCompletionChunk"),
        (Kind::Text, "#/components/schemas/CompletionChunk"),
    ] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for e in [
            (1, GenEvent::Text("blue".into())),
            (0, GenEvent::Text("red".into())),
            (
                0,
                GenEvent::Finished {
                    reason: FinishReason::Length,
                    usage: usage(1),
                },
            ),
            (
                1,
                GenEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: usage(2),
                },
            ),
        ] {
            tx.send(e).expect("send");
        }
        let mut meta = Meta::new(kind, "m".into(), true);
        meta.n = 2;
        let frames: Vec<String> = futures::executor::block_on(
            sse_stream(rx, meta)
                .map(|b| String::from_utf8(b.expect("frame").to_vec()).expect("utf-8"))
                .collect(),
        );
        let events: Vec<Value> = frames
            .iter()
            .filter_map(|f| f.strip_prefix("data: "))
            .map(str::trim)
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("JSON event"))
            .collect();
        for e in &events {
            validate(&spec, schema, e).expect("chunk");
        }
        let indices: std::collections::BTreeSet<u64> = events
            .iter()
            .filter_map(|e| e["choices"][0]["index"].as_u64())
            .collect();
        assert_eq!(indices, [0, 1].into());
        let last = events.last().expect("events");
        assert_eq!(last["usage"]["completion_tokens"], 3, "{last}");
    }
    let continued = json!({
        "id": "ft:m:itamae:more:ftjob-b", "object": "model", "created": 1, "owned_by": "itamae",
        "context_length": 8192, "parent": "ft:m:itamae::ftjob-a", "adapter_type": "lora",
    });
    validate(&spec, "#/components/schemas/Model", &continued).expect("model");
}
