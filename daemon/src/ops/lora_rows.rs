//! LoRA deltas of a batch where every row (a decode batch) or span of rows (packed prompts in
//! one prefill) may use its own variant, from factors packed for serving: `A` as stored
//! (`r × in`, row-major) and `B` transposed in panels of 16 outputs, in f32 or f16. Inference
//! only (no gradient).
//!
//! Why a packed form: each row reads its variant's factors once per step, so a batch of eight
//! variants streams eight sets of factors (18 MB each for r = 16 on every SmolLM2 projection)
//! from memory every token. Half precision halves that stream; `Bᵀ` turns the second product
//! into `r` contiguous AXPYs instead of one short dot product per output; plain slices skip
//! candle's storage locks and copies on each of the 210 projections of a step.
//!
//! Kernels: AVX-512F, else AVX2+FMA+F16C, else portable; chosen once at run time. Each is tested
//! against an f64 reference.
use candle_core::{bail, DType, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// What served adapters pack their factors in: half the bytes of f32 streamed per step, and
/// 11 significant bits, far finer than the 4-bit base weights they add to.
pub type DecodeElem = f16;

/// Element types the packed factors may be stored in.
pub trait Elem: Copy + Send + Sync + Into<f32> + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Outputs per panel of the packed `Bᵀ`: one AVX-512 register of f32.
pub const PANEL: usize = 16;

/// One projection's factors, packed for [`add_spans`].
#[derive(Clone)]
pub struct PackedPair<T> {
    /// `r × in`
    pub a: Vec<T>,
    /// B transposed, in panels of [`PANEL`] outputs: value `(j, o)` of `Bᵀ` at
    /// `((o / PANEL)·r + j)·PANEL + o % PANEL`, the last panel zero-padded. Each block of
    /// outputs then reads one contiguous run instead of `r` rows far apart.
    pub bt: Vec<T>,
    pub r: usize,
    pub inp: usize,
    pub out: usize,
}

impl<T: Elem> PackedPair<T> {
    /// From `a (r, in)` and `b (out, r)` in any float dtype.
    pub fn new(a: &Tensor, b: &Tensor) -> Result<Self> {
        let (r, inp) = a.dims2()?;
        let (out, rb) = b.dims2()?;
        if rb != r {
            bail!(
                "lora pack: A {:?} and B {:?} disagree on the rank",
                a.dims(),
                b.dims()
            )
        }
        let conv = |t: &Tensor| -> Result<Vec<T>> {
            Ok(t.to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(T::from_f32)
                .collect())
        };
        let bv = conv(b)?; // (out, r) row-major
        let panels = out.div_ceil(PANEL);
        let mut bt = vec![T::from_f32(0.0); panels * r * PANEL];
        for o in 0..out {
            for j in 0..r {
                bt[((o / PANEL) * r + j) * PANEL + o % PANEL] = bv[o * r + j];
            }
        }
        Ok(Self {
            a: conv(a)?,
            bt,
            r,
            inp,
            out,
        })
    }

    pub fn bytes(&self) -> usize {
        (self.a.len() + self.bt.len()) * std::mem::size_of::<T>()
    }
}

/// The packed factors and scale one row group uses.
#[derive(Clone, Copy)]
pub struct RowTerm<'a, T> {
    pub pair: &'a PackedPair<T>,
    pub scale: f32,
}

