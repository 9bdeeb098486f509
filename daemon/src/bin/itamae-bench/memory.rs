//! `itamae-bench memory`: resident set after loading the base model in each weights mode and
//! filling a KV cache of `kv_tokens` positions (a real prefill, so the cache's pages are
//! resident), each in a fresh child process (so one mode's freed pages do not flatter the
//! next), against the GGUF file's size plus that cache's f32 bytes (the issue's ≤ 1.3× target).
//! The fill hands freed memory back after each prefill as the engine does
//! (`alloc::release_after_burst`). Each child also prints where its resident pages are at
//! start, after the load, after the fill and after a full trim (`stage` lines, from smaps).
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use itamae::model::{self, WeightsMode};

/// The process's resident set in bytes (Linux `VmRSS`).
fn rss_bytes() -> Option<u64> {
    itamae::alloc::rss_bytes().map(|(now, _)| now)
}

/// Where the resident pages of this process are, from `/proc/self/smaps`: this executable's
/// own mappings (text, rodata, data), shared libraries (OpenBLAS, libc, …), other files, the
/// brk heap and the anonymous mappings (glibc's other arenas, blocks above its mmap threshold —
/// the weights and the KV cache —, thread stacks). Plus, under glibc, what malloc holds live
/// and what it keeps freed.
#[derive(Default)]
struct Breakdown {
    exe: u64,
    libs: u64,
    files: u64,
    heap: u64,
    anon: u64,
    heap_in_use: Option<u64>,
    heap_free: Option<u64>,
}

impl Breakdown {
    fn now() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let exe = std::env::current_exe().ok();
        let exe = exe.as_ref().and_then(|p| p.to_str()).unwrap_or("");
        let mut b = Breakdown::default();
        let mut bucket: Option<&mut u64> = None;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let Some(first) = it.next() else { continue };
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: `start-end perms offset dev inode [path]`.
                let path = it.nth(4).unwrap_or("");
                bucket = Some(if path.is_empty() {
                    &mut b.anon
                } else if path == exe {
                    &mut b.exe
                } else if path == "[heap]" {
                    &mut b.heap
                } else if path.contains(".so") {
                    &mut b.libs
                } else if path.starts_with('/') {
                    &mut b.files
                } else {
                    // [stack], [vdso], [vvar]: the main thread's stack and the kernel's pages.
                    &mut b.anon
                });
            } else if first == "Rss:" {
                let kb: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if let Some(slot) = bucket.as_deref_mut() {
                    *slot += kb * 1024;
                }
            }
        }
        if let Some(h) = itamae::alloc::heap_stats() {
            b.heap_in_use = Some(h.in_use);
            b.heap_free = Some(h.free_kept);
        }
        Some(b)
    }

    /// One parseable line: `stage NAME rss exe libs files heap anon in_use free` (bytes; -1
    /// when unknown).
    fn line(&self, stage: &str) -> String {
        let rss = rss_bytes().map_or(-1, |v| v as i64);
        let opt = |v: Option<u64>| v.map_or(-1, |v| v as i64);
        format!(
            "stage {stage} {rss} {} {} {} {} {} {} {}",
            self.exe,
            self.libs,
            self.files,
            self.heap,
            self.anon,
            opt(self.heap_in_use),
            opt(self.heap_free)
        )
    }
}

fn print_stage(stage: &str) {
    if let Some(b) = Breakdown::now() {
        println!("{}", b.line(stage));
    }
}

/// The parent's rendering of a child's `stage` line.
fn show_stage(line: &str) {
    let mut it = line.split_whitespace();
    let stage = it.next().unwrap_or("?");
    let v: Vec<i64> = it.filter_map(|x| x.parse().ok()).collect();
    let mb = |i: usize| match v.get(i) {
        Some(&x) if x >= 0 => format!("{:.1}", x as f64 / 1e6),
        _ => "-".into(),
    };
    println!(
        "  {stage:<11} RSS {:>6} = exe {:>5} + libs {:>5} + files {:>5} + heap {:>6} + anon {:>6}   (malloc: live {}, free chunks {}, trimmed ones included)",
        mb(0),
        mb(1),
        mb(2),
        mb(3),
        mb(4),
        mb(5),
        mb(6),
        mb(7)
    );
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
    print_stage("start");
    let loaded = model::load(model_path, &dev, mode)?;
    print_stage("loaded");
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
        // What the engine does after each prefill step.
        itamae::alloc::release_after_burst();
        done += n;
    }
    print_stage("filled");
    let rss = rss_bytes().context("reading VmRSS")?;
    println!(
        "measured {mode} {rss} {} {} {}",
        loaded.model.weight_bytes(),
        loaded.model.cfg.num_layers,
        loaded.model.cfg.kv_dim()
    );
    // What the allocator could still give back: the measure above is taken without it.
    itamae::alloc::release_free_memory();
    print_stage("trimmed");
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
    let mut stages = Vec::new();
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
        stages.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("stage "))
                .map(|l| format!("{mode} {l}")),
        );
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
    println!("where the resident MB are, per mode and stage (smaps):");
    let mut last_mode = "";
    for l in &stages {
        let (mode, rest) = l.split_once(' ').unwrap_or(("?", l));
        if mode != last_mode {
            println!("{mode}");
            last_mode = mode;
        }
        show_stage(rest);
    }
    Ok(())
}
