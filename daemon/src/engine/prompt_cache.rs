//! Prompt (prefix) caching: the keys and values of recently prefilled prompts, kept so that a
//! later request on the same variant that starts with the same tokens prefills only the rest
//! (as vLLM's automatic prefix caching, llama.cpp's `cache_prompt` and OpenAI's prompt caching
//! do; OpenAI's `usage.prompt_tokens_details.cached_tokens` reports the reused tokens).
//!
//! An entry is keyed by the variant — its served id and the generation the registry gave it
//! when it was added, so a replaced adapter's entries can never match its successor's requests
//! — and by its token ids. Its cache also holds the variant's virtual positions ahead of the
//! tokens (a prompt-tuned variant's soft prompt, a prefix-tuned one's prefix): they depend on
//! the variant alone, so the key covers them. A lookup finds the entry sharing the longest
//! token prefix with the prompt and copies that many positions (plus the virtual ones) into
//! the request's own cache; at least one prompt token is always left to prefill, since the
//! first generated token needs the last position's logits.
//!
//! Entries live within a byte budget (`engine.prompt_cache_mb`; 0 disables), least recently
//! used first out. A new prompt that extends an entry replaces it (the new one holds the old
//! one's positions too), so a conversation's turns do not pile up copies of its start.
//! The engine thread is the only one that looks up and stores; the registry drops a
//! variant's entries when the variant is replaced or removed.
use candle_core::Result;

use crate::model::KvCache;

/// Which weights computed a cache: the base model (`generation` None) or a variant's
/// adapter of one generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct VariantKey {
    pub(super) model: String,
    pub(super) generation: Option<u64>,
}

struct Entry {
    key: VariantKey,
    tokens: Vec<u32>,
    /// Positions ahead of the tokens (soft prompt or KV prefix).
    virtual_len: usize,
    /// Exactly `virtual_len + tokens.len()` positions.
    kv: KvCache,
    bytes: u64,
    last_used: u64,
}

/// A cached prefix handed to a request: its cache (the shared positions, virtual ones
/// included) and how many of its prompt tokens that covers.
pub(super) struct Hit {
    pub(super) cache: KvCache,
    pub(super) tokens: usize,
}

#[derive(Default)]
pub(super) struct PromptCache {
    budget: u64,
    used: u64,
    entries: Vec<Entry>,
    clock: u64,
}

