//! `y = x·Wᵢᵀ` for several weights `Wᵢ` that read the same few rows `x` (q/k/v of a block, or
//! gate/up), as ONE parallel region: serving's row decode path ([`crate::model`]'s decode step).
//!
//! Why: a decode token of a small model is ~200 projections of a few hundred thousand
//! multiply-adds each. Run one by one ([`super::qdot::matmul`]), each quantizes its activations
//! again, allocates its output and opens its own rayon scope (waking the other threads, then
//! joining them) — and at that size the wake-up and join cost as much as the products. Here the
//! activations are quantized once for all the weights, the outputs go straight into the
//! caller's buffer (columns side by side, leading dimension `ldy`), and the concatenated output
//! columns of every weight are cut into one contiguous range per thread.
//!
//! Weights are GGUF blocks or f16/bf16 rows (the [`super::qdot`] kernels) or dense f32 rows (the
//! [`super::skinny`] kernel). Numbers are those of the per-product kernels exactly: the same
//! quantized activations, the same per-output kernels.
use super::qdot::{self, Acts, Fmt, Job};

/// One weight `(n, k)` of a fan-out, as its raw rows.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// GGUF blocks or f16/bf16 rows, `n · k / block_elems · block_bytes` bytes.
    Blocks { fmt: Fmt, data: &'a [u8] },
    /// f32 rows, `n · k` values.
    F32(&'a [f32]),
}

/// One weight and where its outputs go: columns `col..col + n` of `y`.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub w: Rows<'a>,
    pub n: usize,
    pub col: usize,
}

/// Below this many weight elements in all, one thread does the whole fan-out.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// `y[:, col_i..col_i + n_i] = x · W_iᵀ` for every target, `x` the `m × k` row-major rows and
/// `y` `m` rows of leading dimension `ldy`. `parallel`: spread the outputs over the rayon pool.
pub fn products(
    x: &[f32],
    m: usize,
    k: usize,
    targets: &[Target<'_>],
    y: &mut [f32],
    ldy: usize,
    parallel: bool,
) -> Result<(), String> {
    if x.len() != m * k {
        return Err(format!("fan-out: {} activations for {m} × {k}", x.len()));
    }
    if m == 0 {
        return Ok(());
    }
    if y.len() < (m - 1) * ldy + targets.iter().map(|t| t.col + t.n).max().unwrap_or(0) {
        return Err(format!(
            "fan-out: output of {} for {m} rows of {ldy}",
            y.len()
        ));
    }
    let mut need_acts = false;
    for t in targets {
        if t.col + t.n > ldy {
            return Err(format!(
                "fan-out: columns {}..{} past {ldy}",
                t.col,
                t.col + t.n
            ));
        }
        match t.w {
            Rows::Blocks { fmt, data } => {
                let be = fmt.block_elems();
                let half = matches!(fmt, Fmt::F16 | Fmt::BF16);
                if !k.is_multiple_of(be) || (!half && !k.is_multiple_of(32)) {
                    return Err(format!("fan-out: {k} columns are not whole {fmt:?} blocks"));
                }
                if data.len() != t.n * (k / be) * fmt.block_bytes() {
                    return Err(format!(
                        "fan-out: {} bytes for {} × {k} {fmt:?}",
                        data.len(),
                        t.n
                    ));
                }
                need_acts |= !half;
            }
            Rows::F32(w) => {
                if w.len() != t.n * k {
                    return Err(format!("fan-out: {} values for {} × {k}", w.len(), t.n));
                }
            }
        }
    }
    let acts = need_acts.then(|| Acts::quantize(x, m, k));
    let total: usize = targets.iter().map(|t| t.n).sum();
    let tasks = if parallel && total * k >= PARALLEL_MIN_ELEMS {
        rayon::current_num_threads().clamp(1, total.max(1))
    } else {
        1
    };
    let shared = Shared {
        x,
        m,
        k,
        targets,
        acts: acts.as_ref(),
        y: y.as_mut_ptr(),
        ldy,
    };
    let per = total.div_ceil(tasks);
    if tasks <= 1 {
        // SAFETY: every length was checked above; this is the only writer.
        unsafe { shared.range(0, total) };
        return Ok(());
    }
    let shared = &shared;
    rayon::scope(|s| {
        for t in 1..tasks {
            let (a, b) = (t * per, ((t + 1) * per).min(total));
            if a < b {
                // SAFETY: as above; outputs a..b of the concatenation are this task's alone,
                // and the scope joins every task before `y` is released.
                s.spawn(move |_| unsafe { shared.range(a, b) });
            }
        }
        // SAFETY: outputs 0..per belong to the calling thread.
        unsafe { shared.range(0, per.min(total)) };
    });
    Ok(())
}

/// `fmt`'s row in the kernel table (the table lists formats in [`Fmt::ALL`]'s order).
fn fmt_index(fmt: Fmt) -> usize {
    Fmt::ALL.iter().position(|&f| f == fmt).unwrap_or(0)
}

/// What the tasks of one fan-out share; each writes only its own output columns of `y`.
struct Shared<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    targets: &'a [Target<'a>],
    acts: Option<&'a Acts>,
    y: *mut f32,
    ldy: usize,
}

