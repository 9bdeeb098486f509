//! End to end: `n` > 1 against `itamaed serve` on the real SmolLM2 GGUF: n=3 chat and
//! completions, whole and streamed; `usage` counts the prompt once and the completion tokens
//! of every choice; greedy choices agree with n=1; seeded choices reproduce; choices under a
//! JSON constraint each parse; the request and token metrics count as the API says.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `scripts/fetch-model.sh`), or a GGUF path
//! in `ITAMAE_TEST_MODEL`.
mod common;

use std::time::Duration;

use common::{Daemon, TempDir};
use serde_json::{json, Value};

fn post(d: &Daemon, path: &str, body: &Value) -> String {
    let res = d
        .http
        .post(d.url(path))
        .json(body)
        .send()
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = res.status().as_u16();
    let text = res.text().expect("body");
    assert_eq!(status, 200, "POST {path} {body}: {text}");
    text
}

fn post_json(d: &Daemon, path: &str, body: &Value) -> Value {
    let text = post(d, path, body);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The data payloads of a stream, `[DONE]` checked and left out.
fn post_stream(d: &Daemon, path: &str, body: &Value) -> Vec<Value> {
    let text = post(d, path, body);
    let events: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").expect("data event"))
                .expect("JSON event");
            assert!(v.get("error").is_none(), "{v}");
            v
        })
        .collect()
}

/// `(prompt_tokens, completion_tokens)`, checked for a total.
fn usage(u: &Value) -> (u64, u64) {
    let p = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = u["completion_tokens"].as_u64().expect("completion_tokens");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c), "{u}");
    (p, c)
}

/// The streamed text and finish reason of each choice, by index.
fn streamed_choices(chunks: &[Value], n: usize, field: &str) -> Vec<(String, String)> {
    let mut out = vec![(String::new(), String::new()); n];
    for c in chunks {
        for ch in c["choices"].as_array().expect("choices") {
            let i = ch["index"].as_u64().expect("index") as usize;
            assert!(i < n, "{c}");
            let piece = match field {
                "content" => ch["delta"]["content"].as_str(),
                _ => ch["text"].as_str(),
            };
            out[i].0.push_str(piece.unwrap_or(""));
            if let Some(r) = ch["finish_reason"].as_str() {
                assert!(out[i].1.is_empty(), "choice {i} finished twice");
                out[i].1 = r.to_string();
            }
        }
    }
    out
}

/// Each choice's text of a whole response, in order, its index and finish reason checked.
fn whole_choices(v: &Value, n: usize) -> Vec<String> {
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), n, "{v}");
    choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{v}");
            assert!(c["finish_reason"] == "stop" || c["finish_reason"] == "length");
            c["message"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .expect("text")
                .to_string()
        })
        .collect()
}

fn series(name: &str, model: &str) -> String {
    format!("{name}{{model=\"{model}\"}}")
}

