//! The portable path: plain loops over decoded codes, for CPUs without AVX2 (and the reference
//! the SIMD paths are tested against). Integer sums are exact, so every path agrees up to the
//! order of the float additions.
use super::formats::{f16_at, Block};
use super::{Job, Table};

pub(super) fn table() -> Table {
    super::table!(rows, half)
}

/// # Safety
/// See [`super::Rows`].
pub(super) unsafe fn rows<B: Block, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    let Some(a) = job.acts else { return };
    let k = job.k;
    let nsb = k / 32;
    let nblk = nsb / B::SUBS;
    let mut q = [0u8; 32];
    for o in o0..o1 {
        let row = &job.w[o * job.row_bytes..][..job.row_bytes];
        let mut acc = [0f32; M];
        for bi in 0..nblk {
            let blk = &row[bi * B::BYTES..][..B::BYTES];
            for j in 0..B::SUBS {
                let c = B::unpack(blk, j, &mut q);
                let sb = bi * B::SUBS + j;
                for (r, acc) in acc.iter_mut().enumerate() {
                    let ar = job.r0 + r;
                    let xq = &a.q[ar * k + sb * 32..][..32];
                    let mut i = [0i32; 2];
                    for (l, (&w, &x)) in q.iter().zip(xq).enumerate() {
                        let w = if B::SIGNED { w as i8 as i32 } else { w as i32 };
                        i[l / 16] += w * x as i32;
                    }
                    let s = a.s[ar * nsb + sb];
                    *acc += a.d[ar * nsb + sb] * (c[0] * i[0] as f32 + c[1] * i[1] as f32)
                        + c[2] * s[0]
                        + c[3] * s[1];
                }
            }
        }
        for (r, &v) in acc.iter().enumerate() {
            *job.y.add(r * job.ldy + o) = v;
        }
    }
}

/// One f16 (`BF = false`) or bf16 element at byte offset `i`, widened.
#[inline(always)]
pub(super) fn half_at<const BF: bool>(w: &[u8], i: usize) -> f32 {
    if BF {
        f32::from_bits((u16::from_le_bytes([w[i], w[i + 1]]) as u32) << 16)
    } else {
        f16_at(w, i)
    }
}

/// # Safety
/// See [`super::Rows`].
pub(super) unsafe fn half<const BF: bool, const M: usize>(job: &Job<'_>, o0: usize, o1: usize) {
    let k = job.k;
    let mut wf = vec![0f32; k];
    for o in o0..o1 {
        let row = &job.w[o * job.row_bytes..][..job.row_bytes];
        for (e, v) in wf.iter_mut().enumerate() {
            *v = half_at::<BF>(row, 2 * e);
        }
        for r in 0..M {
            let x = &job.x[(job.r0 + r) * k..][..k];
            *job.y.add(r * job.ldy + o) = crate::ops::dot(&wf, x);
        }
    }
}

pub(super) fn ftable() -> Table {
    super::ftable!(frows, half)
}

/// f32 activations against block weights decoded to f32 (`a·q + b`), eight lanes per row
/// summed in a fixed order, so a row's result does not depend on how many rows share the call.
///
/// # Safety
/// See [`super::Rows`].
pub(super) unsafe fn frows<B: Block, const M: usize, const C: usize>(
    job: &Job<'_>,
    o0: usize,
    o1: usize,
) {
    let k = job.k;
    let nblk = k / 32 / B::SUBS;
    let mut q = [0u8; 32];
    let mut w = [0f32; 32];
    for o in o0..o1 {
        let row = &job.w[o * job.row_bytes..][..job.row_bytes];
        let mut acc = [[0f32; 8]; M];
        for bi in 0..nblk {
            let blk = &row[bi * B::BYTES..][..B::BYTES];
            for j in 0..B::SUBS {
                let c = B::unpack(blk, j, &mut q);
                for (e, (v, &code)) in w.iter_mut().zip(&q).enumerate() {
                    let code = if B::SIGNED {
                        code as i8 as f32
                    } else {
                        code as f32
                    };
                    *v = c[e / 16] * code + c[2 + e / 16];
                }
                let e0 = (bi * B::SUBS + j) * 32;
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = &job.x[(job.r0 + r) * k + e0..][..32];
                    for (wg, xg) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
                        for l in 0..8 {
                            acc[l] += wg[l] * xg[l];
                        }
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            *job.y.add(r * job.ldy + o) = acc.iter().sum();
        }
    }
}
