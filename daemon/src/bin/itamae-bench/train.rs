//! `itamae-bench train`: LoRA SFT tokens/s and peak RSS on synthetic rows, side by side with HF
//! PEFT on the very same rows.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use itamae::model;

/// Token ids of the synthetic training rows both sides of `itamae-bench train` use: deterministic, so the
/// peer script regenerates exactly the same batch.
fn bench_train_ids(row: usize, len: usize, vocab: usize) -> Vec<u32> {
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
pub(crate) fn train(
    model_path: &Path,
    seq: usize,
    batch: usize,
    steps: usize,
    peer_python: Option<&Path>,
) -> anyhow::Result<()> {
    use itamae::adapters::LoraConfig;
    use itamae::train::data::Example;
    use itamae::train::optim::Schedule;
    use itamae::train::{Method, TrainConfig, TrainControl, TrainEvent, Trainer};

    let loaded = model::load(
        model_path,
        &candle_core::Device::Cpu,
        itamae::model::WeightsMode::default(),
    )?;
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
        // LoRA's defaults are the figure's configuration: r=16, alpha=32, no dropout, every
        // linear projection.
        ..TrainConfig::new(Method::Lora(LoraConfig::default()))
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
    itamae::model::hf::save_model_dir(&hf_dir, &loaded.model, &loaded.text)?;
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
