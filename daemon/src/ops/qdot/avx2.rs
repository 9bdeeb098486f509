//! The AVX2 path (with FMA and F16C): a sub-block's 32 codes sit in one `__m256i`, multiplied
//! with the activation codes by `vpmaddubsw` (u8 × i8 → pairs of i16; the largest code, 63,
//! times 127 twice stays below `i16::MAX`) and `vpmaddwd` (→ eight i32, four per 16-element
//! half), then scaled in f32 lanes so no horizontal sum is paid per block — one per output.
//! Q8_0's signed codes go through the sign trick (`|w|` times `x·sign(w)`).
use std::arch::x86_64::*;

use super::formats::{self, Block};
use super::{portable, Job, Table};

/// How a SIMD kernel gets a sub-block's codes into a register: straight from the bytes for the
/// common layouts, else decoded by the portable code into a stack buffer.
pub(super) trait Load: Block {
    /// # Safety
    /// `blk` must point at `Self::BYTES` readable bytes and the CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn load(blk: *const u8, j: usize) -> __m256i {
        let mut q = [0u8; 32];
        Self::codes(std::slice::from_raw_parts(blk, Self::BYTES), j, &mut q);
        _mm256_loadu_si256(q.as_ptr() as *const __m256i)
    }
}

/// 16 bytes of nibbles: low nibbles → lanes 0..16, high → 16..32.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0xF);
    let lo = _mm_and_si128(v, m);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    _mm256_set_m128i(hi, lo)
}

impl Load for formats::Q4_0 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, _: usize) -> __m256i {
        nibbles16(blk.add(2))
    }
}

impl Load for formats::Q4_1 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, _: usize) -> __m256i {
        nibbles16(blk.add(4))
    }
}

impl Load for formats::Q5_0 {}
impl Load for formats::Q5_1 {}

impl Load for formats::Q8_0 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, _: usize) -> __m256i {
        _mm256_loadu_si256(blk.add(2) as *const __m256i)
    }
}

impl Load for formats::Q4K {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, j: usize) -> __m256i {
        let v = _mm256_loadu_si256(blk.add(16 + 32 * (j / 2)) as *const __m256i);
        let v = if j & 1 == 0 {
            v
        } else {
            _mm256_srli_epi16(v, 4)
        };
        _mm256_and_si256(v, _mm256_set1_epi8(0xF))
    }
}

impl Load for formats::Q5K {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, j: usize) -> __m256i {
        let v = formats::Q4K::load(blk.add(32), j);
        // Fifth bits: bit j of each of the 32 bytes at offset 16, moved to bit 4.
        let h = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let bit = _mm256_set1_epi8(1i8 << j);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
        _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(16)))
    }
}

impl Load for formats::Q6K {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(blk: *const u8, j: usize) -> __m256i {
        let (h, k) = (j / 4, j % 4);
        let l = _mm256_loadu_si256(blk.add(64 * h + 32 * (k & 1)) as *const __m256i);
        let l = if k < 2 { l } else { _mm256_srli_epi16(l, 4) };
        let l = _mm256_and_si256(l, _mm256_set1_epi8(0xF));
        let hb = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
        let hb = _mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * k as i32));
        let hb = _mm256_and_si256(hb, _mm256_set1_epi8(3));
        _mm256_or_si256(l, _mm256_slli_epi16(hb, 4))
    }
}

pub(super) fn table() -> &'static Table {
    static T: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    T.get_or_init(|| super::table!(rows_entry, half_entry))
}

/// The f16 at `p`, widened by F16C.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn h2f(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// # Safety
/// See [`super::Rows`]; the CPU must have AVX2, FMA and F16C.
unsafe fn rows_entry<B: Load, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    rows::<B, M>(job, o0, o1)
}

/// # Safety
/// See [`super::Rows`]; the CPU must have AVX2, FMA and F16C.
unsafe fn half_entry<const BF: bool, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    half::<BF, M>(job, o0, o1)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<B: Load, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    let Some(a) = job.acts else { return };
    let k = job.k;
    let nsb = k / 32;
    let nblk = nsb / B::SUBS;
    let ones = _mm256_set1_epi16(1);
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
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qu, x), ones);
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

