//! GEMM/GEMV from the system OpenBLAS (Debian `libopenblas-dev`, see `scripts/setup-system.sh`).
//!
//! candle's own CPU gemm reaches 35–45% of a tuned BLAS on this machine kind (docs/candle-notes.md),
//! and matmuls are most of a training step, so the hot products go through `cblas_?gemm`.
//!
//! Debian's OpenBLAS 0.3.21 misdetects recent AVX-512 CPUs as "Prescott" and then runs generic
//! kernels at a fifth of the speed. It reads `OPENBLAS_CORETYPE` only when the library loads, so
//! the daemon calls [`ensure_coretype_env`] first thing in `main` (it re-executes the process
//! with the variable set) and [`self_check`] before trusting the kernels.
use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{bail, Layout, Result, Storage};
use cblas_sys::{CblasNoTrans, CblasRowMajor, CblasTrans, CBLAS_TRANSPOSE};
use std::ffi::{c_char, c_int};
// The link attribute brings in the system OpenBLAS, which also provides the `cblas_*` symbols
// that `cblas_sys` declares.
#[link(name = "openblas")]
extern "C" {
    // OpenBLAS extension (not CBLAS): the name of the kernel set chosen at load time.
    fn openblas_get_corename() -> *mut c_char;
}

/// Element types with a BLAS GEMM/GEMV.
pub trait BlasFloat: candle_core::WithDType + Copy + Send + Sync + 'static {
    /// # Safety
    /// Same contract as `cblas_?gemm` (row-major): every pointer must cover the extent its
    /// dimensions and leading dimension describe.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        ta: CBLAS_TRANSPOSE,
        tb: CBLAS_TRANSPOSE,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        b: *const Self,
        ldb: c_int,
        beta: Self,
        c: *mut Self,
        ldc: c_int,
    );

    /// # Safety
    /// Same contract as `cblas_?gemv` (row-major).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv_raw(
        ta: CBLAS_TRANSPOSE,
        m: c_int,
        n: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        x: *const Self,
        incx: c_int,
        beta: Self,
        y: *mut Self,
        incy: c_int,
    );
}

/// The f32 and f64 impls differ only in which CBLAS symbols they call.
macro_rules! blas_float {
    ($t:ty, $gemm:ident, $gemv:ident) => {
        impl BlasFloat for $t {
            unsafe fn gemm_raw(
                ta: CBLAS_TRANSPOSE,
                tb: CBLAS_TRANSPOSE,
                m: c_int,
                n: c_int,
                k: c_int,
                alpha: $t,
                a: *const $t,
                lda: c_int,
                b: *const $t,
                ldb: c_int,
                beta: $t,
                c: *mut $t,
                ldc: c_int,
            ) {
                cblas_sys::$gemm(
                    CblasRowMajor,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha,
                    a,
                    lda,
                    b,
                    ldb,
                    beta,
                    c,
                    ldc,
                )
            }

            unsafe fn gemv_raw(
                ta: CBLAS_TRANSPOSE,
                m: c_int,
                n: c_int,
                alpha: $t,
                a: *const $t,
                lda: c_int,
                x: *const $t,
                incx: c_int,
                beta: $t,
                y: *mut $t,
                incy: c_int,
            ) {
                cblas_sys::$gemv(
                    CblasRowMajor,
                    ta,
                    m,
                    n,
                    alpha,
                    a,
                    lda,
                    x,
                    incx,
                    beta,
                    y,
                    incy,
                )
            }
        }
    };
}

blas_float!(f32, cblas_sgemm, cblas_sgemv);
blas_float!(f64, cblas_dgemm, cblas_dgemv);

