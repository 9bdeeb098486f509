//! `y = α·x·Wᵀ + β·y` for a few rows of `x` (decode batches), in f32 on the CPU.
//!
//! Why not BLAS: OpenBLAS 0.3.21 packs the whole of `W` into a scratch buffer on every GEMM call
//! (`sgemm_incopy`), which at 2–16 rows costs more than the products, so an 8-row decode step
//! ran at 6 GB/s of weights while one row (GEMV) runs at 39. Here each output is a dot product
//! of two contiguous rows (`W` is row-major `out × in`, as every projection stores it), computed
//! in register tiles of 4 rows of `x` by 4 rows of `W` so each weight loaded from memory serves
//! every row of the batch, and the outputs are split across the rayon pool.
//!
//! Kernels: AVX-512F when the CPU has it, else AVX2+FMA, else a portable loop; chosen once at
//! run time. Tested against a plain f64 reference at every tile edge.

/// Largest row count this is meant for; above it BLAS's packing pays for itself.
pub const MAX_ROWS: usize = 16;

/// Below this many multiply-adds one thread does the whole product: forking costs more.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Rows of `x` and of `W` per register tile.
const TILE: usize = 4;

/// Operands of one product. `x` is `m × k` with leading dimension `ldx`, `w` is `n × k` with
/// leading dimension `ldw`, `y` is `m × n` with leading dimension `ldy`.
#[derive(Clone, Copy)]
pub struct Xwt<'a> {
    pub x: &'a [f32],
    pub ldx: usize,
    pub w: &'a [f32],
    pub ldw: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl Xwt<'_> {
    fn check(&self, y: &[f32], ldy: usize) -> Result<(), String> {
        let need = |rows: usize, ld: usize, cols: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1) * ld + cols
            }
        };
        let (m, n, k) = (self.m, self.n, self.k);
        if self.ldx < k || self.ldw < k || ldy < n {
            return Err(format!(
                "leading dimensions x {} / w {} / y {ldy} below k {k} / n {n}",
                self.ldx, self.ldw
            ));
        }
        if self.x.len() < need(m, self.ldx, k)
            || self.w.len() < need(n, self.ldw, k)
            || y.len() < need(m, ldy, n)
        {
            return Err(format!(
                "operands too short for {m}x{k} · ({n}x{k})ᵀ: x {}, w {}, y {}",
                self.x.len(),
                self.w.len(),
                y.len()
            ));
        }
        Ok(())
    }
}

/// A pointer to `y` that rayon tasks share; each writes only its own columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint column ranges of `y` (see `gemm`), and `y` outlives the scope.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y = alpha·x·Wᵀ + beta·y` (with `beta == 0` the old `y` is ignored, NaNs included), split
/// over the rayon pool when it is big enough.
pub fn gemm(p: Xwt<'_>, alpha: f32, beta: f32, y: &mut [f32], ldy: usize) -> Result<(), String> {
    run(p, alpha, beta, y, ldy, true)
}

/// [`gemm`] on the calling thread only: for callers that already spread their work over the pool.
pub fn gemm_serial(
    p: Xwt<'_>,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
    ldy: usize,
) -> Result<(), String> {
    run(p, alpha, beta, y, ldy, false)
}

fn run(
    p: Xwt<'_>,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
    ldy: usize,
    parallel: bool,
) -> Result<(), String> {
    p.check(y, ldy)?;
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    let kernel = kernel();
    let out = Out(y.as_mut_ptr());
    let work = p.m * p.n * p.k;
    let tasks = if parallel && work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads().min(p.n.div_ceil(TILE))
    } else {
        1
    };
    // Column blocks of whole tiles, so only the last block has a ragged edge.
    let per = p.n.div_ceil(TILE).div_ceil(tasks.max(1)) * TILE;
    let run = |o0: usize| {
        let o1 = (o0 + per).min(p.n);
        // SAFETY: `check` proved every row of x/W/y in range; this task touches only columns
        // o0..o1 of y, disjoint from every other task's, and `run` holds `y` mutably borrowed
        // until all tasks have joined.
        unsafe { columns(kernel, &p, o0, o1, alpha, beta, out, ldy) }
    };
    if tasks <= 1 {
        run(0);
    } else {
        rayon::scope(|s| {
            for t in 1..tasks {
                let o0 = t * per;
                if o0 < p.n {
                    s.spawn(move |_| run(o0));
                }
            }
            run(0);
        });
    }
    Ok(())
}

