//! Attention of a decode step: one new query per sequence against that sequence's own KV cache,
//! for serving only (nothing here is differentiable; a tracked input takes the composed path).
//!
//! Why its own op: done with candle ops, each sequence of each layer costs about ten small ops
//! (copies of the cache views, two matmuls, scale, softmax) with an allocation each; an 8-row
//! step ran 240 of those sets, which took more time than all the projections. Here the cache
//! views are read in place through their strides and the few thousand multiply-adds per head
//! run in plain loops, one rayon task per sequence.
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// `softmax(scale · q·Kᵀ) · V` for every row: `q` is `(n, n_head, 1, d)` and `kv[r]` the keys
/// and values `(1, n_kv, t_r, d)` row `r` attends to (its cache including the new position).
/// Returns `(n, n_head, 1, d)`.
pub fn attention_rows(q: &Tensor, kv: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor> {
    let fast = q.dtype() == DType::F32
        && q.device().is_cpu()
        && !q.track_op()
        && kv.iter().all(|(k, v)| {
            k.dtype() == DType::F32 && v.dtype() == DType::F32 && !k.track_op() && !v.track_op()
        });
    if !fast {
        return composed(q, kv, scale);
    }
    let (n, n_head, l, d) = q.dims4()?;
    if l != 1 || kv.len() != n {
        candle_core::bail!(
            "attention_rows: {n} rows of {l} queries for {} caches",
            kv.len()
        )
    }
    let qv = super::to_flat_vec::<f32>(q)?;
    let mut out = vec![0f32; n * n_head * d];
    out.par_chunks_mut(n_head * d)
        .zip(qv.par_chunks(n_head * d))
        .zip(kv.par_iter())
        .try_for_each(|((o, q), (k, v))| row(o, q, k, v, n_head, d, scale as f32))?;
    Tensor::from_vec(out, (n, n_head, 1, d), q.device())
}

/// The reference: per row, the composed attention of `ops::attention`.
fn composed(q: &Tensor, kv: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(kv.len());
    for (r, (k, v)) in kv.iter().enumerate() {
        outs.push(super::attention(&q.narrow(0, r, 1)?, k, v, None, scale)?);
    }
    Tensor::cat(&outs, 0)
}

/// A `(1, n_kv, t, d)` tensor's data read in place: element `(h, j, :)` starts at
/// `start + h·sh + j·st` and is contiguous.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    sh: usize,
    st: usize,
    n_kv: usize,
    t: usize,
}

impl View<'_> {
    fn vector(&self, h: usize, j: usize, d: usize) -> &[f32] {
        &self.data[self.start + h * self.sh + j * self.st..][..d]
    }
}

fn with_view<R>(
    x: &Tensor,
    d: usize,
    what: &str,
    f: impl FnOnce(&View<'_>) -> Result<R>,
) -> Result<R> {
    let (s, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else {
        candle_core::bail!("attention_rows: {what} is not on the CPU")
    };
    let data = cpu.as_slice::<f32>()?;
    let (b, n_kv, t, dd) = layout.shape().dims4()?;
    let st = layout.stride();
    if b != 1 || dd != d || (d > 1 && st[3] != 1) {
        candle_core::bail!(
            "attention_rows: {what} of shape {:?} and strides {st:?} for head size {d}",
            layout.dims()
        )
    }
    let view = View {
        data,
        start: layout.start_offset(),
        sh: st[1],
        st: st[2],
        n_kv,
        t,
    };
    // Every index the loops form must lie inside the storage.
    if n_kv > 0 && t > 0 {
        let last = view.start + (n_kv - 1) * view.sh + (t - 1) * view.st + d;
        if last > data.len() {
            candle_core::bail!("attention_rows: {what} view reaches past its storage")
        }
    }
    f(&view)
}

fn row(
    out: &mut [f32],
    q: &[f32],
    k: &Tensor,
    v: &Tensor,
    n_head: usize,
    d: usize,
    scale: f32,
) -> Result<()> {
    with_view(k, d, "keys", |kv| {
        with_view(v, d, "values", |vv| {
            if kv.n_kv == 0 || !n_head.is_multiple_of(kv.n_kv) || vv.n_kv != kv.n_kv || vv.t != kv.t
            {
                candle_core::bail!(
                    "attention_rows: {n_head} heads over {} key / {} value heads, {} / {} positions",
                    kv.n_kv,
                    vv.n_kv,
                    kv.t,
                    vv.t
                )
            }
            let rep = n_head / kv.n_kv;
            let mut p = vec![0f32; kv.t];
            for h in 0..n_head {
                let g = h / rep;
                let qh = &q[h * d..][..d];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = scale * super::dot(qh, kv.vector(g, j, d));
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[h * d..][..d];
                o.iter_mut().for_each(|x| *x = 0.0);
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj / sum;
                    for (x, &vj) in o.iter_mut().zip(vv.vector(g, j, d)) {
                        *x += w * vj;
                    }
                }
            }
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_composed_attention_on_cache_views() {
        // Rows of different lengths, GQA (6 heads over 2), views narrowed out of a larger
        // buffer as the KV cache returns them, and a head size with a vector tail.
        let (n_head, n_kv, d, cap) = (6, 2, 13, 20);
        let lens = [1usize, 5, 17, 20];
        let q = randn(&[lens.len(), n_head, 1, d]);
        let kv: Vec<(Tensor, Tensor)> = lens
            .iter()
            .map(|&t| {
                let k = randn(&[1, n_kv, cap, d]).narrow(2, 0, t).unwrap();
                let v = randn(&[1, n_kv, cap, d]).narrow(2, 0, t).unwrap();
                (k, v)
            })
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        let got = attention_rows(&q, &kv, scale).unwrap();
        let want = composed(&q, &kv, scale).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = crate::ops::gradcheck::max_diff(&got, &want);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }

    #[test]
    fn mismatched_heads_are_an_error() {
        let q = randn(&[1, 5, 1, 8]);
        let kv = vec![(randn(&[1, 2, 3, 8]), randn(&[1, 2, 3, 8]))];
        assert!(attention_rows(&q, &kv, 1.0).is_err());
        let kv = vec![(randn(&[1, 5, 3, 8]), randn(&[1, 5, 4, 8]))];
        assert!(attention_rows(&q, &kv, 1.0).is_err());
    }
}
