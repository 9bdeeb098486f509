//! `itamae-bench train`: LoRA SFT tokens/s and peak RSS on synthetic rows, for the f32 base, the
//! base as stored (`auto`: QLoRA-style on GGUF blocks) and HF PEFT on the very same rows.
//!
//! Each side is its own process (so each peak RSS is its own and no side's freed pages flatter
//! another), and the driver interleaves their steps: step i of every side runs before step i + 1
//! of any, in an order that rotates per step. On a shared machine the load then drifts under all
//! sides alike, and the ratios printed are taken within one run.
//!
//! Line protocol of a side (the itamae worker below and `scripts/bench_peft.py`): it loads, prints
//! `{"ready":true}`, then for every `step` line read from stdin runs one optimizer step and prints
//! `{"secs":…,"loss":…}` (the itamae side adds the step's CPU seconds in user and kernel mode
//! and its minor page faults: on a shared machine they move far less with the load than the
//! wall time, and the kernel share is where re-faulted pages show); after `steps + 1` steps (the first is a warm-up, not timed) it prints
//! `{"peak_rss_bytes":…}` (the itamae side adds `rss_after_bytes`: its resident set once the
//! trainer is dropped and the allocator has handed its free pages back, as the daemon does after
//! a job) and exits. Other stdout lines (the machine banner) are skipped.
//!
//! `--allocators` runs every itamae mode once per process allocator (`ITAMAE_ALLOCATOR`, see
//! `itamae::alloc`), so that the choices are compared within one run too.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;

use itamae::alloc::Choice;
use itamae::model::{self, WeightsMode};

/// Token ids of the synthetic training rows every side uses: deterministic, so the peer script
/// regenerates exactly the same batch.
fn bench_train_ids(row: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + row * 104_729 + 17) % (vocab - 1) + 1) as u32)
        .collect()
}

/// The shape every side trains: LoRA r=16, alpha=32, no dropout, every linear projection, at
/// `seq` tokens × `batch` rows, AdamW at lr 2e-4, clipping at 1.0.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub seq: usize,
    pub batch: usize,
    pub steps: usize,
}

/// The worker side (a child of [`train`]): loads the base in `mode` and trains one step per
/// `step` line on stdin, as described in the module doc.
pub(crate) fn worker(model_path: &Path, mode: WeightsMode, shape: Shape) -> anyhow::Result<()> {
    use itamae::adapters::LoraConfig;
    use itamae::train::data::Example;
    use itamae::train::optim::Schedule;
    use itamae::train::{Method, TrainConfig, TrainControl, TrainEvent, Trainer};

    let Shape { seq, batch, steps } = shape;
    let loaded = model::load(model_path, &candle_core::Device::Cpu, mode)?;
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
    println!("{}", serde_json::json!({"ready": true}));
    std::io::stdout().flush()?;
    // The driver starts each step: the throttle hook runs before every micro-batch (one per
    // step here) and blocks until the next `step` line arrives.
    let started: &'static Mutex<Option<(Instant, Usage)>> = Box::leak(Box::new(Mutex::new(None)));
    let control = TrainControl {
        throttle: Some(Box::new(move |c: &TrainControl| {
            let mut line = String::new();
            let eof = std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_or(true, |n| n == 0);
            if eof {
                c.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            *started.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), usage()));
        })),
        ..TrainControl::default()
    };
    let mut out_err = None;
    trainer.run(None, &control, &mut |e| {
        if let TrainEvent::Step(s) = e {
            let t0 = started.lock().unwrap_or_else(|e| e.into_inner()).take();
            let secs = t0.map_or(f64::NAN, |(t, _)| t.elapsed().as_secs_f64());
            let (now, u0) = (usage(), t0.map_or(Usage::default(), |(_, u)| u));
            println!(
                "{}",
                serde_json::json!({
                    "secs": secs,
                    "loss": s.loss,
                    "user_secs": now.user - u0.user,
                    "sys_secs": now.sys - u0.sys,
                    "minor_faults": now.minflt - u0.minflt,
                })
            );
            if let Err(e) = std::io::stdout().flush() {
                out_err = Some(e);
            }
        }
    })?;
    if let Some(e) = out_err {
        return Err(e.into());
    }
    drop(trainer);
    itamae::alloc::release_free_memory();
    let (now, peak) = itamae::alloc::rss_bytes().unwrap_or((0, 0));
    println!(
        "{}",
        serde_json::json!({"peak_rss_bytes": peak, "rss_after_bytes": now})
    );
    Ok(())
}

