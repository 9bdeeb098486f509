//! Every format × every path this CPU can run (the portable one always) against f64 references.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    // A fixed-seed LCG: the test must not depend on candle's global RNG.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn ggml(fmt: Fmt) -> GgmlDType {
    match fmt {
        Fmt::Q4_0 => GgmlDType::Q4_0,
        Fmt::Q4_1 => GgmlDType::Q4_1,
        Fmt::Q5_0 => GgmlDType::Q5_0,
        Fmt::Q5_1 => GgmlDType::Q5_1,
        Fmt::Q8_0 => GgmlDType::Q8_0,
        Fmt::Q4K => GgmlDType::Q4K,
        Fmt::Q5K => GgmlDType::Q5K,
        Fmt::Q6K => GgmlDType::Q6K,
        Fmt::F16 => GgmlDType::F16,
        Fmt::BF16 => GgmlDType::BF16,
    }
}

/// A random `n × k` weight in `fmt`: its raw bytes and its dequantized values.
fn weight(fmt: Fmt, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let src = Tensor::from_vec(randn(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&src, ggml(fmt)).unwrap();
    let bytes = q.data().unwrap().to_vec();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (bytes, deq)
}

/// `x·Wᵀ` in f64, and `Σ|x||w|` per output (the scale rounding errors act on).
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * n];
    let mut s = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for e in 0..k {
                let p = x[i * k + e] as f64 * w[j * k + e] as f64;
                y[i * n + j] += p;
                s[i * n + j] += p.abs();
            }
        }
    }
    (y, s)
}

/// Holds one product to two references: exact (f32 rounding only, 1e-5 of `Σ|x||w|`) against
/// the activations the kernel actually multiplied (its 8-bit codes, or `x` itself for half
/// weights), and within 1% of `Σ|x||w|` against the unquantized `x` (8-bit codes keep about
/// 7 bits per element).
fn check(path: Path, fmt: Fmt, m: usize, n: usize, k: usize, parallel: bool) {
    let (wb, wd) = weight(fmt, n, k, 7 + k as u64);
    let x = randn(m * k, 100 + m as u64);
    let got = matmul_on(path, fmt, &wb, n, k, &x, m, parallel).unwrap();
    let used = if fmt.is_half() {
        x.clone()
    } else {
        Acts::quantize(&x, m, k).dequantize()
    };
    let (exact, scale) = reference(&used, &wd, m, n, k);
    let (real, _) = reference(&x, &wd, m, n, k);
    for i in 0..m * n {
        let (g, e, s) = (got[i] as f64, exact[i], scale[i]);
        assert!(
            (g - e).abs() <= 1e-5 * s + 1e-6,
            "{path:?} {fmt:?} m={m} n={n} k={k} #{i}: {g} vs exact {e} (scale {s})"
        );
        assert!(
            (g - real[i]).abs() <= 1e-2 * s + 1e-6,
            "{path:?} {fmt:?} m={m} #{i}: {g} vs unquantized {}",
            real[i]
        );
    }
}

fn paths() -> Vec<Path> {
    let p: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
    assert!(p.contains(&Path::Portable));
    p
}

#[test]
fn every_format_on_every_available_path_matches_f64_reference() {
    for path in paths() {
        for fmt in Fmt::ALL {
            // K not a multiple of 256 where the block allows it (and not of 8 for half rows,
            // which exercises the SIMD tail).
            let ks: &[usize] = match fmt {
                Fmt::Q4K | Fmt::Q5K | Fmt::Q6K => &[256, 512],
                Fmt::F16 | Fmt::BF16 => &[100, 512],
                _ => &[96, 512],
            };
            for &k in ks {
                for m in [1, 3, 5, 8, 11] {
                    check(path, fmt, m, 37, k, false);
                }
            }
        }
    }
}

#[test]
fn split_over_the_pool_equals_one_thread() {
    for path in paths() {
        for fmt in [Fmt::Q4_1, Fmt::Q6K, Fmt::BF16] {
            let (n, k, m) = (301, 512, 3);
            let (wb, _) = weight(fmt, n, k, 3);
            let x = randn(m * k, 4);
            let one = matmul_on(path, fmt, &wb, n, k, &x, m, false).unwrap();
            let split = matmul_on(path, fmt, &wb, n, k, &x, m, true).unwrap();
            assert_eq!(one, split, "{path:?} {fmt:?}");
            check(path, fmt, m, n, k, true);
        }
    }
}

