//! End to end: starts `itamaed serve` on the real SmolLM2 GGUF and talks HTTP to it.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `scripts/fetch-model.sh`), or a GGUF path
//! in `ITAMAE_TEST_MODEL`. One daemon serves every check, run in sequence by one test.
mod common;

use std::time::Duration;

use common::{model_path, Daemon, TempDir};
use reqwest::blocking::Response;
use serde_json::{json, Value};

struct Ctx {
    daemon: Daemon,
    model: String,
}

impl Ctx {
    fn get(&self, path: &str) -> Response {
        self.daemon
            .http
            .get(self.daemon.url(path))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.daemon
            .http
            .post(self.daemon.url(path))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    fn post_ok(&self, path: &str, body: &Value) -> Value {
        let res = self.post(path, body);
        let status = res.status();
        let text = res.text().expect("response body");
        assert_eq!(status, 200, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Posts and expects an OpenAI error with this status and `error.param`.
    fn post_err(&self, path: &str, body: &Value, status: u16, param: Option<&str>) -> Value {
        let res = self.post(path, body);
        self.check_err(res, status, param, &format!("POST {path}"))
    }

    fn check_err(&self, res: Response, status: u16, param: Option<&str>, what: &str) -> Value {
        let got = res.status().as_u16();
        let text = res.text().expect("response body");
        assert_eq!(got, status, "{what}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no error.message in {v}"
        );
        assert!(err["type"].is_string(), "{what}: no error.type in {v}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}: {v}");
        }
        v
    }

    fn chat_body(&self, content: &str, extra: Value) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    }

    /// Posts a streamed request; returns the parsed data payloads (without the final `[DONE]`).
    fn post_stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let res = self.post(path, body);
        let status = res.status();
        let ctype = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = res.text().expect("stream body");
        assert_eq!(status, 200, "POST {path} {body}: {text}");
        assert!(
            ctype.starts_with("text/event-stream"),
            "content-type {ctype}"
        );
        let events: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        assert_eq!(events.last(), Some(&"data: [DONE]"), "stream: {text}");
        events[..events.len() - 1]
            .iter()
            .map(|e| {
                let data = e
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"));
                let v: Value =
                    serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"));
                assert!(v.get("error").is_none(), "error event: {v}");
                v
            })
            .collect()
    }
}

fn check_usage(usage: &Value, max_tokens: u64) -> (u64, u64) {
    let p = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = usage["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    let t = usage["total_tokens"].as_u64().expect("total_tokens");
    assert!(p > 0, "{usage}");
    assert_eq!(t, p + c, "{usage}");
    assert!(c <= max_tokens, "{usage}");
    (p, c)
}

fn check_finish(reason: &Value) {
    assert!(
        reason == "stop" || reason == "length",
        "finish_reason {reason}"
    );
}

#[test]
fn e2e_serve() {
    let dir = TempDir::new("e2e");
    let mut daemon = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[],
        Duration::from_secs(300),
    );
    daemon.wait_ready();
    let mut ctx = Ctx {
        daemon,
        model: String::new(),
    };

    health(&ctx);
    ctx.model = models(&ctx);
    let answer = chat(&ctx);
    chat_stream(&ctx, &answer);
    completions(&ctx);
    chat_logprobs(&ctx);
    logit_bias(&ctx);
    completion_logprobs(&ctx);
    errors(&ctx);
    // Still alive and serving after all of that.
    health(&ctx);
    assert_eq!(ctx.get("/readyz").status(), 200);
}

fn health(ctx: &Ctx) {
    let res = ctx.get("/healthz");
    assert_eq!(res.status(), 200);
    let v: Value = res.json().expect("healthz JSON");
    assert_eq!(v["status"], "ok");
}

