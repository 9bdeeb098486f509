//! The GGUF block layouts, read as bytes: for every 32-element sub-block of a weight row, its
//! 32 integer codes and the float coefficients that turn an integer dot product with 8-bit
//! activations back into the real one.
//!
//! A weight element is `a·q + b` with `q` an integer code and `a`, `b` constant over 16 elements
//! (Q6_K's scale granularity; every other type keeps them over 32 or more). So, with the
//! activations `x = dₓ·qₓ`, a sub-block's contribution is
//! `dₓ·(a₀·Σ₀ q·qₓ + a₁·Σ₁ q·qₓ) + b₀·dₓΣ₀ qₓ + b₁·dₓΣ₁ qₓ` over its two halves, where the
//! `dₓΣ qₓ` are computed once when the activations are quantized. The codes are unsigned
//! (0..=63) for every type but Q8_0, whose signed codes the SIMD paths multiply via the sign
//! trick. Layouts are the ones `candle_core::quantized::k_quants` declares (`#[repr(C)]`, f16
//! little-endian), which are GGUF's.

/// One GGUF block type, as its bytes are laid out.
pub(super) trait Block {
    /// Bytes of one block.
    const BYTES: usize;
    /// 32-element sub-blocks per block.
    const SUBS: usize;
    /// Whether the codes are signed (`i8` bits in the `u8`s).
    const SIGNED: bool;
    /// Whether the two 16-element halves of a sub-block can have different coefficients.
    const SPLIT_HALVES: bool = false;
    /// Writes the codes of sub-block `j` of `blk` into `q` and returns `[a₀, a₁, b₀, b₁]`.
    #[inline(always)]
    fn unpack(blk: &[u8], j: usize, q: &mut [u8; 32]) -> [f32; 4] {
        Self::codes(blk, j, q);
        Self::coef(blk, j)
    }
    /// Just the codes of sub-block `j`.
    fn codes(blk: &[u8], j: usize, q: &mut [u8; 32]);
    /// Just the coefficients of sub-block `j`, reading f16 fields with `h(bytes, offset)` (the
    /// SIMD paths pass F16C's conversion).
    fn coef_with(blk: &[u8], j: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4];
    #[inline(always)]
    fn coef(blk: &[u8], j: usize) -> [f32; 4] {
        Self::coef_with(blk, j, f16_at)
    }
}

#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block, packed in 12 bytes.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Low nibbles of 16 bytes are elements 0..16, high nibbles 16..32.
#[inline(always)]
fn nibbles16(qs: &[u8], q: &mut [u8; 32]) {
    let (lo, hi) = q.split_at_mut(16);
    for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(&qs[..16]) {
        *l = b & 0xF;
        *h = b >> 4;
    }
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;
pub(super) struct Q4K;
pub(super) struct Q5K;
pub(super) struct Q6K;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const SUBS: usize = 1;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], _: usize, q: &mut [u8; 32]) {
        nibbles16(&blk[2..18], q);
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], _: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let d = h(blk, 0);
        [d, d, -8.0 * d, -8.0 * d]
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const SUBS: usize = 1;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], _: usize, q: &mut [u8; 32]) {
        nibbles16(&blk[4..20], q);
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], _: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let (d, m) = (h(blk, 0), h(blk, 2));
        [d, d, m, m]
    }
}