/// `y + Δ` over consecutive spans of rows of `x (…, in)` and `y (…, out)` (leading dims
/// flattened): `(rows, term)` in order, covering every row — one row per sequence of a decode
/// batch, or one span per prompt of a packed prefill; span `i` gets `scale·(x·Aᵀ)·Bᵀ` of its
/// term (none: unchanged). f32 CPU tensors only.
///
/// `y` is updated in place (a projection output is fresh and read by no one else; copying it
/// in and out cost more than some of the products), so callers must not pass a tensor whose
/// storage anything else still reads.
pub fn add_spans<T: Elem>(
    y: Tensor,
    x: &Tensor,
    spans: &[(usize, Option<RowTerm<'_, T>>)],
) -> Result<Tensor> {
    let (Some(&out), Some(&inp)) = (y.dims().last(), x.dims().last()) else {
        bail!("lora rows: scalar operands")
    };
    if y.dtype() != DType::F32 || x.dtype() != DType::F32 || !y.device().is_cpu() {
        bail!(
            "lora rows: f32 CPU tensors only, got {:?} on {:?}",
            y.dtype(),
            y.device()
        )
    }
    let rows = y.elem_count() / out.max(1);
    let covered: usize = spans.iter().map(|(n, _)| n).sum();
    if covered != rows || x.elem_count() != rows * inp {
        bail!("lora rows: spans of {covered} rows for {rows} rows")
    }
    for (_, t) in spans {
        let Some(t) = t else { continue };
        let p = t.pair;
        if p.inp != inp
            || p.out != out
            || p.a.len() != p.r * inp
            || p.bt.len() != p.r * out.div_ceil(PANEL) * PANEL
        {
            bail!(
                "lora rows: factors of rank {} for {} -> {} on a {inp} -> {out} projection",
                p.r,
                p.inp,
                p.out
            )
        }
    }
    #[cfg(test)]
    RUNS.with(|c| c.set(c.get() + 1));
    let y = if y.is_contiguous() {
        y
    } else {
        y.contiguous()?
    };
    let op = AddRows {
        spans,
        rows,
        inp,
        out,
    };
    y.inplace_op2(&x.contiguous()?, &op)?;
    Ok(y)
}

/// `y += scale·(x·Aᵀ)·Bᵀ` for one row (`x` of `in`, `y` of `out` values) on the calling thread,
/// with the same kernels as [`add_spans`]: the row decode path's delta on plain buffers.
pub fn add_row<T: Elem>(y: &mut [f32], x: &[f32], t: RowTerm<'_, T>) -> Result<()> {
    let p = t.pair;
    if x.len() != p.inp
        || y.len() != p.out
        || p.a.len() != p.r * p.inp
        || p.bt.len() != p.r * p.out.div_ceil(PANEL) * PANEL
    {
        bail!(
            "lora row: factors of rank {} for {} -> {} on a {} -> {} row",
            p.r,
            p.inp,
            p.out,
            x.len(),
            y.len()
        )
    }
    let kernels = Kernels::<T>::pick();
    let mut h = vec![0f32; p.r];
    for (j, hj) in h.iter_mut().enumerate() {
        // SAFETY: checked above: row j of A holds `inp` values, as does `x`.
        *hj = t.scale * unsafe { (kernels.dot)(&p.a[j * p.inp..][..p.inp], x) };
    }
    // SAFETY: Bᵀ holds the panels of r rows for `out` outputs, `y` holds `out`.
    unsafe { (kernels.axpys)(&p.bt, &h, y) };
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Calls of [`add_spans`] on this thread: lets model tests prove which path a batch took.
    pub(crate) static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

struct AddRows<'a, T> {
    spans: &'a [(usize, Option<RowTerm<'a, T>>)],
    rows: usize,
    inp: usize,
    out: usize,
}

impl<T: Elem> candle_core::InplaceOp2 for AddRows<'_, T> {
    fn name(&self) -> &'static str {
        "lora-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        let (inp, out) = (self.inp, self.out);
        let candle_core::CpuStorage::F32(yall) = s1 else {
            bail!("lora rows: y is not f32")
        };
        let (Some((y0, y1)), Some((x0, x1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("lora rows: operands must be contiguous")
        };
        let xs = &super::cpu_slice::<f32>(s2, l2, "lora rows")?[..x1 - x0];
        let mut ys = &mut yall[y0..y1];
        if ys.len() != self.rows * out || xs.len() != self.rows * inp {
            bail!("lora rows: operand sizes changed")
        }
        // Each span's rows of y and x, cut in order, then done on parallel tasks.
        let mut work = Vec::with_capacity(self.spans.len());
        let mut xs = xs;
        for (n, t) in self.spans {
            let (yh, yt) = std::mem::take(&mut ys).split_at_mut(n * out);
            let (xh, xt) = xs.split_at(n * inp);
            (ys, xs) = (yt, xt);
            if let Some(t) = t {
                work.push((yh, xh, *t));
            }
        }
        let kernels = Kernels::<T>::pick();
        work.into_par_iter().for_each(|(ys, xs, t)| {
            let p = t.pair;
            let mut h = vec![0f32; p.r];
            for (yr, xr) in ys.chunks_exact_mut(out).zip(xs.chunks_exact(inp)) {
                for (j, hj) in h.iter_mut().enumerate() {
                    // SAFETY: `add_spans` checked the shapes: row j of A holds `inp` values.
                    *hj = t.scale * unsafe { (kernels.dot)(&p.a[j * inp..][..inp], xr) };
                }
                // SAFETY: Bᵀ holds the panels of r rows for `out` outputs, `yr` holds `out`.
                unsafe { (kernels.axpys)(&p.bt, &h, yr) };
            }
        });
        Ok(())
    }
}

