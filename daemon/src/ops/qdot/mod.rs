//! `y = x·Wᵀ` for a few rows of `x` (decode and few-row decode batches) straight from a weight
//! kept in GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) or in f16/bf16 rows.
//!
//! Why our own: candle 0.11 has SIMD dot products for only some block types (none for Q4_1, the
//! default model's, nor Q5_x), walks the weight once per activation row, and its thread split
//! costs more than a small projection. Here:
//! * the activation rows are quantized once per call to 8-bit codes per 32 elements, with a
//!   scale and the scaled code sums of each 16-element half ([`Acts`]);
//! * each weight row's blocks are decoded once for all rows of the batch (up to [`MAX_ROWS`];
//!   more rows run in groups), and multiplied with integer dot products: AVX-512 VNNI
//!   (`vpdpbusd`) or AVX2 (`vpmaddubsw` + `vpmaddwd`), else a portable scalar loop that the
//!   compiler vectorises as it can ([`formats`] says how each layout maps onto that);
//! * f16/bf16 rows are widened to f32 eight at a time (F16C) and multiplied with the f32
//!   activations, no quantization;
//! * a second kind of kernel ([`Acc::F32`], [`matmul_f32`]) keeps the activations in f32 and
//!   decodes each sub-block's codes to f32 weights in registers: the dequantized matrix's
//!   product without its copy, for prefill and the LM head (`ops::quant` says which phase
//!   takes which kind);
//! * a row's result never depends on how many rows share the call (each output has its own
//!   accumulator and summation order), so batching does not change a request's logits;
//! * the output rows are split over the rayon pool in one contiguous range per thread.
//!
//! The instruction-set path is detected once and its kernel table cached ([`kernels`]); tests
//! run every path the CPU can execute against an f64 reference, and the portable one always.
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod formats;
mod portable;
#[cfg(test)]
mod tests;

/// Rows of `x` that share one walk over the weight.
pub const MAX_ROWS: usize = 8;

/// Below this many weight elements one thread does the whole product: waking the other costs
/// more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// The weight formats these kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    F16,
    BF16,
}

impl Fmt {
    pub const ALL: [Fmt; 10] = [
        Fmt::Q4_0,
        Fmt::Q4_1,
        Fmt::Q5_0,
        Fmt::Q5_1,
        Fmt::Q8_0,
        Fmt::Q4K,
        Fmt::Q5K,
        Fmt::Q6K,
        Fmt::F16,
        Fmt::BF16,
    ];

    pub fn from_ggml(dtype: GgmlDType) -> Option<Fmt> {
        Some(match dtype {
            GgmlDType::Q4_0 => Fmt::Q4_0,
            GgmlDType::Q4_1 => Fmt::Q4_1,
            GgmlDType::Q5_0 => Fmt::Q5_0,
            GgmlDType::Q5_1 => Fmt::Q5_1,
            GgmlDType::Q8_0 => Fmt::Q8_0,
            GgmlDType::Q4K => Fmt::Q4K,
            GgmlDType::Q5K => Fmt::Q5K,
            GgmlDType::Q6K => Fmt::Q6K,
            GgmlDType::F16 => Fmt::F16,
            GgmlDType::BF16 => Fmt::BF16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Fmt::Q4K | Fmt::Q5K | Fmt::Q6K => 256,
            Fmt::F16 | Fmt::BF16 => 1,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use formats::Block;
        match self {
            Fmt::Q4_0 => formats::Q4_0::BYTES,
            Fmt::Q4_1 => formats::Q4_1::BYTES,
            Fmt::Q5_0 => formats::Q5_0::BYTES,
            Fmt::Q5_1 => formats::Q5_1::BYTES,
            Fmt::Q8_0 => formats::Q8_0::BYTES,
            Fmt::Q4K => formats::Q4K::BYTES,
            Fmt::Q5K => formats::Q5K::BYTES,
            Fmt::Q6K => formats::Q6K::BYTES,
            Fmt::F16 | Fmt::BF16 => 2,
        }
    }

    fn is_half(self) -> bool {
        matches!(self, Fmt::F16 | Fmt::BF16)
    }

    fn index(self) -> usize {
        Fmt::ALL.iter().position(|&f| f == self).unwrap_or(0)
    }
}

/// An instruction-set path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Portable,
    Avx2,
    Avx512Vnni,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Portable, Path::Avx2, Path::Avx512Vnni];

