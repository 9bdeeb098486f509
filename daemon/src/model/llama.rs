//! The Llama family: Llama/SmolLM, Mistral and Qwen2. Pre-norm blocks with separate q/k/v/o
//! projections, grouped-query attention, rotate-half RoPE, RMSNorm and a SwiGLU MLP with
//! separate gate and up projections; optional q/k/v biases (Qwen2) and a tied or separate LM
//! head. Its blocks can train as the fused whole-block op ([`crate::ops::decoder`]).
//!
//! What the three members differ in is data ([`LlamaFamily`]): the HF class, whether q/k/v
//! carry biases by default, and whether GGUF files store Q/K rows permuted by llama.cpp.
//!
//! A new family goes into its own file (see [`super::arch`], and `phi3.rs` for a worked
//! example), not here.
use candle_core::{Result, Tensor};

use super::arch::{Architecture, ProjectFn};
use super::config::ModelConfig;
use super::gguf::unpermute_qk_rows;
use super::layers::{separate_qkv, swiglu, Block, Proj};
use super::weights::Weight;
use crate::ops::decoder::LayerWeights;

/// One member of the Llama family.
pub struct LlamaFamily {
    hf_class: &'static str,
    qkv_bias: bool,
    /// llama.cpp stores this member's Q/K rows interleaved for its RoPE.
    permuted_qk: bool,
}

pub static LLAMA: LlamaFamily = LlamaFamily {
    hf_class: "LlamaForCausalLM",
    qkv_bias: false,
    permuted_qk: true,
};

pub static MISTRAL: LlamaFamily = LlamaFamily {
    hf_class: "MistralForCausalLM",
    qkv_bias: false,
    permuted_qk: false,
};

pub static QWEN2: LlamaFamily = LlamaFamily {
    hf_class: "Qwen2ForCausalLM",
    qkv_bias: true,
    permuted_qk: false,
};