/// Tokens `a` and `b` share at their start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PromptCache {
    pub(super) fn new(budget: u64) -> Self {
        Self {
            budget,
            ..Default::default()
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes held by the entries.
    pub(super) fn bytes(&self) -> u64 {
        self.used
    }

    /// Sets the byte budget (0 disables and empties the cache) and evicts down to it.
    pub(super) fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
        self.evict_to(bytes);
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The longest cached prefix of `tokens` on `key`, copied into a fresh cache sized for
    /// `capacity` positions; None when no entry shares a first token with the prompt. At most
    /// `tokens.len() - 1` tokens are reused.
    pub(super) fn lookup(
        &mut self,
        key: &VariantKey,
        tokens: &[u32],
        capacity: usize,
    ) -> Result<Option<Hit>> {
        if !self.enabled() || tokens.len() < 2 {
            return Ok(None);
        }
        let usable = tokens.len() - 1;
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| &e.key == key)
            .map(|(i, e)| (i, common_prefix(&e.tokens, tokens).min(usable)))
            .filter(|&(_, n)| n > 0)
            // The longest match; among equals the most recently used (it stays warm).
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used));
        let Some((i, n)) = best else {
            return Ok(None);
        };
        let now = self.tick();
        let e = &mut self.entries[i];
        e.last_used = now;
        let positions = e.virtual_len + n;
        let cache = e.kv.fork_prefix(positions, capacity.max(positions))?;
        Ok(Some(Hit { cache, tokens: n }))
    }

    /// True when an entry on `key` holds all of `tokens` (nothing to add).
    pub(super) fn covers(&self, key: &VariantKey, tokens: &[u32]) -> bool {
        self.entries.iter().any(|e| {
            &e.key == key && e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens)
        })
    }

    /// Keeps the prompt `tokens` just prefilled into `cache` (whose first positions are the
    /// variant's virtual ones, then the tokens). Entries it extends are dropped; if an entry
    /// already holds all of it, that entry is only marked used.
    pub(super) fn insert(
        &mut self,
        key: VariantKey,
        tokens: &[u32],
        cache: &KvCache,
    ) -> Result<()> {
        if !self.enabled() || tokens.is_empty() || cache.len() < tokens.len() {
            return Ok(());
        }
        let now = self.tick();
        if let Some(e) = self.entries.iter_mut().find(|e| {
            e.key == key && e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens)
        }) {
            e.last_used = now;
            return Ok(());
        }
        let virtual_len = cache.len() - tokens.len();
        // Sized from the prefilled cache itself (its cached positions, no spare capacity), so
        // a prompt too large for the budget is never copied only to be dropped.
        let bytes = cache.bytes()? as u64;
        if bytes > self.budget {
            return Ok(());
        }
        let positions = cache.len();
        let kv = cache.fork_prefix(positions, positions)?;
        let mut freed = 0;
        self.entries.retain(|e| {
            let superseded = e.key == key && tokens.starts_with(&e.tokens);
            if superseded {
                freed += e.bytes;
            }
            !superseded
        });
        self.used -= freed;
        self.evict_to(self.budget - bytes);
        self.used += bytes;
        self.entries.push(Entry {
            key,
            tokens: tokens.to_vec(),
            virtual_len,
            kv,
            bytes,
            last_used: now,
        });
        Ok(())
    }

    /// Drops every entry of served model `model` (any generation): it was replaced or removed.
    pub(super) fn remove_model(&mut self, model: &str) {
        let mut freed = 0;
        self.entries.retain(|e| {
            let gone = e.key.model == model;
            if gone {
                freed += e.bytes;
            }
            !gone
        });
        self.used -= freed;
    }

    /// Evicts least recently used entries until at most `limit` bytes remain.
    fn evict_to(&mut self, limit: u64) {
        while self.used > limit {
            let Some(i) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = self.entries.swap_remove(i);
            self.used -= e.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;
    use crate::model::Transformer;

    fn key(model: &str, generation: Option<u64>) -> VariantKey {
        VariantKey {
            model: model.into(),
            generation,
        }
    }

    fn prefilled(m: &Transformer, tokens: &[u32]) -> KvCache {
        let mut cache = KvCache::new(&m.cfg, tokens.len());
        let t = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward(&t, Some(&mut cache)).unwrap();
        cache
    }

    #[test]
    fn longest_prefix_per_variant_and_generation() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let mut pc = PromptCache::new(1 << 30);
        let base = key("base", None);
        pc.insert(base.clone(), &[1, 2, 3], &prefilled(&m, &[1, 2, 3]))
            .unwrap();
        pc.insert(
            base.clone(),
            &[1, 2, 7, 8, 9],
            &prefilled(&m, &[1, 2, 7, 8, 9]),
        )
        .unwrap();
        let hit = pc.lookup(&base, &[1, 2, 7, 8, 4, 4], 32).unwrap().unwrap();
        assert_eq!((hit.tokens, hit.cache.len()), (4, 4));
        // The whole prompt cached: its last token is still prefilled.
        let hit = pc.lookup(&base, &[1, 2, 3], 32).unwrap().unwrap();
        assert_eq!(hit.tokens, 2);
        assert!(pc.lookup(&base, &[5, 1, 2], 32).unwrap().is_none());
        // Another variant, or another generation of one, never matches.
        assert!(pc
            .lookup(&key("v", Some(0)), &[1, 2, 3, 4], 32)
            .unwrap()
            .is_none());
        pc.insert(key("v", Some(0)), &[1, 2, 3], &prefilled(&m, &[1, 2, 3]))
            .unwrap();
        assert!(pc
            .lookup(&key("v", Some(1)), &[1, 2, 3, 4], 32)
            .unwrap()
            .is_none());
        assert!(pc
            .lookup(&key("v", Some(0)), &[1, 2, 3, 4], 32)
            .unwrap()
            .is_some());
        pc.remove_model("v");
        assert!(pc
            .lookup(&key("v", Some(0)), &[1, 2, 3, 4], 32)
            .unwrap()
            .is_none());
        assert!(pc.lookup(&base, &[1, 2, 3, 4], 32).unwrap().is_some());
    }

    #[test]
    fn extending_replaces_and_the_budget_evicts_least_recent() {
        let m = Transformer::random(tiny_config(Arch::Llama), &Device::Cpu).unwrap();
        let per_token = prefilled(&m, &[1]).bytes().unwrap() as u64;
        let base = key("base", None);
        let mut pc = PromptCache::new(10 * per_token);
        pc.insert(base.clone(), &[1, 2], &prefilled(&m, &[1, 2]))
            .unwrap();
        pc.insert(base.clone(), &[1, 2, 3, 4], &prefilled(&m, &[1, 2, 3, 4]))
            .unwrap();
        assert_eq!(
            pc.entries.len(),
            1,
            "the longer prompt replaced the shorter"
        );
        assert_eq!(pc.bytes(), 4 * per_token);
        // Already held whole: nothing added.
        pc.insert(base.clone(), &[1, 2, 3], &prefilled(&m, &[1, 2, 3]))
            .unwrap();
        assert_eq!(pc.bytes(), 4 * per_token);
        pc.insert(base.clone(), &[5, 6, 7], &prefilled(&m, &[5, 6, 7]))
            .unwrap();
        // Touch [1..4] so [5,6,7] is the least recently used.
        pc.lookup(&base, &[1, 2, 9], 8).unwrap().unwrap();
        pc.insert(
            base.clone(),
            &[8, 9, 10, 11],
            &prefilled(&m, &[8, 9, 10, 11]),
        )
        .unwrap();
        assert_eq!(pc.bytes(), 8 * per_token);
        assert!(pc.lookup(&base, &[5, 6, 7, 1], 8).unwrap().is_none());
        assert!(pc.lookup(&base, &[1, 2, 3, 1], 8).unwrap().is_some());
        // Larger than the whole budget: not kept.
        let long: Vec<u32> = (1..=11).collect();
        pc.insert(base.clone(), &long, &prefilled(&m, &long))
            .unwrap();
        assert_eq!(pc.bytes(), 8 * per_token);
        pc.set_budget(0);
        assert_eq!(pc.bytes(), 0);
        assert!(pc.lookup(&base, &[1, 2, 3, 1], 8).unwrap().is_none());
    }
}