/// A read-only matrix operand `op(M)` of logical shape `rows × cols`.
///
/// `trans == false`: `data` holds it row-major with leading dimension `ld`. `trans == true`: `data`
/// holds its transpose (`cols × rows`) row-major, so `Mat::new(w, out, inp).t()` is `wᵀ` without
/// a copy.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub trans: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld: cols.max(1),
            trans: false,
        }
    }

    /// Element `(i, j)` of the logical matrix.
    pub fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        if self.trans {
            self.data[j * self.ld + i]
        } else {
            self.data[i * self.ld + j]
        }
    }

    /// The transpose when `t`, else itself.
    pub fn t_if(self, t: bool) -> Self {
        if t {
            self.t()
        } else {
            self
        }
    }

    /// The transpose, sharing the data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            trans: !self.trans,
            ..self
        }
    }

    /// Shape of the stored (row-major) array.
    fn stored(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn check(&self, what: &str) -> Result<()> {
        let (r, c) = self.stored();
        if self.ld < c.max(1) {
            bail!("blas: {what}: leading dimension {} < {c} columns", self.ld)
        }
        let need = if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.ld + c
        };
        if self.data.len() < need {
            bail!(
                "blas: {what}: {r}x{c} (ld {}) needs {need} elements, got {}",
                self.ld,
                self.data.len()
            )
        }
        Ok(())
    }

    fn flag(&self) -> CBLAS_TRANSPOSE {
        if self.trans {
            CblasTrans
        } else {
            CblasNoTrans
        }
    }
}

fn int(v: usize, what: &str) -> Result<c_int> {
    match c_int::try_from(v) {
        Ok(i) => Ok(i),
        Err(_) => bail!("blas: {what} = {v} exceeds the BLAS integer range"),
    }
}

/// `C = alpha · A · B + beta · C`, with `A` of shape `m × k`, `B` of shape `k × n`, and `C` a
/// row-major `m × n` array with leading dimension `ldc`. With `beta == 0` the old contents of
/// `C` are ignored (BLAS semantics: NaNs there do not propagate).
pub fn gemm<T: BlasFloat>(
    alpha: T,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    beta: T,
    c: &mut [T],
    ldc: usize,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!("blas: gemm shapes {m}x{k} · {}x{n} do not match", b.rows)
    }
    a.check("A")?;
    b.check("B")?;
    if ldc < n.max(1) {
        bail!("blas: C: leading dimension {ldc} < {n} columns")
    }
    let need_c = if m == 0 || n == 0 {
        0
    } else {
        (m - 1) * ldc + n
    };
    if c.len() < need_c {
        bail!(
            "blas: C: {m}x{n} (ld {ldc}) needs {need_c} elements, got {}",
            c.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
    let (lda, ldb, ldc_i) = (int(a.ld, "lda")?, int(b.ld, "ldb")?, int(ldc, "ldc")?);
    if k == 0 {
        // No products: C = beta · C (BLAS implementations disagree on k = 0 with beta = 0).
        for i in 0..m {
            for v in &mut c[i * ldc..i * ldc + n] {
                *v = if beta == T::zero() {
                    T::zero()
                } else {
                    *v * beta
                };
            }
        }
        return Ok(());
    }
    if let Some(done) = skinny(alpha, &a, &b, beta, c, ldc) {
        return done;
    }
    if m == 1 {
        // A row vector times B: GEMV on Bᵀ, several times faster than a 1-row GEMM in OpenBLAS
        // 0.3.21 (decode runs at m = 1). x is A's only row; its stride is 1 when stored as a
        // row and lda when stored as a column.
        let incx = if a.trans { lda } else { 1 };
        let (bm, bn) = b.stored();
        // SAFETY: a, b and c were checked above to hold their whole extents (A: k elements at
        // stride incx, B: its stored bm × bn with leading dim ldb, C: n elements); the pointers
        // live for the call and c is uniquely borrowed.
        unsafe {
            T::gemv_raw(
                if b.trans { CblasNoTrans } else { CblasTrans },
                int(bm, "m")?,
                int(bn, "n")?,
                alpha,
                b.data.as_ptr(),
                ldb,
                a.data.as_ptr(),
                incx,
                beta,
                c.as_mut_ptr(),
                1,
            )
        }
        return Ok(());
    }
    // SAFETY: `check` verified that A, B and C each hold (rows - 1) · ld + cols elements of
    // their stored shapes, which is exactly the extent cblas reads or writes; the slices outlive
    // the call and C is uniquely borrowed.
    unsafe {
        T::gemm_raw(
            a.flag(),
            b.flag(),
            mi,
            ni,
            ki,
            alpha,
            a.data.as_ptr(),
            lda,
            b.data.as_ptr(),
            ldb,
            beta,
            c.as_mut_ptr(),
            ldc_i,
        )
    }
    Ok(())
}

/// The kernel-tuning switches, resolved by the daemon's configuration (`[kernels]`, or the
/// `ITAMAE_BLAS` / `ITAMAE_SKINNY` / `ITAMAE_OPENBLAS_CORETYPE` variables) and handed over once
/// at start-up through [`configure`]; nothing here reads the environment for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// false: keep every matmul on candle's gemm (A/B measurements, or a BLAS that misbehaves
    /// in a way the self-check misses).
    pub blas: bool,
    /// false: send few-row f32 products to BLAS too instead of [`super::skinny`] (A/B
    /// measurements).
    pub skinny: bool,
    /// `auto` or an OpenBLAS core type for [`ensure_coretype_env`]; None: respect an inherited
    /// `OPENBLAS_CORETYPE`, else detect.
    pub openblas_coretype: Option<String>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            blas: true,
            skinny: true,
            openblas_coretype: None,
        }
    }
}

