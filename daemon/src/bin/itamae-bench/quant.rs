//! `itamae-bench quant`: the product `x · Wᵀ` of one SmolLM2-sized projection (1536 × 576) held
//! in each block type, at decode and prefill row counts: our block kernels (`ops::qdot`) with
//! 8-bit activations (decode steps) and with f32 activations (prefill and the LM head),
//! candle's quantized matmul, dequantizing the whole weight + the f32 BLAS GEMM, and the tiled
//! product (`ops::dequant::tiled_xwt`: L2-sized tiles dequantized into a per-thread buffer, one
//! GEMM per tile; training's path), with the f32 weight's GEMM as the peer. Prints, per type,
//! the largest row count at which the f32-activation kernel still beats the tiled GEMM.
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use itamae::ops::qdot;
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

const ROWS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Median microseconds of `f` over `reps` calls after one warm-up call.
fn time<T>(reps: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
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
    println!(
        "projection {out} x {inp}; median of {reps} calls, microseconds; qdot path {}, {} threads",
        qdot::path().name(),
        rayon::current_num_threads()
    );
    println!(
        "{:<6} {:>5} {:>10} {:>10} {:>12} {:>14} {:>10} {:>10} {:>10} {:>12}",
        "type",
        "rows",
        "qdot-int8",
        "qdot-f32",
        "candle-qmm",
        "dequant+blas",
        "tiled",
        "f32 blas",
        "int8/f32",
        "tiled/f32"
    );
    for dtype in TYPES {
        // K-quant rows are whole 256-element super-blocks: the input width rounds up for them.
        let inp = inp.next_multiple_of(dtype.block_size());
        let w32 = Tensor::randn(0f32, 0.05, (out, inp), dev)?;
        let w = Weight::quantize(&w32, dtype)?;
        let Weight::Quant(q) = &w else {
            anyhow::bail!("{dtype:?} did not quantize")
        };
        let fmt = qdot::Fmt::from_ggml(dtype).ok_or_else(|| anyhow::anyhow!("{dtype:?}"))?;
        let data = q.data()?;
        let qmm = QMatMul::from_arc(q.clone())?;
        let mut crossover = 0;
        for rows in ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let qd = time(reps, || Ok(qdot::matmul(fmt, &data, out, inp, &xv, rows)?))?;
            let qf = time(reps, || {
                Ok(qdot::matmul_f32(fmt, &data, out, inp, &xv, rows)?)
            })?;
            let c = time(reps, || Ok(qmm.forward(&x)?))?;
            let d = time(reps, || {
                let wd = w.to_dense(DType::F32)?;
                Ok(itamae::ops::linear(&x, &wd, None)?)
            })?;
            let tl = time(reps, || {
                itamae::ops::dequant::tiled_xwt(q, &xv, rows)?
                    .ok_or_else(|| anyhow::anyhow!("no tile decoder for {dtype:?}"))
            })?;
            let f = time(reps, || Ok(itamae::ops::linear(&x, &w32, None)?))?;
            if qf < tl {
                crossover = rows;
            }
            println!(
                "{:<6} {:>5} {:>10.0} {:>10.0} {:>12.0} {:>14.0} {:>10.0} {:>10.0} {:>9.2}x {:>11.2}x  (k {inp})",
                quant::ggml_name(dtype),
                rows,
                qd,
                qf,
                c,
                d,
                tl,
                f,
                f / qd,
                f / tl
            );
        }
        println!(
            "{:<6} crossover: f32-activation qdot beats the tiled GEMM up to {crossover} rows",
            quant::ggml_name(dtype),
        );
    }
    Ok(())
}
