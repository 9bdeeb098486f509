//! Block-quantized matrices to f32: whole ([`dequantize_f32`], for callers that need one layer's
//! matrix, such as the fused decoder block) or a tile at a time inside a product
//! ([`tiled_xwt`], [`tiled_dy_w`]: prefill and QLoRA's input gradient).
//!
//! Rows of blocks are independent, so both split them across rayon's pool, each chunk decoded by
//! candle's own per-type `to_float` (the same arithmetic as candle's single-threaded
//! `QTensor::dequantize`, so the values are bit-identical).
//!
//! Why tiles: dequantizing a whole matrix per product writes its f32 copy (4–8× the blocks) to
//! memory and reads it back in the GEMM — about 540 MB per SmolLM2 prompt, plus a fresh
//! allocation per call. A tile of output rows sized to stay in L2 is decoded into a buffer each
//! thread keeps, multiplied at once by a single-threaded GEMM (`gemm` crate; OpenBLAS's pthread
//! build spins when two threads call it at once), and overwritten by the next tile: the weight
//! crosses the memory bus only in its quantized form. The products are the same as on the whole
//! dequantized matrix; only the GEMM's summation order may differ (tests bound it).
use std::cell::RefCell;

use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Output elements per parallel task: large enough that task overhead is noise, small enough
/// that two to a few dozen threads all get work on a SmolLM2 projection (~330k weights).
const CHUNK_ELEMS: usize = 1 << 16;

/// `q` as an f32 tensor on the CPU; None when `q` is not on the CPU or of a type without a
/// parallel decoder here (the caller then uses candle's).
pub fn dequantize_f32(q: &QTensor) -> Result<Option<Tensor>> {
    if !matches!(q.device(), Device::Cpu) {
        return Ok(None);
    }
    let elems = q.shape().elem_count();
    let bytes = q.data()?;
    let out = match q.dtype() {
        GgmlDType::Q4_0 => decode::<kq::BlockQ4_0>(&bytes, elems),
        GgmlDType::Q4_1 => decode::<kq::BlockQ4_1>(&bytes, elems),
        GgmlDType::Q5_0 => decode::<kq::BlockQ5_0>(&bytes, elems),
        GgmlDType::Q5_1 => decode::<kq::BlockQ5_1>(&bytes, elems),
        GgmlDType::Q8_0 => decode::<kq::BlockQ8_0>(&bytes, elems),
        GgmlDType::Q2K => decode::<kq::BlockQ2K>(&bytes, elems),
        GgmlDType::Q3K => decode::<kq::BlockQ3K>(&bytes, elems),
        GgmlDType::Q4K => decode::<kq::BlockQ4K>(&bytes, elems),
        GgmlDType::Q5K => decode::<kq::BlockQ5K>(&bytes, elems),
        GgmlDType::Q6K => decode::<kq::BlockQ6K>(&bytes, elems),
        GgmlDType::F16 => decode::<f16>(&bytes, elems),
        GgmlDType::BF16 => decode::<bf16>(&bytes, elems),
        _ => None,
    };
    out.map(|v| Tensor::from_vec(v, q.shape(), &Device::Cpu))
        .transpose()
}

/// Decodes `elems` values stored as blocks of `B`; None when the byte count does not match.
fn decode<B: GgmlType>(bytes: &[u8], elems: usize) -> Option<Vec<f32>> {
    let size = std::mem::size_of::<B>();
    let n_blocks = elems / B::BLCK_SIZE;
    if !elems.is_multiple_of(B::BLCK_SIZE) || bytes.len() != n_blocks * size {
        return None;
    }
    let blocks = as_blocks::<B>(bytes)?;
    let per_task = (CHUNK_ELEMS / B::BLCK_SIZE).max(1);
    let mut out = vec![0f32; elems];
    out.par_chunks_mut(per_task * B::BLCK_SIZE)
        .zip(blocks.par_chunks(per_task))
        .for_each(|(ys, xs)| B::to_float(xs, ys));
    Some(out)
}

/// `bytes` viewed as whole blocks of `B`; None when the length or alignment does not fit.
fn as_blocks<B: GgmlType>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>())
    {
        return None;
    }
    // SAFETY: candle's CPU storage of a quantized dtype is a `Vec<B>` viewed as bytes
    // (QTensor::data borrows it; tiles are sub-slices at whole-block offsets): the length was
    // checked to be whole blocks and the pointer's alignment to be `B`'s; `B` is plain old data
    // and the borrow outlives the slice.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) })
}

