//! `itamae-bench batch`: aggregate decode tokens/s of concurrent streams on the base model
//! against the same number of streams on different LoRA variants, batched together.
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use itamae::engine::GenEvent;
use itamae::model;

/// Aggregate decode tokens/s of `streams` concurrent requests on the base model, then on
/// `streams` different LoRA variants (one each, mixed in the same batches); prints the ratio.
/// The base is held in `weights` (`--weights`, default the daemon's default mode).
pub(crate) fn batch(
    model_path: &Path,
    streams: usize,
    tokens: usize,
    weights: model::WeightsMode,
) -> anyhow::Result<()> {
    use itamae::adapters::{Adapter, Lora, LoraConfig};
    use itamae::engine::{EngineHandle, GenerationRequest, PromptInput, SamplingParams};

    let loaded = model::load(model_path, &candle_core::Device::Cpu, weights)?;
    println!(
        "model {} (weights {weights}, {} MB)",
        loaded.name,
        loaded.model.weight_bytes() / 1_000_000
    );
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
                guided: Default::default(),
                n: 1,
            })?;
            rxs.push(engine.submit(p)?);
        }
        let total = completion_tokens(rxs)?;
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

/// Waits for every stream to finish and sums the tokens they generated.
pub(crate) fn completion_tokens(
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>,
) -> anyhow::Result<usize> {
    let mut total = 0;
    for mut rx in rxs {
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenEvent::Finished { usage, .. } => {
                    total += usage.completion_tokens;
                    break;
                }
                GenEvent::Failed(e) => anyhow::bail!("generation failed: {e}"),
                GenEvent::Text(_)
                | GenEvent::ToolCall(_)
                | GenEvent::Echo { .. }
                | GenEvent::Token(_) => {}
            }
        }
    }
    Ok(total)
}