/// Lists the models and returns the id of the base model.
fn models(ctx: &Ctx) -> String {
    let res = ctx.get("/v1/models");
    assert_eq!(res.status(), 200);
    let v: Value = res.json().expect("models JSON");
    assert_eq!(v["object"], "list", "{v}");
    let data = v["data"].as_array().expect("data array");
    assert!(!data.is_empty(), "no models: {v}");
    for m in data {
        assert_eq!(m["object"], "model", "{m}");
        assert!(
            m["id"].is_string() && m["created"].is_u64() && m["owned_by"].is_string(),
            "{m}"
        );
    }
    let stem = model_path()
        .file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .unwrap_or_default();
    let id = data
        .iter()
        .filter_map(|m| m["id"].as_str())
        .find(|id| *id == stem)
        .or_else(|| data[0]["id"].as_str())
        .expect("a model id")
        .to_string();

    let one: Value = ctx
        .get(&format!("/v1/models/{id}"))
        .json()
        .expect("model JSON");
    assert_eq!(one["id"], id.as_str(), "{one}");
    let res = ctx.get("/v1/models/no-such-model");
    ctx.check_err(res, 404, Some("model"), "GET /v1/models/no-such-model");
    id
}

const QUESTION: &str = "What is the capital of France?";

fn greedy() -> Value {
    json!({"temperature": 0, "max_tokens": 30})
}

fn chat(ctx: &Ctx) -> String {
    let v = ctx.post_ok("/v1/chat/completions", &ctx.chat_body(QUESTION, greedy()));
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{v}"
    );
    assert!(v["created"].is_u64(), "{v}");
    assert_eq!(v["model"], ctx.model.as_str());
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    check_finish(&choice["finish_reason"]);
    check_usage(&v["usage"], 30);
    let content = choice["message"]["content"]
        .as_str()
        .expect("message content")
        .to_string();
    assert!(content.contains("Paris"), "answer: {content:?}");
    ignore_eos(ctx);
    content
}

/// The same greedy answer ends on EOS well before 40 tokens; `ignore_eos` runs to the limit.
fn ignore_eos(ctx: &Ctx) {
    let mut extra = greedy();
    extra["max_tokens"] = json!(40);
    let plain = ctx.post_ok(
        "/v1/chat/completions",
        &ctx.chat_body(QUESTION, extra.clone()),
    );
    assert_eq!(plain["choices"][0]["finish_reason"], "stop", "{plain}");
    let short = plain["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!(short < 40, "{plain}");
    extra["ignore_eos"] = json!(true);
    let full = ctx.post_ok("/v1/chat/completions", &ctx.chat_body(QUESTION, extra));
    assert_eq!(full["choices"][0]["finish_reason"], "length", "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 40, "{full}");
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let first = plain["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(
        text.starts_with(first),
        "{text:?} does not continue {first:?}"
    );
}

fn chat_stream(ctx: &Ctx, answer: &str) {
    let mut extra = greedy();
    extra["stream"] = json!(true);
    extra["stream_options"] = json!({"include_usage": true});
    let chunks = ctx.post_stream("/v1/chat/completions", &ctx.chat_body(QUESTION, extra));
    assert!(chunks.len() >= 3, "{chunks:?}");
    let id = chunks[0]["id"].as_str().expect("chunk id");
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], id, "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // The last chunk carries usage only; the one before it the finish reason.
    let usage_chunk = &chunks[chunks.len() - 1];
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    check_usage(&usage_chunk["usage"], 30);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    check_finish(&finish["finish_reason"]);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, answer, "streamed and whole answers differ");

    // Without include_usage: no usage chunk.
    let mut extra = greedy();
    extra["stream"] = json!(true);
    let chunks = ctx.post_stream("/v1/chat/completions", &ctx.chat_body(QUESTION, extra));
    let last = chunks.last().expect("chunks");
    check_finish(&last["choices"][0]["finish_reason"]);
}

