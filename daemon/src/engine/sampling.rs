//! Next-token choice: penalties (repetition as in HF transformers, presence/frequency as in the
//! OpenAI API) and `logit_bias`, then greedy or temperature sampling restricted by top-k, top-p
//! and min-p. The two halves are separate ([`Sampler::adjust`], [`Sampler::choose`]) because
//! reported logprobs are read between them (see `super::logprobs`).
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::types::SamplingParams;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::for_choice(params, 0)
    }

    /// The sampler of choice `index` of a request (`n` > 1): each choice draws from its own
    /// stream. With a seed, choice 0 draws as a single-choice request with that seed would and
    /// every choice is reproducible; without one, every stream is seeded by the OS.
    pub fn for_choice(params: SamplingParams, index: usize) -> Self {
        let rng = match params.seed {
            // The golden-ratio step (as in splitmix64) spreads neighbouring indices apart;
            // `seed_from_u64` then mixes the result.
            Some(s) => StdRng::seed_from_u64(
                s.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// `context`: prompt and generated ids (for the repetition penalty);
    /// `generated`: counts of generated ids (for presence/frequency penalties).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        context: &[u32],
        generated: &HashMap<u32, usize>,
    ) -> u32 {
        self.adjust(logits, context, generated);
        self.choose(logits)
    }

    /// The penalties and the bias: the distribution the model offers for this request.
    pub fn adjust(&self, logits: &mut [f32], context: &[u32], generated: &HashMap<u32, usize>) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in context {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        // Ids were checked against the vocabulary when the request was prepared.
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }

    /// Draws from `logits` (as left by [`Self::adjust`]); may overwrite them.
    pub fn choose(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        if p.top_p >= 1.0 && (p.top_k == 0 || p.top_k >= logits.len()) {
            return self.sample_unsorted(logits);
        }
        // Candidates sorted by logit, best first; top-k cuts before the softmax.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut n = 0;
            for &x in &probs[..keep] {
                cum += x;
                n += 1;
                if cum >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (k, &x) in probs[..keep].iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return idx[k];
            }
        }
        idx[keep - 1]
    }
}

impl Sampler {
    /// Temperature sampling with at most a min-p cut, in vocabulary order: the same
    /// distribution as the sorted path, without sorting the whole vocabulary for every token
    /// (a 49k-entry sort was a fifth of an 8-row decode step). min-p keeps `p ≥ min_p·p_max`,
    /// i.e. logits within `T·ln(min_p)` of the best.
    fn sample_unsorted(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = if p.min_p > 0.0 {
            max + p.temperature * p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        // The logits become unnormalised probabilities in place: one exp per entry.
        let mut total = 0.0;
        for l in logits.iter_mut() {
            *l = if *l >= floor {
                ((*l - max) / p.temperature).exp()
            } else {
                0.0
            };
            total += *l;
        }
        let mut r = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (i, &w) in logits.iter().enumerate() {
            if w > 0.0 {
                last = i as u32;
                r -= w;
                if r <= 0.0 {
                    return i as u32;
                }
            }
        }
        // rounding left a sliver of `r`: the last candidate takes it
        last
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[], &HashMap::new()), 1);
    }

    #[test]
    fn logit_bias_is_added_before_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(1, -100.0), (2, 2.5)],
            ..params()
        });
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[], &HashMap::new()), 3);
        let mut l = vec![0.1, 3.0, 1.0, 2.9];
        s.adjust(&mut l, &[], &HashMap::new());
        assert_eq!(l, vec![0.1, -97.0, 3.5, 2.9]);
        // -100 bans a token even when sampling.
        let mut s = Sampler::new(SamplingParams {
            seed: Some(5),
            logit_bias: vec![(0, -100.0)],
            ..params()
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [5.0, 0.0, 0.0], &[], &HashMap::new()), 0);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..params()
        });
        let mut l = vec![0.1, 3.0, -1.0, 2.0];
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut l, &[1, 1], &HashMap::new()), 3);
    }

    #[test]
    fn frequency_penalty_counts_occurrences() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.5,
            ..params()
        });
        let mut l = vec![0.0, 3.0, 2.2];
        let counts = HashMap::from([(1u32, 2usize)]);
        assert_eq!(s.sample(&mut l, &[], &counts), 2);
    }

    #[test]
    fn seed_reproduces_and_top_k_restricts() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(7),
            ..params()
        };
        let logits = vec![1.0, 0.5, 0.9, 0.2, 0.8];
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..200)
                .map(|_| s.sample(&mut logits.clone(), &[], &HashMap::new()))
                .collect::<Vec<_>>()
        };
        let a = draw(p.clone());
        assert_eq!(a, draw(p));
        assert!(
            a.iter().all(|&t| t == 0 || t == 2),
            "top_k=2 allows only ids 0 and 2"
        );
        assert!(a.contains(&0) && a.contains(&2));
    }

    #[test]
    fn choices_draw_their_own_reproducible_streams() {
        let p = SamplingParams {
            seed: Some(11),
            ..params()
        };
        let logits = vec![0.3f32, 0.1, 0.2, 0.0, 0.25, 0.15];
        let draw = |i: usize| {
            let mut s = Sampler::for_choice(p.clone(), i);
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &[], &HashMap::new()))
                .collect::<Vec<_>>()
        };
        let mut single = Sampler::new(p.clone());
        let first: Vec<u32> = (0..64)
            .map(|_| single.sample(&mut logits.clone(), &[], &HashMap::new()))
            .collect();
        assert_eq!(draw(0), first, "choice 0 draws as a single-choice request");
        assert_eq!(draw(2), draw(2), "a seeded choice is reproducible");
        assert_ne!(draw(1), draw(0));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn unsorted_sampling_follows_the_softmax() {
        // temperature 0.5 over logits [1, 0, 2, 0.5]: the softmax of [2, 0, 4, 1]
        let logits = vec![1.0f32, 0.0, 2.0, 0.5];
        let e: Vec<f64> = [2.0f64, 0.0, 4.0, 1.0].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.5,
            seed: Some(3),
            ..params()
        });
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut logits.clone(), &[], &HashMap::new()) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let (got, want) = (c as f64 / n as f64, e[i] / z);
            // five standard errors of a binomial proportion
            let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < tol, "id {i}: {got} vs {want}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = vec![5.0, 4.0, 0.0, -1.0];
        for p in [
            SamplingParams {
                top_p: 0.5,
                seed: Some(1),
                ..params()
            },
            SamplingParams {
                min_p: 0.5,
                seed: Some(1),
                ..params()
            },
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..100 {
                // p(0) ≈ 0.73: top_p 0.5 keeps only id 0; min_p 0.5 drops id 1 (0.27 < 0.36)
                assert_eq!(s.sample(&mut logits.clone(), &[], &HashMap::new()), 0);
            }
        }
    }
}