type Kernel = unsafe fn(&Xwt<'_>, usize, usize, usize, usize, &mut [[f32; TILE]; TILE]);

/// Columns `o0..o1` of `y = x·Wᵀ` (`y` at `ldy`), on the calling thread: for a caller that
/// splits several products over the pool itself ([`super::fanout`]).
///
/// # Safety
/// `p`'s rows `0..m` of x and `o0..o1` of W must be in range, `y` valid for `m` rows of `ldy`
/// with `o1 ≤ ldy`, and no other thread may touch those columns meanwhile.
pub(crate) unsafe fn columns_raw(p: &Xwt<'_>, o0: usize, o1: usize, y: *mut f32, ldy: usize) {
    columns(kernel(), p, o0, o1, 1.0, 0.0, Out(y), ldy)
}

/// # Safety
/// Rows `0..m` of x and `o0..o1` of W must be in range (checked by `gemm`), and no other thread
/// may touch columns `o0..o1` of `y` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    kernel: Kernel,
    p: &Xwt<'_>,
    o0: usize,
    o1: usize,
    alpha: f32,
    beta: f32,
    y: Out,
    ldy: usize,
) {
    let mut acc = [[0f32; TILE]; TILE];
    let mut o = o0;
    while o < o1 {
        let oo = TILE.min(o1 - o);
        let mut r = 0;
        while r < p.m {
            let rr = TILE.min(p.m - r);
            kernel(p, r, rr, o, oo, &mut acc);
            for (i, row) in acc.iter().enumerate().take(rr) {
                for (j, &v) in row.iter().enumerate().take(oo) {
                    let dst = y.0.add((r + i) * ldy + o + j);
                    *dst = if beta == 0.0 {
                        alpha * v
                    } else {
                        alpha * v + beta * *dst
                    };
                }
            }
            r += rr;
        }
        o += oo;
    }
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return x86::tile_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return x86::tile_avx2;
        }
    }
    tile_portable
}

