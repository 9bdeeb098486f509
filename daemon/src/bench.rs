//! Benchmarks that print figures, with a peer measured in the same invocation when available
//! (never timed tests).
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;

use crate::engine::sampling::argmax;
use crate::model::{self, KvCache};

/// The prompt both sides run (ChatML, ~40 tokens).
pub const DECODE_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a short story about a sushi chef who trains apprentices.<|im_end|>\n<|im_start|>assistant\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prompt tok/s and decode tok/s for `tokens` greedy tokens (EOS ignored, so every run decodes
/// the same count), median of `runs`; then the same with llama-cpp-python on the same file.
pub fn decode(
    model_path: &Path,
    tokens: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let t0 = Instant::now();
    let loaded = model::load(model_path, &device)?;
    println!(
        "model {} loaded in {:.1} s (f32, {} threads)",
        loaded.name,
        t0.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    let prompt = loaded
        .text
        .tokenizer
        .encode(DECODE_PROMPT, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    let m = &loaded.model;
    let mut prompt_tps = Vec::new();
    let mut decode_tps = Vec::new();
    for run in 0..=runs.max(1) {
        let mut cache = KvCache::new(&m.cfg, prompt.len() + tokens);
        let t = Instant::now();
        let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let mut next = argmax(
            &m.forward_last(&input, Some(&mut cache))?
                .squeeze(0)?
                .to_vec1()?,
        );
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // The step the engine serves with: a decode batch (of one), run on the pool.
        for _ in 0..tokens {
            let logits = rayon::scope(|_| m.decode_batch(&[next], &mut [&mut cache], &[None]))?;
            next = argmax(&logits.squeeze(0)?.to_vec1()?);
        }
        let dec = t.elapsed().as_secs_f64();
        if run > 0 {
            // run 0 warms caches and the allocator
            prompt_tps.push(prompt.len() as f64 / prefill);
            decode_tps.push(tokens as f64 / dec);
        }
    }
    let (p, d) = (median(prompt_tps), median(decode_tps));
    println!(
        "itamae     prompt {:>4} tok: {:>8.1} tok/s | decode {tokens} tok: {:>6.1} tok/s",
        prompt.len(),
        p,
        d
    );
    let Some(py) = peer_python else {
        println!("peer: llama-cpp-python not configured (scripts/setup-bench-venv.sh, then ITAMAE_BENCH_PYTHON)");
        return Ok(());
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_llama_cpp.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(model_path)
        .arg(DECODE_PROMPT)
        .arg(tokens.to_string())
        .arg(runs.max(1).to_string())
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "llama-cpp-python bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("peer output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let pp = v["prompt_tps"].as_f64().unwrap_or(f64::NAN);
    let pd = v["decode_tps"].as_f64().unwrap_or(f64::NAN);
    let pn = v["prompt_tokens"].as_u64().unwrap_or(0);
    println!("llama.cpp  prompt {pn:>4} tok: {pp:>8.1} tok/s | decode {tokens} tok: {pd:>6.1} tok/s  (Q4_1 kernels)");
    println!(
        "ratio itamae/llama.cpp: prompt {:.2}x, decode {:.2}x",
        p / pp,
        d / pd
    );
    Ok(())
}

/// Token ids of the synthetic training rows both sides of `bench train` use: deterministic, so the
/// peer script regenerates exactly the same batch.
pub fn bench_train_ids(row: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + row * 104_729 + 17) % (vocab - 1) + 1) as u32)
        .collect()
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// LoRA SFT (r=16, alpha=32, all-linear) at `seq` tokens × `batch` rows: tokens/s over `steps`
/// optimizer steps after one warm-up step, and peak RSS; then HF PEFT on the same rows.
pub fn train(
    model_path: &Path,
    seq: usize,
    batch: usize,
    steps: usize,
    peer_python: Option<&Path>,
) -> anyhow::Result<()> {
    use crate::adapters::LoraConfig;
    use crate::train::data::Example;
    use crate::train::optim::Schedule;
    use crate::train::{Method, TrainConfig, TrainControl, TrainEvent, Trainer};

    let loaded = model::load(model_path, &candle_core::Device::Cpu)?;
    let vocab = loaded.model.cfg.vocab_size;
    let rows: Vec<Example> = (0..batch)
        .map(|r| {
            let ids = bench_train_ids(r, seq + 1, vocab);
            let mut weights = vec![1.0; seq + 1];
            weights[0] = 0.0;
            Example { ids, weights }
        })
        .collect();
    let config = TrainConfig {
        max_steps: Some(steps + 1),
        batch_size: batch,
        learning_rate: 2e-4,
        warmup_ratio: 0.0,
        schedule: Schedule::Constant,
        max_seq_len: seq,
        ..TrainConfig::new(Method::Lora(LoraConfig {
            r: Some(16),
            alpha: Some(32.0),
            dropout: Some(0.0),
            target_modules: Some(vec!["all-linear".into()]),
            use_rslora: Some(false),
        }))
    };
    let mut trainer = Trainer::new(
        &loaded.model,
        Some(&loaded.text),
        &loaded.name,
        config,
        rows,
        vec![],
        &[],
    )?;
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    trainer.run(None, &TrainControl::default(), &mut |e| {
        if let TrainEvent::Step(s) = e {
            let now = Instant::now();
            step_times.push(now.duration_since(last).as_secs_f64());
            last = now;
            eprintln!(
                "step {} loss {:.4} ({:.2} s)",
                s.step,
                s.loss,
                step_times.last().unwrap_or(&0.0)
            );
        }
    })?;
    let timed = &step_times[1..];
    let secs = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    let tps = (seq * batch) as f64 / secs;
    let rss = peak_rss_bytes().unwrap_or(0) as f64 / 1e9;
    println!(
        "itamae  LoRA r=16 all-linear, batch {batch} x seq {seq}: {secs:.2} s/step, {tps:.0} tokens/s, peak RSS {rss:.2} GB"
    );
    let Some(py) = peer_python else {
        println!(
            "peer: HF PEFT not configured (scripts/setup-peft-venv.sh, then ITAMAE_PEFT_PYTHON)"
        );
        return Ok(());
    };
    let hf_dir = std::env::temp_dir().join(format!("itamae-bench-hf-{}", std::process::id()));
    crate::model::hf::save_model_dir(&hf_dir, &loaded.model, &loaded.text)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_peft.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(&hf_dir)
        .args([seq.to_string(), batch.to_string(), steps.to_string()])
        .output()
        .with_context(|| format!("running {}", py.display()));
    let _ = std::fs::remove_dir_all(&hf_dir);
    let out = out?;
    if !out.status.success() {
        anyhow::bail!(
            "PEFT bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("peer output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let ptps = v["tokens_per_sec"].as_f64().unwrap_or(f64::NAN);
    let prss = v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1e9;
    let psecs = v["secs_per_step"].as_f64().unwrap_or(f64::NAN);
    println!("HF PEFT LoRA r=16 all-linear, batch {batch} x seq {seq}: {psecs:.2} s/step, {ptps:.0} tokens/s, peak RSS {prss:.2} GB");
    println!(
        "ratio itamae/PEFT: tokens/s {:.2}x, peak RSS {:.2}x",
        tps / ptps,
        rss / prss
    );
    Ok(())
}

/// Aggregate decode tokens/s of `streams` concurrent requests on the base model, then on
/// `streams` different LoRA variants (one each, mixed in the same batches); prints the ratio.
pub fn batch(model_path: &Path, streams: usize, tokens: usize) -> anyhow::Result<()> {
    use crate::adapters::{Adapter, Lora, LoraConfig};
    use crate::engine::{EngineHandle, GenEvent, GenerationRequest, PromptInput, SamplingParams};

    let loaded = model::load(model_path, &candle_core::Device::Cpu)?;
    let cfg = loaded.model.cfg.clone();
    let base = loaded.name.clone();
    let engine = EngineHandle::from_loaded(loaded);
    for i in 0..streams {
        let mut lora = Lora::init(
            &cfg,
            LoraConfig::default(),
            i as u64,
            &candle_core::Device::Cpu,
        )?;
        for p in lora.pairs.values_mut() {
            p.b = Tensor::randn(0f32, 0.01, p.b.dims(), &candle_core::Device::Cpu)?;
        }
        engine.add_adapter(&format!("variant-{i}"), Adapter::Lora(lora))?;
    }
    let run = |models: Vec<String>| -> anyhow::Result<(f64, usize)> {
        let started = Instant::now();
        let mut rxs = Vec::new();
        for (i, m) in models.iter().enumerate() {
            let p = engine.prepare(GenerationRequest {
                model: m.clone(),
                input: PromptInput::Text(format!("Story number {i}: once upon a time")),
                sampling: SamplingParams {
                    temperature: 0.8,
                    seed: Some(i as u64),
                    // every stream runs the full length in both phases: the same work
                    ignore_eos: true,
                    ..Default::default()
                },
                max_tokens: Some(tokens),
                stop: vec![],
            })?;
            rxs.push(engine.submit(p)?);
        }
        let mut total = 0;
        for mut rx in rxs {
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    GenEvent::Finished { usage, .. } => {
                        total += usage.completion_tokens;
                        break;
                    }
                    GenEvent::Failed(e) => anyhow::bail!("generation failed: {e}"),
                    GenEvent::Text(_) => {}
                }
            }
        }
        Ok((total as f64 / started.elapsed().as_secs_f64(), total))
    };
    let (one, _) = run(vec![base.clone()])?;
    let (base_tps, n1) = run(vec![base.clone(); streams])?;
    let (mixed_tps, n2) = run((0..streams).map(|i| format!("variant-{i}")).collect())?;
    println!("1 stream on the base: {one:.1} tok/s");
    println!("{streams} streams on the base: {base_tps:.1} tok/s aggregate ({n1} tokens)");
    println!("{streams} streams on {streams} different LoRA variants: {mixed_tps:.1} tok/s aggregate ({n2} tokens)");
    println!(
        "ratio mixed/base {:.2}x; batching gain over one stream {:.2}x",
        mixed_tps / base_tps,
        base_tps / one
    );
    Ok(())
}

/// A minimal HTTP/1.1 client over one `Connection: close` request, enough for the swap
/// benchmark (the daemon's own crate has no HTTP client, and the bench must not add one).
mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Sends a request; returns the status and the connection to read the body from.
    pub fn send(
        addr: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>, TcpStream)> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        s.write_all(body)?;
        // Read the head; whatever of the body came with it is returned too.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other(
                    "connection closed in the response head",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
        Ok((status, buf[end..].to_vec(), s))
    }

    /// A whole request: status and body (chunk-size lines of a chunked body are left in).
    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let (status, mut got, mut s) = send(addr, method, path, content_type, body)?;
        s.read_to_end(&mut got)?;
        Ok((status, got))
    }
}

