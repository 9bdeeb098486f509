//! A request's logits do not depend on what shares its batch. On a tiny random model held in
//! quantized blocks, each of nine requests is prefilled and decoded alone (the engine's solo
//! path) and then together with others in batches of 2, 3 and 9 (one packed prefill, batched
//! decode steps of 2, 3 and 9 rows): every row's logits must be bit-identical to its solo run.
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::layers::{Ctx, ForwardHooks};
use super::transformer::Transformer;
use super::{KvCache, Weight};
use crate::model::arch::Arch;

fn quantized_model(dtype: GgmlDType) -> Transformer {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 97,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        qkv_bias: false,
    };
    let mut m = Transformer::random(cfg, &Device::Cpu).unwrap();
    let q =
        |w: &Weight, t: GgmlDType| Weight::quantize(&w.to_dense(DType::F32).unwrap(), t).unwrap();
    for layer in &mut m.layers {
        for (_, lin) in &mut layer.proj {
            lin.w = q(&lin.w, dtype);
        }
    }
    // SmolLM2's tied table is Q8_0.
    m.embed_tokens = q(&m.embed_tokens, GgmlDType::Q8_0);
    m.lm_head = q(&m.lm_head, GgmlDType::Q8_0);
    m
}

/// Nine prompts of different lengths (1 to 13 tokens) and the tokens each one decodes.
fn prompts() -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..9u32)
        .map(|i| {
            let len = [5, 1, 13, 8, 3, 9, 2, 7, 11][i as usize];
            let prompt = (0..len).map(|t| (7 * i + 3 * t + 1) % 97).collect();
            let next = (0..4).map(|t| (11 * i + 5 * t + 2) % 97).collect();
            (prompt, next)
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// One request alone, as the engine runs it: a prefill through `last_logits`, then decode
/// steps of one row. Returns the logits of the prefill and of every step.
fn solo(m: &Transformer, prompt: &[u32], next: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(&m.cfg, 32);
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let x = m.embed(&ids).unwrap();
    let mut out = rows(
        &m.last_logits(&x, Ctx::with_cache(Some(&mut cache)))
            .unwrap(),
    );
    for &t in next {
        let l = m.decode_batch(&[t], &mut [&mut cache], &[None]).unwrap();
        out.extend(rows(&l));
    }
    out
}

#[test]
fn a_requests_logits_are_the_same_alone_and_in_batches_of_2_3_and_9() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let m = quantized_model(dtype);
        let reqs = prompts();
        let alone: Vec<Vec<Vec<f32>>> = reqs.iter().map(|(p, n)| solo(&m, p, n)).collect();
        for size in [2, 3, 9] {
            let batch = &reqs[..size];
            let xs: Vec<Tensor> = batch
                .iter()
                .map(|(p, _)| {
                    let ids = Tensor::new(p.as_slice(), &Device::Cpu).unwrap();
                    m.embed(&ids.unsqueeze(0).unwrap()).unwrap()
                })
                .collect();
            let mut caches: Vec<KvCache> = batch.iter().map(|_| KvCache::new(&m.cfg, 32)).collect();
            let hooks: Vec<Option<&dyn ForwardHooks>> = vec![None; size];
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let first = rows(&m.prefill_batch(&xs, &mut refs, &hooks).unwrap());
            for (i, row) in first.iter().enumerate() {
                assert_eq!(row, &alone[i][0], "{dtype:?}: prefill of {i} in {size}");
            }
            for step in 0..4 {
                let tokens: Vec<u32> = batch.iter().map(|(_, n)| n[step]).collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let l = rows(&m.decode_batch(&tokens, &mut refs, &hooks).unwrap());
                for (i, row) in l.iter().enumerate() {
                    assert_eq!(
                        row,
                        &alone[i][step + 1],
                        "{dtype:?}: decode step {step} of {i} in {size}"
                    );
                }
            }
        }
    }
}