    /// Whether this CPU can execute the path.
    pub fn available(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => {
                Path::Avx2.available()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU has.
    pub fn detect() -> Path {
        [Path::Avx512Vnni, Path::Avx2]
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(Path::Portable)
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Activation rows quantized to 8 bits per 32-element sub-block: codes `q` (row-major, `k` per
/// row), scale `d` and `d·Σq` of each half (`s`), per row and sub-block.
pub(crate) struct Acts {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<[f32; 2]>,
}

impl Acts {
    /// Quantizes the `m` rows of `x` (`m × k`, `k` a multiple of 32): `d = max|x|/127`,
    /// `q = round(x/d)`, so every code fits the `i8` operand of the integer dot products.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Acts {
        let nsb = k / 32;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * nsb];
        let mut s = vec![[0f32; 2]; m * nsb];
        for (i, (xb, qb)) in x[..m * k]
            .chunks_exact(32)
            .zip(q.chunks_exact_mut(32))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let dx = amax / 127.0;
            let id = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let mut sums = [0i32; 2];
            for (l, (c, &v)) in qb.iter_mut().zip(xb).enumerate() {
                let t = v * id;
                // Round half away from zero without a libm call, so the loop vectorises.
                let r = (t + 0.5f32.copysign(t)) as i32;
                *c = r.clamp(-127, 127) as i8;
                sums[l / 16] += *c as i32;
            }
            d[i] = dx;
            s[i] = [dx * sums[0] as f32, dx * sums[1] as f32];
        }
        Acts { q, d, s }
    }

    /// The activations these codes stand for (tests hold the kernels to these exactly).
    #[cfg(test)]
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &c)| c as f32 * self.d[i / 32])
            .collect()
    }
}

/// One product: weight rows `w` (`n` rows of `row_bytes`), activation rows `r0..r0 + m` (of
/// `x` for f16/bf16, of `acts` for block types), output `y` (already offset to row `r0`) with
/// leading dimension `ldy`.
pub(crate) struct Job<'a> {
    pub w: &'a [u8],
    pub row_bytes: usize,
    pub k: usize,
    pub r0: usize,
    pub x: &'a [f32],
    pub acts: Option<&'a Acts>,
    pub y: *mut f32,
    pub ldy: usize,
}