// SAFETY: `y` is written at disjoint columns by each task (see `products`); the rest is read.
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// Outputs `a..b` of the concatenation of every target's outputs.
    ///
    /// # Safety
    /// `products` checked the shapes; no other thread may write these outputs meanwhile.
    unsafe fn range(&self, a: usize, b: usize) {
        let (_, table) = qdot::kernels();
        let mut base = 0;
        for t in self.targets {
            let (lo, hi) = (a.max(base), b.min(base + t.n));
            if lo < hi {
                let (o0, o1) = (lo - base, hi - base);
                match t.w {
                    Rows::Blocks { fmt, data } => {
                        let row_bytes = self.k / fmt.block_elems() * fmt.block_bytes();
                        for r0 in (0..self.m).step_by(qdot::MAX_ROWS) {
                            let mm = qdot::MAX_ROWS.min(self.m - r0);
                            let job = Job {
                                w: data,
                                row_bytes,
                                k: self.k,
                                r0,
                                x: self.x,
                                acts: self.acts,
                                y: self.y.add(r0 * self.ldy + t.col),
                                ldy: self.ldy,
                            };
                            table[fmt_index(fmt)][mm - 1](&job, o0, o1);
                        }
                    }
                    Rows::F32(w) => {
                        let p = super::skinny::Xwt {
                            x: self.x,
                            ldx: self.k,
                            w,
                            ldw: self.k,
                            m: self.m,
                            n: t.n,
                            k: self.k,
                        };
                        super::skinny::columns_raw(&p, o0, o1, self.y.add(t.col), self.ldy);
                    }
                }
            }
            base += t.n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::Weight;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor};

    fn randn(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005) | 1;
        (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// Every target's columns equal the per-product kernel's output for that weight (the
    /// numbers the composed decode path gets), bit for bit for block types, and the f32
    /// target is within f32 rounding of an f64 reference.
    #[test]
    fn fan_out_equals_each_product_alone() {
        let k = 256;
        let types = [
            (GgmlDType::Q4_1, 40),
            (GgmlDType::Q8_0, 24),
            (GgmlDType::Q4K, 33),
            (GgmlDType::Q6K, 8),
            (GgmlDType::F16, 17),
            (GgmlDType::F32, 21),
        ];
        let weights: Vec<(Weight, Vec<f32>, usize)> = types
            .iter()
            .enumerate()
            .map(|(i, &(dt, n))| {
                let v = randn(n, k, i as u64 + 3);
                let t = Tensor::from_vec(v.clone(), (n, k), &Device::Cpu).unwrap();
                (Weight::quantize(&t, dt).unwrap(), v, n)
            })
            .collect();
        let datas: Vec<Option<Vec<u8>>> = weights
            .iter()
            .map(|(w, _, _)| match w {
                Weight::Quant(q) => Some(q.data().unwrap().to_vec()),
                Weight::Dense(_) => None,
            })
            .collect();
        for m in [1, 3, 8, 11] {
            let x = randn(m, k, 100 + m as u64);
            let mut targets = Vec::new();
            let mut col = 2; // a gap before the first target: columns it must not touch
            for ((w, dense, n), data) in weights.iter().zip(&datas) {
                let rows = match (w, data) {
                    (Weight::Quant(q), Some(d)) => Rows::Blocks {
                        fmt: Fmt::from_ggml(q.dtype()).unwrap(),
                        data: d,
                    },
                    _ => Rows::F32(dense),
                };
                targets.push(Target {
                    w: rows,
                    n: *n,
                    col,
                });
                col += n;
            }
            let ldy = col + 1;
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * ldy];
                products(&x, m, k, &targets, &mut y, ldy, parallel).unwrap();
                for ((w, dense, n), t) in weights.iter().zip(&targets) {
                    for r in 0..m {
                        assert!(y[r * ldy].is_nan() && y[r * ldy + ldy - 1].is_nan());
                        let got = &y[r * ldy + t.col..][..*n];
                        match w {
                            Weight::Quant(q) => {
                                let want =
                                    crate::ops::quant::qdot_product(q, &x, m, qdot::Acc::Int8)
                                        .unwrap()
                                        .unwrap();
                                assert_eq!(got, &want[r * n..][..*n], "{:?} m={m}", q.dtype());
                            }
                            Weight::Dense(_) => {
                                for (j, g) in got.iter().enumerate() {
                                    let want: f64 = (0..k)
                                        .map(|i| x[r * k + i] as f64 * dense[j * k + i] as f64)
                                        .sum();
                                    assert!((*g as f64 - want).abs() < 1e-4, "f32 {g} vs {want}");
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = DType::F32;
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(2, 64, 1);
        let w = randn(4, 64, 2);
        let t = [Target {
            w: Rows::F32(&w),
            n: 4,
            col: 0,
        }];
        let mut y = vec![0f32; 8];
        assert!(products(&x, 2, 64, &t, &mut y, 4, true).is_ok());
        assert!(products(&x, 2, 64, &t, &mut y, 3, true).is_err());
        assert!(products(&x[..64], 2, 64, &t, &mut y, 4, true).is_err());
        let mut short = vec![0f32; 7];
        assert!(products(&x, 2, 64, &t, &mut short, 4, true).is_err());
        let bytes = vec![0u8; 10];
        let t = [Target {
            w: Rows::Blocks {
                fmt: Fmt::Q4_1,
                data: &bytes,
            },
            n: 4,
            col: 0,
        }];
        assert!(products(&x, 2, 64, &t, &mut y, 4, true).is_err());
    }
}