/// `acc[i][j] = x[r + i] · W[o + j]` for `i < rr`, `j < oo`.
///
/// # Safety
/// The rows must be in range.
unsafe fn tile_portable(
    p: &Xwt<'_>,
    r: usize,
    rr: usize,
    o: usize,
    oo: usize,
    acc: &mut [[f32; TILE]; TILE],
) {
    for (i, row) in acc.iter_mut().enumerate().take(rr) {
        let x = &p.x[(r + i) * p.ldx..][..p.k];
        for (j, v) in row.iter_mut().enumerate().take(oo) {
            *v = super::dot(&p.w[(o + j) * p.ldw..][..p.k], x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Xwt, TILE};
    use std::arch::x86_64::*;

    /// Dispatches a ragged tile to the const-sized kernel that fits it, so the accumulators of
    /// every size stay in registers.
    macro_rules! dispatch {
        ($f:ident, $p:expr, $r:expr, $rr:expr, $o:expr, $oo:expr, $acc:expr) => {
            match ($rr, $oo) {
                (4, 4) => $f::<4, 4>($p, $r, $o, $acc),
                (4, 3) => $f::<4, 3>($p, $r, $o, $acc),
                (4, 2) => $f::<4, 2>($p, $r, $o, $acc),
                (4, 1) => $f::<4, 1>($p, $r, $o, $acc),
                (3, 4) => $f::<3, 4>($p, $r, $o, $acc),
                (3, 3) => $f::<3, 3>($p, $r, $o, $acc),
                (3, 2) => $f::<3, 2>($p, $r, $o, $acc),
                (3, 1) => $f::<3, 1>($p, $r, $o, $acc),
                (2, 4) => $f::<2, 4>($p, $r, $o, $acc),
                (2, 3) => $f::<2, 3>($p, $r, $o, $acc),
                (2, 2) => $f::<2, 2>($p, $r, $o, $acc),
                (2, 1) => $f::<2, 1>($p, $r, $o, $acc),
                (1, 4) => $f::<1, 4>($p, $r, $o, $acc),
                (1, 3) => $f::<1, 3>($p, $r, $o, $acc),
                (1, 2) => $f::<1, 2>($p, $r, $o, $acc),
                _ => $f::<1, 1>($p, $r, $o, $acc),
            }
        };
    }

    /// # Safety
    /// The CPU must have AVX-512F; the rows must be in range.
    pub(super) unsafe fn tile_avx512(
        p: &Xwt<'_>,
        r: usize,
        rr: usize,
        o: usize,
        oo: usize,
        acc: &mut [[f32; TILE]; TILE],
    ) {
        dispatch!(avx512, p, r, rr, o, oo, acc)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize, const O: usize>(
        p: &Xwt<'_>,
        r: usize,
        o: usize,
        out: &mut [[f32; TILE]; TILE],
    ) {
        let x = p.x.as_ptr().add(r * p.ldx);
        let w = p.w.as_ptr().add(o * p.ldw);
        let mut acc = [[_mm512_setzero_ps(); O]; R];
        let mut wv = [_mm512_setzero_ps(); O];
        let mut q = 0;
        while q + 16 <= p.k {
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(j * p.ldw + q));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i * p.ldx + q));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            q += 16;
        }
        if q < p.k {
            // Masked loads read nothing past the row's end.
            let mask: __mmask16 = ((1u32 << (p.k - q)) - 1) as u16;
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(j * p.ldw + q));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(i * p.ldx + q));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                out[i][j] = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; the rows must be in range.
    pub(super) unsafe fn tile_avx2(
        p: &Xwt<'_>,
        r: usize,
        rr: usize,
        o: usize,
        oo: usize,
        acc: &mut [[f32; TILE]; TILE],
    ) {
        dispatch!(avx2, p, r, rr, o, oo, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize, const O: usize>(
        p: &Xwt<'_>,
        r: usize,
        o: usize,
        out: &mut [[f32; TILE]; TILE],
    ) {
        let x = p.x.as_ptr().add(r * p.ldx);
        let w = p.w.as_ptr().add(o * p.ldw);
        let mut acc = [[_mm256_setzero_ps(); O]; R];
        let mut wv = [_mm256_setzero_ps(); O];
        let mut q = 0;
        while q + 8 <= p.k {
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(j * p.ldw + q));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * p.ldx + q));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
            q += 8;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let mut s: f32 = lanes.iter().sum();
                for t in q..p.k {
                    s += *x.add(i * p.ldx + t) * *w.add(j * p.ldw + t);
                }
                out[i][j] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        // Deterministic values in [-1, 1) without pulling a RNG into the fixture.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(p: &Xwt<'_>, alpha: f32, beta: f32, y: &[f32], ldy: usize) -> Vec<f64> {
        let mut out = vec![0f64; p.m * p.n];
        for i in 0..p.m {
            for j in 0..p.n {
                let dot: f64 = (0..p.k)
                    .map(|t| p.x[i * p.ldx + t] as f64 * p.w[j * p.ldw + t] as f64)
                    .sum();
                let old = if beta == 0.0 {
                    0.0
                } else {
                    beta as f64 * y[i * ldy + j] as f64
                };
                out[i * p.n + j] = alpha as f64 * dot + old;
            }
        }
        out
    }

    /// Runs one product: operands, alpha, beta, y, ldy.
    type Run<'a> = &'a dyn Fn(Xwt<'_>, f32, f32, &mut [f32], usize);

    fn check_all(kernel_name: &str, run: Run<'_>) {
        // Every ragged tile edge, k with and without a vector tail, padded leading dimensions.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 16, 576),
            (2, 7, 33),
            (3, 5, 17),
            (5, 9, 16),
            (8, 13, 100),
            (8, 192, 576),
            (16, 70, 8),
            (7, 600, 513),
        ] {
            for &(alpha, beta) in &[(1.0f32, 0.0f32), (0.5, 1.0), (2.0, -0.5)] {
                let (ldx, ldw, ldy) = (k + 3, k + 1, n + 2);
                let x = data(m * ldx, 1);
                let w = data(n * ldw, 2);
                let mut y = data(m * ldy, 3);
                if beta == 0.0 {
                    y.iter_mut().for_each(|v| *v = f32::NAN);
                }
                let p = Xwt {
                    x: &x,
                    ldx,
                    w: &w,
                    ldw,
                    m,
                    n,
                    k,
                };
                let want = reference(&p, alpha, beta, &y, ldy);
                let pad = y.clone();
                run(p, alpha, beta, &mut y, ldy);
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (y[i * ldy + j] as f64, want[i * n + j]);
                        let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "{kernel_name} {m}x{n}x{k} a={alpha} b={beta} [{i},{j}]: {got} vs {want}"
                        );
                    }
                    for j in n..ldy {
                        if i * ldy + j < y.len() {
                            let (a, b) = (y[i * ldy + j], pad[i * ldy + j]);
                            assert!(a.to_bits() == b.to_bits(), "{kernel_name}: padding written");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_every_tile_edge() {
        check_all("dispatched", &|p, a, b, y, ld| {
            gemm(p, a, b, y, ld).unwrap()
        });
        check_all("serial", &|p, a, b, y, ld| {
            gemm_serial(p, a, b, y, ld).unwrap()
        });
    }

    #[test]
    fn every_kernel_matches_reference() {
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", tile_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", x86::tile_avx512));
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kernels.push(("avx2", x86::tile_avx2));
            }
        }
        for (name, k) in kernels {
            check_all(name, &|p, a, b, y, ld| {
                p.check(y, ld).unwrap();
                // SAFETY: checked above; single thread.
                unsafe { columns(k, &p, 0, p.n, a, b, Out(y.as_mut_ptr()), ld) }
            });
        }
    }

    /// `x·Wᵀ` at a few row counts on the model's projection shapes: this kernel against
    /// OpenBLAS's GEMM, interleaved, best of 30. Run with
    /// `cargo test --release -p itamae-daemon --lib skinny_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn skinny_bench() {
        use crate::ops::blas::BlasFloat;
        use cblas_sys::{CblasNoTrans, CblasTrans};
        use std::time::Instant;
        for (n, k) in [(1536usize, 576usize), (576, 1536), (576, 576), (192, 576)] {
            for m in [8usize, 16, 24, 33, 42, 64] {
                let (x, w) = (data(m * k, 1), data(n * k, 2));
                let mut y = vec![0f32; m * n];
                let (mut ours, mut blas) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..30 {
                    let t = Instant::now();
                    let p = Xwt {
                        x: &x,
                        ldx: k,
                        w: &w,
                        ldw: k,
                        m,
                        n,
                        k,
                    };
                    gemm(p, 1.0, 0.0, &mut y, n).unwrap();
                    ours = ours.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    // SAFETY: x is m×k, w is n×k, y is m×n, all row-major and in range.
                    unsafe {
                        f32::gemm_raw(
                            CblasNoTrans,
                            CblasTrans,
                            m as i32,
                            n as i32,
                            k as i32,
                            1.0,
                            x.as_ptr(),
                            k as i32,
                            w.as_ptr(),
                            k as i32,
                            0.0,
                            y.as_mut_ptr(),
                            n as i32,
                        )
                    };
                    blas = blas.min(t.elapsed().as_secs_f64());
                }
                let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                println!(
                    "{m:>3}x{k:>4}x{n:>4}: skinny {:>7.3} ms ({:>5.0} GFLOP/s)  blas {:>7.3} ms ({:>5.0})  {:.2}x",
                    ours * 1e3,
                    gf(ours),
                    blas * 1e3,
                    gf(blas),
                    blas / ours
                );
            }
        }
    }

    #[test]
    fn short_operands_are_an_error() {
        let x = vec![0f32; 10];
        let w = vec![0f32; 10];
        let mut y = vec![0f32; 4];
        let p = Xwt {
            x: &x,
            ldx: 5,
            w: &w,
            ldw: 5,
            m: 2,
            n: 3,
            k: 5,
        };
        assert!(gemm(p, 1.0, 0.0, &mut y, 3).is_err());
    }
}