/// Computes output columns `o0..o1` of every row of the job.
///
/// # Safety
/// The job's slices must hold `n` weight rows and `m` activation rows, `y` must be valid for
/// `m` rows of `ldy` with `o1 ≤ ldy`, the columns `o0..o1` must be written by no one else
/// meanwhile, and the CPU must have the path's instruction set.
pub(crate) type Rows = unsafe fn(&Job<'_>, usize, usize);

/// One kernel per format and row count (index `m − 1`).
pub(crate) type Table = [[Rows; MAX_ROWS]; 10];

/// Builds a path's table from a generic kernel `$f::<B, M>` (block kernels) and `$h::<BF, M>`
/// (half kernels, `BF` true for bf16).
macro_rules! table {
    ($f:ident, $h:ident) => {{
        macro_rules! per_m {
            ($g:ident, $t:ty) => {
                [
                    $g::<$t, 1>,
                    $g::<$t, 2>,
                    $g::<$t, 3>,
                    $g::<$t, 4>,
                    $g::<$t, 5>,
                    $g::<$t, 6>,
                    $g::<$t, 7>,
                    $g::<$t, 8>,
                ]
            };
        }
        macro_rules! half_m {
            ($b:literal) => {
                [
                    $h::<$b, 1>,
                    $h::<$b, 2>,
                    $h::<$b, 3>,
                    $h::<$b, 4>,
                    $h::<$b, 5>,
                    $h::<$b, 6>,
                    $h::<$b, 7>,
                    $h::<$b, 8>,
                ]
            };
        }
        use $crate::ops::qdot::formats as f;
        let t: $crate::ops::qdot::Table = [
            per_m!($f, f::Q4_0),
            per_m!($f, f::Q4_1),
            per_m!($f, f::Q5_0),
            per_m!($f, f::Q5_1),
            per_m!($f, f::Q8_0),
            per_m!($f, f::Q4K),
            per_m!($f, f::Q5K),
            per_m!($f, f::Q6K),
            half_m!(false),
            half_m!(true),
        ];
        t
    }};
}
pub(crate) use table;

/// Builds a path's f32-activation table from `$f::<B, M, C>` (block kernels, `C` output
/// columns in flight: more when few rows leave FMA latency exposed) and `$h::<BF, M>` (half
/// kernels, which already take f32 activations).
macro_rules! ftable {
    ($f:ident, $h:ident) => {{
        macro_rules! per_m {
            ($g:ident, $t:ty) => {
                [
                    $g::<$t, 1, 4>,
                    $g::<$t, 2, 4>,
                    $g::<$t, 3, 2>,
                    $g::<$t, 4, 2>,
                    $g::<$t, 5, 1>,
                    $g::<$t, 6, 1>,
                    $g::<$t, 7, 1>,
                    $g::<$t, 8, 1>,
                ]
            };
        }
        macro_rules! half_m {
            ($b:literal) => {
                [
                    $h::<$b, 1>,
                    $h::<$b, 2>,
                    $h::<$b, 3>,
                    $h::<$b, 4>,
                    $h::<$b, 5>,
                    $h::<$b, 6>,
                    $h::<$b, 7>,
                    $h::<$b, 8>,
                ]
            };
        }
        use $crate::ops::qdot::formats as f;
        let t: $crate::ops::qdot::Table = [
            per_m!($f, f::Q4_0),
            per_m!($f, f::Q4_1),
            per_m!($f, f::Q5_0),
            per_m!($f, f::Q5_1),
            per_m!($f, f::Q8_0),
            per_m!($f, f::Q4K),
            per_m!($f, f::Q5K),
            per_m!($f, f::Q6K),
            half_m!(false),
            half_m!(true),
        ];
        t
    }};
}
pub(crate) use ftable;

/// What the activations are multiplied as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    /// 8-bit codes per 32 elements, integer dot products: the fastest on few rows, the
    /// activations rounded to about 7 bits.
    Int8,
    /// f32 as they are, against the weight decoded to f32 in registers: the dequantized
    /// matrix's exact product (f32 rounding only).
    F32,
}

/// The kernel table of `path` (which must be available).
fn table_of(path: Path) -> &'static Table {
    static PORTABLE: OnceLock<Table> = OnceLock::new();
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => avx2::table(),
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => avx512::table(),
        _ => PORTABLE.get_or_init(portable::table),
    }
}

/// The f32-activation table of `path`. AVX-512 runs the AVX2 kernel: its gain would be the
/// wider FMA, and no host this was built on has AVX-512 to measure or test it.
fn ftable_of(path: Path) -> &'static Table {
    static PORTABLE: OnceLock<Table> = OnceLock::new();
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => avx2::ftable(),
        _ => PORTABLE.get_or_init(portable::ftable),
    }
}

/// The path this CPU runs (detected once per process).
pub fn path() -> Path {
    kernels().0
}

/// The detected path and its table, chosen once per process.
pub(crate) fn kernels() -> (Path, &'static Table) {
    static BEST: OnceLock<Path> = OnceLock::new();
    let p = *BEST.get_or_init(Path::detect);
    (p, table_of(p))
}

/// Why a product cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum QdotError {
    #[error("qdot: {0}")]
    Shape(String),
    #[error("qdot: path {0} is not available on this CPU")]
    Unavailable(&'static str),
}

