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
    f(&view_of(&s, layout, d, what)?)
}

/// The in-place view of a `(1, n_kv, t, d)` f32 tensor's storage, checked to lie inside it.
fn view_of<'a>(
    s: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    d: usize,
    what: &str,
) -> Result<View<'a>> {
    let candle_core::Storage::Cpu(cpu) = s else {
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
    Ok(view)
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
            let rep = check_heads(kv, vv, n_head)?;
            let mut p = Vec::new();
            for h in 0..n_head {
                let (o, qh) = (&mut out[h * d..][..d], &q[h * d..][..d]);
                head(o, qh, kv, vv, h / rep, d, scale, &mut p);
            }
            Ok(())
        })
    })
}

/// `n_head / n_kv`, after checking the key and value views agree with each other and the heads.
fn check_heads(kv: &View<'_>, vv: &View<'_>, n_head: usize) -> Result<usize> {
    if kv.n_kv == 0 || !n_head.is_multiple_of(kv.n_kv) || vv.n_kv != kv.n_kv || vv.t != kv.t {
        candle_core::bail!(
            "attention_rows: {n_head} heads over {} key / {} value heads, {} / {} positions",
            kv.n_kv,
            vv.n_kv,
            kv.t,
            vv.t
        )
    }
    Ok(n_head / kv.n_kv)
}

/// One query head `qh` against KV head `g`: `o = softmax(scale · qh·Kᵀ) · V`; `p` is scratch.
#[allow(clippy::too_many_arguments)]
fn head(
    o: &mut [f32],
    qh: &[f32],
    kv: &View<'_>,
    vv: &View<'_>,
    g: usize,
    d: usize,
    scale: f32,
    p: &mut Vec<f32>,
) {
    p.clear();
    p.resize(kv.t, 0.0);
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
    o.iter_mut().for_each(|x| *x = 0.0);
    for (j, &pj) in p.iter().enumerate() {
        let w = pj / sum;
        for (x, &vj) in o.iter_mut().zip(vv.vector(g, j, d)) {
            *x += w * vj;
        }
    }
}

/// Below this many query·key multiply-adds a step's attention runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// [`attention_rows`] on plain rows, for the row decode path: `q` and `out` are `n × (n_head·d)`
/// row-major (heads side by side, as the q projection writes them), `kv[r]` row `r`'s keys and
/// values `(1, n_kv, t_r, d)` (f32 CPU tensors, views of its cache). Every (row, head) pair is a
/// task of its own, so one sequence's heads spread over the pool too.
pub fn attention_slices(
    out: &mut [f32],
    q: &[f32],
    kv: &[(Tensor, Tensor)],
    n_head: usize,
    d: usize,
    scale: f32,
) -> Result<()> {
    let n = kv.len();
    if q.len() != n * n_head * d || out.len() != q.len() || d == 0 {
        candle_core::bail!(
            "attention_slices: {} queries and {} outputs for {n} rows of {n_head} heads of {d}",
            q.len(),
            out.len()
        )
    }
    let guards: Vec<_> = kv
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let mut views = Vec::with_capacity(n);
    for (((ks, kl), (vs, vl)), (k, v)) in guards.iter().zip(kv) {
        if k.dtype() != DType::F32 || v.dtype() != DType::F32 {
            candle_core::bail!("attention_slices: the cache is not f32")
        }
        let kv = view_of(ks, kl, d, "keys")?;
        let vv = view_of(vs, vl, d, "values")?;
        let rep = check_heads(&kv, &vv, n_head)?;
        views.push((kv, vv, rep));
    }
    let work: usize = views.iter().map(|(k, _, _)| k.t).sum::<usize>() * n_head * d;
    let task = |(i, o): (usize, &mut [f32]), p: &mut Vec<f32>| {
        let (r, h) = (i / n_head, i % n_head);
        let (kv, vv, rep) = &views[r];
        head(o, &q[i * d..][..d], kv, vv, h / rep, d, scale, p);
    };
    if work < PARALLEL_MIN_WORK {
        let mut p = Vec::new();
        out.chunks_mut(d).enumerate().for_each(|t| task(t, &mut p));
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each_init(Vec::new, |p, t| task(t, p));
    }
    Ok(())
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
    fn slices_match_composed_attention_serial_and_parallel() {
        // Short caches run on the calling thread, long ones over the pool: both must equal the
        // composed attention.
        let (n_head, n_kv, d) = (6, 2, 16);
        for lens in [vec![1usize, 3], vec![40, 700, 5]] {
            let cap = lens.iter().max().copied().unwrap_or(1) + 3;
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
            let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut out = vec![0f32; qv.len()];
            attention_slices(&mut out, &qv, &kv, n_head, d, scale as f32).unwrap();
            let got = Tensor::from_vec(out, q.dims(), &Device::Cpu).unwrap();
            let want = composed(&q, &kv, scale).unwrap();
            let diff = crate::ops::gradcheck::max_diff(&got, &want);
            assert!(diff < 1e-5, "lens {lens:?}: max abs diff {diff}");
        }
        let mut out = vec![0f32; 5];
        let kv = vec![(randn(&[1, 2, 3, 8]), randn(&[1, 2, 3, 8]))];
        assert!(attention_slices(&mut out, &[0.0; 5], &kv, 4, 8, 1.0).is_err());
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