/// CPU seconds (user, kernel) and minor page faults of this process so far.
#[derive(Clone, Copy, Default)]
struct Usage {
    user: f64,
    sys: f64,
    minflt: f64,
}

fn usage() -> Usage {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Usage::default();
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Usage {
        user: secs(ru.ru_utime),
        sys: secs(ru.ru_stime),
        minflt: ru.ru_minflt as f64,
    }
}

/// One side as seen by the driver.
struct Side {
    label: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    secs: Vec<f64>,
    /// Per step: user and kernel CPU seconds, minor faults (NaN from the PEFT side).
    usage: Vec<Usage>,
    loss: f64,
    peak_rss: f64,
    rss_after: f64,
}

impl Side {
    fn spawn(label: String, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {label} side"))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(Self {
            label,
            child,
            stdin,
            stdout,
            secs: Vec::new(),
            usage: Vec::new(),
            loss: f64::NAN,
            peak_rss: f64::NAN,
            rss_after: f64::NAN,
        })
    }

    /// The next protocol line (a JSON object), skipping anything else the side prints.
    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                anyhow::bail!(
                    "the {} side exited early (see its stderr above)",
                    self.label
                );
            }
            if line.trim_start().starts_with('{') {
                return serde_json::from_str(line.trim())
                    .with_context(|| format!("{} side printed `{}`", self.label, line.trim()));
            }
        }
    }

    fn step(&mut self) -> anyhow::Result<()> {
        writeln!(self.stdin, "step")?;
        self.stdin.flush()?;
        let v = self.read()?;
        let secs = v["secs"]
            .as_f64()
            .with_context(|| format!("{} side answered {v}", self.label))?;
        self.loss = v["loss"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "{:<14} step {} loss {:.4} ({secs:.2} s)",
            self.label,
            self.secs.len(),
            self.loss
        );
        self.secs.push(secs);
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        self.usage.push(Usage {
            user: f("user_secs"),
            sys: f("sys_secs"),
            minflt: f("minor_faults"),
        });
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let v = self.read()?;
        self.peak_rss = v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1e9;
        self.rss_after = v["rss_after_bytes"].as_f64().unwrap_or(f64::NAN) / 1e9;
        self.child.wait()?;
        Ok(())
    }

    /// Mean seconds per timed step (the warm-up step excluded).
    fn secs_per_step(&self) -> f64 {
        let timed = &self.secs[1.min(self.secs.len())..];
        timed.iter().sum::<f64>() / timed.len().max(1) as f64
    }

    /// Mean [`Usage`] per timed step.
    fn usage_per_step(&self) -> Usage {
        let timed = &self.usage[1.min(self.usage.len())..];
        let n = timed.len().max(1) as f64;
        Usage {
            user: timed.iter().map(|u| u.user).sum::<f64>() / n,
            sys: timed.iter().map(|u| u.sys).sum::<f64>() / n,
            minflt: timed.iter().map(|u| u.minflt).sum::<f64>() / n,
        }
    }
}

