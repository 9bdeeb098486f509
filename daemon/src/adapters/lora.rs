//! LoRA: `y = W·x + s · B·A·dropout(x)` on chosen projections, with `s = alpha / r`
//! (`alpha / √r` with rsLoRA). A starts Kaiming-uniform, B at zero, as in PEFT, so a fresh adapter
//! leaves the model unchanged.
use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Result, Tensor};

use serde_json::{json, Value};

use super::peft::{get_usize, PeftError};
use super::{rng, seeded_uniform, AdapterMethod};
use crate::model::layers::{ForwardHooks, LowRank, Proj};
use crate::model::ModelConfig;
use crate::ops;
use crate::ops::lora_rows::{DecodeElem, PackedPair, RowTerm};

/// The config (the API's `{"type": "lora"}` object) is defined once, with the API types.
pub use itamae_client::methods::LoraConfig;

/// `target_modules` as users and PEFT write them: `all-linear`, or module names.
pub fn parse_targets(names: &[String]) -> std::result::Result<Vec<Proj>, String> {
    if names.len() == 1 && names[0] == "all-linear" {
        return Ok(Proj::ALL.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        // Fused projections (`qkv_proj`) are named only by the architectures that have them;
        // the error lists the usual names.
        let p = Proj::ALL
            .into_iter()
            .chain([Proj::Qkv, Proj::GateUp])
            .find(|p| p.hf_name() == n)
            .ok_or_else(|| {
                format!(
                    "unknown target module `{n}` (expected all-linear or some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                )
            })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err("target_modules must not be empty".into());
    }
    Ok(out)
}

/// [`parse_targets`] as the check a config's validation takes.
pub fn check_targets(names: &[String]) -> std::result::Result<(), String> {
    parse_targets(names).map(|_| ())
}

/// `names` of `targets` as PEFT writes them.
fn target_names(targets: &[Proj]) -> Vec<String> {
    targets.iter().map(|p| p.hf_name().to_string()).collect()
}

/// The A and B matrices of one projection.
#[derive(Clone)]
pub struct LoraPair {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
}

pub struct Lora {
    pub config: LoraConfig,
    /// Keyed by (layer, projection).
    pub pairs: BTreeMap<(usize, Proj), LoraPair>,
    /// Dropout is applied only while training.
    pub training: bool,
    /// Seed of the current micro-batch's dropout masks: set by the trainer per micro-batch so
    /// that a resumed run draws the same masks as an uninterrupted one.
    pub dropout_seed: std::sync::atomic::AtomicU64,
    /// The factors packed for decode batches ([`Self::pack_for_decode`]); None until a served
    /// copy is packed. A snapshot: never set on an adapter that still trains.
    pub decode: Option<BTreeMap<(usize, Proj), PackedPair<DecodeElem>>>,
}

/// PEFT's tensor name prefix for a projection of a layer.
pub fn peft_prefix(layer: usize, proj: Proj) -> String {
    format!("base_model.model.model.layers.{layer}.{}", proj.hf_path())
}

impl Lora {
    /// A fresh adapter: A Kaiming-uniform (PEFT's `kaiming_uniform_(a=√5)`, bound `1/√in`),
    /// B zero.
    /// `config.target_modules` comes back resolved (`all-linear` spelled out).
    pub fn init(
        model: &ModelConfig,
        config: LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let wanted = parse_targets(config.target_modules()).map_err(candle_core::Error::msg)?;
        let targets = model.arch.family().targets(&wanted);
        if targets.is_empty() {
            candle_core::bail!("none of the target modules is a projection of this model");
        }
        let config = LoraConfig {
            target_modules: Some(target_names(&targets)),
            ..config.with_defaults()
        };
        let rank = config.r();
        let mut r = rng(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &proj in &targets {
                let (i, o) = proj.dims(model);
                let bound = 1.0 / (i as f32).sqrt();
                let a =
                    Tensor::from_vec(seeded_uniform(rank * i, bound, &mut r), (rank, i), device)?;
                let b = Tensor::zeros((o, rank), candle_core::DType::F32, device)?;
                pairs.insert((layer, proj), LoraPair { a, b });
            }
        }
        Ok(Self {
            config,
            pairs,
            training: false,
            dropout_seed: Default::default(),
            decode: None,
        })
    }

    /// The dropout mask of projection `proj` of `layer` for an input of `shape`, while training
    /// with dropout: seeded per micro-batch, layer and projection, so a resumed run draws the
    /// same masks.
    fn dropout_mask(
        &self,
        layer: usize,
        proj: Proj,
        shape: &candle_core::Shape,
    ) -> Result<Option<Tensor>> {
        use rand::{Rng, SeedableRng};
        if !(self.training && self.config.dropout() > 0.0) {
            return Ok(None);
        }
        let p = self.config.dropout();
        let seed = self.dropout_seed.load(std::sync::atomic::Ordering::Relaxed)
            ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..shape.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        let device = self
            .pairs
            .values()
            .next()
            .map_or(Device::Cpu, |p| p.a.device().clone());
        Tensor::from_vec(mask, shape, &device)?
            .to_dtype(self.dtype()?)
            .map(Some)
    }

    fn dtype(&self) -> Result<candle_core::DType> {
        Ok(self
            .pairs
            .values()
            .next()
            .map_or(candle_core::DType::F32, |p| p.a.dtype()))
    }

    /// The factors of projection `proj` of `layer` (with this micro-batch's dropout mask for
    /// an input of shape `input`), if the adapter targets it.
    pub fn low_rank(
        &self,
        layer: usize,
        proj: Proj,
        input: &candle_core::Shape,
    ) -> Result<Option<LowRank>> {
        let Some(p) = self.pairs.get(&(layer, proj)) else {
            return Ok(None);
        };
        Ok(Some(LowRank {
            a: p.a.clone(),
            b: p.b.clone(),
            scale: self.config.scale(),
            dropout_mask: self.dropout_mask(layer, proj, input)?,
        }))
    }

    /// Packs every pair for decode batches (CPU only; elsewhere the tensors serve as they are).
    pub fn pack_for_decode(&mut self) -> Result<()> {
        if self.pairs.values().any(|p| !p.a.device().is_cpu()) {
            return Ok(());
        }
        let packed = self
            .pairs
            .iter()
            .map(|(k, p)| Ok((*k, PackedPair::new(&p.a, &p.b)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.decode = Some(packed);
        Ok(())
    }

    /// Bytes of the packed copy (0 when not packed).
    pub fn decode_bytes(&self) -> usize {
        self.decode
            .as_ref()
            .map_or(0, |d| d.values().map(PackedPair::bytes).sum())
    }

    /// The packed factors of projection `proj` of `layer`, if packed and targeted.
    pub fn decode_term(&self, layer: usize, proj: Proj) -> Option<RowTerm<'_, DecodeElem>> {
        let pair = self.decode.as_ref()?.get(&(layer, proj))?;
        Some(RowTerm {
            pair,
            scale: self.config.scale() as f32,
        })
    }

    pub fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(lr) = self.low_rank(layer, proj, x.shape())? else {
            return Ok(None);
        };
        let x = match &lr.dropout_mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let h = ops::linear(&x, &lr.a, None)?;
        let y = ops::linear(&h, &lr.b, None)?;
        Ok(Some((y * lr.scale)?))
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (&(layer, proj), p) in &self.pairs {
            let pre = peft_prefix(layer, proj);
            out.push((format!("{pre}.lora_A.weight"), p.a.clone()));
            out.push((format!("{pre}.lora_B.weight"), p.b.clone()));
        }
        out
    }

    /// Rebuilds from PEFT-named tensors; the pairs present decide the targets.
    pub fn from_tensors(
        model: &ModelConfig,
        mut config: LoraConfig,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<Self, String> {
        let rank = config.r();
        let mut pairs = BTreeMap::new();
        let mut targets = Vec::new();
        for layer in 0..model.num_layers {
            for &proj in model.arch.family().projections() {
                let pre = peft_prefix(layer, proj);
                let a = tensors.get(&format!("{pre}.lora_A.weight"));
                let b = tensors.get(&format!("{pre}.lora_B.weight"));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let (i, o) = proj.dims(model);
                        if a.dims() != [rank, i] || b.dims() != [o, rank] {
                            return Err(format!(
                                "{pre}: lora_A {:?} / lora_B {:?} do not match r={} and the base model ({o}x{i})",
                                a.dims(),
                                b.dims(),
                                rank
                            ));
                        }
                        let a = a
                            .to_dtype(candle_core::DType::F32)
                            .map_err(|e| e.to_string())?;
                        let b = b
                            .to_dtype(candle_core::DType::F32)
                            .map_err(|e| e.to_string())?;
                        pairs.insert((layer, proj), LoraPair { a, b });
                        if !targets.contains(&proj) {
                            targets.push(proj);
                        }
                    }
                    (None, None) => {}
                    _ => return Err(format!("{pre}: lora_A and lora_B must both be present")),
                }
            }
        }
        if pairs.is_empty() {
            return Err("the adapter holds no LoRA tensor for this model's layers".into());
        }
        let known: usize = tensors.keys().filter(|k| k.contains(".lora_")).count();
        if known != 2 * pairs.len() {
            return Err(
                "the adapter holds LoRA tensors for modules this model does not have".into(),
            );
        }
        config.target_modules = Some(target_names(&targets));
        Ok(Self {
            config,
            pairs,
            training: false,
            dropout_seed: Default::default(),
            decode: None,
        })
    }
}

impl ForwardHooks for Lora {
    fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        self.delta(layer, proj, x)
    }

    fn low_rank(
        &self,
        layer: usize,
        proj: Proj,
        input: &candle_core::Shape,
    ) -> Result<Option<LowRank>> {
        Lora::low_rank(self, layer, proj, input)
    }

    fn only_low_rank(&self) -> bool {
        true
    }

    fn has_decode_terms(&self) -> bool {
        self.decode.is_some()
    }

    fn decode_term(&self, layer: usize, proj: Proj) -> Option<RowTerm<'_, DecodeElem>> {
        Lora::decode_term(self, layer, proj)
    }
}

