//! `itamae-bench swap`: hot-swapping a served LoRA under streaming load.
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use itamae::model;

use crate::server::{percentile, start_server, stream_chat};

/// Hot-swap under load: an in-process daemon (HTTP server, engine, adapter store) serves a
/// LoRA variant (r=16, all linear layers) to `clients` clients streaming chats back to back.
/// First `secs` without swaps (the peer: the same loop, nothing replaced), then `secs` while
/// the adapter is replaced every `every_ms` through `POST /v1/adapters` (compare-and-set on its
/// generation, alternating two different LoRAs). Prints the import latency, the time from an
/// import's start to the first token of a request on the new generation, failed requests and
/// the throughput ratio of the two phases.
pub(crate) fn swap(
    model_path: &Path,
    clients: usize,
    secs: f64,
    every_ms: u64,
    tokens: usize,
) -> anyhow::Result<()> {
    use itamae::adapters::{peft, Adapter, Lora, LoraConfig};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let device = candle_core::Device::Cpu;
    let loaded = model::load(model_path, &device, itamae::model::WeightsMode::default())?;
    let cfg = loaded.model.cfg.clone();
    let base = loaded.name.clone();
    let dir =
        std::env::temp_dir().join(format!("itamae-bench-swap-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    // Two LoRAs that answer differently, as PEFT directories the client uploads.
    let mut dirs = Vec::new();
    for seed in 0..2u64 {
        let mut lora = Lora::init(&cfg, LoraConfig::default(), seed, &device)?;
        for p in lora.pairs.values_mut() {
            p.b = Tensor::randn(0f32, 0.01, p.b.dims(), &device)?;
        }
        let out = dir.join(format!("lora-{seed}"));
        peft::save(&out, &Adapter::Lora(lora), &cfg, &base)?;
        dirs.push(out);
    }
    let engine = itamae::engine::EngineHandle::from_loaded(loaded);
    let store = itamae::jobs::AdapterStore::open(&dir.join("data"), engine.clone(), 1 << 30)?;
    let client = start_server(engine.clone(), None, store)?;
    let name = "swapped";
    client
        .import_adapter(name, &dirs[0], Some(0))
        .map_err(|e| anyhow::anyhow!("first import: {e}"))?;
    let weights_bytes = std::fs::metadata(dirs[0].join(peft::WEIGHTS_FILE))?.len();
    println!(
        "LoRA r=16 all-linear ({:.1} MB of weights), {clients} clients streaming {tokens}-token chats, {secs} s per phase",
        weights_bytes as f64 / 1e6
    );

    // One phase: clients loop until `stop`; returns (completed tokens, ok, failed).
    let phase = |swaps: Option<&mut dyn FnMut()>| -> (usize, usize, usize) {
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (stop, totals, client) = (stop.clone(), totals.clone(), client.clone());
                std::thread::spawn(move || {
                    let mut seed = c as u64 * 1000;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let r = stream_chat(&client, name, tokens, seed);
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
        let adapter_dir = &dirs[(generation % 2) as usize];
        let t0 = Instant::now();
        match client.import_adapter(name, adapter_dir, Some(generation)) {
            Ok(_) => {
                import_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                generation += 1;
                // A request sent now runs on the new generation.
                let r = stream_chat(&client, name, 1, generation);
                match r.ttft {
                    Some(_) if r.ok => first_token_ms.push(t0.elapsed().as_secs_f64() * 1e3),
                    _ => swap_failures += 1,
                }
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