#[test]
fn several_choices_from_one_prompt() {
    let dir = TempDir::new("e2e-choices");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[("ITAMAE_API_KEYS", None), ("ITAMAE_CONFIG", None)],
        Duration::from_secs(300),
    );
    d.wait_ready();
    let models: Value = d
        .http
        .get(d.url("/v1/models"))
        .send()
        .and_then(|r| r.json())
        .expect("models");
    let model = models["data"][0]["id"].as_str().expect("id").to_string();
    let chat = |extra: Value| {
        let mut b = json!({"model": model, "max_tokens": 24,
                           "messages": [{"role": "user", "content": "Name a colour."}]});
        b.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        b
    };

    // Greedy: three equal choices, the n=1 answer; the prompt counted once.
    let one = post_json(&d, "/v1/chat/completions", &chat(json!({"temperature": 0})));
    let (p1, c1) = usage(&one["usage"]);
    let answer = whole_choices(&one, 1).remove(0);
    let three = post_json(
        &d,
        "/v1/chat/completions",
        &chat(json!({"temperature": 0, "n": 3})),
    );
    assert_eq!(whole_choices(&three, 3), vec![answer.clone(); 3]);
    assert_eq!(usage(&three["usage"]), (p1, 3 * c1), "{}", three["usage"]);

    // Sampled with a seed: reproducible, and the choices are not all the same.
    let seeded = chat(json!({"temperature": 1.0, "seed": 7, "n": 3}));
    let a = post_json(&d, "/v1/chat/completions", &seeded);
    let b = post_json(&d, "/v1/chat/completions", &seeded);
    let (ta, tb) = (whole_choices(&a, 3), whole_choices(&b, 3));
    assert_eq!(ta, tb, "a seed reproduces every choice");
    assert!(ta[0] != ta[1] || ta[1] != ta[2], "{ta:?}");
    let (pa, ca) = usage(&a["usage"]);
    assert_eq!(pa, p1);
    assert!(ca <= 3 * 24);

    // Streamed: each choice's deltas carry its index; one usage chunk sums them.
    let before_prompt = d.metric(&series("itamae_prompt_tokens_total", &model));
    let before_gen = d.metric(&series("itamae_generation_tokens_total", &model));
    let before_req = d.metric(&series("itamae_requests_total", &model));
    let mut body = seeded.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(&d, "/v1/chat/completions", &body);
    let roles: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"] == "assistant")
        .map(|c| &c["choices"][0]["index"])
        .collect();
    assert_eq!(roles, [&json!(0), &json!(1), &json!(2)]);
    let streamed = streamed_choices(&chunks, 3, "content");
    let texts: Vec<String> = streamed.iter().map(|s| s.0.clone()).collect();
    assert_eq!(texts, ta, "streamed and whole choices agree");
    assert!(streamed.iter().all(|s| !s.1.is_empty()), "{streamed:?}");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(usage(&last["usage"]), (pa, ca));
    // metrics: the request and its prompt once, every choice's tokens
    let after = |s: &str| d.metric(&series(s, &model));
    d.wait_metric(
        &series("itamae_generation_tokens_total", &model),
        Duration::from_secs(5),
        |v| v >= before_gen + ca as f64,
    );
    assert_eq!(
        after("itamae_generation_tokens_total") - before_gen,
        ca as f64
    );
    assert_eq!(
        after("itamae_prompt_tokens_total") - before_prompt,
        pa as f64
    );
    assert_eq!(after("itamae_requests_total") - before_req, 1.0);

    // Completions, whole and streamed, with stop sequences and logprobs per choice.
    let text = json!({"model": model, "prompt": "Once upon a time", "max_tokens": 12,
                      "temperature": 0.9, "seed": 11, "n": 3, "logprobs": 2});
    let whole = post_json(&d, "/v1/completions", &text);
    let wt = whole_choices(&whole, 3);
    for c in whole["choices"].as_array().expect("choices") {
        let tokens = c["logprobs"]["tokens"].as_array().expect("tokens");
        assert_eq!(tokens.concat_str(), c["text"].as_str().expect("text"));
    }
    let (pt, ct) = usage(&whole["usage"]);
    let mut body = text.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(&d, "/v1/completions", &body);
    let st: Vec<String> = streamed_choices(&chunks, 3, "text")
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(st, wt);
    assert_eq!(usage(&chunks.last().expect("chunks")["usage"]), (pt, ct));
    let stopped = post_json(
        &d,
        "/v1/completions",
        &json!({"model": model, "prompt": "1, 2, 3,", "max_tokens": 16, "temperature": 0,
                "n": 2, "stop": [","]}),
    );
    for c in stopped["choices"].as_array().expect("choices") {
        assert_eq!(c["finish_reason"], "stop", "{stopped}");
        assert!(!c["text"].as_str().expect("text").contains(','));
    }

    // Each choice its own grammar state: every one parses as JSON.
    let v = post_json(
        &d,
        "/v1/chat/completions",
        &chat(
            json!({"temperature": 0.8, "seed": 5, "n": 3, "max_tokens": 60,
                     "response_format": {"type": "json_object"}}),
        ),
    );
    for c in v["choices"].as_array().expect("choices") {
        if c["finish_reason"] == "stop" {
            let content = c["message"]["content"].as_str().expect("content");
            serde_json::from_str::<Value>(content)
                .unwrap_or_else(|e| panic!("choice {}: {e}: {content}", c["index"]));
        }
    }

    // Out of range: a 400 naming `n`.
    for n in [0, 17] {
        let res = d
            .http
            .post(d.url("/v1/chat/completions"))
            .json(&chat(json!({"n": n})))
            .send()
            .expect("request");
        assert_eq!(res.status().as_u16(), 400);
        let v: Value = res.json().expect("JSON");
        assert_eq!(v["error"]["param"], "n", "{v}");
    }
}

/// The joined strings of a JSON array.
trait ConcatStr {
    fn concat_str(&self) -> String;
}

impl ConcatStr for Vec<Value> {
    fn concat_str(&self) -> String {
        self.iter().filter_map(Value::as_str).collect()
    }
}