#[test]
fn paths_agree_and_read_unaligned_blocks() {
    let (n, k, m) = (19, 256, 2);
    for fmt in Fmt::ALL {
        let (wb, _) = weight(fmt, n, k, 9);
        // The same bytes one byte off any alignment the allocator gave.
        let mut shifted = vec![0u8; wb.len() + 1];
        shifted[1..].copy_from_slice(&wb);
        let x = randn(m * k, 5);
        let base = matmul_on(Path::Portable, fmt, &wb, n, k, &x, m, false).unwrap();
        for path in paths() {
            let got = matmul_on(path, fmt, &shifted[1..], n, k, &x, m, false).unwrap();
            for (i, (a, b)) in got.iter().zip(&base).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{path:?} {fmt:?} #{i}: {a} vs portable {b}"
                );
            }
        }
    }
}

#[test]
fn shapes_that_do_not_fit_are_refused() {
    let (wb, _) = weight(Fmt::Q4_0, 4, 64, 1);
    let x = randn(64, 2);
    assert!(matmul(Fmt::Q4_0, &wb, 4, 64, &x, 1).is_ok());
    assert!(matmul(Fmt::Q4_0, &wb, 5, 64, &x, 1).is_err());
    assert!(matmul(Fmt::Q4_0, &wb, 4, 64, &x[..63], 1).is_err());
    assert!(matmul(Fmt::Q4K, &wb, 4, 64, &x, 1).is_err());
    assert_eq!(
        matmul(Fmt::Q4_0, &wb, 4, 64, &[], 0).unwrap(),
        Vec::<f32>::new()
    );
}

#[test]
fn activation_codes_round_trip_within_half_a_step() {
    let x = randn(2 * 64, 8);
    let a = Acts::quantize(&x, 2, 64);
    let back = a.dequantize();
    for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
        assert!(
            (v - b).abs() <= 0.5 * a.d[i / 32] + 1e-7,
            "#{i}: {v} vs {b}"
        );
    }
    for (sb, s) in a.s.iter().enumerate() {
        let sum = |h: usize| -> i32 {
            a.q[sb * 32 + 16 * h..][..16]
                .iter()
                .map(|&c| c as i32)
                .sum()
        };
        assert_eq!(s[0], a.d[sb] * sum(0) as f32);
        assert_eq!(s[1], a.d[sb] * sum(1) as f32);
    }
}

/// The f32-activation kernels: the dequantized weight's exact product (f32 rounding only,
/// 1e-5 of `Σ|x||w|`) on every format and path, with `k` that is not a multiple of 256 where
/// the block allows it.
#[test]
fn f32_activations_match_f64_reference_on_every_format_and_path() {
    for path in paths() {
        for fmt in Fmt::ALL {
            let ks: &[usize] = match fmt {
                Fmt::Q4K | Fmt::Q5K | Fmt::Q6K => &[256, 512],
                Fmt::F16 | Fmt::BF16 => &[100, 512],
                _ => &[96, 512],
            };
            for &k in ks {
                for m in [1, 2, 3, 5, 8, 11] {
                    // 37 outputs: not a multiple of any column group, so tails run too.
                    let n = 37;
                    let (wb, wd) = weight(fmt, n, k, 17 + k as u64);
                    let x = randn(m * k, 200 + m as u64);
                    let got = product_on(path, Acc::F32, fmt, &wb, n, k, &x, m, false).unwrap();
                    let (want, scale) = reference(&x, &wd, m, n, k);
                    for i in 0..m * n {
                        let (g, e, s) = (got[i] as f64, want[i], scale[i]);
                        assert!(
                            (g - e).abs() <= 1e-5 * s + 1e-6,
                            "{path:?} {fmt:?} m={m} k={k} #{i}: {g} vs {e} (scale {s})"
                        );
                    }
                }
            }
        }
    }
}

/// A row's output is bit-identical whatever else shares the product: alone, or at any
/// position of 2, 3, 8, 9 or 17 rows, split over the pool or not — for both kinds of
/// activations.
#[test]
fn a_rows_result_does_not_depend_on_the_other_rows() {
    for path in paths() {
        for fmt in [Fmt::Q4_1, Fmt::Q8_0, Fmt::Q6K, Fmt::BF16] {
            let (n, k) = (301, 512);
            let (wb, _) = weight(fmt, n, k, 21);
            let x = randn(17 * k, 22);
            for acc in [Acc::Int8, Acc::F32] {
                let solo: Vec<Vec<f32>> = (0..17)
                    .map(|r| {
                        let xr = &x[r * k..(r + 1) * k];
                        product_on(path, acc, fmt, &wb, n, k, xr, 1, false).unwrap()
                    })
                    .collect();
                for m in [2, 3, 8, 9, 17] {
                    for parallel in [false, true] {
                        let y = product_on(path, acc, fmt, &wb, n, k, &x[..m * k], m, parallel)
                            .unwrap();
                        for (r, want) in solo.iter().take(m).enumerate() {
                            assert_eq!(
                                &y[r * n..(r + 1) * n],
                                &want[..],
                                "{path:?} {fmt:?} {acc:?}: row {r} of {m}"
                            );
                        }
                    }
                }
            }
        }
    }
}
