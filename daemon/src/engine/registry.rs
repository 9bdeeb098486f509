//! The served variants and their memory budget: adapters beyond the budget are evicted least
//! recently used first (never one a request holds) and read again from their PEFT directory
//! by the first request that needs them.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{EngineError, Shared};
use crate::adapters::Adapter;

/// One served variant: its adapter (unless evicted) and what the LRU needs to know.
pub(super) struct Variant {
    /// None while evicted.
    pub(super) adapter: Option<Arc<Adapter>>,
    pub(super) kind: &'static str,
    /// Bytes of the adapter's weights when loaded.
    pub(super) bytes: u64,
    pub(super) created: u64,
    /// The PEFT directory to reload it from; None: memory only, never evicted.
    pub(super) source: Option<PathBuf>,
    pub(super) last_used: std::sync::atomic::AtomicU64,
    pub(super) generation: u64,
}

impl Variant {
    /// Loaded, evictable, and no request holds it (a running or prepared sequence owns a
    /// clone of the `Arc`).
    fn evictable(&self) -> bool {
        self.source.is_some()
            && self
                .adapter
                .as_ref()
                .is_some_and(|a| Arc::strong_count(a) == 1)
    }
}

impl Shared {
    /// The adapter of variant `id` and its generation, read again from its directory first if
    /// it was evicted (blocking: callers run on a blocking thread); marks it used for the LRU.
    pub(super) fn variant(&self, id: &str) -> Result<(Arc<Adapter>, u64), EngineError> {
        use std::sync::atomic::Ordering;
        let source = {
            let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
            let v = adapters
                .get(id)
                .ok_or_else(|| EngineError::ModelNotFound(id.to_string()))?;
            v.last_used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            match &v.adapter {
                Some(a) => return Ok((a.clone(), v.generation)),
                None => v.source.clone(),
            }
        };
        let Some(dir) = source else {
            return Err(EngineError::Internal(format!(
                "variant `{id}` was evicted but has no source to reload from"
            )));
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        // Someone else may have reloaded (or replaced) it while this request waited.
        let generation = {
            let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
            let v = adapters
                .get(id)
                .ok_or_else(|| EngineError::ModelNotFound(id.to_string()))?;
            if let Some(a) = &v.adapter {
                return Ok((a.clone(), v.generation));
            }
            v.generation
        };
        let started = std::time::Instant::now();
        let loaded = crate::adapters::peft::load(&dir, &self.config, self.base.model.device())
            .map_err(|e| e.to_string())
            .and_then(|mut a| {
                a.prepare_for_serving()
                    .map(|()| a)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| {
                EngineError::Internal(format!(
                    "reloading adapter `{id}` from {}: {e}",
                    dir.display()
                ))
            })?;
        let secs = started.elapsed().as_secs_f64();
        crate::metrics::global().adapter_loaded(id, secs);
        tracing::info!(adapter = %id, ms = (secs * 1e3) as u64, "adapter reloaded on demand");
        let loaded = Arc::new(loaded);
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        match adapters.get_mut(id) {
            Some(v) if v.generation == generation => {
                v.adapter = Some(loaded.clone());
                v.last_used.store(
                    self.clock.fetch_add(1, Ordering::Relaxed),
                    Ordering::Relaxed,
                );
            }
            // Replaced while loading: the request started before the replace, so the adapter
            // read now (the new files) is the newer one anyway, but the registry keeps its own.
            Some(v) => {
                if let Some(a) = &v.adapter {
                    return Ok((a.clone(), v.generation));
                }
            }
            None => return Err(EngineError::ModelNotFound(id.to_string())),
        }
        // The request's clone (`loaded`) keeps this one from being evicted right away.
        self.enforce_budget(&mut adapters, Some(id));
        Ok((loaded, generation))
    }

    /// Whether `key` names the base model or a variant's current generation: a cache computed
    /// with a replaced or removed variant's weights is not worth keeping.
    pub(super) fn is_current(&self, key: &super::prompt_cache::VariantKey) -> bool {
        match key.generation {
            None => key.model == self.id,
            Some(g) => self
                .adapters
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key.model)
                .is_some_and(|v| v.generation == g),
        }
    }

    /// Evicts least recently used variants until the loaded ones fit the budget, never `keep`
    /// and never one a request holds; then publishes the resident gauge.
    pub(super) fn enforce_budget(
        &self,
        adapters: &mut HashMap<String, Variant>,
        keep: Option<&str>,
    ) {
        use std::sync::atomic::Ordering;
        let mut over = false;
        if let Some(budget) = *self.budget.read().unwrap_or_else(|e| e.into_inner()) {
            let mut used: u64 = adapters
                .values()
                .filter(|v| v.adapter.is_some())
                .map(|v| v.bytes)
                .sum();
            while used > budget {
                let victim = adapters
                    .iter()
                    .filter(|(id, v)| Some(id.as_str()) != keep && v.evictable())
                    .min_by_key(|(_, v)| v.last_used.load(Ordering::Relaxed))
                    .map(|(id, _)| id.clone());
                let Some(id) = victim else {
                    over = true;
                    break;
                };
                if let Some(v) = adapters.get_mut(&id) {
                    v.adapter = None;
                    used = used.saturating_sub(v.bytes);
                    crate::metrics::global().adapter_evicted();
                    tracing::info!(adapter = %id, bytes = v.bytes, "adapter evicted (memory budget)");
                }
            }
            if over && !self.over_budget.load(Ordering::Relaxed) {
                tracing::info!(
                    used,
                    budget,
                    "loaded adapters exceed the memory budget until requests using them finish"
                );
            }
        }
        self.over_budget.store(over, Ordering::Relaxed);
        self.publish_resident(adapters);
    }

    pub(super) fn publish_resident(&self, adapters: &HashMap<String, Variant>) {
        let m = crate::metrics::global();
        let loaded = adapters.values().filter(|v| v.adapter.is_some());
        m.set_adapters_resident(loaded.clone().count());
        m.set_adapters_resident_bytes(loaded.map(|v| v.bytes).sum());
    }
}