impl Architecture for LlamaFamily {
    fn hf_class(&self) -> &'static str {
        self.hf_class
    }

    fn default_qkv_bias(&self) -> bool {
        self.qkv_bias
    }

    fn projections(&self) -> &'static [Proj] {
        &Proj::ALL
    }

    fn gguf_module(&self, module: &str) -> Option<&'static str> {
        Some(match module {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            _ => return None,
        })
    }

    fn fix_gguf_tensor(&self, gguf_name: &str, t: Weight, cfg: &ModelConfig) -> Result<Weight> {
        if self.permuted_qk && gguf_name.ends_with("attn_q.weight") {
            unpermute_qk_rows(&t, cfg.num_heads)
        } else if self.permuted_qk && gguf_name.ends_with("attn_k.weight") {
            unpermute_qk_rows(&t, cfg.num_kv_heads)
        } else {
            Ok(t)
        }
    }

    fn attention_inputs(
        &self,
        _cfg: &ModelConfig,
        h: &Tensor,
        project: &ProjectFn<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        separate_qkv(h, project)
    }

    fn mlp(&self, _cfg: &ModelConfig, h: &Tensor, project: &ProjectFn<'_>) -> Result<Tensor> {
        swiglu(h, project)
    }

    fn row_decode(&self) -> bool {
        true
    }

    fn fused_block(&self, blk: &Block, cfg: &ModelConfig) -> Option<LayerWeights> {
        let lin = |p: Proj| blk.linear(p).ok();
        let [q, k, v, o, gate, up, down] = Proj::ALL.map(lin);
        let (q, k, v) = (q?, k?, v?);
        Some(LayerWeights {
            proj: [
                q.w.clone(),
                k.w.clone(),
                v.w.clone(),
                o?.w.clone(),
                gate?.w.clone(),
                up?.w.clone(),
                down?.w.clone(),
            ],
            bias: [q.b.clone(), k.b.clone(), v.b.clone()],
            norm1: blk.input_layernorm.clone(),
            norm2: blk.post_attention_layernorm.clone(),
            eps: cfg.rms_norm_eps,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::config::RopeScaling;
    use crate::model::layers::{Ctx, ForwardHooks, KvCache, Packed};
    use crate::model::Transformer;
    use candle_core::{DType, Device, D};

    pub fn tiny_config(arch: Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 61,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 64,
            tie_word_embeddings: arch != Arch::Qwen2,
            qkv_bias: arch == Arch::Qwen2,
        }
    }

    /// Max abs difference, as the f32 the tests compare against.
    pub(crate) fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        crate::ops::gradcheck::max_diff(a, b) as f32
    }

    #[test]
    fn shapes() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let t = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&t, None).unwrap().dims(), &[2, 5, 61]);
        assert_eq!(m.forward_last(&t, None).unwrap().dims(), &[2, 61]);
    }

    #[test]
    fn kv_cache_decode_equals_full_forward() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Transformer::random(tiny_config(arch), &Device::Cpu).unwrap();
            let ids = [3u32, 14, 15, 9, 26, 5, 35, 8, 9, 7];
            let full = m
                .forward(
                    &Tensor::new(&ids[..], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    None,
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            // prefill 4 tokens, then one at a time, then a chunk of 3
            let mut cache = KvCache::new(&m.cfg, 4);
            let mut outs = Vec::new();
            for chunk in [&ids[0..4], &ids[4..5], &ids[5..6], &ids[6..7], &ids[7..10]] {
                let t = Tensor::new(chunk, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                outs.push(m.forward(&t, Some(&mut cache)).unwrap().squeeze(0).unwrap());
            }
            assert_eq!(cache.len(), ids.len());
            let inc = Tensor::cat(&outs, 0).unwrap();
            let d = max_abs(&full, &inc);
            assert!(d < 1e-4, "{arch:?}: max abs diff {d}");
        }
    }

    #[test]
    fn positions_beyond_context_are_an_error() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let t = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
        assert!(m.forward(&t, None).is_err());
    }

    #[test]
    fn training_path_reaches_every_weight() {
        // The composed path must carry a gradient to every weight kind of the model.
        let cfg = tiny_config(Arch::Qwen2);
        let mut m = Transformer::random(cfg, &Device::Cpu).unwrap();
        let q_proj = m.layers[0].linear_mut(Proj::Q).unwrap();
        let var = candle_core::Var::from_tensor(q_proj.w.as_dense().unwrap()).unwrap();
        q_proj.w = var.as_tensor().clone().into();
        let nvar = candle_core::Var::from_tensor(&m.layers[1].input_layernorm).unwrap();
        m.layers[1].input_layernorm = nvar.as_tensor().clone();
        let t = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let loss = m
            .forward(&t, None)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        for v in [&var, &nvar] {
            let gv = g.get(v.as_tensor()).expect("gradient missing");
            let n = gv
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0);
        }
    }

    #[test]
    fn packed_rows_equal_separate_sequences() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let a = [5u32, 6, 7];
        let b = [9u32, 10, 11, 12];
        let solo = |ids: &[u32]| {
            m.forward(
                &Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
        };
        let packed_ids: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
        let packed = Packed::from_segments(&[vec![0, 0, 0, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let emb = m
            .embed(
                &Tensor::new(packed_ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let ctx = Ctx {
            packed: Some(&packed),
            ..Default::default()
        };
        let out = m
            .logits(&m.forward_hidden(&emb, ctx).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = Tensor::cat(&[solo(&a), solo(&b)], 0).unwrap();
        assert!(max_abs(&out, &want) < 1e-4);
    }

    struct TestHooks {
        k: Tensor,
        v: Tensor,
        delta_scale: f64,
    }

    impl ForwardHooks for TestHooks {
        fn linear_delta(&self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
            if layer == 1 && proj == Proj::Up {
                // a fixed rank-1 style delta: sum of inputs broadcast over outputs
                let s = (x.sum_keepdim(D::Minus1)? * self.delta_scale)?;
                Ok(Some(
                    s.broadcast_as((x.dim(0)?, x.dim(1)?, 48))?.contiguous()?,
                ))
            } else {
                Ok(None)
            }
        }
        fn prefix_len(&self) -> usize {
            self.k.dim(2).unwrap()
        }
        fn kv_prefix(&self, _layer: usize) -> Result<Option<(Tensor, Tensor)>> {
            Ok(Some((self.k.clone(), self.v.clone())))
        }
    }

    #[test]
    fn hooks_apply_identically_with_and_without_cache() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let hooks = TestHooks {
            k: Tensor::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap(),
            v: Tensor::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap(),
            delta_scale: 0.1,
        };
        let ids = [4u32, 8, 15, 16, 23, 42];
        let emb = m
            .embed(
                &Tensor::new(&ids[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let full = m
            .logits(
                &m.forward_hidden(
                    &emb,
                    Ctx {
                        hooks: Some(&hooks),
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let base = m
            .forward(
                &Tensor::new(&ids[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        assert!(
            max_abs(&full, &base.squeeze(0).unwrap()) > 1e-3,
            "hooks changed nothing"
        );
        let mut cache = KvCache::new(&m.cfg, 16);
        let mut outs = Vec::new();
        for (start, len) in [(0, 4), (4, 1), (5, 1)] {
            let x = emb.narrow(1, start, len).unwrap();
            let ctx = Ctx {
                cache: Some(&mut cache),
                hooks: Some(&hooks),
                packed: None,
            };
            outs.push(
                m.logits(&m.forward_hidden(&x, ctx).unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 3 + ids.len());
        let inc = Tensor::cat(&outs, 0).unwrap();
        assert!(max_abs(&full, &inc) < 1e-4);
    }

    /// Prefills each prompt alone (with its hooks), then checks that one batched decode step of
    /// `next` gives the logits each sequence gets when decoded alone, within `tol` (absolute).
    /// Returns the caches' lengths.
    pub(crate) fn assert_batched_decode_matches_solo(
        m: &Transformer,
        hooks: &[Option<&dyn ForwardHooks>],
        prompts: &[&[u32]],
        next: &[u32],
        tol: f32,
    ) -> Vec<usize> {
        let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let prefill = |i: usize| {
            let mut cache = KvCache::new(&m.cfg, 16);
            let x = m.embed(&ids(prompts[i])).unwrap();
            let ctx = Ctx {
                cache: Some(&mut cache),
                hooks: hooks[i],
                packed: None,
            };
            m.forward_hidden(&x, ctx).unwrap();
            cache
        };
        let solo: Vec<Tensor> = (0..prompts.len())
            .map(|i| {
                let mut cache = prefill(i);
                let x = m.embed(&ids(&next[i..=i])).unwrap();
                let ctx = Ctx {
                    cache: Some(&mut cache),
                    hooks: hooks[i],
                    packed: None,
                };
                m.last_logits(&x, ctx).unwrap()
            })
            .collect();
        let solo = Tensor::cat(&solo, 0).unwrap();
        let mut caches: Vec<KvCache> = (0..prompts.len()).map(prefill).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batched = m.decode_batch(next, &mut refs, hooks).unwrap();
        let d = max_abs(&solo, &batched);
        assert!(d < tol, "batched vs solo: max abs diff {d}");
        caches.iter().map(KvCache::len).collect()
    }

    #[test]
    fn batched_prefill_equals_one_prompt_at_a_time() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Transformer::random(tiny_config(arch), &Device::Cpu).unwrap();
            let delta = TestHooks {
                k: Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu).unwrap(),
                v: Tensor::zeros((1, 2, 0, 8), DType::F32, &Device::Cpu).unwrap(),
                delta_scale: 0.05,
            };
            let prompts: [&[u32]; 3] = [&[3, 4, 5, 6, 7], &[8], &[9, 10, 11]];
            let d = Some(&delta as &dyn ForwardHooks);
            for hooks in [[None, None, None], [d, d, d], [d, None, d], [None, d, None]] {
                let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let mut solo_caches = Vec::new();
                let mut solo = Vec::new();
                for (p, hooks) in prompts.iter().zip(hooks) {
                    let mut cache = KvCache::new(&m.cfg, 16);
                    let ctx = Ctx {
                        cache: Some(&mut cache),
                        hooks,
                        packed: None,
                    };
                    solo.push(m.last_logits(&m.embed(&ids(p)).unwrap(), ctx).unwrap());
                    solo_caches.push(cache);
                }
                let solo = Tensor::cat(&solo, 0).unwrap();
                let xs: Vec<Tensor> = prompts.iter().map(|p| m.embed(&ids(p)).unwrap()).collect();
                let mut caches: Vec<KvCache> =
                    prompts.iter().map(|_| KvCache::new(&m.cfg, 16)).collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let batched = m.prefill_batch(&xs, &mut refs, &hooks).unwrap();
                assert!(max_abs(&solo, &batched) < 1e-4, "{arch:?}: logits differ");
                // the caches hold the same keys and values: the next decode step agrees
                let next = [12, 13, 14];
                let mut a: Vec<&mut KvCache> = caches.iter_mut().collect();
                let mut b: Vec<&mut KvCache> = solo_caches.iter_mut().collect();
                let (da, db) = (
                    m.decode_batch(&next, &mut a, &hooks).unwrap(),
                    m.decode_batch(&next, &mut b, &hooks).unwrap(),
                );
                assert!(
                    max_abs(&da, &db) < 1e-4,
                    "{arch:?}: decode after prefill differs"
                );
                assert_eq!(
                    caches.iter().map(KvCache::len).collect::<Vec<_>>(),
                    [6, 2, 4]
                );
            }
            let mut used = KvCache::new(&m.cfg, 16);
            used.len = 1;
            let x = m
                .embed(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap())
                .unwrap();
            assert!(m.prefill_batch(&[x], &mut [&mut used], &[None]).is_err());
        }
    }

    #[test]
    fn batched_decode_equals_one_sequence_at_a_time() {
        let m = Transformer::random(tiny_config(Arch::Qwen2), &Device::Cpu).unwrap();
        let with_prefix = TestHooks {
            k: Tensor::randn(0f32, 1., (1, 2, 2, 8), &Device::Cpu).unwrap(),
            v: Tensor::randn(0f32, 1., (1, 2, 2, 8), &Device::Cpu).unwrap(),
            delta_scale: 0.05,
        };
        let hooks: [Option<&dyn ForwardHooks>; 3] = [None, Some(&with_prefix), None];
        let prompts: [&[u32]; 3] = [&[3, 4, 5], &[7, 8, 9, 10, 11], &[12]];
        let lens = assert_batched_decode_matches_solo(&m, &hooks, &prompts, &[21, 22, 23], 1e-4);
        // the prefix (2) sits in the cache ahead of the prompt (5) and the decoded token
        assert_eq!(lens, vec![3 + 1, 2 + 5 + 1, 1 + 1]);
    }
}