/// `y = x·Wᵀ` with `W` (`n × k`) in `fmt` as raw bytes and `x` (`m × k`, any `m`) in f32; `y`
/// is `m × n`. Runs on the detected path.
pub fn matmul(
    fmt: Fmt,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>, QdotError> {
    matmul_on(kernels().0, fmt, w, n, k, x, m, true)
}

/// [`matmul`] with the activations kept in f32 ([`Acc::F32`]): the product of the dequantized
/// weight, read from the blocks. A row's result does not depend on `m`.
pub fn matmul_f32(
    fmt: Fmt,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>, QdotError> {
    product_on(kernels().0, Acc::F32, fmt, w, n, k, x, m, true)
}

/// [`matmul`] on a chosen path, optionally on the calling thread only (tests, benches).
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    path: Path,
    fmt: Fmt,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    parallel: bool,
) -> Result<Vec<f32>, QdotError> {
    product_on(path, Acc::Int8, fmt, w, n, k, x, m, parallel)
}

/// [`matmul_on`] for either kind of activations: the kernels run over `x` in groups of
/// [`MAX_ROWS`] rows, each group walking the weight once.
#[allow(clippy::too_many_arguments)]
pub fn product_on(
    path: Path,
    acc: Acc,
    fmt: Fmt,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    parallel: bool,
) -> Result<Vec<f32>, QdotError> {
    if !path.available() {
        return Err(QdotError::Unavailable(path.name()));
    }
    let be = fmt.block_elems();
    if !k.is_multiple_of(be) || (!fmt.is_half() && !k.is_multiple_of(32)) {
        return Err(QdotError::Shape(format!(
            "{k} columns are not whole {fmt:?} blocks"
        )));
    }
    let row_bytes = k / be * fmt.block_bytes();
    if w.len() != n * row_bytes || x.len() != m * k {
        return Err(QdotError::Shape(format!(
            "{} weight bytes for {n} × {k} {fmt:?}, {} activations for {m} × {k}",
            w.len(),
            x.len()
        )));
    }
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(y);
    }
    let (table, acts) = match acc {
        // Half weights take f32 activations in both tables.
        Acc::Int8 => (
            table_of(path),
            (!fmt.is_half()).then(|| Acts::quantize(x, m, k)),
        ),
        Acc::F32 => (ftable_of(path), None),
    };
    let tasks = if parallel && n * k >= PARALLEL_MIN_ELEMS {
        rayon::current_num_threads().clamp(1, n)
    } else {
        1
    };
    // Whole 8-row groups of x; each group walks the weight once.
    for r0 in (0..m).step_by(MAX_ROWS) {
        let mm = MAX_ROWS.min(m - r0);
        let job = Job {
            w,
            row_bytes,
            k,
            r0,
            x,
            acts: acts.as_ref(),
            // SAFETY: r0 < m, so the offset stays inside y.
            y: unsafe { y.as_mut_ptr().add(r0 * n) },
            ldy: n,
        };
        let kernel = table[fmt.index()][mm - 1];
        run_split(kernel, &job, n, tasks);
    }
    Ok(y)
}

/// A job shared by the tasks of one split; each writes only its own columns of `y`.
struct Shared<'a, 'b>(&'a Job<'b>);
// SAFETY: the raw `y` pointer is written at disjoint columns by each task (see `run_split`), and
// the job's borrowed slices are only read.
unsafe impl Sync for Shared<'_, '_> {}

/// Runs `kernel` over output columns `0..n` in `tasks` contiguous ranges on the rayon pool.
fn run_split(kernel: Rows, job: &Job<'_>, n: usize, tasks: usize) {
    let per = n.div_ceil(tasks.max(1));
    if tasks <= 1 {
        // SAFETY: `matmul_on` checked every length; this is the only writer.
        unsafe { kernel(job, 0, n) };
        return;
    }
    let shared = Shared(job);
    let shared = &shared;
    rayon::scope(|s| {
        for t in 1..tasks {
            let o0 = t * per;
            if o0 < n {
                let o1 = (o0 + per).min(n);
                // SAFETY: as above; columns o0..o1 belong to this task alone, and the scope
                // joins every task before `y` is read.
                s.spawn(move |_| unsafe { kernel(shared.0, o0, o1) });
            }
        }
        // SAFETY: columns 0..per belong to the calling thread.
        unsafe { kernel(shared.0, 0, per.min(n)) };
    });
}