fn completions(ctx: &Ctx) {
    let body = json!({
        "model": ctx.model,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
    });
    let v = ctx.post_ok("/v1/completions", &body);
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(
        v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "{v}"
    );
    let choice = &v["choices"][0];
    check_finish(&choice["finish_reason"]);
    check_usage(&v["usage"], 8);
    let text = choice["text"].as_str().expect("text").to_string();

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let chunks = ctx.post_stream("/v1/completions", &stream_body);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "text_completion", "{c}");
    }
    assert_eq!(streamed, text);
    check_finish(&chunks.last().expect("chunks")["choices"][0]["finish_reason"]);

    // Default max_tokens is 16, as OpenAI.
    let v = ctx.post_ok(
        "/v1/completions",
        &json!({"model": ctx.model, "prompt": "Once upon a time", "temperature": 0}),
    );
    check_usage(&v["usage"], 16);
}

fn errors(ctx: &Ctx) {
    let chat = "/v1/chat/completions";

    let res = ctx
        .daemon
        .http
        .post(ctx.daemon.url(chat))
        .header("content-type", "application/json")
        .body("{\"model\": \"x\", \"messages\": [")
        .send()
        .expect("malformed JSON request");
    ctx.check_err(res, 400, None, "malformed JSON");

    let mut body = ctx.chat_body("hi", json!({}));
    body["model"] = json!("no-such-model");
    let v = ctx.post_err(chat, &body, 404, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    // A streamed request failing before generation gets a plain JSON error too.
    body["stream"] = json!(true);
    ctx.post_err(chat, &body, 404, Some("model"));

    let body = json!({"model": ctx.model, "messages": []});
    ctx.post_err(chat, &body, 400, Some("messages"));

    let body = json!({"model": ctx.model, "messages": [{"role": "wizard", "content": "hi"}]});
    ctx.post_err(chat, &body, 400, Some("messages[0].role"));

    let body = ctx.chat_body("hi", json!({"temperature": 5}));
    ctx.post_err(chat, &body, 400, Some("temperature"));

    let body = ctx.chat_body("hi", json!({"max_tokens": 100000}));
    ctx.post_err(chat, &body, 400, Some("max_tokens"));

    let body = ctx.chat_body(&"hello ".repeat(10000), json!({"max_tokens": 10}));
    ctx.post_err(chat, &body, 400, Some("messages"));

    let body = ctx.chat_body("hi", json!({"n": 17}));
    ctx.post_err(chat, &body, 400, Some("n"));

    let body = json!({"model": ctx.model, "prompt": "x", "best_of": 2});
    ctx.post_err("/v1/completions", &body, 400, Some("best_of"));

    let body = json!({"model": ctx.model, "prompt": "hello ".repeat(10000)});
    ctx.post_err("/v1/completions", &body, 400, Some("prompt"));

    unsupported_fields(ctx);

    let res = ctx.get("/v1/no-such-route");
    ctx.check_err(res, 404, None, "unknown route");
}

/// Fields we do not act on are refused by name, never dropped; their defaults pass.
fn unsupported_fields(ctx: &Ctx) {
    let chat = "/v1/chat/completions";
    for (extra, param) in [
        (
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            "audio",
        ),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (
            json!({"prediction": {"type": "content", "content": "x"}}),
            "prediction",
        ),
        (json!({"web_search_options": {}}), "web_search_options"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let body = ctx.chat_body("hi", extra);
        let v = ctx.post_err(chat, &body, 400, Some(param));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{param}`")), "{v}");
    }
    let body = ctx.chat_body(
        "hi",
        json!({"max_tokens": 2, "store": false, "functions": [], "n": 1, "service_tier": "auto",
               "response_format": {"type": "text"}, "user": "u", "audio": null}),
    );
    ctx.post_ok(chat, &body);
    let res = ctx.get("/v1/fine_tuning/jobs?metadata[team]=a");
    ctx.check_err(res, 400, Some("metadata"), "job list by metadata");
    let res = ctx.get("/v1/files?colour=red");
    ctx.check_err(
        res,
        400,
        Some("colour"),
        "file list with an unknown parameter",
    );
}

/// The tokens of a chat `logprobs.content`, each checked for shape and range.
fn content_tokens(lps: &Value, top: usize) -> Vec<(String, f64)> {
    let content = lps["content"].as_array().expect("logprobs.content");
    assert_eq!(lps["refusal"], Value::Null, "{lps}");
    content
        .iter()
        .map(|t| {
            let token = t["token"].as_str().expect("token").to_string();
            let lp = t["logprob"].as_f64().expect("logprob");
            assert!(lp <= 0.0, "{t}");
            let bytes: Vec<u8> = t["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8)
                .collect();
            assert_eq!(String::from_utf8_lossy(&bytes), token, "{t}");
            let alts = t["top_logprobs"].as_array().expect("top_logprobs");
            assert_eq!(alts.len(), top, "{t}");
            let mut prev = 0.0;
            let mut mass = 0.0;
            for (i, a) in alts.iter().enumerate() {
                let alp = a["logprob"].as_f64().expect("alternative logprob");
                assert!(alp <= prev + 1e-6, "alternatives best first: {t}");
                assert!(a["bytes"].is_array() && a["token"].is_string(), "{t}");
                if i == 0 {
                    assert!(
                        alp >= lp - 1e-5,
                        "the best alternative is at least as likely: {t}"
                    );
                }
                prev = alp;
                mass += alp.exp();
            }
            assert!(mass <= 1.0 + 1e-3, "{t}");
            (token, lp)
        })
        .collect()
}

/// Greedy chat with logprobs: one entry per generated token, the chosen token is the most
/// likely one, the tokens spell the answer, and streaming reports the same numbers.
fn chat_logprobs(ctx: &Ctx) {
    let chat = "/v1/chat/completions";
    let extra = json!({"temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3,
                       "ignore_eos": true});
    let v = ctx.post_ok(chat, &ctx.chat_body(QUESTION, extra.clone()));
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{v}");
    let tokens = content_tokens(&choice["logprobs"], 3);
    assert_eq!(tokens.len(), 6, "{v}");
    let spelled: String = tokens.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        spelled,
        choice["message"]["content"].as_str().expect("content")
    );
    for t in choice["logprobs"]["content"].as_array().expect("content") {
        // Greedy: the chosen token is the top alternative.
        assert_eq!(t["top_logprobs"][0]["token"], t["token"], "{t}");
    }

    let mut body = ctx.chat_body(QUESTION, extra);
    body["stream"] = json!(true);
    let chunks = ctx.post_stream(chat, &body);
    let mut streamed = Vec::new();
    for c in &chunks {
        let lps = &c["choices"][0]["logprobs"];
        if !lps.is_null() {
            streamed.extend(content_tokens(lps, 3));
        }
    }
    assert_eq!(streamed.len(), tokens.len(), "{chunks:?}");
    for (a, b) in streamed.iter().zip(&tokens) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() < 1e-4, "{a:?} vs {b:?}");
    }

    // Without the flag: `logprobs` is null.
    let v = ctx.post_ok(chat, &ctx.chat_body(QUESTION, json!({"max_tokens": 2})));
    assert_eq!(v["choices"][0]["logprobs"], Value::Null, "{v}");
}

/// A +100 bias makes one token certain; logprobs describe the biased distribution.
fn logit_bias(ctx: &Ctx) {
    let chat = "/v1/chat/completions";
    let extra = json!({"max_tokens": 4, "logprobs": true, "ignore_eos": true,
                       "logit_bias": {"1000": 100}, "seed": 1});
    let v = ctx.post_ok(chat, &ctx.chat_body(QUESTION, extra));
    let tokens = content_tokens(&v["choices"][0]["logprobs"], 0);
    assert_eq!(tokens.len(), 4, "{v}");
    for t in &tokens {
        assert_eq!(t.0, tokens[0].0, "every token is the biased one: {v}");
        assert!(t.1 > -1e-3, "after a +100 bias the token is certain: {v}");
    }
    // −100 on the greedy answer's first token changes the answer's start.
    let greedy_body = |bias: Value| {
        ctx.chat_body(
            QUESTION,
            json!({"temperature": 0, "max_tokens": 1, "logprobs": true, "top_logprobs": 2,
                   "logit_bias": bias}),
        )
    };
    let v = ctx.post_ok(chat, &greedy_body(json!({})));
    let first = content_tokens(&v["choices"][0]["logprobs"], 2);
    let v = ctx.post_ok(chat, &greedy_body(json!({"1000": 0})));
    assert_eq!(
        content_tokens(&v["choices"][0]["logprobs"], 2)[0].0,
        first[0].0
    );

    for bias in [json!({"99999999": 1}), json!({"5": 101}), json!({"x": 1})] {
        let body = ctx.chat_body("hi", json!({"logit_bias": bias}));
        ctx.post_err(chat, &body, 400, Some("logit_bias"));
    }
}

/// Legacy completions: `logprobs` = n alternatives (+ the chosen token), `echo` returns the
/// prompt with its tokens' logprobs (the first one null), and the numbers of a generated token
/// and of the same token read back as prompt agree.
fn completion_logprobs(ctx: &Ctx) {
    let url = "/v1/completions";
    let prompt = "The capital of France is";
    let v = ctx.post_ok(
        url,
        &json!({"model": ctx.model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "logprobs": 2}),
    );
    let lps = &v["choices"][0]["logprobs"];
    let generated = lps["tokens"][0].as_str().expect("token").to_string();
    let generated_lp = lps["token_logprobs"][0].as_f64().expect("logprob");
    let top = lps["top_logprobs"][0].as_object().expect("top_logprobs");
    assert!(top.len() <= 3 && top.contains_key(&generated), "{v}");
    assert_eq!(lps["text_offset"], json!([0]), "{v}");

    let echoed = format!("{prompt}{generated}");
    let v = ctx.post_ok(
        url,
        &json!({"model": ctx.model, "prompt": echoed, "max_tokens": 2, "temperature": 0,
                "logprobs": 1, "echo": true, "ignore_eos": true}),
    );
    let (p, c) = check_usage(&v["usage"], 2);
    let choice = &v["choices"][0];
    let text = choice["text"].as_str().expect("text");
    assert!(text.starts_with(&echoed), "{v}");
    let lps = &choice["logprobs"];
    let tokens: Vec<&str> = lps["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token"))
        .collect();
    assert_eq!(tokens.len() as u64, p + c, "{v}");
    assert_eq!(tokens.concat(), text, "{v}");
    let lp = lps["token_logprobs"].as_array().expect("token_logprobs");
    assert!(lp[0].is_null() && lps["top_logprobs"][0].is_null(), "{v}");
    let offsets: Vec<u64> = lps["text_offset"]
        .as_array()
        .expect("text_offset")
        .iter()
        .map(|o| o.as_u64().expect("offset"))
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0,
        "{v}"
    );
    // The prompt's last token is the one generated above: same context, same logprob.
    let last = p as usize - 1;
    assert_eq!(tokens[last], generated, "{v}");
    let read_back = lp[last].as_f64().expect("prompt token logprob");
    assert!(
        (read_back - generated_lp).abs() < 0.05,
        "generated {generated_lp}, read back {read_back}"
    );

    // Echo alone: the prompt comes back first, streamed too; logprobs stay null.
    let body = json!({"model": ctx.model, "prompt": prompt, "max_tokens": 2, "echo": true});
    let v = ctx.post_ok(url, &body);
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .expect("text")
            .starts_with(prompt),
        "{v}"
    );
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = ctx.post_stream(url, &body);
    assert_eq!(chunks[0]["choices"][0]["text"], prompt, "{chunks:?}");
}
