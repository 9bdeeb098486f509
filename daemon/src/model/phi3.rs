//! Phi-3: the Llama block with q/k/v fused into one `qkv_proj` (rows: q, then k, then v) and
//! gate/up fused into one `gate_up_proj` (gate rows first); RMSNorm, SwiGLU, rotate-half RoPE,
//! no biases, `model_type: "phi3"`. Loads from HF directories; GGUF files (llama.cpp's `phi3`
//! arch, with long-context rope factors as extra tensors) are not supported.
//!
//! Its fused projections are its adapter targets (`qkv_proj`, `o_proj`, `gate_up_proj`,
//! `down_proj`), so its blocks cannot run as the fused training op, whose LoRA slots are the
//! seven separate projections: they train through the composed per-op path.
use candle_core::{Result, Tensor};

use super::arch::{Architecture, ProjectFn};
use super::config::ModelConfig;
use super::layers::{fused_qkv, fused_swiglu, Proj};

pub struct Phi3;

impl Architecture for Phi3 {
    fn hf_class(&self) -> &'static str {
        "Phi3ForCausalLM"
    }

    fn projections(&self) -> &'static [Proj] {
        &[Proj::Qkv, Proj::O, Proj::GateUp, Proj::Down]
    }

    fn gguf_module(&self, _module: &str) -> Option<&'static str> {
        None
    }

    fn loads_gguf(&self) -> bool {
        false
    }

    fn attention_inputs(
        &self,
        cfg: &ModelConfig,
        h: &Tensor,
        project: &ProjectFn<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        fused_qkv(cfg, h, project)
    }

    fn row_decode(&self) -> bool {
        true
    }

    fn mlp(&self, cfg: &ModelConfig, h: &Tensor, project: &ProjectFn<'_>) -> Result<Tensor> {
        fused_swiglu(cfg, h, project)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Shape, Var};

    use super::*;
    use crate::model::arch::Arch;
    use crate::model::layers::{Ctx, ForwardHooks, KvCache, LowRank};
    use crate::model::llama::tests::{max_abs, tiny_config};
    use crate::model::Transformer;

    /// A Llama model and the Phi-3 model whose fused weights are its q/k/v and gate/up weights
    /// concatenated (the rest shared).
    fn twins() -> (Transformer, Transformer) {
        let dev = &Device::Cpu;
        let llama = Transformer::random(tiny_config(Arch::Llama), dev).unwrap();
        let mut w: HashMap<String, Tensor> = llama.named_weights().unwrap().into_iter().collect();
        for i in 0..llama.cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut fuse = |parts: &[&str], into: &str| {
                let ts: Vec<Tensor> = parts
                    .iter()
                    .map(|n| w.remove(&format!("{p}.{n}.weight")).unwrap())
                    .collect();
                let fused = Tensor::cat(&ts, 0).unwrap();
                w.insert(format!("{p}.{into}.weight"), fused);
            };
            fuse(
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "self_attn.qkv_proj",
            );
            fuse(&["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj");
        }
        let cfg = ModelConfig {
            arch: Arch::Phi3,
            ..llama.cfg.clone()
        };
        let phi = Transformer::from_weights(cfg, w, dev).unwrap();
        (llama, phi)
    }

    fn ids(t: &[u32]) -> Tensor {
        Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
    }

    #[test]
    fn fused_projections_give_the_llama_logits_when_serving_and_decoding() {
        let (llama, phi) = twins();
        let toks = [3u32, 14, 15, 9, 26, 5, 35, 8];
        let want = llama.forward(&ids(&toks), None).unwrap();
        let got = phi.forward(&ids(&toks), None).unwrap();
        // One fused GEMM and three separate ones sum in different orders, and the BLAS blocking
        // depends on the threads free at that moment: 1e-5 was exceeded (1.1e-5) under load.
        assert!(max_abs(&want, &got) < 5e-5, "{}", max_abs(&want, &got));
        // cached decode: prefill, then one token at a time
        let mut cache = KvCache::new(&phi.cfg, 4);
        let mut outs = Vec::new();
        for chunk in [&toks[0..4], &toks[4..5], &toks[5..6], &toks[6..8]] {
            outs.push(phi.forward(&ids(chunk), Some(&mut cache)).unwrap());
        }
        let inc = Tensor::cat(&outs, 1).unwrap();
        assert!(max_abs(&want, &inc) < 5e-5, "{}", max_abs(&want, &inc));
        // a batched decode step over two sequences agrees with the Llama model's
        let step = |m: &Transformer| {
            let mut caches: Vec<KvCache> = [&toks[0..3], &toks[3..8]]
                .iter()
                .map(|p| {
                    let mut c = KvCache::new(&m.cfg, 8);
                    m.forward(&ids(p), Some(&mut c)).unwrap();
                    c
                })
                .collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            m.decode_batch(&[7, 11], &mut refs, &[None, None]).unwrap()
        };
        assert!(max_abs(&step(&llama), &step(&phi)) < 5e-5);
    }

    #[test]
    fn training_forward_matches_the_fused_llama_block_with_gradients() {
        // The Llama twin trains through the fused block op, Phi-3 through the composed path:
        // same loss, same gradient to the input.
        let (llama, phi) = twins();
        let x = Var::from_tensor(&llama.embed(&ids(&[4, 8, 15, 16, 23, 42])).unwrap()).unwrap();
        let run = |m: &Transformer| {
            let h = m.forward_hidden(x.as_tensor(), Ctx::default()).unwrap();
            let logits = m.logits(&h).unwrap();
            let loss = logits.sqr().unwrap().mean_all().unwrap();
            let g = loss.backward().unwrap();
            (logits, g.get(x.as_tensor()).unwrap().clone())
        };
        let (la, ga) = run(&llama);
        let (lb, gb) = run(&phi);
        assert!(max_abs(&la, &lb) < 1e-5, "logits {}", max_abs(&la, &lb));
        assert!(
            max_abs(&ga, &gb) < 1e-5,
            "input gradient {}",
            max_abs(&ga, &gb)
        );
    }

    /// A LoRA with one shared `A` on q, k and v: on Phi-3 one term on `qkv_proj` with `B` the
    /// three `B`s stacked, on Llama three terms with `B`'s row blocks.
    struct SharedA {
        a: Var,
        b: Var,
        fused: bool,
        rows: [(usize, usize); 3],
    }

    impl ForwardHooks for SharedA {
        fn low_rank(&self, _layer: usize, proj: Proj, _input: &Shape) -> Result<Option<LowRank>> {
            let b = match (self.fused, proj) {
                (true, Proj::Qkv) => self.b.as_tensor().clone(),
                (false, Proj::Q) => self.b.narrow(0, self.rows[0].0, self.rows[0].1)?,
                (false, Proj::K) => self.b.narrow(0, self.rows[1].0, self.rows[1].1)?,
                (false, Proj::V) => self.b.narrow(0, self.rows[2].0, self.rows[2].1)?,
                _ => return Ok(None),
            };
            Ok(Some(LowRank {
                a: self.a.as_tensor().clone(),
                b,
                scale: 0.5,
                dropout_mask: None,
            }))
        }
        fn only_low_rank(&self) -> bool {
            true
        }
    }

    #[test]
    fn lora_on_qkv_proj_trains_like_lora_on_q_k_v() {
        let (llama, phi) = twins();
        let c = &phi.cfg;
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.kv_dim());
        assert_eq!(Proj::Qkv.dims(c), (h, q + 2 * kv));
        let dev = &Device::Cpu;
        let a = Tensor::randn(0f32, 0.3, (4, h), dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, (q + 2 * kv, 4), dev).unwrap();
        let toks = ids(&[5, 6, 7, 9, 10, 11, 12]);
        let run = |m: &Transformer, fused: bool| {
            let hooks = SharedA {
                a: Var::from_tensor(&a).unwrap(),
                b: Var::from_tensor(&b).unwrap(),
                fused,
                rows: [(0, q), (q, kv), (q + kv, kv)],
            };
            let ctx = Ctx {
                hooks: Some(&hooks),
                ..Default::default()
            };
            let hidden = m.forward_hidden(&m.embed(&toks).unwrap(), ctx).unwrap();
            let logits = m.logits(&hidden).unwrap();
            let g = logits
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .backward()
                .unwrap();
            let ga = g.get(hooks.a.as_tensor()).unwrap().clone();
            let gb = g.get(hooks.b.as_tensor()).unwrap().clone();
            (logits, ga, gb)
        };
        let (lp, gap, gbp) = run(&phi, true);
        let (ll, gal, gbl) = run(&llama, false);
        let norm = |t: &Tensor| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(
            norm(&gap) > 0.0 && norm(&gbp) > 0.0,
            "no gradient reached the factors"
        );
        // The fused qkv_proj and the split q/k/v products sum in different orders (different
        // GEMM shapes); on logits of magnitude ~1 that is a few f32 ulps, seen up to 1.1e-5.
        let tol = 5e-5;
        assert!(max_abs(&lp, &ll) < tol, "logits {}", max_abs(&lp, &ll));
        assert!(max_abs(&gap, &gal) < tol, "dA {}", max_abs(&gap, &gal));
        assert!(max_abs(&gbp, &gbl) < tol, "dB {}", max_abs(&gbp, &gbl));
        // and the adapter changes the model
        let base = phi.forward(&toks, None).unwrap();
        assert!(max_abs(&lp, &base) > 1e-3);
    }

    #[test]
    fn hf_config_and_tensor_names() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"phi3","architectures":["Phi3ForCausalLM"],"vocab_size":61,
            "hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"rope_scaling":null}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Arch::Phi3);
        assert!(!c.qkv_bias);
        assert_eq!(c.to_hf_json()["architectures"][0], "Phi3ForCausalLM");
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(format!("{c:?}"), format!("{back:?}"));
        let m = Transformer::random(c, &Device::Cpu).unwrap();
        let named: HashMap<String, Tensor> = m.named_weights().unwrap().into_iter().collect();
        assert_eq!(
            named["model.layers.1.self_attn.qkv_proj.weight"].dims(),
            [32 + 2 * 16, 32]
        );
        assert_eq!(
            named["model.layers.0.mlp.gate_up_proj.weight"].dims(),
            [96, 32]
        );
        assert!(!named.contains_key("model.layers.0.self_attn.q_proj.weight"));
        // what an HF directory holds loads back (shapes checked against the projections)
        let again = m.with_weights(named.clone()).unwrap();
        let t = ids(&[1, 2, 3]);
        assert_eq!(
            max_abs(
                &m.forward(&t, None).unwrap(),
                &again.forward(&t, None).unwrap()
            ),
            0.0
        );
        let mut wrong = named;
        let w = wrong
            .remove("model.layers.0.mlp.gate_up_proj.weight")
            .unwrap();
        wrong.insert(
            "model.layers.0.mlp.gate_up_proj.weight".into(),
            w.narrow(0, 0, 48).unwrap(),
        );
        let e = m.with_weights(wrong).err().unwrap().to_string();
        assert!(e.contains("gate_up_proj") && e.contains("[96, 32]"), "{e}");
    }
}
