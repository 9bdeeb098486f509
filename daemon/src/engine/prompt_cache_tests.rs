//! Prompt caching through the engine on a tiny random model: a request that reuses a cached
//! prefix generates what it generates without the cache (base, LoRA, soft prompt and KV
//! prefix variants), reports the reused tokens, never reuses a replaced variant's cache, and a
//! new variant's first chat finds the template's preamble warmed.
use candle_core::{Device, Tensor};

use super::choices_tests::word_level_text;
use super::*;
use crate::adapters::lora::Lora;
use crate::adapters::prefix::Prefix;
use crate::adapters::prompt::SoftPrompt;
use crate::engine::{GenEvent, GenerationRequest, PromptInput, SamplingParams};
use crate::model::arch::Arch;
use crate::model::chat::ChatMessage;
use crate::model::llama::tests::tiny_config;
use crate::model::{ChatTemplate, LoadedModel, Transformer, WeightsMode};

/// A template with a fixed preamble (`t1 t2 t3`, a stand-in for a default system prompt)
/// ahead of each user message.
const TEMPLATE: &str = "{% for m in messages %}t1 t2 t3 {{ m.content }} t4 {% endfor %}{% if add_generation_prompt %}t5{% endif %}";

/// The tiny model of `choices_tests` (word-level `t0` … `t60`, no EOS) with [`TEMPLATE`].
fn engine(seed_model: &Transformer) -> EngineHandle {
    let cfg = seed_model.cfg.clone();
    let text = word_level_text(cfg.vocab_size);
    // The same weights in every engine of a test.
    let weights = seed_model.named_weights().expect("weights");
    let model = seed_model
        .with_weights(weights.into_iter().collect())
        .expect("copy");
    EngineHandle::from_loaded(LoadedModel {
        model,
        text,
        template: Some(ChatTemplate::new(TEMPLATE, "", "").expect("template")),
        name: "tiny".into(),
        hub_id: None,
        weights: WeightsMode::default(),
    })
}

/// Builds one variant's adapter (called once per engine, so both get the same weights).
type MakeAdapter<'a> = Box<dyn Fn() -> Adapter + 'a>;

fn model() -> Transformer {
    // Untied embeddings: a tied random model mostly repeats its last input token.
    Transformer::random(tiny_config(Arch::Qwen2), &Device::Cpu).expect("model")
}

/// What one greedy request produced: its tokens' logprobs, text and cached prompt tokens.
struct Out {
    text: String,
    logprobs: Vec<f32>,
    ids: Vec<u32>,
    cached: usize,
    prompt: usize,
}

fn run(e: &EngineHandle, model: &str, input: PromptInput) -> Out {
    let req = GenerationRequest {
        model: model.into(),
        input,
        sampling: SamplingParams {
            temperature: 0.0,
            logprobs: Some(0),
            ..Default::default()
        },
        max_tokens: Some(8),
        stop: Vec::new(),
        guided: Default::default(),
        n: 1,
    };
    let p = e.prepare(req).expect("prepare");
    let mut rx = e.submit(p).expect("submit");
    let mut out = Out {
        text: String::new(),
        logprobs: Vec::new(),
        ids: Vec::new(),
        cached: 0,
        prompt: 0,
    };
    loop {
        match rx.blocking_recv().expect("an event") {
            GenEvent::Text(t) => out.text.push_str(&t),
            GenEvent::Token(t) => {
                out.ids.push(t.id);
                out.logprobs.push(t.logprob.unwrap_or(f32::NAN));
            }
            GenEvent::Finished { usage, .. } => {
                out.cached = usage.prompt_tokens_details.cached_tokens;
                out.prompt = usage.prompt_tokens;
                return out;
            }
            GenEvent::Failed(m) => panic!("failed: {m}"),
            _ => {}
        }
    }
}

fn text(s: &str) -> PromptInput {
    PromptInput::Text(s.into())
}

fn chat(s: &str) -> PromptInput {
    PromptInput::Chat {
        messages: vec![ChatMessage::new(crate::model::chat::Role::User, s)],
    }
}

/// Same greedy tokens, and logprobs equal to f32 rounding: the cached positions were computed
/// by a prefill of another length, whose products may sum in another order.
fn assert_same(hit: &Out, miss: &Out, what: &str) {
    assert_eq!(hit.ids, miss.ids, "{what}: tokens");
    assert_eq!(hit.text, miss.text, "{what}: text");
    for (a, b) in hit.logprobs.iter().zip(&miss.logprobs) {
        assert!((a - b).abs() < 1e-4, "{what}: logprob {a} vs {b}");
    }
}

fn lora(m: &Transformer, seed: u64) -> Adapter {
    let mut l = Lora::init(
        &m.cfg,
        itamae_client::methods::LoraConfig {
            r: Some(4),
            ..Default::default()
        },
        seed,
        &Device::Cpu,
    )
    .expect("lora");
    // B starts at zero (the base's output): give it weights so the variant differs.
    // Drawn from a seeded stream, so two engines given `lora(m, seed)` serve the same one.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for p in l.pairs.values_mut() {
        let n = p.b.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        p.b = Tensor::from_vec(v, p.b.dims(), &Device::Cpu).expect("b");
    }
    Adapter::Lora(l)
}

