//! `itamae-bench job-swap`: from a fine-tuning job's success to the first token served with
//! its adapter, while clients stream chats on the base model.
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use itamae_client::{AutoOr, Client, CreateJob, Hyperparameters, JobMethod, Supervised};

use itamae::model;

use crate::server::{percentile, start_server, stream_chat, StreamResult};

/// The chat examples `itamae-bench job-swap` trains on: short, so a job takes seconds.
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

/// Whether a job's swap runs with the prompt cache (see `--prompt-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CacheMode {
    On,
    Off,
    Both,
}

impl CacheMode {
    fn on_for(self, job: usize) -> bool {
        match self {
            CacheMode::On => true,
            CacheMode::Off => false,
            CacheMode::Both => job.is_multiple_of(2),
        }
    }
}

/// First-token figures of the jobs swapped in with the prompt cache on or off.
#[derive(Default)]
struct Side {
    swap_ms: Vec<f64>,
    again_ms: Vec<f64>,
    base_ms: Vec<f64>,
    cached: Vec<u64>,
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

/// `itamae_prompt_cache_cached_tokens_total` of the in-process daemon (0 if absent).
fn cached_tokens() -> u64 {
    itamae::metrics::global()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("itamae_prompt_cache_cached_tokens_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Follows the job's live event stream until its success event (or the end of the stream).
fn follow_job(client: &Client, id: &str) -> anyhow::Result<JobOutcome> {
    let mut out = JobOutcome {
        succeeded_at: None,
        model: None,
        error: None,
    };
    client
        .follow_job_events(id, |ev| {
            let now = Instant::now();
            let msg = ev.message.as_str();
            if ev.level == "error" {
                out.error = Some(msg.to_string());
            }
            if let Some(model) = msg.strip_prefix(MODEL_CREATED) {
                out.model = Some(model.trim().to_string());
            }
            if msg.starts_with(MODEL_CREATED) || msg.starts_with(JOB_COMPLETED) {
                out.succeeded_at = Some(now);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .with_context(|| format!("reading the events of {id}"))?;
    Ok(out)
}

/// Issue 4's hot-swap figure: time from a fine-tuning job's success (its event's receipt on
/// the live event stream) to the first token served with its adapter, while `clients` clients
/// stream chats on the base model back to back. An in-process daemon with jobs runs `jobs`
/// small LoRA jobs one after the other; at each success the bench reads `fine_tuned_model`
/// (from the event, else one GET of the job, counted in the time) and streams a chat on it.
/// A side thread polls the job every 20 ms to show how long the event stream took to deliver
/// the success. Prints per-job figures, the p50 against the idle 60 ms target, the same chat on
/// the base right after (its first token is the prefill alone: the peer figure), failed
/// requests and the load's throughput.
///
/// With `--prompt-cache both` (the default) even jobs swap in with the prompt cache on (the
/// server's default: the new variant's chat template preamble is warmed when it is added) and
/// odd jobs with it off (every prompt prefilled whole), and both figures print with their
/// ratio. Each probe is followed by the same chat on the variant again (nothing left to do
/// lazily: what a first request pays beyond it is the swap's own) and on the base.
pub(crate) fn job_swap(
    model_path: &Path,
    clients: usize,
    jobs: usize,
    tokens: usize,
    weights: model::WeightsMode,
    cache: CacheMode,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let loaded = model::load(model_path, &candle_core::Device::Cpu, weights)?;
    println!("weights {weights}");
    let base = loaded.name.clone();
    let dir = std::env::temp_dir().join(format!(
        "itamae-bench-job-swap-{:016x}",
        rand::random::<u64>()
    ));
    let result = (|| -> anyhow::Result<()> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let engine = itamae::engine::EngineHandle::from_loaded(loaded);
        // The daemon's wiring (main.rs `serve`): jobs and imported adapters in one data dir.
        let jobs_cfg = itamae::jobs::JobsConfig::new(data_dir.clone());
        let max_upload = jobs_cfg.max_upload_bytes;
        let training_share = jobs_cfg.training_max_share;
        let job_service = itamae::jobs::Jobs::open(jobs_cfg, engine.clone())?;
        let store = itamae::jobs::AdapterStore::open(&data_dir, engine.clone(), max_upload)?;
        let client = start_server(engine.clone(), Some(job_service.clone()), store)?;

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
        let dataset = dir.join("job-swap.jsonl");
        std::fs::write(&dataset, jsonl)
            .with_context(|| format!("writing {}", dataset.display()))?;
        let file_id = client
            .upload_file(&dataset, itamae_client::FINE_TUNE)
            .context("upload")?
            .id;
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
                let (stop, totals, client, base) =
                    (stop.clone(), totals.clone(), client.clone(), base.clone());
                std::thread::spawn(move || {
                    let mut seed = c as u64 * 100_000;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let r = stream_chat(&client, &base, tokens, seed);
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

        let mut sides = [Side::default(), Side::default()];
        let mut failed_probes = 0usize;
        let mut failed_jobs = 0usize;
        let mut lag_ms = Vec::new();
        for i in 0..jobs {
            let cache_on = cache.on_for(i);
            let budget = if cache_on {
                itamae::engine::DEFAULT_PROMPT_CACHE_MB << 20
            } else {
                0
            };
            engine.set_prompt_cache_bytes(budget)?;
            let side = &mut sides[usize::from(!cache_on)];
            // No adapter given: the server's default, LoRA r=16 on every linear projection.
            let req = CreateJob {
                model: base.clone(),
                training_file: file_id.clone(),
                validation_file: None,
                suffix: Some(format!("swap{i}")),
                seed: Some(i as u64),
                metadata: None,
                method: JobMethod {
                    supervised: Supervised {
                        hyperparameters: Hyperparameters {
                            n_epochs: Some(AutoOr::Value(1)),
                            batch_size: Some(AutoOr::Value(2)),
                            max_seq_len: Some(64),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                },
            };
            let created_at = Instant::now();
            let id = client.create_job(&req).context("create job")?.id;
            // Side thread: when a plain poll first sees `succeeded` (20 ms resolution).
            let polled = {
                let (client, id) = (client.clone(), id.clone());
                std::thread::spawn(move || -> Option<Instant> {
                    let polling = Instant::now();
                    loop {
                        let now = Instant::now();
                        match client.job(&id) {
                            Ok(j) => match j.status.as_str() {
                                "succeeded" => return Some(now),
                                "failed" | "cancelled" => return None,
                                _ => {}
                            },
                            Err(_) => return None,
                        }
                        if polling.elapsed().as_secs() > 900 {
                            return None;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                })
            };
            let outcome = follow_job(&client, &id)?;
            let Some(succeeded_at) = outcome.succeeded_at else {
                failed_jobs += 1;
                let j = client.job(&id).with_context(|| format!("GET job {id}"))?;
                println!(
                    "job {i} ({id}): {} without a success event: {}",
                    j.status,
                    outcome.error.unwrap_or_else(|| j
                        .error
                        .map_or_else(|| "no error".to_string(), |e| e.message))
                );
                let _ = polled.join();
                continue;
            };
            // What a client does next: the model's name (one GET unless the event named it),
            // then a chat on it.
            let model = match outcome.model {
                Some(m) => Some(m),
                None => client.job(&id).ok().and_then(|j| j.fine_tuned_model),
            };
            let probe_started = Instant::now();
            let cached_before = cached_tokens();
            let probe = model
                .as_deref()
                .map(|m| stream_chat(&client, m, tokens, 7 + i as u64));
            side.cached
                .push(cached_tokens().saturating_sub(cached_before));
            // The same chat on the variant again: whatever the first one paid lazily is paid.
            let again = model
                .as_deref()
                .map(|m| stream_chat(&client, m, tokens, 7 + i as u64));
            if let Some(t) = again.and_then(|a| a.ttft.filter(|_| a.ok)) {
                side.again_ms.push(t * 1e3);
            }
            // The peer figure: the same chat on the base right after, whose first token is
            // the prefill alone; the difference is what swapping to the new variant costs.
            let base_probe = stream_chat(&client, &base, tokens, 7 + i as u64);
            if let Some(t) = base_probe.ttft.filter(|_| base_probe.ok) {
                side.base_ms.push(t * 1e3);
            }
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
                    side.swap_ms.push(ms);
                    println!(
                        "job {i} ({}), prompt cache {}: {job_secs:.1} s to succeed; success event -> first token {ms:.1} ms (name lookup {:.1} ms, chat's own first token {:.1} ms, {} prompt tokens cached; same chat on the variant again {}; on the base right after {}); poll saw succeeded {lag_text} before the event",
                        model.as_deref().unwrap_or(""),
                        if cache_on { "on" } else { "off" },
                        before * 1e3,
                        ttft * 1e3,
                        side.cached.last().copied().unwrap_or(0),
                        side.again_ms
                            .last()
                            .map_or("failed".to_string(), |t| format!("{t:.1} ms")),
                        base_probe
                            .ttft
                            .filter(|_| base_probe.ok)
                            .map_or("failed".to_string(), |t| format!("{:.1} ms", t * 1e3))
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

        lag_ms.sort_by(|a, b| a.total_cmp(b));
        load_ttft.sort_by(|a, b| a.total_cmp(b));
        let mut p50s = [f64::NAN; 2];
        for (k, side) in sides.iter_mut().enumerate() {
            if side.swap_ms.is_empty() {
                continue;
            }
            for v in [&mut side.swap_ms, &mut side.again_ms, &mut side.base_ms] {
                v.sort_by(|a, b| a.total_cmp(b));
            }
            let label = if k == 0 { "on" } else { "off" };
            let p50 = percentile(&side.swap_ms, 0.5);
            p50s[k] = p50;
            let planned = (0..jobs).filter(|&i| cache.on_for(i) == (k == 0)).count();
            let verdict = match (side.swap_ms.len() == planned && p50 < 60.0, clients) {
                (_, c) if c > 0 => "not judged: the target is idle (--clients 0)",
                (true, _) => "met",
                (false, _) => "missed",
            };
            println!(
                "prompt cache {label}: success -> first token p50 {p50:.1} ms, max {:.1} ms over {} of {planned} jobs ({} prompt tokens cached, median); target p50 < 60 ms idle: {verdict}",
                percentile(&side.swap_ms, 1.0),
                side.swap_ms.len(),
                {
                    let mut c = side.cached.clone();
                    c.sort_unstable();
                    c.get(c.len() / 2).copied().unwrap_or(0)
                },
            );
            println!(
                "  peers (cache {label}): the same chat on the variant again p50 {:.1} ms, on the base right after p50 {:.1} ms; swap's own cost p50 {:.1} ms (first chat on the variant minus its second)",
                percentile(&side.again_ms, 0.5),
                percentile(&side.base_ms, 0.5),
                p50 - percentile(&side.again_ms, 0.5)
            );
        }
        if p50s.iter().all(|p| p.is_finite()) {
            println!(
                "prompt cache on/off: success -> first token {:.2}x the time (same run)",
                p50s[0] / p50s[1]
            );
        }
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