impl AdapterMethod for Lora {
    type Config = LoraConfig;
    const NAME: &'static str = itamae_client::methods::lora::NAME;
    const PEFT_TYPE: &'static str = "LORA";
    const DEFAULT_LEARNING_RATE: f64 = 2e-4;

    fn config(&self) -> &LoraConfig {
        &self.config
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        Lora::tensors(self)
    }

    fn peft_config(&self, _model: &ModelConfig, _base_name: &str) -> Value {
        let c = &self.config;
        let targets = parse_targets(c.target_modules())
            .map(|t| target_names(&t))
            .unwrap_or_else(|_| c.target_modules().to_vec());
        json!({
            "peft_type": Self::PEFT_TYPE,
            "r": c.r(),
            "lora_alpha": c.alpha(),
            "lora_dropout": c.dropout(),
            "target_modules": targets,
            "bias": "none",
            "use_rslora": c.use_rslora(),
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    fn from_peft(
        c: &Value,
        tensors: &HashMap<String, Tensor>,
        model: &ModelConfig,
    ) -> std::result::Result<Self, PeftError> {
        let r = get_usize(c, "r")?;
        if r == 0 {
            return Err(PeftError::Config("`r` must be positive".into()));
        }
        let alpha = c.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        if c.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(PeftError::Config("DoRA adapters are not supported".into()));
        }
        if c.get("bias")
            .and_then(Value::as_str)
            .is_some_and(|b| b != "none")
        {
            return Err(PeftError::Config(
                "LoRA bias training is not supported (bias must be \"none\")".into(),
            ));
        }
        for key in ["alpha_pattern", "rank_pattern"] {
            if c.get(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(PeftError::Config(format!(
                    "per-module `{key}` is not supported (one r and lora_alpha for every module)"
                )));
            }
        }
        if let Some(name) = tensors
            .keys()
            .find(|k| !k.contains(".lora_A.") && !k.contains(".lora_B."))
        {
            return Err(PeftError::Config(format!(
                "tensor `{name}` is not a LoRA A/B matrix (modules_to_save and trained biases are not supported)"
            )));
        }
        if c.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return Err(PeftError::Config(
                "fan_in_fan_out is not supported for Llama-family models".into(),
            ));
        }
        let config = LoraConfig {
            r: Some(r),
            alpha: Some(alpha),
            dropout: Some(c.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32),
            target_modules: None,
            use_rslora: Some(
                c.get("use_rslora")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
        };
        Lora::from_tensors(model, config, tensors).map_err(PeftError::Mismatch)
    }

    fn detached(&self, _model: &ModelConfig) -> Result<Self> {
        Ok(Lora {
            config: self.config.clone(),
            pairs: self
                .pairs
                .iter()
                .map(|(k, p)| {
                    (
                        *k,
                        LoraPair {
                            a: p.a.detach(),
                            b: p.b.detach(),
                        },
                    )
                })
                .collect(),
            training: false,
            dropout_seed: Default::default(),
            decode: None,
        })
    }

    fn extra_bytes(&self) -> usize {
        self.decode_bytes()
    }

    fn prepare_for_serving(&mut self) -> Result<()> {
        self.pack_for_decode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::layers::{Ctx, ForwardHooks};
    use crate::model::llama::tests::tiny_config;
    use crate::model::Transformer;

    use crate::ops::gradcheck::max_diff;

    struct Only<'a>(&'a Lora);
    impl ForwardHooks for Only<'_> {
        fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
            self.0.delta(layer, proj, x)
        }
    }

