//! The AVX-512 VNNI path: the AVX2 kernel with `vpdpbusd` (u8 × i8, four products summed into
//! each i32 lane in one instruction, no i16 saturation) in place of `vpmaddubsw` + `vpmaddwd`.
//! It runs at 256-bit width (AVX512VL encoding) because one 32-element sub-block is the unit
//! every scale applies to; wider registers would need a cross-lane shuffle per block to keep the
//! halves apart. f16/bf16 weights use the AVX2/F16C kernel.
use std::arch::x86_64::*;

use super::avx2::{h2f, half, hsum, Load};
use super::{Job, Table};

pub(super) fn table() -> &'static Table {
    static T: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    T.get_or_init(|| super::table!(rows_entry, half_entry))
}

/// # Safety
/// See [`super::Rows`]; the CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
unsafe fn rows_entry<B: Load, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    rows::<B, M>(job, o0, o1)
}

/// # Safety
/// See [`super::Rows`]; the CPU must have AVX2, FMA and F16C.
unsafe fn half_entry<const BF: bool, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    half::<BF, M>(job, o0, o1)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<B: Load, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    let Some(a) = job.acts else { return };
    let k = job.k;
    let nsb = k / 32;
    let nblk = nsb / B::SUBS;
    let xq = a.q.as_ptr().add(job.r0 * k);
    let xd = a.d.as_ptr().add(job.r0 * nsb);
    let xs = a.s.as_ptr().add(job.r0 * nsb);
    for o in o0..o1 {
        let row = job.w.as_ptr().add(o * job.row_bytes);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut accs = [0f32; M];
        for bi in 0..nblk {
            let blk = row.add(bi * B::BYTES);
            let bytes = std::slice::from_raw_parts(blk, B::BYTES);
            for j in 0..B::SUBS {
                let q = B::load(blk, j);
                let c = B::coef_with(bytes, j, |b, i| h2f(b.as_ptr().add(i)));
                let sb = bi * B::SUBS + j;
                let cv = if B::SPLIT_HALVES {
                    _mm256_setr_ps(c[0], c[0], c[0], c[0], c[1], c[1], c[1], c[1])
                } else {
                    _mm256_set1_ps(c[0])
                };
                let qu = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                for r in 0..M {
                    let x = _mm256_loadu_si256(xq.add(r * k + sb * 32) as *const __m256i);
                    let x = if B::SIGNED { _mm256_sign_epi8(x, q) } else { x };
                    let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qu, x);
                    let dx = _mm256_set1_ps(*xd.add(r * nsb + sb));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(cv, dx), acc[r]);
                    let s = *xs.add(r * nsb + sb);
                    accs[r] += if B::SPLIT_HALVES {
                        c[2] * s[0] + c[3] * s[1]
                    } else {
                        c[2] * (s[0] + s[1])
                    };
                }
            }
        }
        for r in 0..M {
            *job.y.add(r * job.ldy + o) = hsum(acc[r]) + accs[r];
        }
    }
}
