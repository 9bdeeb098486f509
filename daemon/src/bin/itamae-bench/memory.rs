//! `itamae-bench memory`: resident set after loading the base model in each weights mode and
//! filling a KV cache of `kv_tokens` positions (a real prefill, so the cache's pages are
//! resident), each in a fresh child process (so one mode's freed pages do not flatter the
//! next), against the GGUF file's size plus that cache's f32 bytes (the issue's ≤ 1.3× target).
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use itamae::model::{self, WeightsMode};

/// The process's resident set in bytes (Linux `VmRSS`).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Positions per prefill call while filling the cache.
const FILL_CHUNK: usize = 256;

/// The child's side: load in `mode`, prefill `kv_tokens` positions, print one parseable line.
pub(crate) fn measure_one(
    model_path: &Path,
    mode: WeightsMode,
    kv_tokens: usize,
) -> anyhow::Result<()> {
    let dev = candle_core::Device::Cpu;
    let loaded = model::load(model_path, &dev, mode)?;
    let mut cache = model::KvCache::new(&loaded.model.cfg, kv_tokens);
    let ids = loaded
        .text
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. ", false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        anyhow::bail!("the tokenizer made no tokens of the fill text")
    }
    let mut done = 0;
    while done < kv_tokens {
        let n = FILL_CHUNK.min(kv_tokens - done);
        let chunk: Vec<u32> = (0..n).map(|i| ids[(done + i) % ids.len()]).collect();
        let input = candle_core::Tensor::new(chunk.as_slice(), &dev)?.unsqueeze(0)?;
        loaded.model.forward_last(&input, Some(&mut cache))?;
        done += n;
    }
    let rss = rss_bytes().context("reading VmRSS")?;
    println!(
        "measured {mode} {rss} {} {} {}",
        loaded.model.weight_bytes(),
        loaded.model.cfg.num_layers,
        loaded.model.cfg.kv_dim()
    );
    Ok(())
}

pub(crate) fn memory(model_path: &Path, kv_tokens: usize) -> anyhow::Result<()> {
    let file = std::fs::metadata(model_path)
        .with_context(|| format!("{}", model_path.display()))?
        .len();
    let exe = std::env::current_exe()?;
    println!(
        "model {} ({:.1} MB file); RSS after filling a KV cache of {kv_tokens} positions (f32)",
        model_path.display(),
        file as f64 / 1e6
    );
    println!(
        "{:<6} {:>10} {:>13} {:>12} {:>9}",
        "mode", "RSS MB", "weights MB", "target MB", "RSS/target"
    );
    for mode in WeightsMode::ALL {
        let out = Command::new(&exe)
            .arg("memory")
            .arg("--model")
            .arg(model_path)
            .arg("--only")
            .arg(mode.name())
            .arg("--kv-tokens")
            .arg(kv_tokens.to_string())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("measured ")) else {
            println!(
                "{mode:<6} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        };
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let [rss, weights, layers, kv_dim] = f[..] else {
            anyhow::bail!("unexpected child output `{line}`")
        };
        let kv = 2 * layers * kv_dim * 4 * kv_tokens as u64;
        let target = file + kv;
        println!(
            "{:<6} {:>10.1} {:>13.1} {:>12.1} {:>9.2}",
            mode.name(),
            rss as f64 / 1e6,
            weights as f64 / 1e6,
            target as f64 / 1e6,
            rss as f64 / target as f64
        );
    }
    Ok(())
}