/// f16/bf16 rows widened eight at a time and multiplied with the f32 activations. Also the
/// AVX-512 path's half kernel.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn half<const BF: bool, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    let k = job.k;
    let k8 = k / 8 * 8;
    let x = job.x.as_ptr().add(job.r0 * k);
    for o in o0..o1 {
        let row = job.w.as_ptr().add(o * job.row_bytes);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut e = 0;
        while e < k8 {
            let h = _mm_loadu_si128(row.add(2 * e) as *const __m128i);
            let wv = if BF {
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            } else {
                _mm256_cvtph_ps(h)
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(r * k + e));
                *acc = _mm256_fmadd_ps(wv, xv, *acc);
            }
            e += 8;
        }
        let bytes = std::slice::from_raw_parts(row, job.row_bytes);
        for (r, acc) in acc.iter().enumerate() {
            let mut s = hsum(*acc);
            for t in k8..k {
                s += portable::half_at::<BF>(bytes, 2 * t) * *x.add(r * k + t);
            }
            *job.y.add(r * job.ldy + o) = s;
        }
    }
}

/// The f32-activation kernel table: block weights decoded to f32 in registers and multiplied
/// with the activations as they are (no 8-bit codes). Also the AVX-512 path's.
pub(super) fn ftable() -> &'static Table {
    static T: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    T.get_or_init(|| super::ftable!(frows_entry, half_entry))
}

/// # Safety
/// See [`super::Rows`]; the CPU must have AVX2, FMA and F16C.
unsafe fn frows_entry<B: Load, const M: usize, const C: usize>(
    job: &Job<'_>,
    o0: usize,
    o1: usize,
) {
    let mut o = o0;
    while o + C <= o1 {
        fcols::<B, M, C>(job, o);
        o += C;
    }
    // The tail one column at a time: the same arithmetic per output, only fewer in flight.
    while o < o1 {
        fcols::<B, M, 1>(job, o);
        o += 1;
    }
}

/// Sub-block codes (32 lanes of `q`) → the eight f32 weights of group `i` (0..4): `a·q + b`
/// with the coefficients of the group's 16-element half.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn weights8<B: Load>(q: __m256i, i: usize, a: __m256, b: __m256) -> __m256 {
    let half = if i < 2 {
        _mm256_castsi256_si128(q)
    } else {
        _mm256_extracti128_si256(q, 1)
    };
    let bytes = if i & 1 == 0 {
        half
    } else {
        _mm_srli_si128(half, 8)
    };
    let ints = if B::SIGNED {
        _mm256_cvtepi8_epi32(bytes)
    } else {
        _mm256_cvtepu8_epi32(bytes)
    };
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), a, b)
}

/// Output columns `o..o + C` of the job's `M` rows. Every output has one accumulator that takes
/// the sub-blocks in order, four eight-lane FMAs each, then one horizontal sum: its value does
/// not depend on `M` or `C` (those only set how many independent chains are in flight), so a
/// row's result is the same whatever shares its batch.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fcols<B: Load, const M: usize, const C: usize>(job: &Job<'_>, o: usize) {
    let k = job.k;
    let nblk = k / 32 / B::SUBS;
    let x = job.x.as_ptr().add(job.r0 * k);
    let mut acc = [[_mm256_setzero_ps(); C]; M];
    for bi in 0..nblk {
        for c in 0..C {
            let blk = job.w.as_ptr().add((o + c) * job.row_bytes + bi * B::BYTES);
            let bytes = std::slice::from_raw_parts(blk, B::BYTES);
            for j in 0..B::SUBS {
                let q = B::load(blk, j);
                let cf = B::coef_with(bytes, j, |b, i| h2f(b.as_ptr().add(i)));
                let e0 = (bi * B::SUBS + j) * 32;
                for i in 0..4 {
                    let h = i / 2;
                    let w = weights8::<B>(q, i, _mm256_set1_ps(cf[h]), _mm256_set1_ps(cf[2 + h]));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(r * k + e0 + 8 * i));
                        acc[c] = _mm256_fmadd_ps(w, xv, acc[c]);
                    }
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            *job.y.add(r * job.ldy + o + c) = hsum(a);
        }
    }
}
