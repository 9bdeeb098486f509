//! `itamae-bench decode`: greedy prompt and decode tokens/s of the engine's decode step, side
//! by side with llama-cpp-python on the same GGUF file.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;

use itamae::engine::sampling::argmax;
use itamae::model::{self, KvCache};

/// The prompt both sides run (ChatML, ~40 tokens).
const DECODE_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a short story about a sushi chef who trains apprentices.<|im_end|>\n<|im_start|>assistant\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU seconds this process has used (every thread): a figure that holds up when other
/// processes share the cores, unlike wall time.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One mode's median prompt and decode tok/s (the decode step the engine serves with).
/// Each run also decodes the same tokens through the composed path
/// ([`model::Transformer::decode_batch_composed`]), alternating with the served step so both
/// see the same load, and prints the two side by side with their CPU time per token.
fn measure(
    model_path: &Path,
    weights: model::WeightsMode,
    tokens: usize,
    runs: usize,
) -> anyhow::Result<(f64, f64)> {
    let device = candle_core::Device::Cpu;
    let t0 = Instant::now();
    let loaded = model::load(model_path, &device, weights)?;
    println!(
        "model {} loaded in {:.1} s (weights {weights}, {} MB, {} threads)",
        loaded.name,
        t0.elapsed().as_secs_f64(),
        loaded.model.weight_bytes() / 1_000_000,
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
    let mut cpu_ms = Vec::new();
    let mut composed_tps = Vec::new();
    let mut composed_cpu_ms = Vec::new();
    let mut same_tokens = true;
    for run in 0..=runs.max(1) {
        let mut cache = KvCache::new(&m.cfg, prompt.len() + tokens);
        let t = Instant::now();
        let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let first = argmax(
            &m.forward_last(&input, Some(&mut cache))?
                .squeeze(0)?
                .to_vec1()?,
        );
        let prefill = t.elapsed().as_secs_f64();
        let mut twin = cache.fork(prompt.len() + tokens)?;
        // The step the engine serves with: a decode batch (of one), run on the pool.
        let mut next = first;
        let mut served = Vec::with_capacity(tokens);
        let (t, c) = (Instant::now(), cpu_seconds());
        for _ in 0..tokens {
            let logits = rayon::scope(|_| m.decode_batch(&[next], &mut [&mut cache], &[None]))?;
            next = argmax(&logits.squeeze(0)?.to_vec1()?);
            served.push(next);
        }
        let (dec, dec_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let mut next = first;
        let (t, c) = (Instant::now(), cpu_seconds());
        for &want in &served {
            let logits =
                rayon::scope(|_| m.decode_batch_composed(&[next], &mut [&mut twin], &[None]))?;
            next = argmax(&logits.squeeze(0)?.to_vec1()?);
            same_tokens &= next == want;
            // Follow the served tokens, so both paths see the same positions and cache.
            next = want;
        }
        let (comp, comp_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        if run > 0 {
            // run 0 warms caches and the allocator
            prompt_tps.push(prompt.len() as f64 / prefill);
            decode_tps.push(tokens as f64 / dec);
            cpu_ms.push(dec_cpu * 1e3 / tokens as f64);
            composed_tps.push(tokens as f64 / comp);
            composed_cpu_ms.push(comp_cpu * 1e3 / tokens as f64);
        }
    }
    let (p, d) = (median(prompt_tps), median(decode_tps));
    println!(
        "itamae {weights:<4} prompt {:>4} tok: {:>8.1} tok/s | decode {tokens} tok: {:>6.1} tok/s",
        prompt.len(),
        p,
        d
    );
    let (dc, cm, ccm) = (
        median(composed_tps),
        median(cpu_ms),
        median(composed_cpu_ms),
    );
    println!(
        "  decode step: served {d:.1} tok/s ({cm:.2} CPU ms/token), composed path {dc:.1} tok/s \
         ({ccm:.2} CPU ms/token): served/composed {:.2}x wall, {:.2}x CPU; greedy tokens {}",
        d / dc,
        ccm / cm,
        if same_tokens { "identical" } else { "DIFFER" }
    );
    Ok((p, d))
}

/// Prompt tok/s and decode tok/s for `tokens` greedy tokens (EOS ignored, so every run decodes
/// the same count), median of `runs`, in `weights` and — unless that is `f32` — in `f32` too, in
/// the same run; then the same with llama-cpp-python on the same file.
pub(crate) fn decode(
    model_path: &Path,
    weights: model::WeightsMode,
    tokens: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> anyhow::Result<()> {
    let (p, d) = measure(model_path, weights, tokens, runs)?;
    if weights != model::WeightsMode::F32 {
        let (pf, df) = measure(model_path, model::WeightsMode::F32, tokens, runs)?;
        println!(
            "ratio {weights}/f32: prompt {:.2}x, decode {:.2}x",
            p / pf,
            d / df
        );
    }
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