static KERNELS: OnceLock<KernelConfig> = OnceLock::new();

/// Sets the process's kernel switches; call once at start-up, before the first matmul. Returns
/// false (and changes nothing) when they were already fixed, by an earlier call or by a kernel
/// that ran first with the defaults (tests and library users that never configure).
pub fn configure(k: KernelConfig) -> bool {
    KERNELS.set(k).is_ok()
}

/// The switches in force: the configured ones, else the defaults.
pub fn kernels() -> &'static KernelConfig {
    KERNELS.get_or_init(KernelConfig::default)
}

/// `x · Wᵀ` in f32 with a few rows of `x` and `W` stored row-major (every projection in a
/// decode step, and LoRA's per-row factors) goes to [`super::skinny`], which reads `W` once for
/// all rows instead of packing it per call. None: not that shape, BLAS does it.
fn skinny<T: BlasFloat>(
    alpha: T,
    a: &Mat<'_, T>,
    b: &Mat<'_, T>,
    beta: T,
    c: &mut [T],
    ldc: usize,
) -> Option<Result<()>> {
    if T::DTYPE != candle_core::DType::F32
        || a.trans
        || !b.trans
        || a.rows > super::skinny::MAX_ROWS
        // one row: OpenBLAS's GEMV already streams W once, and is faster on small W
        || a.rows < 2
        || !kernels().skinny
    {
        return None;
    }
    let f = |v: T| v.to_f64() as f32;
    // SAFETY: T is f32 (checked via its DType above), so the slices reinterpret in place with
    // the same length, alignment and lifetime.
    let (x, w, y) = unsafe {
        (
            std::slice::from_raw_parts(a.data.as_ptr() as *const f32, a.data.len()),
            std::slice::from_raw_parts(b.data.as_ptr() as *const f32, b.data.len()),
            std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, c.len()),
        )
    };
    let p = super::skinny::Xwt {
        x,
        ldx: a.ld,
        w,
        ldw: b.ld,
        m: a.rows,
        n: b.cols,
        k: a.cols,
    };
    Some(
        super::skinny::gemm(p, f(alpha), f(beta), y, ldc)
            .map_err(|e| candle_core::Error::Msg(format!("skinny gemm: {e}"))),
    )
}

/// `A · B` into a new row-major `m × n` vector.
pub fn matmul<T: BlasFloat>(a: Mat<'_, T>, b: Mat<'_, T>) -> Result<Vec<T>> {
    let mut c = vec![T::zero(); a.rows * b.cols];
    gemm(T::one(), a, b, T::zero(), &mut c, b.cols.max(1))?;
    Ok(c)
}

/// A 2-D operand read from candle storage: borrowed when its layout is row-major or transposed
/// row-major (what BLAS takes directly), copied when it has any other strides.
pub(crate) struct Operand<'a, T: Clone> {
    data: Cow<'a, [T]>,
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
}