#[test]
fn a_hit_generates_what_a_miss_does_and_says_how_many_tokens_it_reused() {
    let m = model();
    let cached = engine(&m);
    let fresh = engine(&m);
    fresh.set_prompt_cache_bytes(0).expect("cache off");
    let prompt = "t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t17 t18";
    let first = run(&cached, "tiny", text(prompt));
    assert_eq!((first.cached, first.prompt), (0, 12));
    let again = run(&cached, "tiny", text(prompt));
    assert_eq!(again.cached, 11, "the whole prompt but its last token");
    assert_same(&again, &first, "the same prompt");
    // A prompt sharing the first 9 tokens, against the same prompt without the cache.
    let other = "t7 t8 t9 t10 t11 t12 t13 t14 t15 t30 t31 t32 t33";
    let hit = run(&cached, "tiny", text(other));
    assert_eq!(hit.cached, 9);
    let miss = run(&fresh, "tiny", text(other));
    assert_eq!(miss.cached, 0);
    assert_same(&hit, &miss, "a shared prefix");
    assert_eq!(fresh.prompt_cache_bytes(), 0);
    assert!(cached.prompt_cache_bytes() > 0);
}

#[test]
fn variants_hit_their_own_cache_only_and_a_replace_drops_it() {
    let m = model();
    let cached = engine(&m);
    let fresh = engine(&m);
    fresh.set_prompt_cache_bytes(0).expect("cache off");
    let flat = Tensor::randn(
        0f32,
        1.0,
        (3, m.cfg.num_layers * 2 * m.cfg.kv_dim()),
        &Device::Cpu,
    )
    .expect("flat");
    let prefix = || {
        let config = itamae_client::methods::PrefixTuningConfig {
            num_virtual_tokens: Some(3),
            ..Default::default()
        };
        Adapter::Prefix(Prefix::from_flat(&m.cfg, config, flat.clone()).expect("prefix"))
    };
    let soft = || {
        let config = itamae_client::methods::PromptTuningConfig {
            num_virtual_tokens: Some(4),
            init: Some(itamae_client::methods::PromptInit::Random),
            init_text: None,
        };
        Adapter::Prompt(SoftPrompt::init(&m, config, &[], 3).expect("soft prompt"))
    };
    let variants: Vec<(&str, MakeAdapter)> = vec![
        ("lora", Box::new(|| lora(&m, 1))),
        ("prefix", Box::new(prefix)),
        ("soft", Box::new(soft)),
    ];
    let prompt = "t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t17 t18";
    let other = "t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t40 t41";
    for (id, make) in &variants {
        cached.add_adapter(id, make()).expect("add");
        fresh.add_adapter(id, make()).expect("add");
        let first = run(&cached, id, text(prompt));
        assert_eq!(
            first.cached, 0,
            "{id}: the base's cache is not the variant's"
        );
        let hit = run(&cached, id, text(other));
        assert_eq!(hit.cached, 10, "{id}");
        let miss = run(&fresh, id, text(other));
        assert_same(&hit, &miss, id);
        assert_ne!(
            hit.ids,
            run(&fresh, "tiny", text(other)).ids,
            "{id} differs from the base"
        );
    }
    // A replaced adapter's cached prompts are gone: the new weights prefill everything.
    cached.add_adapter("lora", lora(&m, 2)).expect("replace");
    fresh.add_adapter("lora", lora(&m, 2)).expect("replace");
    let after = run(&cached, "lora", text(other));
    assert_eq!(after.cached, 0, "nothing of the old generation is reused");
    assert_same(&after, &run(&fresh, "lora", text(other)), "replaced lora");
}

#[test]
fn a_new_variant_and_the_base_start_with_the_preamble_warmed() {
    let m = model();
    let e = engine(&m);
    let fresh = engine(&m);
    fresh.set_prompt_cache_bytes(0).expect("cache off");
    // The base was warmed at start: `t1 t2 t3` of the template, not the user's content.
    let base = run(&e, "tiny", chat("t20 t21"));
    assert_eq!((base.cached, base.prompt), (3, 7));
    assert_same(&base, &run(&fresh, "tiny", chat("t20 t21")), "base chat");
    e.add_adapter("v", lora(&m, 5)).expect("add");
    fresh.add_adapter("v", lora(&m, 5)).expect("add");
    let first = run(&e, "v", chat("t22 t23 t24"));
    assert_eq!(
        first.cached, 3,
        "the variant's first chat reuses its warmed preamble"
    );
    assert_same(
        &first,
        &run(&fresh, "v", chat("t22 t23 t24")),
        "variant chat",
    );
    assert_eq!(run(&fresh, "v", chat("t22")).cached, 0);
}
