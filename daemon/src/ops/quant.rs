//! Frozen base weights kept in the precision they ship in: [`Weight`] is either a plain tensor
//! (f32, the trainable/full-precision case) or a block-quantized or half-precision matrix held
//! as candle's [`QTensor`] (GGUF Q4_0…Q8_0, the K-quants, f16, bf16).
//!
//! Which kernel runs on the CPU is chosen by the phase of the forward pass, never by how many
//! rows a product has, so a request's logits do not depend on what shares its batch:
//! * decode steps ([`DecodeRows`]) run every projection on our integer-dot kernels
//!   ([`super::qdot`], 8-bit activations, each weight block read once for up to eight rows;
//!   more rows run in groups of eight with the same arithmetic per row);
//! * everything else that serves (prefill, prompt logprobs) and the LM head in every phase
//!   ([`linear_exact`]) multiplies f32 activations with the blocks decoded to f32 in registers
//!   ([`super::qdot::Acc::F32`]): the dequantized matrix's exact product, again row by row.
//!   8-bit activations on the prompt or on the head's last row move SmolLM2's greedy answers;
//! * training and validation ([`exact`]) dequantize the matrix one L2-sized tile at a time and
//!   run an f32 GEMM per tile ([`super::dequant::tiled_xwt`]).
//!
//! All of them run inside one op ([`QLinear`]).
//!
//! Training never makes a whole f32 copy of a quantized base: [`linear`] on a gradient-tracking
//! input runs [`QLinear`], whose backward computes `dX = dY · W` from the weight dequantized
//! tile by tile, and callers that need an f32 matrix for a fused op (the decoder block, the LM
//! head in the loss) materialise one layer at a time with [`Weight::to_dense`].
use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// One frozen weight matrix `(out, in)` (or embedding table `(vocab, hidden)`).
#[derive(Clone)]
pub enum Weight {
    /// A plain tensor: f32 (or f64 in gradient checks), possibly a trainable variable.
    Dense(Tensor),
    /// Blocks as stored: a GGUF quant type, or f16/bf16 rows.
    Quant(Arc<QTensor>),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({}, {:?})", self.type_name(), self.dims())
    }
}

impl Weight {
    /// Quantizes (or rounds to f16/bf16) an f32 matrix; `dtype` F32 keeps it dense.
    pub fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<Self> {
        if dtype == GgmlDType::F32 {
            return Ok(Weight::Dense(t.to_dtype(DType::F32)?));
        }
        Ok(Weight::Quant(Arc::new(QTensor::quantize(t, dtype)?)))
    }

    /// The shape `(rows, cols)` and every other dimension, as stored.
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => q.shape().dims(),
        }
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Quant(q) => q.shape().dims2(),
        }
    }

    pub fn dim(&self, i: usize) -> Result<usize> {
        match self.dims().get(i) {
            Some(&d) => Ok(d),
            None => bail!("weight of shape {:?} has no dimension {i}", self.dims()),
        }
    }

    /// The storage format: `f32`, `f16`, `bf16`, `q4_1`, `q4_k`, …
    pub fn type_name(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Weight::Quant(q) => ggml_name(q.dtype()),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_size_in_bytes(),
        }
    }

    /// The plain tensor, when this weight is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The matrix as a plain tensor of `dtype`: the tensor itself when it already is one of
    /// that type, else a transient dequantized copy (one layer's worth, dropped by the caller).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) if t.dtype() == dtype => Ok(t.clone()),
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quant(q) => match super::dequant::dequantize_f32(q)? {
                Some(t) => t.to_dtype(dtype),
                None => q.dequantize(&q.device())?.to_dtype(dtype),
            },
        }
    }

    /// Rows `ids` (any shape) of an embedding table → `(ids..., hidden)`, dequantizing only the
    /// rows asked for.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => {
                use candle_core::Module;
                let hidden = t.dim(1)?;
                candle_nn::Embedding::new(t.clone(), hidden).forward(ids)
            }
            Weight::Quant(q) => q.embedding(ids),
        }
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `src[i]` of this
    /// one. Quantized blocks never straddle rows, so whole rows of blocks move as bytes.
    pub fn permute_rows(&self, src: &[usize]) -> Result<Self> {
        let (rows, cols) = self.dims2()?;
        if src.len() != rows || src.iter().any(|&s| s >= rows) {
            bail!("row permutation of {} entries for {rows} rows", src.len())
        }
        match self {
            Weight::Dense(t) => {
                let idx: Vec<u32> = src.iter().map(|&s| s as u32).collect();
                let idx = Tensor::new(idx.as_slice(), t.device())?;
                Ok(Weight::Dense(t.index_select(&idx, 0)?.contiguous()?))
            }
            Weight::Quant(q) => {
                let dtype = q.dtype();
                if cols % dtype.block_size() != 0 {
                    bail!("rows of {cols} are not whole {:?} blocks", dtype)
                }
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                if data.len() != rows * row_bytes {
                    bail!("quantized storage of {} bytes for {rows} rows", data.len())
                }
                let mut out = Vec::with_capacity(data.len());
                for &s in src {
                    out.extend_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
                }
                let storage = QStorage::from_data(Cow::Owned(out), &q.device(), dtype)?;
                Ok(Weight::Quant(Arc::new(QTensor::new(
                    storage,
                    (rows, cols),
                )?)))
            }
        }
    }

    /// Whether autograd tracks this weight (a trainable dense tensor).
    pub fn track_op(&self) -> bool {
        matches!(self, Weight::Dense(t) if t.track_op())
    }
}