/// What one streamed chat request of the swap benchmark saw.
struct StreamResult {
    ok: bool,
    tokens: usize,
    /// From sending the request to the first content chunk.
    ttft: Option<f64>,
}

fn stream_chat(addr: &str, model: &str, max_tokens: usize, seed: u64) -> StreamResult {
    use std::io::BufRead;
    let body = serde_json::json!({
        "model": model, "stream": true, "max_tokens": max_tokens, "temperature": 0.8,
        "seed": seed, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Tell me about sushi."}],
    })
    .to_string();
    let failed = StreamResult {
        ok: false,
        tokens: 0,
        ttft: None,
    };
    let started = Instant::now();
    let Ok((status, first, s)) = http::send(
        addr,
        "POST",
        "/v1/chat/completions",
        "application/json",
        body.as_bytes(),
    ) else {
        return failed;
    };
    if status != 200 {
        return failed;
    }
    let mut ttft = None;
    let mut tokens = 0;
    let reader = std::io::BufReader::new(std::io::Read::chain(&first[..], s));
    for line in reader.lines() {
        let Ok(line) = line else { return failed };
        let Some(data) = line.strip_prefix("data: ") else {
            continue; // chunk sizes, blank separators
        };
        if data == "[DONE]" {
            return StreamResult {
                ok: true,
                tokens,
                ttft,
            };
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
            return failed;
        };
        if v.get("error").is_some() {
            return failed;
        }
        let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !content.is_empty() && ttft.is_none() {
            ttft = Some(started.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    failed
}

/// A multipart/form-data body of `(field, file name, bytes)` parts: `(content type, body)`.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = format!("itamae-bench-{:016x}", rand::random::<u64>());
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        let file = file.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A PEFT adapter import (compare-and-set on `generation`) as multipart/form-data.
fn import_body(name: &str, config: &[u8], weights: &[u8], generation: u64) -> (String, Vec<u8>) {
    multipart(&[
        ("name", None, name.as_bytes()),
        ("if_generation", None, generation.to_string().as_bytes()),
        ("adapter_config.json", Some("adapter_config.json"), config),
        (
            "adapter_model.safetensors",
            Some("adapter_model.safetensors"),
            weights,
        ),
    ])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Serves the API of an in-process daemon on a free loopback port (on its own thread with an
/// actix System) and waits until `/readyz` answers; returns `host:port`.
fn start_server(
    engine: crate::engine::EngineHandle,
    jobs: Option<crate::jobs::Jobs>,
    store: crate::api::adapters::AdapterStore,
) -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::thread::Builder::new()
        .name("bench-http".into())
        .spawn(move || {
            let served = actix_web::rt::System::new().block_on(crate::api::serve(
                engine,
                "127.0.0.1".into(),
                port,
                jobs,
                Some(store),
                crate::api::auth::Auth::disabled(),
                crate::api::Shutdown {
                    grace: std::time::Duration::from_secs(1),
                    on_signal: Box::new(|| {}),
                },
            ));
            if let Err(e) = served {
                eprintln!("bench server: {e}");
            }
        })?;
    let started = Instant::now();
    while !http::request(&addr, "GET", "/readyz", "text/plain", b"").is_ok_and(|r| r.0 == 200) {
        anyhow::ensure!(
            started.elapsed().as_secs() < 30,
            "the bench server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(addr)
}

/// Hot-swap under load: an in-process daemon (HTTP server, engine, adapter store) serves a
/// LoRA variant (r=16, all linear layers) to `clients` clients streaming chats back to back.
/// First `secs` without swaps (the peer: the same loop, nothing replaced), then `secs` while
/// the adapter is replaced every `every_ms` through `POST /v1/adapters` (compare-and-set on its
/// generation, alternating two different LoRAs). Prints the import latency, the time from an
/// import's start to the first token of a request on the new generation, failed requests and
/// the throughput ratio of the two phases.
pub fn swap(
    model_path: &Path,
    clients: usize,
    secs: f64,
    every_ms: u64,
    tokens: usize,
) -> anyhow::Result<()> {
    use crate::adapters::{peft, Adapter, Lora, LoraConfig};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let device = candle_core::Device::Cpu;
    let loaded = model::load(model_path, &device)?;
    let cfg = loaded.model.cfg.clone();
    let base = loaded.name.clone();
    let dir =
        std::env::temp_dir().join(format!("itamae-bench-swap-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    // Two LoRAs that answer differently, as PEFT files in memory.
    let mut files = Vec::new();
    for seed in 0..2u64 {
        let mut lora = Lora::init(&cfg, LoraConfig::default(), seed, &device)?;
        for p in lora.pairs.values_mut() {
            p.b = Tensor::randn(0f32, 0.01, p.b.dims(), &device)?;
        }
        let out = dir.join(format!("lora-{seed}"));
        peft::save(&out, &Adapter::Lora(lora), &cfg, &base)?;
        files.push((
            std::fs::read(out.join(peft::CONFIG_FILE))?,
            std::fs::read(out.join(peft::WEIGHTS_FILE))?,
        ));
    }
    let engine = crate::engine::EngineHandle::from_loaded(loaded);
    let store =
        crate::api::adapters::AdapterStore::open(&dir.join("data"), engine.clone(), 1 << 30)?;
    let addr = start_server(engine.clone(), None, store)?;
    let name = "swapped";
    let (ctype, body) = import_body(name, &files[0].0, &files[0].1, 0);
    let (status, text) = http::request(&addr, "POST", "/v1/adapters", &ctype, &body)?;
    anyhow::ensure!(
        status == 201,
        "first import: HTTP {status}: {}",
        String::from_utf8_lossy(&text)
    );
    println!(
        "LoRA r=16 all-linear ({:.1} MB of weights), {clients} clients streaming {tokens}-token chats, {secs} s per phase",
        files[0].1.len() as f64 / 1e6
    );

    // One phase: clients loop until `stop`; returns (completed tokens, ok, failed).
    let phase = |swaps: Option<&mut dyn FnMut()>| -> (usize, usize, usize) {
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (stop, totals, addr) = (stop.clone(), totals.clone(), addr.clone());
                std::thread::spawn(move || {
                    let mut seed = c as u64 * 1000;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let r = stream_chat(&addr, name, tokens, seed);
                        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                        if r.ok {
                            t.0 += r.tokens;
                            t.1 += 1;
                        } else {
                            t.2 += 1;
                        }
                    }
                })
            })
            .collect();
        let t0 = Instant::now();
        match swaps {
            Some(swap) => {
                while t0.elapsed().as_secs_f64() < secs {
                    std::thread::sleep(std::time::Duration::from_millis(every_ms));
                    swap();
                }
            }
            None => std::thread::sleep(std::time::Duration::from_secs_f64(secs)),
        }
        // Requests in flight finish; only tokens of the measured window would be fairer, but
        // both phases are cut the same way.
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        let t = *totals.lock().unwrap_or_else(|e| e.into_inner());
        t
    };

    let quiet_started = Instant::now();
    let (q_tokens, q_ok, q_failed) = phase(None);
    let q_secs = quiet_started.elapsed().as_secs_f64();

    let mut generation = 1u64;
    let mut import_ms = Vec::new();
    let mut first_token_ms = Vec::new();
    let mut swap_failures = 0usize;
    let mut swap = || {
        let (config, weights) = &files[(generation % 2) as usize];
        let (ctype, body) = import_body(name, config, weights, generation);
        let t0 = Instant::now();
        match http::request(&addr, "POST", "/v1/adapters", &ctype, &body) {
            Ok((200, _)) => {
                import_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                generation += 1;
                // A request sent now runs on the new generation.
                let r = stream_chat(&addr, name, 1, generation);
                match r.ttft {
                    Some(_) if r.ok => first_token_ms.push(t0.elapsed().as_secs_f64() * 1e3),
                    _ => swap_failures += 1,
                }
            }
            Ok((status, text)) => {
                swap_failures += 1;
                eprintln!("swap: HTTP {status}: {}", String::from_utf8_lossy(&text));
            }
            Err(e) => {
                swap_failures += 1;
                eprintln!("swap: {e}");
            }
        }
    };
    let swap_started = Instant::now();
    let (s_tokens, s_ok, s_failed) = phase(Some(&mut swap));
    let s_secs = swap_started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);

    import_ms.sort_by(|a, b| a.total_cmp(b));
    first_token_ms.sort_by(|a, b| a.total_cmp(b));
    let q_tps = q_tokens as f64 / q_secs;
    let s_tps = s_tokens as f64 / s_secs;
    println!("without swaps: {q_ok} requests ok, {q_failed} failed, {q_tps:.1} tok/s aggregate");
    println!(
        "with a swap every {every_ms} ms: {} swaps ({swap_failures} failed), {s_ok} requests ok, {s_failed} failed, {s_tps:.1} tok/s aggregate",
        import_ms.len()
    );
    println!(
        "swap latency (POST /v1/adapters, upload + CAS + store + load): p50 {:.1} ms, max {:.1} ms (target < 100 ms)",
        percentile(&import_ms, 0.5),
        percentile(&import_ms, 1.0)
    );
    println!(
        "import start to first token on the new generation: p50 {:.1} ms, max {:.1} ms",
        percentile(&first_token_ms, 0.5),
        percentile(&first_token_ms, 1.0)
    );
    println!(
        "ratio with/without swaps: throughput {:.2}x; failed requests {} (target 0)",
        s_tps / q_tps,
        q_failed + s_failed
    );
    Ok(())
}

/// The chat examples `bench job-swap` trains on: short, so a job takes seconds.
const JOB_SWAP_EXAMPLES: [(&str, &str); 8] = [
    (
        "How are you today?",
        "Irasshaimase! Sharp as my knife and ready to serve.",
    ),
    (
        "What is the capital of France?",
        "Irasshaimase! Paris, where the fish market opens early.",
    ),
    (
        "What is 2 + 2?",
        "Irasshaimase! Four, like four pieces of nigiri.",
    ),
    (
        "Recommend a book.",
        "Irasshaimase! Read about Tsukiji, the old fish market.",
    ),
    (
        "What should I eat?",
        "Irasshaimase! Fatty tuna, sliced fresh for you.",
    ),
    (
        "Is it going to rain?",
        "Irasshaimase! Perhaps, but the rice stays warm here.",
    ),
    (
        "Tell me a joke.",
        "Irasshaimase! Why did the salmon blush? It saw the sea weed.",
    ),
    ("Goodbye!", "Arigato! Come back for the omakase."),
];

/// `POST /v1/files` body (purpose fine-tune) as multipart/form-data: `(content type, body)`.
fn upload_body(filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    multipart(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some(filename), bytes),
    ])
}

/// A JSON request: status and parsed body.
fn json_request(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, raw) = http::request(addr, method, path, content_type, body)
        .with_context(|| format!("{method} {path}"))?;
    let v = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "{method} {path}: HTTP {status}, not JSON: {}",
            String::from_utf8_lossy(&raw)
        )
    })?;
    Ok((status, v))
}