/// `dot(a, x)` and `y += Σ_j h[j]·Bᵀ[j]` (`bt` in panels, see [`PackedPair::bt`]).
struct Kernels<T> {
    dot: unsafe fn(&[T], &[f32]) -> f32,
    axpys: unsafe fn(&[T], &[f32], &mut [f32]),
}

impl<T: Elem> Kernels<T> {
    fn pick() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(k) = x86::kernels::<T>() {
                return k;
            }
        }
        Self::portable()
    }

    fn portable() -> Self {
        Self {
            dot: dot_portable::<T>,
            axpys: axpys_portable::<T>,
        }
    }
}

/// # Safety
/// Always safe; `unsafe` only to share the kernels' signature.
unsafe fn dot_portable<T: Elem>(a: &[T], x: &[f32]) -> f32 {
    super::dot(a, x)
}

/// # Safety
/// Always safe; `unsafe` only to share the kernels' signature.
unsafe fn axpys_portable<T: Elem>(bt: &[T], h: &[f32], y: &mut [f32]) {
    let r = h.len();
    for (ys, panel) in y.chunks_mut(PANEL).zip(bt.chunks_exact(r * PANEL)) {
        for (row, &c) in panel.chunks_exact(PANEL).zip(h) {
            for (v, b) in ys.iter_mut().zip(row) {
                *v += c * b.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Elem, Kernels, PANEL};
    use half::f16;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    pub(super) fn kernels<T: Elem>() -> Option<Kernels<T>> {
        avx512().or_else(avx2)
    }

    /// The kernels for `T` from `f32_` / `f16_` instances of one instruction set.
    fn typed<T: Elem>(f32_: Kernels<f32>, f16_: Kernels<f16>) -> Option<Kernels<T>> {
        // SAFETY: T is exactly the element type of the kernels returned (checked by TypeId),
        // so the function pointer types are identical.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                Some(std::mem::transmute::<Kernels<f32>, Kernels<T>>(f32_))
            } else if TypeId::of::<T>() == TypeId::of::<f16>() {
                Some(std::mem::transmute::<Kernels<f16>, Kernels<T>>(f16_))
            } else {
                None
            }
        }
    }

    fn avx512<T: Elem>() -> Option<Kernels<T>> {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        typed(
            Kernels {
                dot: dot512::<F32>,
                axpys: axpys512::<F32>,
            },
            Kernels {
                dot: dot512::<F16>,
                axpys: axpys512::<F16>,
            },
        )
    }

    fn avx2<T: Elem>() -> Option<Kernels<T>> {
        let ok = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if !ok {
            return None;
        }
        typed(
            Kernels {
                dot: dot256::<F32>,
                axpys: axpys256::<F32>,
            },
            Kernels {
                dot: dot256::<F16>,
                axpys: axpys256::<F16>,
            },
        )
    }

    /// Loads of 16 (AVX-512) or 8 (AVX2) stored factors as f32 lanes.
    trait Load {
        type E: Elem;
        unsafe fn load16(p: *const Self::E) -> __m512;
        unsafe fn load8(p: *const Self::E) -> __m256;
    }

    struct F32;
    struct F16;

    impl Load for F32 {
        type E = f32;
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load for F16 {
        type E = f16;
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// # Safety
    /// AVX-512F; `a` no longer than `x`.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot512<L: Load>(a: &[L::E], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(
                L::load16(a.as_ptr().add(i)),
                _mm512_loadu_ps(x.as_ptr().add(i)),
                s0,
            );
            s1 = _mm512_fmadd_ps(
                L::load16(a.as_ptr().add(i + 16)),
                _mm512_loadu_ps(x.as_ptr().add(i + 16)),
                s1,
            );
            i += 32;
        }
        if i + 16 <= n {
            s0 = _mm512_fmadd_ps(
                L::load16(a.as_ptr().add(i)),
                _mm512_loadu_ps(x.as_ptr().add(i)),
                s0,
            );
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        for k in i..n {
            s += a[k].to_f32() * x[k];
        }
        s
    }

    /// # Safety
    /// AVX-512F; `bt` holds the panels of `h.len()` rows for `y.len()` outputs.
    #[target_feature(enable = "avx512f")]
    unsafe fn axpys512<L: Load>(bt: &[L::E], h: &[f32], y: &mut [f32]) {
        let (n, r) = (y.len(), h.len());
        let mut o = 0;
        // A block of y stays in a register while its panel (r·16 values) streams past.
        while o < n {
            let left = n - o;
            let mask: __mmask16 = if left >= PANEL {
                0xffff
            } else {
                ((1u32 << left) - 1) as u16
            };
            let yp = y.as_mut_ptr().add(o);
            let mut acc = _mm512_maskz_loadu_ps(mask, yp);
            let panel = bt.as_ptr().add(o * r);
            for (j, &c) in h.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_set1_ps(c), L::load16(panel.add(j * PANEL)), acc);
            }
            _mm512_mask_storeu_ps(yp, mask, acc);
            o += PANEL;
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `a` no longer than `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot256<L: Load>(a: &[L::E], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                L::load8(a.as_ptr().add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                L::load8(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1));
        let mut s: f32 = lanes.iter().sum();
        for k in i..n {
            s += a[k].to_f32() * x[k];
        }
        s
    }

    /// # Safety
    /// AVX2, FMA and F16C; `bt` holds the panels of `h.len()` rows for `y.len()` outputs.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpys256<L: Load>(bt: &[L::E], h: &[f32], y: &mut [f32]) {
        let (n, r) = (y.len(), h.len());
        let mut o = 0;
        while o + PANEL <= n {
            let yp = y.as_mut_ptr().add(o);
            let (mut lo, mut hi) = (_mm256_loadu_ps(yp), _mm256_loadu_ps(yp.add(8)));
            let panel = bt.as_ptr().add(o * r);
            for (j, &c) in h.iter().enumerate() {
                let c = _mm256_set1_ps(c);
                lo = _mm256_fmadd_ps(c, L::load8(panel.add(j * PANEL)), lo);
                hi = _mm256_fmadd_ps(c, L::load8(panel.add(j * PANEL + 8)), hi);
            }
            _mm256_storeu_ps(yp, lo);
            _mm256_storeu_ps(yp.add(8), hi);
            o += PANEL;
        }
        // the ragged last panel
        for (k, v) in y.iter_mut().enumerate().skip(o) {
            for (j, &c) in h.iter().enumerate() {
                *v += c * bt[(o * r) + j * PANEL + (k - o)].to_f32();
            }
        }
    }

    #[cfg(test)]
    pub(super) fn all<T: Elem>() -> Vec<(&'static str, Kernels<T>)> {
        [("avx512", avx512()), ("avx2", avx2())]
            .into_iter()
            .filter_map(|(name, k)| k.map(|k| (name, k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    /// `terms` over the rows of `y (n, 1, out)`, split evenly into consecutive spans.
    fn groups<'a, T>(
        y: &Tensor,
        terms: &[Option<RowTerm<'a, T>>],
    ) -> Vec<(usize, Option<RowTerm<'a, T>>)>
    where
        RowTerm<'a, T>: Copy,
    {
        let per = y.dim(0).unwrap() / terms.len();
        terms.iter().map(|t| (per, *t)).collect()
    }

    /// y + scale·(x·Aᵀ)·Bᵀ per group, in f64 from the f32 factors.
    fn reference(y: &Tensor, x: &Tensor, f: &[Option<(Tensor, Tensor, f32)>]) -> Vec<f64> {
        let out = *y.dims().last().unwrap();
        let inp = *x.dims().last().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let per = yv.len() / out / f.len();
        let mut res: Vec<f64> = yv.iter().map(|&v| v as f64).collect();
        for (g, t) in f.iter().enumerate() {
            let Some((a, b, s)) = t else { continue };
            let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
            for row in g * per..(g + 1) * per {
                let xr = &xv[row * inp..][..inp];
                let h: Vec<f64> = a
                    .iter()
                    .map(|ar| ar.iter().zip(xr).map(|(&p, &q)| p as f64 * q as f64).sum())
                    .collect();
                for o in 0..out {
                    let d: f64 = b[o].iter().zip(&h).map(|(&p, q)| p as f64 * q).sum();
                    res[row * out + o] += *s as f64 * d;
                }
            }
        }
        res
    }

    /// Runs the product under test: y, x, terms → y + Δ.
    type Run<'a, T> = &'a dyn Fn(&Tensor, &Tensor, &[Option<RowTerm<'_, T>>]) -> Tensor;

    fn check<T: Elem>(tol: f64, run: Run<'_, T>) {
        // ragged sizes (vector tails), a row without adapter, two rows per group
        for &(groups, per, inp, out, r) in
            &[(4, 1, 37, 53, 3), (3, 2, 64, 48, 16), (2, 1, 576, 192, 8)]
        {
            let n = groups * per;
            let y = randn(&[n, 1, out], 1.0);
            let x = randn(&[n, 1, inp], 1.0);
            let f: Vec<Option<(Tensor, Tensor, f32)>> = (0..groups)
                .map(|g| {
                    (g != 1).then(|| (randn(&[r, inp], 0.2), randn(&[out, r], 0.2), 0.5 + g as f32))
                })
                .collect();
            let packed: Vec<Option<(PackedPair<T>, f32)>> = f
                .iter()
                .map(|t| {
                    t.as_ref()
                        .map(|(a, b, s)| (PackedPair::new(a, b).unwrap(), *s))
                })
                .collect();
            let terms: Vec<Option<RowTerm<'_, T>>> = packed
                .iter()
                .map(|t| {
                    t.as_ref().map(|(pair, scale)| RowTerm {
                        pair,
                        scale: *scale,
                    })
                })
                .collect();
            let got = run(&y.copy().unwrap(), &x, &terms)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = reference(&y, &x, &f);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
                .fold(0.0, f64::max);
            assert!(
                worst < tol,
                "{groups}x{per} {inp}->{out} r={r}: error {worst}"
            );
        }
    }

    #[test]
    fn f32_rows_match_reference() {
        check::<f32>(1e-5, &|y, x, t| {
            add_spans(y.clone(), x, &groups(y, t)).unwrap()
        });
    }

    #[test]
    fn f16_rows_match_reference_to_half_precision() {
        // f16 keeps 11 significant bits: relative error ~5e-4 per factor, summed over r terms
        check::<f16>(5e-3, &|y, x, t| {
            add_spans(y.clone(), x, &groups(y, t)).unwrap()
        });
    }

    fn each_kernel<T: Elem>(tol: f64) {
        let mut kernels = vec![("portable", Kernels::<T>::portable())];
        #[cfg(target_arch = "x86_64")]
        kernels.extend(x86::all::<T>());
        for (name, k) in kernels {
            // the same product as add_spans, one row at a time with this kernel
            check::<T>(tol, &|y, x, terms| {
                let out = *y.dims().last().unwrap();
                let inp = *x.dims().last().unwrap();
                let mut yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let per = yv.len() / out / terms.len();
                for (row, (yr, xr)) in yv
                    .chunks_exact_mut(out)
                    .zip(xv.chunks_exact(inp))
                    .enumerate()
                {
                    let Some(t) = terms[row / per] else { continue };
                    let h: Vec<f32> = (0..t.pair.r)
                        .map(|j| t.scale * unsafe { (k.dot)(&t.pair.a[j * inp..][..inp], xr) })
                        .collect();
                    unsafe { (k.axpys)(&t.pair.bt, &h, yr) };
                }
                let _ = name;
                Tensor::from_vec(yv, y.shape(), y.device()).unwrap()
            });
        }
    }

    #[test]
    fn every_kernel_matches_reference() {
        each_kernel::<f32>(1e-5);
        each_kernel::<f16>(5e-3);
    }

    /// The LoRA share of one decode step with 8 rows on 8 different r = 16 all-linear variants
    /// of SmolLM2 (30 layers × 7 projections; the factors stream from memory as in serving):
    /// unpacked tensors (a delta per row with candle ops), then packed f32, then packed f16. Run
    /// with `cargo test --release -p itamae-daemon --lib lora_rows_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lora_rows_bench() {
        use std::time::Instant;
        let (rows, r, h, f, kv) = (8, 16, 576, 1536, 192);
        let shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)];
        let projections: Vec<(usize, usize)> = (0..30).flat_map(|_| shapes).collect();
        let factors: Vec<Vec<(Tensor, Tensor)>> = projections
            .iter()
            .map(|&(o, i)| {
                (0..rows)
                    .map(|_| (randn(&[r, i], 0.05), randn(&[o, r], 0.05)))
                    .collect()
            })
            .collect();
        let p32: Vec<Vec<PackedPair<f32>>> = factors
            .iter()
            .map(|v| {
                v.iter()
                    .map(|(a, b)| PackedPair::new(a, b).unwrap())
                    .collect()
            })
            .collect();
        let p16: Vec<Vec<PackedPair<f16>>> = factors
            .iter()
            .map(|v| {
                v.iter()
                    .map(|(a, b)| PackedPair::new(a, b).unwrap())
                    .collect()
            })
            .collect();
        let inputs: Vec<(Tensor, Tensor)> = projections
            .iter()
            .map(|&(o, i)| (randn(&[rows, 1, o], 1.0), randn(&[rows, 1, i], 1.0)))
            .collect();
        let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
        let time = |step: &(dyn Fn(usize) + Sync)| {
            let mut best = f64::INFINITY;
            for _ in 0..8 {
                let t = Instant::now();
                pool.install(|| (0..projections.len()).for_each(step));
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        // unpacked factors: what a decode batch does without packing, a delta per row
        let tensors = time(&|p| {
            let (y, x) = &inputs[p];
            let rows: Vec<Tensor> = factors[p]
                .iter()
                .enumerate()
                .map(|(r, (a, b))| {
                    let h = crate::ops::linear(&x.narrow(0, r, 1).unwrap(), a, None).unwrap();
                    (crate::ops::linear(&h, b, None).unwrap() * 2.0).unwrap()
                })
                .collect();
            (y + Tensor::cat(&rows, 0).unwrap()).unwrap();
        });
        fn packed<T: Elem>(pairs: &[PackedPair<T>], y: &Tensor, x: &Tensor) {
            let spans: Vec<_> = pairs
                .iter()
                .map(|pair| (1, Some(RowTerm { pair, scale: 2.0 })))
                .collect();
            add_spans(y.clone(), x, &spans).unwrap();
        }
        let f32_ = time(&|p| packed(&p32[p], &inputs[p].0, &inputs[p].1));
        let f16_ = time(&|p| packed(&p16[p], &inputs[p].0, &inputs[p].1));
        let mb = |v: &Vec<Vec<PackedPair<f32>>>| {
            v.iter().flatten().map(PackedPair::bytes).sum::<usize>() as f64 / 1e6
        };
        let mb16 = p16.iter().flatten().map(PackedPair::bytes).sum::<usize>() as f64 / 1e6;
        println!(
            "{rows} rows x {} projections, ms per step: tensors {:.2} ({:.0} MB) | packed f32 {:.2} | packed f16 {:.2} ({mb16:.0} MB)",
            projections.len(),
            tensors * 1e3,
            mb(&p32),
            f32_ * 1e3,
            f16_ * 1e3,
        );
    }

    #[test]
    fn spans_of_any_length_match_reference() {
        // rows 0..3 on one variant, 3..4 on none, 4..9 on another: as the reference does
        // row by row
        let (inp, out, r) = (40, 24, 4);
        let y = randn(&[1, 9, out], 1.0);
        let x = randn(&[1, 9, inp], 1.0);
        let f: Vec<(Tensor, Tensor)> = (0..2)
            .map(|_| (randn(&[r, inp], 0.2), randn(&[out, r], 0.2)))
            .collect();
        let pairs: Vec<PackedPair<f32>> = f
            .iter()
            .map(|(a, b)| PackedPair::new(a, b).unwrap())
            .collect();
        let t = |i: usize| {
            Some(RowTerm {
                pair: &pairs[i],
                scale: 1.5,
            })
        };
        let got = add_spans(y.copy().unwrap(), &x, &[(3, t(0)), (1, None), (5, t(1))]).unwrap();
        let per_row: Vec<_> = [0, 0, 0, 9, 1, 1, 1, 1, 1]
            .iter()
            .map(|&i| (i != 9).then(|| (f[i].0.clone(), f[i].1.clone(), 1.5f32)))
            .collect();
        let want = reference(
            &y.reshape((9, 1, out)).unwrap(),
            &x.reshape((9, 1, inp)).unwrap(),
            &per_row,
        );
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
        }
        assert!(
            add_spans(y, &x, &[(3, t(0)), (5, t(1))]).is_err(),
            "spans must cover every row"
        );
    }

    #[test]
    fn mismatched_factors_are_an_error() {
        let pair = PackedPair::<f32>::new(&randn(&[2, 5], 1.0), &randn(&[7, 2], 1.0)).unwrap();
        let t = [(
            1,
            Some(RowTerm {
                pair: &pair,
                scale: 1.0,
            }),
        )];
        let (y, x) = (randn(&[1, 1, 7], 1.0), randn(&[1, 1, 6], 1.0));
        assert!(add_spans(y, &x, &t).is_err());
        assert!(PackedPair::<f32>::new(&randn(&[2, 5], 1.0), &randn(&[7, 3], 1.0)).is_err());
    }
}