    /// The adapter as the trainer sees it: purely low-rank, so training runs fused blocks.
    struct Fused<'a>(&'a Lora);
    impl ForwardHooks for Fused<'_> {
        fn low_rank(
            &self,
            layer: usize,
            proj: Proj,
            input: &candle_core::Shape,
        ) -> Result<Option<LowRank>> {
            self.0.low_rank(layer, proj, input)
        }
        fn only_low_rank(&self) -> bool {
            true
        }
    }

    #[test]
    fn fused_training_blocks_match_the_per_op_forward_and_gradients() {
        use crate::model::layers::Packed;
        use crate::ops::decoder::FUSED_RUNS;
        use candle_core::Var;
        use std::sync::atomic::Ordering::Relaxed;
        let dev = &Device::Cpu;
        for arch in [Arch::Llama, Arch::Qwen2] {
            for dropout in [0.0, 0.3] {
                for packed in [false, true] {
                    let cfg = tiny_config(arch);
                    let m = Transformer::random(cfg.clone(), dev).unwrap();
                    let config = LoraConfig {
                        r: Some(4),
                        dropout: Some(dropout),
                        ..Default::default()
                    };
                    let mut lora = Lora::init(&cfg, config, 3, dev).unwrap();
                    let mut vars = Vec::new();
                    for p in lora.pairs.values_mut() {
                        let b = Tensor::randn(0f32, 0.2, p.b.shape(), dev).unwrap();
                        let (va, vb) = (
                            Var::from_tensor(&p.a).unwrap(),
                            Var::from_tensor(&b).unwrap(),
                        );
                        p.a = va.as_tensor().clone();
                        p.b = vb.as_tensor().clone();
                        vars.push(va);
                        vars.push(vb);
                    }
                    lora.training = true;
                    lora.dropout_seed.store(7, Relaxed);
                    let ids =
                        Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]], dev).unwrap();
                    let x = Var::from_tensor(&m.embed(&ids).unwrap()).unwrap();
                    vars.push(x.clone());
                    let pk =
                        Packed::from_segments(&[vec![0, 0, 0, 1, 1, 1], vec![0; 6]], dev).unwrap();
                    let r = Tensor::randn(0f32, 1.0, (2, 6, cfg.hidden_size), dev).unwrap();
                    let run = |hooks: Option<&dyn ForwardHooks>| {
                        let ctx = Ctx {
                            hooks,
                            packed: packed.then_some(&pk),
                            ..Default::default()
                        };
                        let h = m.forward_hidden(x.as_tensor(), ctx).unwrap();
                        let g = (&h * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        let gs: Vec<Option<Tensor>> =
                            vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
                        (h, gs)
                    };
                    // with the adapter, and without one (prompt tuning: only the input trains)
                    let no_pairs = Lora {
                        pairs: BTreeMap::new(),
                        ..Lora::init(&cfg, LoraConfig::default(), 0, dev).unwrap()
                    };
                    let (with_ref, with_fused) = (Only(&lora), Fused(&lora));
                    let plain = Only(&no_pairs);
                    let cases: [(&dyn ForwardHooks, Option<&dyn ForwardHooks>); 2] =
                        [(&with_ref, Some(&with_fused)), (&plain, None)];
                    for (reference, fused) in cases {
                        let before = FUSED_RUNS.with(|c| c.get());
                        let (h_ref, g_ref) = run(Some(reference));
                        let after_ref = FUSED_RUNS.with(|c| c.get());
                        assert_eq!(after_ref, before, "reference must not fuse");
                        let (h, g) = run(fused);
                        let fused_ran = FUSED_RUNS.with(|c| c.get()) > after_ref;
                        assert!(fused_ran, "fused path not taken");
                        let what = format!(
                            "{arch:?} dropout {dropout} packed {packed} adapter {}",
                            fused.is_some()
                        );
                        assert!(max_diff(&h, &h_ref) < 1e-4, "{what}: hidden differs");
                        for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
                            let (Some(a), Some(b)) = (a, b) else {
                                // without an adapter only the input has a gradient
                                let none = fused.is_none() && a.is_none() && b.is_none();
                                assert!(none, "{what}: gradient {i} missing");
                                continue;
                            };
                            // f32 sums in another order: relative to the gradient's size
                            let size = b.abs().unwrap().max_all().unwrap();
                            let size = size.to_scalar::<f32>().unwrap();
                            let d = max_diff(a, b) as f32;
                            assert!(
                                d < 3e-4 * (1.0 + size),
                                "{what}: gradient {i} differs by {d} (size {size})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fresh_adapter_is_identity_and_trained_one_is_not() {
        let cfg = tiny_config(Arch::Llama);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).unwrap();
        let mut lora = Lora::init(&cfg, LoraConfig::default(), 1, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let run = |l: &Lora| {
            let h = m
                .forward_hidden(
                    &m.embed(&ids).unwrap(),
                    Ctx {
                        hooks: Some(&Only(l)),
                        ..Default::default()
                    },
                )
                .unwrap();
            m.logits(&h).unwrap()
        };
        let base = m.forward(&ids, None).unwrap();
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(d(&run(&lora), &base) < 1e-6);
        for p in lora.pairs.values_mut() {
            p.b = Tensor::randn(0f32, 0.1, p.b.dims(), &Device::Cpu).unwrap();
        }
        assert!(d(&run(&lora), &base) > 1e-3);
    }

    #[test]
    fn delta_matches_formula() {
        let cfg = tiny_config(Arch::Llama);
        let config = LoraConfig {
            r: Some(4),
            alpha: Some(8.0),
            dropout: Some(0.0),
            target_modules: Some(vec!["v_proj".into()]),
            use_rslora: Some(true),
        };
        let mut lora = Lora::init(&cfg, config, 3, &Device::Cpu).unwrap();
        let p = lora.pairs.get_mut(&(1, Proj::V)).unwrap();
        p.b = Tensor::randn(0f32, 1., p.b.dims(), &Device::Cpu).unwrap();
        let (a, b) = (p.a.clone(), p.b.clone());
        let x = Tensor::randn(0f32, 1., (2, 3, 32), &Device::Cpu).unwrap();
        let got = lora.delta(1, Proj::V, &x).unwrap().unwrap();
        let want = (x
            .reshape((6, 32))
            .unwrap()
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * (8.0 / 2.0))
            .unwrap()
            .reshape((2, 3, 16))
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5);
        assert!(lora.delta(0, Proj::Q, &x).unwrap().is_none());
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_targets(&["all-linear".into()]).unwrap().len(), 7);
        assert_eq!(
            parse_targets(&["q_proj".into(), "v_proj".into()]).unwrap(),
            vec![Proj::Q, Proj::V]
        );
        assert!(parse_targets(&["lm_head".into()])
            .unwrap_err()
            .contains("lm_head"));
    }

    #[test]
    fn batched_decode_mixing_lora_variants_equals_solo() {
        use crate::adapters::Adapter;
        use crate::model::llama::tests::assert_batched_decode_matches_solo;
        let cfg = tiny_config(Arch::Llama);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).unwrap();
        let make = |seed: u64, r: usize| {
            let c = LoraConfig {
                r: Some(r),
                alpha: Some(8.0),
                ..Default::default()
            };
            let mut l = Lora::init(&cfg, c, seed, &Device::Cpu).unwrap();
            for p in l.pairs.values_mut() {
                p.b = Tensor::randn(0f32, 0.2, p.b.dims(), &Device::Cpu).unwrap();
            }
            Adapter::Lora(l)
        };
        let (a1, a2, a3) = (make(1, 4), make(2, 4), make(3, 2));
        let hooks: [Option<&dyn ForwardHooks>; 4] = [Some(&a1), None, Some(&a2), Some(&a3)];
        let prompts: [&[u32]; 4] = [&[3, 4], &[5, 6, 7], &[8], &[9, 10]];
        assert_batched_decode_matches_solo(&m, &hooks, &prompts, &[11, 12, 13, 14], 1e-4);

        // Served copies decode from their packed half-precision factors; the solo reference
        // still runs the f32 tensors, so they agree to f16's precision.
        let packed = |mut a: Adapter| {
            a.prepare_for_serving().unwrap();
            a
        };
        let (p1, p2, p3) = (packed(make(1, 4)), packed(make(2, 4)), packed(make(3, 2)));
        let Adapter::Lora(l) = &p1 else {
            unreachable!()
        };
        assert!(l.decode.is_some() && p1.size_bytes() > a1.size_bytes());
        let hooks: [Option<&dyn ForwardHooks>; 4] = [Some(&p1), None, Some(&p2), Some(&p3)];
        let before = crate::ops::lora_rows::RUNS.with(|c| c.get());
        assert_batched_decode_matches_solo(&m, &hooks, &prompts, &[11, 12, 13, 14], 2e-2);
        let runs = crate::ops::lora_rows::RUNS.with(|c| c.get()) - before;
        let projections = cfg.num_layers * Proj::ALL.len();
        assert_eq!(runs, projections, "the packed path ran once per projection");

        // A packed prefill of prompts on different variants: each prompt's last logits as
        // alone (f32 tensors) to f16's precision, through the packed path.
        let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let solo: Vec<Tensor> = prompts
            .iter()
            .zip(hooks)
            .map(|(p, hooks)| {
                let mut cache = crate::model::KvCache::new(&cfg, 16);
                let ctx = Ctx {
                    cache: Some(&mut cache),
                    hooks,
                    packed: None,
                };
                m.last_logits(&m.embed(&ids(p)).unwrap(), ctx).unwrap()
            })
            .collect();
        let xs: Vec<Tensor> = prompts.iter().map(|p| m.embed(&ids(p)).unwrap()).collect();
        let mut caches: Vec<_> = (0..4)
            .map(|_| crate::model::KvCache::new(&cfg, 16))
            .collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let before = crate::ops::lora_rows::RUNS.with(|c| c.get());
        let batched = m.prefill_batch(&xs, &mut refs, &hooks).unwrap();
        let runs = crate::ops::lora_rows::RUNS.with(|c| c.get()) - before;
        assert_eq!(runs, projections, "the packed path ran once per projection");
        let d = max_diff(&Tensor::cat(&solo, 0).unwrap(), &batched);
        assert!(d < 2e-2, "packed prefill vs solo: {d}");
    }
}