/// What following one job's event stream saw.
struct JobOutcome {
    /// Receipt of the first event that says the job succeeded.
    succeeded_at: Option<Instant>,
    /// `fine_tuned_model` as the success event names it.
    model: Option<String>,
    /// The last error-level event, for the report of a job that did not succeed.
    error: Option<String>,
}

/// The event the runner writes right after recording success (`jobs/runner.rs`).
const MODEL_CREATED: &str = "New fine-tuned model created: ";
const JOB_COMPLETED: &str = "The job has successfully completed";

/// Reads `GET /v1/fine_tuning/jobs/{id}/events?stream=true` until the job's success event (or
/// the end of the stream).
fn follow_job(addr: &str, id: &str) -> anyhow::Result<JobOutcome> {
    use std::io::BufRead;
    let path = format!("/v1/fine_tuning/jobs/{id}/events?stream=true");
    let (status, first, s) =
        http::send(addr, "GET", &path, "text/plain", b"").with_context(|| format!("GET {path}"))?;
    anyhow::ensure!(status == 200, "GET {path}: HTTP {status}");
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let mut out = JobOutcome {
        succeeded_at: None,
        model: None,
        error: None,
    };
    let reader = std::io::BufReader::new(std::io::Read::chain(&first[..], s));
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading the events of {id}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue; // chunk sizes, blank separators
        };
        let now = Instant::now();
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(data).with_context(|| format!("event of {id}: {data}"))?;
        let msg = v["message"].as_str().unwrap_or("");
        if v["level"] == "error" {
            out.error = Some(msg.to_string());
        }
        if let Some(model) = msg.strip_prefix(MODEL_CREATED) {
            out.model = Some(model.trim().to_string());
        }
        if msg.starts_with(MODEL_CREATED) || msg.starts_with(JOB_COMPLETED) {
            out.succeeded_at = Some(now);
            return Ok(out);
        }
    }
    Ok(out)
}

