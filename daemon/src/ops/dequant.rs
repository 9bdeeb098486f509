//! Dequantizing a whole block-quantized matrix to f32 on every core.
//!
//! Training on a quantized base (QLoRA-style) dequantizes each layer's seven projections in its
//! forward and again in its backward, and the LM head once per step. candle's
//! `QTensor::dequantize` runs on one thread; rows of blocks are independent, so here they are
//! split across rayon's pool, each chunk decoded by candle's own per-type `to_float` (the same
//! arithmetic, so the result is bit-identical).
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
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
        _ => None,
    };
    out.map(|v| Tensor::from_vec(v, q.shape(), &Device::Cpu))
        .transpose()
}

/// Decodes `elems` values stored as blocks of `B`; None when the byte count does not match.
fn decode<B: GgmlType>(bytes: &[u8], elems: usize) -> Option<Vec<f32>> {
    let size = std::mem::size_of::<B>();
    let n_blocks = elems / B::BLCK_SIZE;
    if size == 0
        || !elems.is_multiple_of(B::BLCK_SIZE)
        || bytes.len() != n_blocks * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>())
    {
        return None;
    }
    // SAFETY: candle's CPU storage of this dtype is a `Vec<B>` viewed as bytes (QTensor::data
    // borrows it): the length was checked to be exactly `n_blocks` blocks and the pointer's
    // alignment to be `B`'s; `B` is plain old data and the borrow outlives the slice.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, n_blocks) };
    let per_task = (CHUNK_ELEMS / B::BLCK_SIZE).max(1);
    let mut out = vec![0f32; elems];
    out.par_chunks_mut(per_task * B::BLCK_SIZE)
        .zip(blocks.par_chunks(per_task))
        .for_each(|(ys, xs)| B::to_float(xs, ys));
    Some(out)
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