/// Decodes whole rows of blocks (`bytes`) into `out`; false when the sizes do not match.
type RowDecoder = fn(&[u8], &mut [f32]) -> bool;

fn decode_rows<B: GgmlType>(bytes: &[u8], out: &mut [f32]) -> bool {
    match as_blocks::<B>(bytes) {
        Some(blocks) if blocks.len() * B::BLCK_SIZE == out.len() => {
            B::to_float(blocks, out);
            true
        }
        _ => false,
    }
}

fn row_decoder(dtype: GgmlDType) -> Option<RowDecoder> {
    Some(match dtype {
        GgmlDType::Q4_0 => decode_rows::<kq::BlockQ4_0>,
        GgmlDType::Q4_1 => decode_rows::<kq::BlockQ4_1>,
        GgmlDType::Q5_0 => decode_rows::<kq::BlockQ5_0>,
        GgmlDType::Q5_1 => decode_rows::<kq::BlockQ5_1>,
        GgmlDType::Q8_0 => decode_rows::<kq::BlockQ8_0>,
        GgmlDType::Q2K => decode_rows::<kq::BlockQ2K>,
        GgmlDType::Q3K => decode_rows::<kq::BlockQ3K>,
        GgmlDType::Q4K => decode_rows::<kq::BlockQ4K>,
        GgmlDType::Q5K => decode_rows::<kq::BlockQ5K>,
        GgmlDType::Q6K => decode_rows::<kq::BlockQ6K>,
        GgmlDType::F16 => decode_rows::<f16>,
        GgmlDType::BF16 => decode_rows::<bf16>,
        _ => return None,
    })
}

/// f32 weight bytes one tile holds: half of a Zen 3 / Zen 4 core's 512 KB–1 MB L2 (a Xeon's is
/// 1–2 MB), leaving room for the GEMM's packed panels of the activations.
const TILE_BYTES: usize = 192 << 10;

/// Below this many multiply-adds the product runs on one thread.
const TILED_PARALLEL_MIN: usize = 1 << 20;

thread_local! {
    /// Each thread's tile buffer, kept across calls (one SmolLM2 tile is ~190 KB).
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A quantized `n × k` matrix's blocks, split into tiles of whole rows.
struct Tiles<'a> {
    data: &'a [u8],
    decode: RowDecoder,
    n: usize,
    k: usize,
    row_bytes: usize,
    rows_per_tile: usize,
}

impl<'a> Tiles<'a> {
    fn new(q: &QTensor, data: &'a [u8]) -> Result<Option<Self>> {
        let Some(decode) = row_decoder(q.dtype()) else {
            return Ok(None);
        };
        if !matches!(q.device(), Device::Cpu) {
            return Ok(None);
        }
        let (n, k) = q.shape().dims2()?;
        let dtype = q.dtype();
        if !k.is_multiple_of(dtype.block_size()) {
            bail!("rows of {k} are not whole {dtype:?} blocks")
        }
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        if data.len() != n * row_bytes {
            bail!("quantized storage of {} bytes for {n} rows", data.len())
        }
        // Multiples of 16 rows: the GEMM's register tile spans 8 or 16 columns.
        let rows_per_tile = (TILE_BYTES / (4 * k.max(1)) / 16 * 16).max(16);
        Ok(Some(Self {
            data,
            decode,
            n,
            k,
            row_bytes,
            rows_per_tile,
        }))
    }

    fn count(&self) -> usize {
        self.n.div_ceil(self.rows_per_tile)
    }

    /// Weight rows of tile `t`.
    fn rows(&self, t: usize) -> std::ops::Range<usize> {
        let r0 = t * self.rows_per_tile;
        r0..(r0 + self.rows_per_tile).min(self.n)
    }