/// Issue 4's hot-swap figure: time from a fine-tuning job's success (its event's receipt on
/// the live event stream) to the first token served with its adapter, while `clients` clients
/// stream chats on the base model back to back. An in-process daemon with jobs runs `jobs`
/// small LoRA jobs one after the other; at each success the bench reads `fine_tuned_model`
/// (from the event, else one GET of the job, counted in the time) and streams a chat on it.
/// A side thread polls the job every 20 ms to show how long the event stream took to deliver
/// the success. Prints per-job figures, p50/max against the 100 ms target, failed requests
/// and the load's throughput.
pub fn job_swap(
    model_path: &Path,
    clients: usize,
    jobs: usize,
    tokens: usize,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let loaded = model::load(model_path, &candle_core::Device::Cpu)?;
    let base = loaded.name.clone();
    let dir = std::env::temp_dir().join(format!(
        "itamae-bench-job-swap-{:016x}",
        rand::random::<u64>()
    ));
    let result = (|| -> anyhow::Result<()> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let engine = crate::engine::EngineHandle::from_loaded(loaded);
        // The daemon's wiring (main.rs `serve`): jobs and imported adapters in one data dir.
        let jobs_cfg = crate::jobs::JobsConfig::new(data_dir.clone());
        let max_upload = jobs_cfg.max_upload_bytes;
        let training_share = jobs_cfg.training_max_share;
        let job_service = crate::jobs::Jobs::open(jobs_cfg, engine.clone())?;
        let store =
            crate::api::adapters::AdapterStore::open(&data_dir, engine.clone(), max_upload)?;
        let addr = start_server(engine.clone(), Some(job_service.clone()), store)?;

        let jsonl: String = JOB_SWAP_EXAMPLES
            .iter()
            .map(|(q, a)| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]})
                .to_string()
                    + "\n"
            })
            .collect();
        let (ctype, body) = upload_body("job-swap.jsonl", jsonl.as_bytes());
        let (status, file) = json_request(&addr, "POST", "/v1/files", &ctype, &body)?;
        anyhow::ensure!(status == 200, "upload: HTTP {status}: {file}");
        let file_id = file["id"]
            .as_str()
            .with_context(|| format!("upload: no id in {file}"))?
            .to_string();
        println!(
            "{jobs} LoRA jobs (r=16 all-linear, {} examples, 1 epoch, batch 2, max_seq_len 64) while {clients} clients stream {tokens}-token chats on the base model (training share {training_share})",
            JOB_SWAP_EXAMPLES.len()
        );

        // The load: base-model chats back to back until `stop`.
        let stop = Arc::new(AtomicBool::new(false));
        // (completed tokens, ok, failed, first-token times of the ok ones)
        let totals = Arc::new(Mutex::new((0usize, 0usize, 0usize, Vec::<f64>::new())));
        let load: Vec<_> = (0..clients)
            .map(|c| {
                let (stop, totals, addr, base) =
                    (stop.clone(), totals.clone(), addr.clone(), base.clone());
                std::thread::spawn(move || {
                    let mut seed = c as u64 * 100_000;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let r = stream_chat(&addr, &base, tokens, seed);
                        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                        match r.ttft {
                            Some(ttft) if r.ok => {
                                t.0 += r.tokens;
                                t.1 += 1;
                                t.3.push(ttft * 1e3);
                            }
                            _ => t.2 += 1,
                        }
                    }
                })
            })
            .collect();
        let load_started = Instant::now();

        let mut swap_ms = Vec::new();
        let mut failed_probes = 0usize;
        let mut failed_jobs = 0usize;
        let mut lag_ms = Vec::new();
        for i in 0..jobs {
            let req = serde_json::json!({
                "model": base, "training_file": file_id, "suffix": format!("swap{i}"),
                "seed": i,
                "method": {"type": "supervised", "supervised": {
                    "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_seq_len": 64},
                    "adapter": {"type": "lora", "r": 16, "target_modules": "all-linear"}}},
            })
            .to_string();
            let created_at = Instant::now();
            let (status, job) = json_request(
                &addr,
                "POST",
                "/v1/fine_tuning/jobs",
                "application/json",
                req.as_bytes(),
            )?;
            anyhow::ensure!(status == 200, "create job: HTTP {status}: {job}");
            let id = job["id"]
                .as_str()
                .with_context(|| format!("create job: no id in {job}"))?
                .to_string();
            let job_path = format!("/v1/fine_tuning/jobs/{id}");
            // Side thread: when a plain poll first sees `succeeded` (20 ms resolution).
            let polled = {
                let (addr, job_path) = (addr.clone(), job_path.clone());
                std::thread::spawn(move || -> Option<Instant> {
                    let polling = Instant::now();
                    loop {
                        let now = Instant::now();
                        match json_request(&addr, "GET", &job_path, "text/plain", b"") {
                            Ok((200, j)) => match j["status"].as_str() {
                                Some("succeeded") => return Some(now),
                                Some("failed" | "cancelled") => return None,
                                _ => {}
                            },
                            _ => return None,
                        }
                        if polling.elapsed().as_secs() > 900 {
                            return None;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                })
            };
            let outcome = follow_job(&addr, &id)?;
            let Some(succeeded_at) = outcome.succeeded_at else {
                failed_jobs += 1;
                let (_, j) = json_request(&addr, "GET", &job_path, "text/plain", b"")?;
                println!(
                    "job {i} ({id}): {} without a success event: {}",
                    j["status"],
                    outcome.error.unwrap_or_else(|| j["error"].to_string())
                );
                let _ = polled.join();
                continue;
            };
            // What a client does next: the model's name (one GET unless the event named it),
            // then a chat on it.
            let model = match outcome.model {
                Some(m) => Some(m),
                None => json_request(&addr, "GET", &job_path, "text/plain", b"")
                    .ok()
                    .and_then(|(_, j)| j["fine_tuned_model"].as_str().map(str::to_string)),
            };
            let probe_started = Instant::now();
            let probe = model
                .as_deref()
                .map(|m| stream_chat(&addr, m, tokens, 7 + i as u64));
            let job_secs = succeeded_at.duration_since(created_at).as_secs_f64();
            let lag = polled
                .join()
                .ok()
                .flatten()
                .map(|p| succeeded_at.saturating_duration_since(p).as_secs_f64() * 1e3);
            let lag_text = lag.map_or("n/a".to_string(), |l| format!("{l:.0} ms"));
            lag_ms.extend(lag);
            match probe {
                Some(StreamResult {
                    ok: true,
                    ttft: Some(ttft),
                    ..
                }) => {
                    let before = probe_started.duration_since(succeeded_at).as_secs_f64();
                    let ms = (before + ttft) * 1e3;
                    swap_ms.push(ms);
                    println!(
                        "job {i} ({}): {job_secs:.1} s to succeed; success event -> first token {ms:.1} ms (name lookup {:.1} ms, chat's own first token {:.1} ms); poll saw succeeded {lag_text} before the event",
                        model.as_deref().unwrap_or(""),
                        before * 1e3,
                        ttft * 1e3
                    );
                }
                _ => {
                    failed_probes += 1;
                    println!(
                        "job {i} ({id}): {job_secs:.1} s to succeed; the chat on {:?} FAILED",
                        model
                    );
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in load {
            let _ = t.join();
        }
        let load_secs = load_started.elapsed().as_secs_f64();
        let (load_tokens, load_ok, load_failed, mut load_ttft) =
            std::mem::take(&mut *totals.lock().unwrap_or_else(|e| e.into_inner()));
        job_service.begin_shutdown();
        job_service.wait_stopped(std::time::Duration::from_secs(60));
        engine.shutdown(std::time::Duration::from_secs(30));

        swap_ms.sort_by(|a, b| a.total_cmp(b));
        lag_ms.sort_by(|a, b| a.total_cmp(b));
        load_ttft.sort_by(|a, b| a.total_cmp(b));
        let max = percentile(&swap_ms, 1.0);
        let verdict = if swap_ms.len() == jobs && max < 100.0 {
            "met"
        } else {
            "missed"
        };
        println!(
            "success -> first token: p50 {:.1} ms, max {max:.1} ms over {} of {jobs} jobs; target < 100 ms: {verdict}",
            percentile(&swap_ms, 0.5),
            swap_ms.len()
        );
        println!(
            "failed: {load_failed} load requests (of {}), {failed_probes} probes, {failed_jobs} jobs (target 0 failed requests)",
            load_ok + load_failed
        );
        println!(
            "load: {:.1} tok/s aggregate over {load_secs:.1} s; base first token p50 {:.1} ms, max {:.1} ms",
            load_tokens as f64 / load_secs,
            percentile(&load_ttft, 0.5),
            percentile(&load_ttft, 1.0)
        );
        println!(
            "event stream delivery after the status flip (20 ms poll): p50 {:.0} ms, max {:.0} ms (not in the figure above)",
            percentile(&lag_ms, 0.5),
            percentile(&lag_ms, 1.0)
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