impl<'a, T: Copy> Operand<'a, T> {
    /// `data` is the whole storage; `layout` must be 2-D.
    pub(crate) fn new(data: &'a [T], layout: &Layout) -> Result<Self> {
        let (rows, cols) = match layout.dims() {
            [r, c] => (*r, *c),
            d => bail!("blas: expected a 2-D operand, got shape {d:?}"),
        };
        let (s0, s1) = match layout.stride() {
            [a, b] => (*a, *b),
            s => bail!("blas: expected 2-D strides, got {s:?}"),
        };
        let start = layout.start_offset();
        if start > data.len() {
            bail!(
                "blas: start offset {start} beyond storage of {}",
                data.len()
            )
        }
        let tail = &data[start..];
        // Row-major: unit column stride (or a single column); rows may be padded.
        if cols <= 1 || s1 == 1 {
            let ld = if rows <= 1 { cols.max(1) } else { s0 };
            if ld >= cols.max(1) {
                return Ok(Self {
                    data: Cow::Borrowed(tail),
                    rows,
                    cols,
                    ld,
                    trans: false,
                });
            }
        }
        // Transposed (e.g. `w.t()`): unit row stride.
        if rows <= 1 || s0 == 1 {
            let ld = if cols <= 1 { rows.max(1) } else { s1 };
            if ld >= rows.max(1) {
                return Ok(Self {
                    data: Cow::Borrowed(tail),
                    rows,
                    cols,
                    ld,
                    trans: true,
                });
            }
        }
        // Broadcast (stride 0) or otherwise strided: gather into a dense copy.
        let mut out = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                match tail.get(i * s0 + j * s1) {
                    Some(v) => out.push(*v),
                    None => bail!("blas: layout {layout:?} reaches past its storage"),
                }
            }
        }
        Ok(Self {
            data: Cow::Owned(out),
            rows,
            cols,
            ld: cols.max(1),
            trans: false,
        })
    }

    pub(crate) fn mat(&self) -> Mat<'_, T> {
        Mat {
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
            trans: self.trans,
        }
    }
}

/// A CPU storage (e.g. from `Tensor::storage_and_layout`) as a 2-D BLAS operand of type `T`.
pub(crate) fn cpu_operand<'a, T: BlasFloat>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<Operand<'a, T>> {
    match storage {
        Storage::Cpu(c) => Operand::new(T::cpu_storage_as_slice(c)?, layout),
        _ => bail!("blas: operand is not on the CPU"),
    }
}

/// The kernel set OpenBLAS chose when it loaded (e.g. "Haswell", "SkylakeX", "Prescott").
pub fn core_name() -> String {
    // SAFETY: openblas_get_corename takes no arguments and returns a pointer to a static,
    // NUL-terminated string owned by the library (never freed); null is handled.
    let p = unsafe { openblas_get_corename() };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated and static as above.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

const AVX512_CORES: &[&str] = &["skylakex", "cooperlake", "sapphirerapids"];
const AVX2_CORES: &[&str] = &["haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"];

/// Whether OpenBLAS runs AVX-512 kernels (decided at load; cached).
pub fn avx512_kernels() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| AVX512_CORES.contains(&core_name().to_lowercase().as_str()))
}

/// The `OPENBLAS_CORETYPE` this CPU should run, when OpenBLAS picked a weaker kernel set than
/// the CPU supports (None: nothing to fix, or not x86-64).
pub fn wanted_coretype() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let core = core_name().to_lowercase();
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if avx512 && !AVX512_CORES.contains(&core.as_str()) {
            return Some("SkylakeX");
        }
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && !AVX2_CORES.contains(&core.as_str()) {
            return Some("Haswell");
        }
    }
    None
}

/// When OpenBLAS runs slower kernels than this CPU supports and `OPENBLAS_CORETYPE` is unset
/// (or `overridden`, [`KernelConfig::openblas_coretype`], asks for another core type),
/// re-executes the current program with the same arguments and `OPENBLAS_CORETYPE` set:
/// OpenBLAS reads it only when the library loads. `overridden` replaces an inherited
/// `OPENBLAS_CORETYPE`: `auto` picks the kernel set from the CPU's flags (some hosts set
/// `Haswell` for every process, AVX-512 CPUs included, where `SkylakeX` runs GEMMs about twice
/// as fast); any other value is used as the core type. The re-executed child resolves the same
/// configuration, so it must come out with the same `overridden`. Call it first thing in
/// `main`, before threads start, then [`self_check`]. Returns `Ok(())` when nothing needed
/// doing; after a successful re-exec it does not return.
pub fn ensure_coretype_env(overridden: Option<&str>) -> std::io::Result<()> {
    // The variable OpenBLAS itself read at load: the one environment read this module needs.
    let current = std::env::var("OPENBLAS_CORETYPE").ok();
    match coretype_to_set(current.as_deref(), overridden, wanted_coretype) {
        Some(core) => reexec_with_coretype(&core),
        None => Ok(()),
    }
}

