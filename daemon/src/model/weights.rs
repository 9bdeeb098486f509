//! The precision the base model's weights are held in, chosen once at load ([`WeightsMode`]):
//! as stored in the file, or converted. Norms and biases always stay f32 (they are tiny and
//! every kernel reads them as f32); the weight matrices — projections, embeddings, LM head —
//! become [`Weight`]s.
//!
//! The device and this mode are both start-up values: a CUDA build would ask for `bf16`; the
//! CPU build defaults to `auto` (a GGUF's blocks stay resident: a fraction of the memory, and
//! faster decode, docs/ops.md). Full fine-tuning needs `f32`.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

pub use crate::ops::quant::Weight;

/// How the base model's weight matrices are held in memory (`model.weights`, `--weights`,
/// `ITAMAE_WEIGHTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsMode {
    /// As stored: GGUF blocks stay quantized, safetensors keep bf16/f16/f32.
    #[default]
    Auto,
    /// Everything dequantized to f32 (what full fine-tuning needs).
    F32,
    Bf16,
    F16,
    /// GGUF's 8-bit blocks of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGUF's 4-bit K-quant super-blocks of 256 (rows that are not a multiple of 256 fall back
    /// to `q8_0`).
    #[serde(rename = "q4_k")]
    Q4K,
}

impl WeightsMode {
    pub const ALL: [WeightsMode; 6] = [
        WeightsMode::Auto,
        WeightsMode::F32,
        WeightsMode::Bf16,
        WeightsMode::F16,
        WeightsMode::Q8_0,
        WeightsMode::Q4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightsMode::Auto => "auto",
            WeightsMode::F32 => "f32",
            WeightsMode::Bf16 => "bf16",
            WeightsMode::F16 => "f16",
            WeightsMode::Q8_0 => "q8_0",
            WeightsMode::Q4K => "q4_k",
        }
    }

    /// Whether every weight is full-precision f32 (trainable in place, exportable as is).
    pub fn is_f32(self) -> bool {
        self == WeightsMode::F32
    }

    /// The block type a conversion targets (None: keep as stored).
    fn target(self) -> Option<GgmlDType> {
        match self {
            WeightsMode::Auto => None,
            WeightsMode::F32 => Some(GgmlDType::F32),
            WeightsMode::Bf16 => Some(GgmlDType::BF16),
            WeightsMode::F16 => Some(GgmlDType::F16),
            WeightsMode::Q8_0 => Some(GgmlDType::Q8_0),
            WeightsMode::Q4K => Some(GgmlDType::Q4K),
        }
    }

    /// A dense tensor read from a file (safetensors, or a GGUF f32 tensor) as this mode holds
    /// it. Vectors (norms, biases) stay f32; `auto` keeps f16/bf16 matrices half.
    pub fn convert_dense(self, t: Tensor) -> candle_core::Result<Weight> {
        if t.rank() != 2 {
            return Ok(Weight::Dense(t.to_dtype(DType::F32)?));
        }
        let target = match (self.target(), t.dtype()) {
            (Some(target), _) => target,
            (None, DType::BF16) => GgmlDType::BF16,
            (None, DType::F16) => GgmlDType::F16,
            (None, _) => GgmlDType::F32,
        };
        quantize_or_fall_back(&t, target)
    }

    /// A GGUF tensor as this mode holds it: `auto` keeps its blocks (f32 ones become a plain
    /// tensor), the others dequantize and convert. Vectors always become f32.
    pub fn convert_gguf(self, q: QTensor) -> candle_core::Result<Weight> {
        let keep =
            self == WeightsMode::Auto && q.shape().rank() == 2 && q.dtype() != GgmlDType::F32;
        if keep {
            return Ok(Weight::Quant(std::sync::Arc::new(q)));
        }
        let t = q.dequantize(&q.device())?.to_dtype(DType::F32)?;
        match self {
            WeightsMode::Auto => Ok(Weight::Dense(t)),
            _ => self.convert_dense(t),
        }
    }
}

/// `t` in `target`, or in the next type whose blocks fit its rows (`q4_k` → `q8_0` → f32).
fn quantize_or_fall_back(t: &Tensor, target: GgmlDType) -> candle_core::Result<Weight> {
    let cols = t.dim(1)?;
    let mut target = target;
    if cols % target.block_size() != 0 {
        target = GgmlDType::Q8_0;
    }
    if cols % target.block_size() != 0 {
        target = GgmlDType::F32;
    }
    Weight::quantize(&t.to_dtype(DType::F32)?, target)
}

impl std::fmt::Display for WeightsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        WeightsMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = WeightsMode::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown weights mode `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_parse_back() {
        for m in WeightsMode::ALL {
            assert_eq!(m.name().parse::<WeightsMode>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        assert!("q3_k".parse::<WeightsMode>().is_err());
        assert_eq!(WeightsMode::default(), WeightsMode::Auto);
    }

    #[test]
    fn conversions_keep_vectors_f32_and_fall_back_on_odd_rows() {
        let dev = &Device::Cpu;
        let v = Tensor::ones(64, DType::BF16, dev).unwrap();
        for m in WeightsMode::ALL {
            let w = m.convert_dense(v.clone()).unwrap();
            assert_eq!(w.type_name(), "f32");
        }
        let half = Tensor::ones((4, 64), DType::BF16, dev).unwrap();
        assert_eq!(
            WeightsMode::Auto
                .convert_dense(half.clone())
                .unwrap()
                .type_name(),
            "bf16"
        );
        assert_eq!(
            WeightsMode::F32
                .convert_dense(half.clone())
                .unwrap()
                .type_name(),
            "f32"
        );
        // 64 columns are not whole Q4_K super-blocks of 256: q8_0 instead.
        assert_eq!(
            WeightsMode::Q4K.convert_dense(half).unwrap().type_name(),
            "q8_0"
        );
        let wide = Tensor::ones((2, 256), DType::F32, dev).unwrap();
        assert_eq!(
            WeightsMode::Q4K
                .convert_dense(wide.clone())
                .unwrap()
                .type_name(),
            "q4_k"
        );
        let odd = Tensor::ones((2, 20), DType::F32, dev).unwrap();
        assert_eq!(
            WeightsMode::Q8_0.convert_dense(odd).unwrap().type_name(),
            "f32"
        );
        let q = QTensor::quantize(&wide, GgmlDType::Q4_1).unwrap();
        assert_eq!(
            WeightsMode::Auto.convert_gguf(q).unwrap().type_name(),
            "q4_1"
        );
    }
}