    /// Splits tiles over the pool: one contiguous range of tiles per task.
    fn ranges(&self, work: usize) -> Vec<std::ops::Range<usize>> {
        let tiles = self.count();
        let tasks = if work < TILED_PARALLEL_MIN {
            1
        } else {
            rayon::current_num_threads().clamp(1, tiles.max(1))
        };
        (0..tasks)
            .map(|i| tiles * i / tasks..tiles * (i + 1) / tasks)
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// Runs `f(tile rows, decoded tile)` for each tile of `tiles`, in order, on this thread's
    /// buffer.
    fn each(
        &self,
        tiles: std::ops::Range<usize>,
        mut f: impl FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<()> {
        TILE.with(|buf| {
            let mut buf = buf.borrow_mut();
            let need = self.rows_per_tile * self.k;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            for t in tiles {
                let rows = self.rows(t);
                let w = &mut buf[..rows.len() * self.k];
                let bytes = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
                if !(self.decode)(bytes, w) {
                    bail!(
                        "tile of rows {rows:?}: blocks do not decode to {} values",
                        w.len()
                    )
                }
                f(rows, w);
            }
            Ok(())
        })
    }
}

/// `dst (m × n, row stride dst_rs) = [dst +] lhs (m × k) · rhs (k × n)`, each operand given by
/// its row and column strides, on this thread only.
#[allow(clippy::too_many_arguments)]
fn gemm1(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= extent(m, n, dst_rs, 1), "gemm1: dst too short");
    assert!(
        lhs.len() >= extent(m, k, lhs_rs, lhs_cs),
        "gemm1: lhs too short"
    );
    assert!(
        rhs.len() >= extent(k, n, rhs_rs, rhs_cs),
        "gemm1: rhs too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above check that every element the strides address lies inside its
    // slice; dst is uniquely borrowed and does not overlap lhs or rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `y = x · Wᵀ` (`m × n`) for `x` (`m × k`, row-major) and the quantized `W` (`n × k`), one
/// L2-sized tile of `W` at a time. None: `q`'s type has no row decoder here (or it is not on
/// the CPU); the caller then dequantizes the whole matrix.
pub fn tiled_xwt(q: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let data = q.data()?;
    let Some(tiles) = Tiles::new(q, &data)? else {
        return Ok(None);
    };
    let (n, k) = (tiles.n, tiles.k);
    if x.len() != m * k {
        bail!("tiled product: {} activations for {m} rows of {k}", x.len())
    }
    // Each task fills a column band of y in its own buffer; the bands are copied in after.
    let parts = tiles
        .ranges(m * n * k)
        .into_par_iter()
        .map(|range| {
            let c0 = tiles.rows(range.start).start;
            let width = tiles.rows(range.end - 1).end - c0;
            let mut part = vec![0f32; m * width];
            tiles.each(range, |rows, w| {
                let (j, tr) = (rows.start - c0, rows.len());
                gemm1(m, tr, k, &mut part[j..], width, false, x, (k, 1), w, (1, k));
            })?;
            Ok((c0, width, part))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut y = vec![0f32; m * n];
    for (c0, width, part) in parts {
        for (dst, src) in y.chunks_mut(n).zip(part.chunks(width)) {
            dst[c0..c0 + width].copy_from_slice(src);
        }
    }
    Ok(Some(y))
}

/// `dX = dY · W` (`m × k`) for `dY` (`m × n`, row-major) and the quantized `W` (`n × k`): the
/// input gradient of [`tiled_xwt`], tile by tile, each task summing its tiles' contributions
/// into its own `m × k` buffer. None as for [`tiled_xwt`].
pub fn tiled_dy_w(q: &QTensor, dy: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let data = q.data()?;
    let Some(tiles) = Tiles::new(q, &data)? else {
        return Ok(None);
    };
    let (n, k) = (tiles.n, tiles.k);
    if dy.len() != m * n {
        bail!("tiled gradient: {} values for {m} rows of {n}", dy.len())
    }
    let parts = tiles
        .ranges(m * n * k)
        .into_par_iter()
        .map(|range| {
            let mut part = vec![0f32; m * k];
            let mut first = true;
            tiles.each(range, |rows, w| {
                let dyt = &dy[rows.start..];
                gemm1(
                    m,
                    k,
                    rows.len(),
                    &mut part,
                    k,
                    !first,
                    dyt,
                    (n, 1),
                    w,
                    (k, 1),
                );
                first = false;
            })?;
            Ok(part)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut parts = parts.into_iter();
    let mut dx = parts.next().unwrap_or_else(|| vec![0f32; m * k]);
    for p in parts {
        dx.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    Ok(Some(dx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type the decoder covers matches candle's single-threaded dequantize bit for bit,
    /// on a matrix with more blocks than one task takes (so chunk edges are crossed).
    #[test]
    fn matches_candle_dequantize() {
        let (rows, cols) = (300, 512);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0)
            .collect();
        let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::BF16,
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = dequantize_f32(&q).unwrap().expect("decoder for this type");
            assert_eq!(got.dims(), &[rows, cols]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?} differs from candle's dequantize"
            );
        }
    }
}

#[cfg(test)]
mod tiled_tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005) | 1;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// Any summation order of k f32 products stays within γ_k = k·u/(1 − k·u) (u = 2⁻²⁴) of
    /// the exact sum, relative to Σ|a·b|: the bound both the tiled and the whole-matrix product
    /// are held to against f64, and (twice it) against each other.
    fn gamma(k: usize) -> f64 {
        let ku = k as f64 * (2f64).powi(-24);
        ku / (1.0 - ku)
    }

    /// Weights of `n × k` in `dtype`, their dequantized values, and the quantized tensor.
    fn weight(n: usize, k: usize, dtype: GgmlDType) -> (QTensor, Vec<f32>) {
        let t = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let w = dequantize_f32(&q).unwrap().unwrap();
        (q, w.flatten_all().unwrap().to_vec1().unwrap())
    }

    /// Forward: tiled `x · Wᵀ` against f64 on the dequantized matrix and against the
    /// whole-matrix BLAS product, for shapes with several tiles per thread, a ragged last tile,
    /// and one row (the exact path at decode sizes).
    #[test]
    fn tiled_product_matches_whole_matrix_and_f64() {
        for (dtype, n, k) in [
            (GgmlDType::Q4_1, 300, 576),
            (GgmlDType::Q8_0, 45, 2048),
            (GgmlDType::Q6K, 200, 512),
            (GgmlDType::Q4K, 17, 256),
            (GgmlDType::BF16, 130, 96),
            (GgmlDType::F16, 64, 64),
        ] {
            let (q, w) = weight(n, k, dtype);
            for m in [1, 9, 42] {
                let x = values(m * k, 5 + m as u64);
                let got = tiled_xwt(&q, &x, m).unwrap().expect("tile decoder");
                use crate::ops::blas::{matmul, Mat};
                let whole = matmul(Mat::new(&x, m, k), Mat::new(&w, n, k).t()).unwrap();
                let tol = gamma(k);
                for i in 0..m {
                    for j in 0..n {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                        let exact: f64 =
                            xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let scale: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let (g, h) = (got[i * n + j] as f64, whole[i * n + j] as f64);
                        assert!(
                            (g - exact).abs() <= tol * scale,
                            "{dtype:?} {m}x{n}x{k} ({i},{j}): tiled {g} vs f64 {exact}"
                        );
                        assert!(
                            (g - h).abs() <= 2.0 * tol * scale,
                            "{dtype:?} {m}x{n}x{k} ({i},{j}): tiled {g} vs whole {h}"
                        );
                    }
                }
            }
        }
    }

    /// Backward: tiled `dY · W` against f64 on the dequantized matrix (each task sums its tiles,
    /// then the tasks' sums are added: still one sum of n products per element).
    #[test]
    fn tiled_input_gradient_matches_f64() {
        for (dtype, n, k) in [(GgmlDType::Q4_1, 1536, 576), (GgmlDType::Q5_0, 70, 160)] {
            let (q, w) = weight(n, k, dtype);
            for m in [3, 33] {
                let dy = values(m * n, 17 + m as u64);
                let got = tiled_dy_w(&q, &dy, m).unwrap().expect("tile decoder");
                let tol = gamma(n);
                for i in 0..m {
                    for c in 0..k {
                        let terms = (0..n).map(|j| dy[i * n + j] as f64 * w[j * k + c] as f64);
                        let exact: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        let g = got[i * k + c] as f64;
                        assert!(
                            (g - exact).abs() <= tol * scale,
                            "{dtype:?} {m}x{n}x{k} ({i},{c}): {g} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_rejects_mismatched_activations() {
        let (q, _) = weight(16, 64, GgmlDType::Q8_0);
        assert!(tiled_xwt(&q, &[0.0; 63], 1).is_err());
        assert!(tiled_dy_w(&q, &[0.0; 15], 1).is_err());
    }
}
