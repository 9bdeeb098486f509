//! Copies of the first positions of a [`KvCache`]: what the engine's prompt cache keeps of a
//! prefilled prompt and hands back to a later request that starts with the same tokens. Kept
//! apart from the cache type itself, which the decode path owns: this only reads and rebuilds it.
use candle_core::Result;

use super::layers::KvCache;

impl KvCache {
    /// A new cache holding this one's first `positions` positions (every layer's keys and
    /// values), in fresh buffers sized for `capacity`. A deep copy: candle's cache appends in
    /// place, so a cache handed to a request must never share a buffer with a kept one.
    pub fn fork_prefix(&self, positions: usize, capacity: usize) -> Result<Self> {
        if positions > self.len {
            candle_core::bail!(
                "fork_prefix: {positions} positions asked of a cache of {}",
                self.len
            );
        }
        let layers = self
            .layers
            .iter()
            .map(|c| {
                let mut copy = candle_nn::kv_cache::KvCache::new(2, capacity.max(positions).max(1));
                if positions > 0 {
                    if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                        copy.append(
                            &k.narrow(2, 0, positions)?.contiguous()?,
                            &v.narrow(2, 0, positions)?.contiguous()?,
                        )?;
                    }
                }
                Ok(copy)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: positions,
        })
    }

    /// Bytes of the cached positions' keys and values (not of spare capacity).
    pub fn bytes(&self) -> Result<usize> {
        let mut total = 0;
        for c in &self.layers {
            for t in [c.k()?, c.v()?].into_iter().flatten() {
                total += t.elem_count() * t.dtype().size_in_bytes();
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::model::arch::Arch;
    use crate::model::llama::tests::tiny_config;
    use crate::model::{KvCache, Transformer};

    /// A prefix copy holds exactly the first positions' keys and values, and appending to it
    /// leaves the original untouched.
    #[test]
    fn fork_prefix_copies_the_first_positions() {
        let cfg = tiny_config(Arch::Llama);
        let m = Transformer::random(cfg.clone(), &Device::Cpu).expect("model");
        let mut cache = KvCache::new(&cfg, 8);
        let toks = Tensor::new(&[[3u32, 5, 7, 9, 11]], &Device::Cpu).expect("tokens");
        m.forward(&toks, Some(&mut cache)).expect("forward");
        let mut head = cache.fork_prefix(3, 16).expect("prefix");
        assert_eq!(head.len(), 3);
        for layer in 0..cfg.num_layers {
            let (k, v) = cache.layer_kv(layer).unwrap().unwrap();
            let (hk, hv) = head.layer_kv(layer).unwrap().unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                let d = (a.narrow(2, 0, 3).unwrap() - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(d, 0.0);
            };
            same(&k, &hk);
            same(&v, &hv);
        }
        let per_position = cache.bytes().unwrap() / 5;
        assert_eq!(head.bytes().unwrap(), 3 * per_position);
        let next = Tensor::new(&[[13u32]], &Device::Cpu).expect("token");
        m.forward(&next, Some(&mut head))
            .expect("forward on the copy");
        assert_eq!(head.len(), 4);
        assert_eq!(cache.len(), 5);
        assert!(cache.fork_prefix(6, 6).is_err());
    }
}
