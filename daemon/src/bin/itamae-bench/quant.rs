//! `itamae-bench quant`: the product `x · Wᵀ` of one SmolLM2-sized projection (1536 × 576) held
//! in each block type, at decode and prefill row counts: candle's quantized matmul (8-bit
//! activations, integer dot products) against dequantizing the weight and running the f32 BLAS
//! GEMM, with the f32 weight's GEMM as the peer. What picks the prefill path.
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use itamae::ops::quant::{self, Weight};

const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::BF16,
    GgmlDType::F16,
];

/// Median microseconds of `f` over `reps` calls after one warm-up call.
fn time(reps: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> anyhow::Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

pub(crate) fn quant(out: usize, inp: usize, reps: usize) -> anyhow::Result<()> {
    let dev = &Device::Cpu;
    let w32 = Tensor::randn(0f32, 0.05, (out, inp), dev)?;
    println!("projection {out} x {inp}; median of {reps} calls, microseconds");
    println!(
        "{:<6} {:>5} {:>12} {:>14} {:>10} {:>10}",
        "type", "rows", "quant-matmul", "dequant+blas", "f32 blas", "dequant"
    );
    for dtype in TYPES {
        let w = Weight::quantize(&w32, dtype)?;
        let dq = time(reps, || w.to_dense(DType::F32))?;
        for rows in [1, 4, 16, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), dev)?;
            let q = time(reps, || quant::linear(&x, &w, None))?;
            let d = time(reps, || {
                let wd = w.to_dense(DType::F32)?;
                itamae::ops::linear(&x, &wd, None)
            })?;
            let f = time(reps, || itamae::ops::linear(&x, &w32, None))?;
            println!(
                "{:<6} {:>5} {:>12.0} {:>14.0} {:>10.0} {:>10.0}",
                quant::ggml_name(dtype),
                rows,
                q,
                d,
                f,
                dq
            );
        }
    }
    Ok(())
}
