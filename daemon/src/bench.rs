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
        for _ in 0..tokens {
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            next = argmax(
                &m.forward_last(&input, Some(&mut cache))?
                    .squeeze(0)?
                    .to_vec1()?,
            );
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
    use crate::model::llama::Proj;
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
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: Proj::ALL.to_vec(),
            use_rslora: false,
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