/// The core type to re-execute with, if any. `detect` is [`wanted_coretype`], called only when
/// the answer depends on it.
fn coretype_to_set(
    current: Option<&str>,
    overridden: Option<&str>,
    detect: impl FnOnce() -> Option<&'static str>,
) -> Option<String> {
    let wanted = match overridden.filter(|v| !v.is_empty()) {
        None if current.is_some() => return None,
        None | Some("auto") => detect()?.to_string(),
        Some(core) => core.to_string(),
    };
    // The child starts with the variable equal to `wanted`, so it cannot loop.
    (current != Some(wanted.as_str())).then_some(wanted)
}

#[cfg(unix)]
fn reexec_with_coretype(core: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    Err(cmd.args(args).env("OPENBLAS_CORETYPE", core).exec())
}

#[cfg(not(unix))]
fn reexec_with_coretype(_core: &str) -> std::io::Result<()> {
    Ok(())
}

/// Runs small GEMMs and GEMVs of every transpose combination (f32 and f64, odd sizes, sizes
/// large enough to use every thread) against a naive float64 reference. An error means the
/// loaded kernels compute wrong results: set `OPENBLAS_CORETYPE=Haswell` (or unset it) and retry.
pub fn self_check() -> Result<()> {
    // (m, k, n): odd k exercises kernel tails; 96×577×200 is past OpenBLAS's threading threshold.
    let shapes = [(1, 67, 53), (7, 13, 5), (37, 67, 53), (96, 577, 200)];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for &(m, k, n) in &shapes {
        let a: Vec<f64> = (0..m * k).map(|_| rnd()).collect();
        let b: Vec<f64> = (0..k * n).map(|_| rnd()).collect();
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let av = a[i * k + p];
                for j in 0..n {
                    want[i * n + j] += av * b[p * n + j];
                }
            }
        }
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            // A transposed operand is handed over as its transpose's storage plus the flag.
            let a_data = if ta { &at } else { &a };
            let b_data = if tb { &bt } else { &b };
            let a32: Vec<f32> = a_data.iter().map(|&v| v as f32).collect();
            let b32: Vec<f32> = b_data.iter().map(|&v| v as f32).collect();
            let got64 = matmul(view(a_data, m, k, ta), view(b_data, k, n, tb))?;
            compare(&got64, &want, 1e-12, "f64", (m, k, n), (ta, tb))?;
            let got32: Vec<f64> = matmul(view(&a32, m, k, ta), view(&b32, k, n, tb))?
                .iter()
                .map(|&v| v as f64)
                .collect();
            compare(&got32, &want, f32_tol(k), "f32", (m, k, n), (ta, tb))?;
        }
    }
    Ok(())
}

/// `op(M)` of shape `r × c`, stored as `c × r` when `t`.
fn view<T>(d: &[T], r: usize, c: usize, t: bool) -> Mat<'_, T> {
    if t {
        Mat::new(d, c, r).t()
    } else {
        Mat::new(d, r, c)
    }
}

fn transpose(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0f64; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = a[i * c + j];
        }
    }
    t
}

/// Rounding of f32 inputs and sums grows like √k; wrong kernels are off by O(1).
fn f32_tol(k: usize) -> f64 {
    1e-5 * (k.max(1) as f64).sqrt()
}

fn compare(
    got: &[f64],
    want: &[f64],
    tol: f64,
    ty: &str,
    (m, k, n): (usize, usize, usize),
    (ta, tb): (bool, bool),
) -> Result<()> {
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
        .fold(0f64, |acc, e| {
            if e.is_nan() {
                f64::INFINITY
            } else {
                acc.max(e)
            }
        });
    if worst > tol {
        bail!(
            "OpenBLAS self-check failed ({ty} gemm {m}x{k}x{n}, transposes {ta}/{tb}, kernels \
             \"{}\"): error {worst:.3e} > {tol:.0e}; set OPENBLAS_CORETYPE=Haswell and retry",
            core_name()
        )
    }
    Ok(())
}

