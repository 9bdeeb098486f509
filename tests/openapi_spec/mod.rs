//! Shared by the OpenAPI tests (`openapi`, `openapi_session`): the spec, its routes against
//! the served ones, schema validation with `$ref`s resolved inside the spec, and a session client
//! that checks every response against the documented operation.
//!
//! Each test crate compiles this module on its own, so items one of them does not use are
//! allowed to be dead there.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{multipart, Daemon, WORKSPACE};
use reqwest::blocking::RequestBuilder;
use serde_json::Value;

pub const ADMIN: &str = "openapi-admin-key-0123456789";
pub const INFER: &str = "openapi-infer-key-0123456789";
pub const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

pub fn load_spec() -> Value {
    let path = Path::new(WORKSPACE).join("openapi/openapi.yaml");
    let text = std::fs::read_to_string(&path).expect("read openapi/openapi.yaml");
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("openapi.yaml: {e}"))
}

/// A path template with every parameter written `{}`, so that actix's `{id:.+}` and the spec's
/// `{fine_tuning_job_id}` compare equal.
pub fn normalize(path: &str) -> String {
    let re = regex::Regex::new(r"\{[^}]*\}").expect("regex");
    re.replace_all(path, "{}").into_owned()
}

/// `(METHOD, normalized path)` of every route registered in `daemon/src/api/*.rs`: each
/// `resource("…")` and the `web::get()`/`post()`/… routes chained on it, up to the next
/// resource. Test modules are cut off first.
pub fn served_routes() -> BTreeSet<(String, String)> {
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
pub fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
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
pub fn pointer(tokens: &[&str]) -> String {
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
pub fn deref<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
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
pub fn validate(spec: &Value, fragment: &str, instance: &Value) -> Result<(), String> {
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
pub struct Answer {
    pub status: u16,
    pub media: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Checks one answer of `METHOD template` against the spec: the status must be documented
/// (exactly, as `4XX`/`5XX`, or `default`), the media type must be one of its contents, and the
/// body must validate against that content's schema. SSE bodies are split into `data:` events,
/// each checked against `x-event-schema` when the spec names one.
pub fn conform(spec: &Value, method: &str, template: &str, a: &Answer) -> Result<(), String> {
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
pub struct Session<'a> {
    pub d: &'a Daemon,
    pub spec: &'a Value,
    pub checked: BTreeSet<(String, String, u16)>,
}

impl Session<'_> {
    pub fn send(&mut self, method: &str, template: &str, b: RequestBuilder) -> Answer {
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
    pub fn req(&self, method: &str, path: &str, key: Option<&str>) -> RequestBuilder {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let b = self.d.http.request(m, self.d.url(path));
        match key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    pub fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Answer {
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
    pub fn expect(
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

    pub fn upload(&mut self, name: &str, bytes: &[u8]) -> Value {
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

    pub fn wait_job(&mut self, id: &str) -> Value {
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