/// Q5_0/Q5_1: bit `e` of the little-endian `u32` at `qh` is element `e`'s fifth bit.
#[inline(always)]
fn q5(qh: &[u8], qs: &[u8], q: &mut [u8; 32]) {
    nibbles16(qs, q);
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (e, v) in q.iter_mut().enumerate() {
        *v |= (((h >> e) & 1) << 4) as u8;
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const SUBS: usize = 1;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], _: usize, q: &mut [u8; 32]) {
        q5(&blk[2..6], &blk[6..22], q);
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], _: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let d = h(blk, 0);
        [d, d, -16.0 * d, -16.0 * d]
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const SUBS: usize = 1;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], _: usize, q: &mut [u8; 32]) {
        q5(&blk[4..8], &blk[8..24], q);
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], _: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let (d, m) = (h(blk, 0), h(blk, 2));
        [d, d, m, m]
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SUBS: usize = 1;
    const SIGNED: bool = true;
    #[inline(always)]
    fn codes(blk: &[u8], _: usize, q: &mut [u8; 32]) {
        q.copy_from_slice(&blk[2..34]);
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], _: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let d = h(blk, 0);
        [d, d, 0.0, 0.0]
    }
}

/// Q4_K: `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins, then 128 bytes of codes where
/// each 32 bytes hold sub-block `2c` in their low nibbles and `2c + 1` in their high ones.
impl Block for Q4K {
    const BYTES: usize = 144;
    const SUBS: usize = 8;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], j: usize, q: &mut [u8; 32]) {
        let qs = &blk[16 + 32 * (j / 2)..][..32];
        let shift = 4 * (j & 1);
        for (v, &b) in q.iter_mut().zip(qs) {
            *v = (b >> shift) & 0xF;
        }
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], j: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let (sc, m) = scale_min_k4(j, &blk[4..16]);
        let a = h(blk, 0) * sc as f32;
        let b = -h(blk, 2) * m as f32;
        [a, a, b, b]
    }
}

/// Q5_K: Q4_K's header and codes with 32 bytes of fifth bits before the codes: bit `j` of
/// byte `l` belongs to element `l` of sub-block `j`.
impl Block for Q5K {
    const BYTES: usize = 176;
    const SUBS: usize = 8;
    const SIGNED: bool = false;
    #[inline(always)]
    fn codes(blk: &[u8], j: usize, q: &mut [u8; 32]) {
        let qs = &blk[48 + 32 * (j / 2)..][..32];
        let qh = &blk[16..48];
        let shift = 4 * (j & 1);
        for ((v, &b), &h) in q.iter_mut().zip(qs).zip(qh) {
            *v = ((b >> shift) & 0xF) | (((h >> j) & 1) << 4);
        }
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], j: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let (sc, m) = scale_min_k4(j, &blk[4..16]);
        let a = h(blk, 0) * sc as f32;
        let b = -h(blk, 2) * m as f32;
        [a, a, b, b]
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 `i8` scales (one per 16 elements),
/// then `d`. Element `e` is `d·scale[e/16]·(q − 32)`. Within each half of 128 elements,
/// sub-block `k` takes low (k < 2) or high nibbles of `ql[64h + 32(k&1) ..]` and bits `2k, 2k+1`
/// of `qh[32h ..]`.
impl Block for Q6K {
    const BYTES: usize = 210;
    const SUBS: usize = 8;
    const SIGNED: bool = false;
    const SPLIT_HALVES: bool = true;
    #[inline(always)]
    fn codes(blk: &[u8], j: usize, q: &mut [u8; 32]) {
        let (h, k) = (j / 4, j % 4);
        let ql = &blk[64 * h + 32 * (k & 1)..][..32];
        let qh = &blk[128 + 32 * h..][..32];
        let (sl, sh) = (4 * (k >> 1), 2 * k);
        for ((v, &l), &hb) in q.iter_mut().zip(ql).zip(qh) {
            *v = ((l >> sl) & 0xF) | (((hb >> sh) & 3) << 4);
        }
    }
    #[inline(always)]
    fn coef_with(blk: &[u8], j: usize, h: impl Fn(&[u8], usize) -> f32) -> [f32; 4] {
        let d = h(blk, 208);
        let a0 = d * (blk[192 + 2 * j] as i8) as f32;
        let a1 = d * (blk[193 + 2 * j] as i8) as f32;
        [a0, a1, -32.0 * a0, -32.0 * a1]
    }
}