/// The lowercase GGUF name of a block type (`q4_k`, `bf16`, …).
pub fn ggml_name(dtype: GgmlDType) -> String {
    let s = format!("{dtype:?}").to_lowercase();
    // candle spells the K-quants `Q4K`; GGUF tools say `q4_k`.
    match s.strip_suffix('k') {
        Some(head) if head.starts_with('q') => format!("{head}_k"),
        _ => s,
    }
}

/// `x · Wᵀ (+ b)` for `x` of any rank `(..., in)`. A dense weight goes to [`super::linear`]
/// (BLAS, with its own backward); a quantized one to [`QLinear`], which picks the kernel by
/// phase (module doc).
pub fn linear(x: &Tensor, w: &Weight, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, b, false)
}

/// [`linear`] that never rounds the activations to 8 bits, whatever the phase: for the LM head,
/// whose one row per sequence picks the next token (an argmax that 8-bit activations on the
/// tied Q8_0 embedding of SmolLM2 move).
pub fn linear_exact(x: &Tensor, w: &Weight, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, b, true)
}

fn linear_with(x: &Tensor, w: &Weight, b: Option<&Tensor>, f32_acts: bool) -> Result<Tensor> {
    let q = match w {
        Weight::Dense(t) => return super::linear(x, t, b),
        Weight::Quant(q) => q,
    };
    let dims = x.dims();
    let Some(&in_dim) = dims.last() else {
        bail!("linear: input must have at least one dimension")
    };
    let (out, k) = q.shape().dims2()?;
    if in_dim != k {
        bail!("linear: input of {in_dim} features for a weight of {k}")
    }
    let rows = x.elem_count() / in_dim.max(1);
    let dtype = x.dtype();
    let x2 = x
        .reshape((rows, in_dim))?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let op = QLinear {
        q: q.clone(),
        grad: x2.track_op(),
        f32_acts,
    };
    let y = if x2.track_op() && x2.device().is_cpu() {
        x2.apply_op1(op)?
    } else {
        x2.apply_op1_no_bwd(&op)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = out;
    y.reshape(out_dims)?.to_dtype(dtype)
}

/// `x · Wᵀ (+ b) + scale · ((x ⊙ mask) · Aᵀ) · Bᵀ`: [`super::linear::linear_lora`] for a dense
/// weight (one fused op), the quantized product plus the composed low-rank term otherwise.
pub fn linear_lora(
    x: &Tensor,
    w: &Weight,
    b: Option<&Tensor>,
    lora: &super::linear::LoraTerm<'_>,
) -> Result<Tensor> {
    if let Weight::Dense(t) = w {
        return super::linear::linear_lora(x, t, b, lora);
    }
    let xl = match lora.dropout_mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let d = super::linear(&super::linear(&xl, lora.a, None)?, lora.b, None)?;
    linear(x, w, b)? + (d * lora.scale)?
}

thread_local! {
    static EXACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static DECODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every quantized product on this thread taking the exact path (the weight
/// dequantized, activations in f32) whatever its row count. Validation runs on the serving
/// kernels but reports a loss that must be comparable with the training loss, which never
/// sees 8-bit activations.
pub fn exact<R>(f: impl FnOnce() -> R) -> R {
    let before = EXACT.with(|e| e.replace(true));
    let r = f();
    EXACT.with(|e| e.set(before));
    r
}

/// While held, the quantized products on this thread take the decode kernels: 8-bit
/// activations, one walk over each weight per eight rows (one decode step's projections hold
/// it). The phase, not the row count, decides, so a decode row gets the same arithmetic in a
/// batch of 1 or 30, and a prompt of 3 tokens the same as one of 300.
pub struct DecodeRows(bool);

impl DecodeRows {
    pub fn enter() -> Self {
        DecodeRows(DECODE.with(|d| d.replace(true)))
    }
}

impl Drop for DecodeRows {
    fn drop(&mut self) {
        DECODE.with(|d| d.set(self.0));
    }
}

/// `x · Wᵀ` for the `rows × k` activations `x` with our block kernels (`acc`: the activations
/// as 8-bit codes or as f32), when they read this weight's format (every type the loaders
/// keep resident does).
pub fn qdot_product(
    q: &QTensor,
    x: &[f32],
    rows: usize,
    acc: super::qdot::Acc,
) -> Result<Option<Vec<f32>>> {
    let Some(fmt) = super::qdot::Fmt::from_ggml(q.dtype()) else {
        return Ok(None);
    };
    let (n, k) = q.shape().dims2()?;
    let data = q.data()?;
    let path = super::qdot::path();
    super::qdot::product_on(path, acc, fmt, &data, n, k, x, rows, true)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// The quantized product as an op with a backward for its input only: the weight is frozen,
/// and `dX = dY · W` is computed from dequantized tiles that live for that call alone. When
/// the input tracks a gradient (`grad`), the forward always runs on the dequantized weight, so
/// training's loss and gradients are the f32 base's exactly (8-bit activations are a serving
/// trade only). `f32_acts` keeps a decode step's product on f32 activations ([`linear_exact`]).
struct QLinear {
    q: Arc<QTensor>,
    grad: bool,
    f32_acts: bool,
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        let x = super::cpu_slice::<f32>(s, l, "quant-linear")?;
        let n = self.q.shape().dims2()?.0;
        if !self.grad && !EXACT.with(|e| e.get()) {
            use super::qdot::Acc;
            let acc = if DECODE.with(|d| d.get()) && !self.f32_acts {
                Acc::Int8
            } else {
                Acc::F32
            };
            if let Some(y) = qdot_product(&self.q, x, rows, acc)? {
                return Ok((CpuStorage::F32(y), Shape::from((rows, n))));
            }
            // A format qdot does not read (none the loaders keep): the exact path below.
        }
        if let Some(y) = super::dequant::tiled_xwt(&self.q, x, rows)? {
            return Ok((CpuStorage::F32(y), Shape::from((rows, n))));
        }
        // A type without a tile decoder: one transient f32 copy of the matrix.
        let w = self.q.dequantize(&candle_core::Device::Cpu)?;
        let n = w.dim(0)?;
        let (ws, wl) = w.storage_and_layout();
        let wv = match &*ws {
            candle_core::Storage::Cpu(c) => super::cpu_slice::<f32>(c, wl, "quant-linear")?,
            _ => bail!("quant-linear: dequantized weight is not on the CPU"),
        };
        use super::blas::Mat;
        let y = super::blas::matmul(Mat::new(x, rows, k), Mat::new(wv, n, k).t())?;
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.q.cuda_fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?.to_dtype(DType::F32)?;
        if dy.device().is_cpu() {
            let (m, _) = dy.dims2()?;
            let k = self.q.shape().dims2()?.1;
            let v = dy.flatten_all()?.to_vec1::<f32>()?;
            if let Some(dx) = super::dequant::tiled_dy_w(&self.q, &v, m)? {
                return Ok(Some(Tensor::from_vec(dx, (m, k), dy.device())?));
            }
        }
        let w = self.q.dequantize(&self.q.device())?;
        let dx = if dy.device().is_cpu() {
            super::linear::gemm_tensors(&dy, false, &w, false)?
        } else {
            dy.matmul(&w)?
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every type the loaders can keep resident.
    pub(crate) const TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::BF16,
        GgmlDType::F16,
    ];

    fn randn(rows: usize, cols: usize, seed: u64) -> Tensor {
        // A fixed-seed LCG: the test must not depend on candle's global RNG.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// `x · Wᵀ` in f64 from the dequantized weight: the reference every product is held to.
    fn reference(x: &Tensor, w: &Weight) -> Vec<Vec<f64>> {
        let w = w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let x = x.to_vec2::<f32>().unwrap();
        x.iter()
            .map(|xr| {
                w.iter()
                    .map(|wr| xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
                    .collect()
            })
            .collect()
    }

    /// Each serving product against the exact product of the dequantized weight, bounded
    /// relative to `Σ|x|·|w|`, the scale that rounding acts on: outside decode steps (and in
    /// the LM head's [`linear_exact`]) f32 rounding only, 1e-5; a decode step's 8-bit codes
    /// keep about 7 bits per activation, 1%.
    fn check(rows: usize, dtype: GgmlDType) {
        let lin = |x: &Tensor, w: &Weight| linear(x, w, None);
        let head = |x: &Tensor, w: &Weight| {
            let _d = DecodeRows::enter();
            linear_exact(x, w, None)
        };
        let step = |x: &Tensor, w: &Weight| {
            let _d = DecodeRows::enter();
            linear(x, w, None)
        };
        check_with(rows, dtype, 1e-5, lin);
        check_with(rows, dtype, 1e-5, head);
        check_with(rows, dtype, 1e-2, step);
    }

    fn check_with(
        rows: usize,
        dtype: GgmlDType,
        tol: f64,
        f: impl Fn(&Tensor, &Weight) -> Result<Tensor>,
    ) {
        let (out, k) = (40, 512);
        let w = Weight::quantize(&randn(out, k, 7), dtype).unwrap();
        let x = randn(rows, k, 11 + rows as u64);
        let got = f(&x, &w).unwrap().to_vec2::<f32>().unwrap();
        let want = reference(&x, &w);
        let wd = w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let xv = x.to_vec2::<f32>().unwrap();
        for i in 0..rows {
            for j in 0..out {
                let scale: f64 = xv[i]
                    .iter()
                    .zip(&wd[j])
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let err = (got[i][j] as f64 - want[i][j]).abs();
                assert!(
                    err <= tol * scale + 1e-6,
                    "{dtype:?} rows={rows} ({i},{j}): {} vs {} (scale {scale})",
                    got[i][j],
                    want[i][j]
                );
            }
        }
    }

    #[test]
    fn every_type_matches_f64_reference_at_decode_and_prefill_rows() {
        for dtype in TYPES {
            for rows in [1, 3, 8, 9, 33] {
                check(rows, dtype);
            }
        }
    }

    #[test]
    fn dequantized_blocks_stay_close_to_the_source() {
        // The storage itself: dequantize(quantize(w)) within the type's rounding step.
        for (dtype, tol) in [
            (GgmlDType::Q4_0, 0.15),
            (GgmlDType::Q4_1, 0.15),
            (GgmlDType::Q5_0, 0.08),
            (GgmlDType::Q5_1, 0.08),
            (GgmlDType::Q8_0, 0.01),
            (GgmlDType::Q4K, 0.15),
            (GgmlDType::Q5K, 0.08),
            (GgmlDType::Q6K, 0.04),
            (GgmlDType::BF16, 0.005),
            (GgmlDType::F16, 0.001),
        ] {
            let src = randn(8, 256, 3);
            let w = Weight::quantize(&src, dtype).unwrap();
            let back = w.to_dense(DType::F32).unwrap();
            let err = (back - &src)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err <= tol, "{dtype:?}: max error {err}");
            assert!(w.bytes() < 8 * 256 * 4, "{dtype:?} is not smaller than f32");
        }
    }

    #[test]
    fn permuted_rows_move_whole_blocks() {
        let src = randn(6, 64, 5);
        let perm = [3, 0, 5, 1, 4, 2];
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::F16,
            GgmlDType::F32,
        ] {
            let w = Weight::quantize(&src, dtype).unwrap();
            let p = w.permute_rows(&perm).unwrap();
            let a = w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let b = p.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            for (i, &s) in perm.iter().enumerate() {
                assert_eq!(b[i], a[s], "{dtype:?} row {i}");
            }
        }
        let w = Weight::quantize(&src, GgmlDType::Q8_0).unwrap();
        assert!(w.permute_rows(&[0, 1]).is_err());
    }

    #[test]
    fn embedding_rows_equal_dequantized_table_rows() {
        let table = randn(10, 64, 9);
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::BF16,
            GgmlDType::F32,
        ] {
            let w = Weight::quantize(&table, dtype).unwrap();
            let ids = Tensor::new(&[[7u32, 2, 7]], &Device::Cpu).unwrap();
            let got = w.embedding(&ids).unwrap();
            assert_eq!(got.dims(), [1, 3, 64]);
            let full = w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let got = got.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got[0], full[7]);
            assert_eq!(got[1], full[2]);
        }
    }

    #[test]
    fn input_gradient_matches_dense_path_on_dequantized_weight() {
        // QLoRA's backward: dX through the quantized weight equals the f32 path run on the
        // dequantized weight (same matrix; only the forward's 8-bit activations differ).
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q6K, GgmlDType::BF16] {
            let w = Weight::quantize(&randn(24, 256, 1), dtype).unwrap();
            let dense = w.to_dense(DType::F32).unwrap();
            let x = candle_core::Var::from_tensor(&randn(5, 256, 2)).unwrap();
            let g = randn(5, 24, 4);
            let y = linear(x.as_tensor(), &w, None).unwrap();
            let gq = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let y = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
            let gd = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (gq.get(&x).unwrap(), gd.get(&x).unwrap());
            let err = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-4, "{dtype:?}: {err}");
        }
    }
}