/// Whether OpenBLAS runs generic (pre-AVX2) kernels on a CPU that has AVX2 and FMA: then it is
/// several times slower than candle's gemm (docs/candle-notes.md: "Prescott", 39–49 GFLOP/s).
pub fn generic_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        avx2 && !AVX2_CORES.contains(&core_name().to_lowercase().as_str())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether BLAS should carry the f32/f64 CPU matmuls: its kernels are tuned for this CPU and
/// passed [`self_check`]. Decided once per process; otherwise candle's gemm is used, since
/// generic kernels are slower than it and wrong results must never be served or trained on.
pub fn preferred() -> bool {
    static PREFERRED: OnceLock<bool> = OnceLock::new();
    *PREFERRED.get_or_init(|| {
        if !kernels().blas {
            tracing::info!("ITAMAE_BLAS is off: using candle's matmul");
            return false;
        }
        if generic_kernels() {
            tracing::warn!(
                "OpenBLAS runs generic \"{}\" kernels on this CPU: using candle's matmul \
                 (start through blas::ensure_coretype_env or set OPENBLAS_CORETYPE)",
                core_name()
            );
            return false;
        }
        match self_check() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{e}; using candle's matmul");
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_check_passes() {
        self_check().unwrap();
    }

    #[test]
    fn rejects_short_slices_and_bad_shapes() {
        let a = vec![1f32; 6];
        let b = vec![1f32; 5];
        let mut c = vec![0f32; 4];
        assert!(gemm(1.0, Mat::new(&a, 2, 3), Mat::new(&b, 3, 2), 0.0, &mut c, 2).is_err());
        let b = vec![1f32; 8];
        assert!(gemm(1.0, Mat::new(&a, 2, 3), Mat::new(&b, 4, 2), 0.0, &mut c, 2).is_err());
        let mut short = vec![0f32; 3];
        let b = vec![1f32; 6];
        assert!(gemm(
            1.0,
            Mat::new(&a, 2, 3),
            Mat::new(&b, 3, 2),
            0.0,
            &mut short,
            2
        )
        .is_err());
        gemm(1.0, Mat::new(&a, 2, 3), Mat::new(&b, 3, 2), 0.0, &mut c, 2).unwrap();
        assert_eq!(c, vec![3.0; 4]);
    }

    #[test]
    fn empty_and_k_zero() {
        let mut c = vec![5f64; 6];
        gemm(
            1.0,
            Mat::new(&[], 2, 0),
            Mat::new(&[], 0, 3),
            0.0,
            &mut c,
            3,
        )
        .unwrap();
        assert_eq!(c, vec![0.0; 6]);
        let mut c = vec![5f64; 6];
        gemm(
            1.0,
            Mat::new(&[], 2, 0),
            Mat::new(&[], 0, 3),
            2.0,
            &mut c,
            3,
        )
        .unwrap();
        assert_eq!(c, vec![10.0; 6]);
        let mut none: Vec<f64> = vec![];
        gemm(
            1.0,
            Mat::new(&[], 0, 4),
            Mat::new(&[0.0; 8], 4, 2),
            0.0,
            &mut none,
            2,
        )
        .unwrap();
    }

    #[test]
    fn padded_leading_dimensions_and_accumulation() {
        // A 2×2 window (ld 3) of a 2×3 array, times I, added onto C.
        let a = [1f64, 2., 99., 3., 4., 99.];
        let id = [1f64, 0., 0., 1.];
        let mut c = vec![10f64, 10., 10., 10.];
        let am = Mat {
            data: &a,
            rows: 2,
            cols: 2,
            ld: 3,
            trans: false,
        };
        gemm(1.0, am, Mat::new(&id, 2, 2), 1.0, &mut c, 2).unwrap();
        assert_eq!(c, vec![11., 12., 13., 14.]);
        // Its transpose, via the flag.
        let got = matmul(am.t(), Mat::new(&id, 2, 2)).unwrap();
        assert_eq!(got, vec![1., 3., 2., 4.]);
    }

    #[test]
    fn operand_reads_candle_layouts() {
        use candle_core::{Device, Tensor};
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let dense = |t: &Tensor| -> Vec<f32> {
            let (s, l) = t.storage_and_layout();
            let data = match &*s {
                candle_core::Storage::Cpu(c) => c.as_slice::<f32>().unwrap().to_vec(),
                _ => unreachable!(),
            };
            let op = Operand::new(&data, l).unwrap();
            let m = op.mat();
            let id: Vec<f32> = (0..m.cols * m.cols)
                .map(|i| if i / m.cols == i % m.cols { 1.0 } else { 0.0 })
                .collect();
            matmul(m, Mat::new(&id, m.cols, m.cols)).unwrap()
        };
        let want = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for v in [
            t.clone(),
            t.t().unwrap(),
            t.narrow(1, 1, 2).unwrap(),
            t.narrow(0, 1, 2).unwrap().t().unwrap(),
            t.narrow(0, 1, 1).unwrap().broadcast_as((3, 4)).unwrap(),
        ] {
            assert_eq!(dense(&v), want(&v), "layout {:?}", v.layout());
        }
    }

    #[test]
    fn coretype_decision() {
        let skx = || Some("SkylakeX");
        let none = || None;
        // Unset: follow detection.
        assert_eq!(
            coretype_to_set(None, None, skx).as_deref(),
            Some("SkylakeX")
        );
        assert_eq!(coretype_to_set(None, None, none), None);
        // Set by the environment: respected unless the daemon's override asks otherwise.
        assert_eq!(coretype_to_set(Some("Haswell"), None, skx), None);
        assert_eq!(coretype_to_set(Some("Haswell"), Some(""), skx), None);
        assert_eq!(
            coretype_to_set(Some("Haswell"), Some("auto"), skx).as_deref(),
            Some("SkylakeX")
        );
        assert_eq!(coretype_to_set(Some("Haswell"), Some("auto"), none), None);
        assert_eq!(
            coretype_to_set(Some("Haswell"), Some("Zen"), none).as_deref(),
            Some("Zen")
        );
        // The re-executed child: already what was asked for.
        assert_eq!(coretype_to_set(Some("Zen"), Some("Zen"), skx), None);
        assert_eq!(coretype_to_set(Some("SkylakeX"), None, skx), None);
    }

    /// How the test hands [`reexec_child`] its override (the daemon's variable of that name
    /// reaches [`ensure_coretype_env`] through its configuration).
    const CHILD_OVERRIDE: &str = "ITAMAE_OPENBLAS_CORETYPE";

    /// Re-executes this test binary through [`ensure_coretype_env`] with an override, and checks
    /// that the child runs the kernels asked for (it only can if the variable was set before the
    /// library loaded).
    #[cfg(all(unix, target_arch = "x86_64"))]
    #[test]
    fn reexec_sets_coretype_before_load() {
        if !std::arch::is_x86_feature_detected!("avx") {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args(["--ignored", "--exact", "--nocapture"])
            .arg("ops::blas::tests::reexec_child")
            .env_remove("OPENBLAS_CORETYPE")
            // Sandybridge (AVX) kernels: correct on any AVX CPU and named unlike the defaults.
            .env(CHILD_OVERRIDE, "Sandybridge")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        assert!(
            stdout.contains("child kernels: Sandybridge"),
            "child output: {stdout}"
        );
    }

    #[test]
    #[ignore]
    fn reexec_child() {
        ensure_coretype_env(std::env::var(CHILD_OVERRIDE).ok().as_deref()).unwrap();
        println!("child kernels: {}", core_name());
    }

    /// Many shapes (small-matrix kernels, tails, threading threshold, m = 1), every transpose
    /// pair and padded leading dimensions, f32 against a float64 reference. For vetting a kernel
    /// set: `OPENBLAS_CORETYPE=SkylakeX cargo test ... blas_stress -- --ignored`.
    #[test]
    #[ignore]
    fn blas_stress() {
        let mut seed = 12345u64;
        let mut next = move |hi: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % hi
        };
        let dims = [1usize, 2, 3, 7, 16, 17, 31, 64, 65, 127, 192, 257, 577];
        for _ in 0..600 {
            let (m, k, n) = (dims[next(13)], dims[next(13)], dims[next(13)]);
            let (ta, tb) = (next(2) == 1, next(2) == 1);
            let pad = next(3);
            let a: Vec<f64> = (0..m * k)
                .map(|_| next(2001) as f64 / 1000.0 - 1.0)
                .collect();
            let b: Vec<f64> = (0..k * n)
                .map(|_| next(2001) as f64 / 1000.0 - 1.0)
                .collect();
            let mut want = vec![0f64; m * n];
            for i in 0..m {
                for p in 0..k {
                    for j in 0..n {
                        want[i * n + j] += a[i * k + p] * b[p * n + j];
                    }
                }
            }
            // Stored arrays with `pad` extra columns.
            let store = |d: &[f64], r: usize, c: usize, t: bool| -> (Vec<f32>, usize) {
                let (sr, sc) = if t { (c, r) } else { (r, c) };
                let ld = sc + pad;
                let mut s = vec![f32::NAN; sr * ld];
                for i in 0..r {
                    for j in 0..c {
                        let (si, sj) = if t { (j, i) } else { (i, j) };
                        s[si * ld + sj] = d[i * c + j] as f32;
                    }
                }
                (s, ld)
            };
            let (sa, lda) = store(&a, m, k, ta);
            let (sb, ldb) = store(&b, k, n, tb);
            fn mat(d: &[f32], r: usize, c: usize, ld: usize, t: bool) -> Mat<'_, f32> {
                let (sr, sc) = if t { (c, r) } else { (r, c) };
                Mat {
                    data: &d[..sr.saturating_sub(1) * ld + sc],
                    rows: sr,
                    cols: sc,
                    ld,
                    trans: false,
                }
                .t_if(t)
            }
            let got = matmul(mat(&sa, m, k, lda, ta), mat(&sb, k, n, ldb, tb)).unwrap();
            let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
            compare(&got, &want, f32_tol(k), "f32", (m, k, n), (ta, tb)).unwrap();
        }
    }

    /// GFLOP/s of BLAS vs candle's matmul on the model's shapes, best of several runs (the
    /// machine is shared). `ta`/`tb`: operands stored transposed. Run with
    /// `cargo test --release -p itamae-daemon --lib blas_gflops -- --ignored --nocapture`, and
    /// with `OPENBLAS_CORETYPE=SkylakeX` (or unset) in front to compare kernel sets.
    #[test]
    #[ignore]
    fn blas_gflops() {
        use candle_core::{Device, Tensor};
        use std::time::Instant;
        println!("OpenBLAS kernels: {}", core_name());
        // (m, k, n, A stored transposed, B stored transposed, what)
        let shapes = [
            (2048, 576, 1536, false, true, "fwd gate/up  x·Wᵀ"),
            (2048, 1536, 576, false, true, "fwd down     x·Wᵀ"),
            (2048, 576, 576, false, true, "fwd q/o      x·Wᵀ"),
            (2048, 1536, 576, false, false, "bwd dX gate  dY·W"),
            (2048, 576, 1536, false, false, "bwd dX down  dY·W"),
            (1536, 2048, 576, true, false, "bwd dW gate  dYᵀ·X"),
            (2048, 576, 49152, false, true, "lm head      H·Eᵀ"),
            (256, 576, 49152, false, true, "CE chunk     H·Eᵀ"),
            (256, 49152, 576, false, false, "CE chunk dH  G·E"),
            (49152, 256, 576, true, false, "CE chunk dE  Gᵀ·H"),
            (42, 576, 1536, false, true, "prompt       x·Wᵀ"),
            (42, 1536, 576, false, true, "prompt       x·Wᵀ"),
            (42, 576, 192, false, true, "prompt       x·Wᵀ"),
            (8, 576, 1536, false, true, "batch decode x·Wᵀ"),
            (1, 576, 1536, false, true, "decode       x·Wᵀ"),
            (1, 1536, 576, false, true, "decode       x·Wᵀ"),
            (1, 576, 49152, false, true, "decode head  x·Eᵀ"),
        ];
        for (m, k, n, ta, tb, what) in shapes {
            let a =
                Tensor::randn(0f32, 1., if ta { (k, m) } else { (m, k) }, &Device::Cpu).unwrap();
            let b =
                Tensor::randn(0f32, 1., if tb { (n, k) } else { (k, n) }, &Device::Cpu).unwrap();
            let flop = 2.0 * (m * k * n) as f64;
            let reps = ((10e9 / flop) as usize).clamp(5, 500);
            let best = |f: &mut dyn FnMut()| {
                f();
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            let (at, bt) = (
                if ta { a.t().unwrap() } else { a.clone() },
                if tb { b.t().unwrap() } else { b.clone() },
            );
            let candle = best(&mut || {
                at.matmul(&bt).unwrap();
            });
            let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut c = vec![0f32; m * n];
            let blas = best(&mut || {
                gemm(
                    1.0,
                    view(&av, m, k, ta),
                    view(&bv, k, n, tb),
                    0.0,
                    &mut c,
                    n,
                )
                .unwrap();
            });
            let g = |s: f64| flop / s / 1e9;
            println!(
                "{what:<20} {m:>5}x{k:>5}x{n:>5}: candle {:>6.1} | blas {:>6.1} GFLOP/s",
                g(candle),
                g(blas)
            );
        }
    }
}