/// Runs every side (`modes` of itamae under each of `allocators`, then PEFT when `peer_python`
/// is given) in lock-step and prints tokens/s, peak RSS and the ratios the targets name.
/// No allocators: the children use this process's.
pub(crate) fn train(
    model_path: &Path,
    modes: &[WeightsMode],
    allocators: &[Choice],
    shape: Shape,
    peer_python: Option<&Path>,
) -> anyhow::Result<()> {
    let Shape { seq, batch, steps } = shape;
    let exe = std::env::current_exe()?;
    let mut sides = Vec::new();
    let mut hf_dir: Option<PathBuf> = None;
    if let Some(py) = peer_python {
        // The peer trains the same weights: an HF export of the base as itamae loads it in f32.
        let dir = std::env::temp_dir().join(format!("itamae-bench-hf-{}", std::process::id()));
        {
            let loaded = model::load(model_path, &candle_core::Device::Cpu, WeightsMode::F32)?;
            itamae::model::hf::save_model_dir(&dir, &loaded.model, &loaded.text)?;
        }
        hf_dir = Some(dir.clone());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_peft.py");
        let mut cmd = Command::new(py);
        cmd.arg(&script)
            .arg(&dir)
            .args([seq.to_string(), batch.to_string(), steps.to_string()]);
        sides.push(Side::spawn("HF PEFT".into(), cmd)?);
    } else {
        println!(
            "peer: HF PEFT not configured (scripts/setup-peft-venv.sh, then ITAMAE_PEFT_PYTHON)"
        );
    }
    let allocators: Vec<Option<Choice>> = if allocators.is_empty() {
        vec![None]
    } else {
        allocators.iter().copied().map(Some).collect()
    };
    for &alloc in &allocators {
        for &mode in modes {
            let mut cmd = Command::new(&exe);
            cmd.arg("train")
                .arg("--model")
                .arg(model_path)
                .args(["--seq", &seq.to_string()])
                .args(["--batch", &batch.to_string()])
                .args(["--steps", &steps.to_string()])
                .args(["--worker", mode.name()]);
            if let Some(a) = alloc {
                cmd.env(Choice::ENV, a.name());
            }
            sides.push(Side::spawn(label(mode, alloc), cmd)?);
        }
    }
    let result = run_sides(&mut sides, steps);
    if let Some(dir) = hf_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Err(e) = result {
        for s in &mut sides {
            let _ = s.child.kill();
        }
        return Err(e);
    }
    println!("LoRA r=16 all-linear, batch {batch} x seq {seq}, {steps} timed steps (interleaved)");
    let tps = |s: &Side| (seq * batch) as f64 / s.secs_per_step();
    for s in &sides {
        let after = if s.rss_after.is_nan() {
            String::new()
        } else {
            let u = s.usage_per_step();
            format!(
                ", RSS after the job {:.2} GB; per step CPU {:.1} s user + {:.1} s kernel, {:.0}k minor faults",
                s.rss_after,
                u.user,
                u.sys,
                u.minflt / 1e3
            )
        };
        println!(
            "{:<26} {:.2} s/step, {:.0} tokens/s, peak RSS {:.2} GB{after}, last loss {:.4}",
            s.label,
            s.secs_per_step(),
            tps(s),
            s.peak_rss,
            s.loss
        );
    }
    let find = |label: &str| sides.iter().find(|s| s.label == label);
    for &alloc in &allocators {
        let f32s = find(&label(WeightsMode::F32, alloc));
        if let (Some(f32s), Some(peer)) = (f32s, find("HF PEFT")) {
            println!(
                "ratio {} / PEFT: tokens/s {:.2}x, peak RSS {:.2}x",
                f32s.label,
                tps(f32s) / tps(peer),
                f32s.peak_rss / peer.peak_rss
            );
        }
        if let (Some(f32s), Some(q)) = (f32s, find(&label(WeightsMode::Auto, alloc))) {
            println!(
                "ratio {} (base as stored) / f32: tokens/s {:.2}x, peak RSS {:.2}x",
                q.label,
                tps(q) / tps(f32s),
                q.peak_rss / f32s.peak_rss
            );
        }
    }
    Ok(())
}

fn label(mode: WeightsMode, alloc: Option<Choice>) -> String {
    match alloc {
        Some(a) => format!("itamae {} ({})", mode.name(), a.name()),
        None => format!("itamae {}", mode.name()),
    }
}

/// Waits for every side to load, then runs `steps + 1` rounds, rotating who goes first.
fn run_sides(sides: &mut [Side], steps: usize) -> anyhow::Result<()> {
    for s in sides.iter_mut() {
        let v = s.read()?;
        if v["ready"] != serde_json::Value::Bool(true) {
            anyhow::bail!("{} side: expected ready, got {v}", s.label);
        }
    }
    let n = sides.len();
    for round in 0..=steps {
        for i in 0..n {
            sides[(round + i) % n].step()?;
        }
    }
    for s in sides.iter_mut() {
        s.finish()?;
    }
    Ok(())
}
