//! AdamW with decoupled weight decay, per-parameter decay switch, global-norm clipping and a
//! saveable state; and the learning-rate schedule (linear warmup, then cosine, linear or
//! constant). candle's own `AdamW` can neither clip, skip decay per parameter, nor save its
//! moments (docs/candle-notes.md), all of which exact resume and PEFT-style training need.
use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// One trainable tensor.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Soft prompts, prefixes, norms and biases are not decayed.
    pub decay: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (bias correction).
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Param]) -> Result<Self> {
        let zeros = |p: &Param| p.var.as_tensor().zeros_like();
        Ok(Self {
            config,
            t: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// Applies one update with the summed gradients `grads[i]` of `params[i]` divided by
    /// `denom` (the number of trained tokens in the accumulated micro-batches). Returns the
    /// gradient norm before clipping.
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], denom: f64, lr: f64) -> Result<f64> {
        let c = self.config;
        let inv = 1.0 / denom.max(1.0);
        let mut sq = 0f64;
        for g in grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt() * inv;
        let mut scale = inv;
        if c.max_grad_norm > 0.0 && norm > c.max_grad_norm {
            scale *= c.max_grad_norm / (norm + 1e-6);
        }
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let g = (g * scale)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = p.var.as_tensor();
            let decayed = if p.decay && c.weight_decay > 0.0 {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            p.var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// Moments keyed `m.{name}` / `v.{name}`.
    pub fn state_tensors(&self, params: &[Param]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            out.insert(format!("m.{}", p.name), self.m[i].clone());
            out.insert(format!("v.{}", p.name), self.v[i].clone());
        }
        out
    }

    pub fn load_state(
        &mut self,
        params: &[Param],
        t: u64,
        state: &HashMap<String, Tensor>,
    ) -> Result<()> {
        for (i, p) in params.iter().enumerate() {
            for (slot, key) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                let name = format!("{key}.{}", p.name);
                let s = state.get(&name).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks `{name}`"))
                })?;
                if s.dims() != p.var.dims() {
                    candle_core::bail!("optimizer state `{name}` has the wrong shape");
                }
                *slot = s.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, peak: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computed_first_step() {
        let p = vec![Param {
            name: "w".into(),
            var: Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap(),
            decay: true,
        }];
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.1,
                max_grad_norm: 0.0,
                ..Default::default()
            },
            &p,
        )
        .unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        opt.step(&p, &[g], 1.0, 0.01).unwrap();
        // first step: mhat/sqrt(vhat) = sign(g); w = w(1 - lr·wd) - lr·sign(g)
        let w = p[0].var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((w[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6);
        assert!((w[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6);
    }

    #[test]
    fn clipping_bounds_the_norm_and_state_round_trips() {
        let p = vec![Param {
            name: "w".into(),
            var: Var::new(&[0.0f32, 0.0], &Device::Cpu).unwrap(),
            decay: false,
        }];
        let mut opt = AdamW::new(AdamWConfig::default(), &p).unwrap();
        let g = Tensor::new(&[30.0f32, 40.0], &Device::Cpu).unwrap();
        let norm = opt.step(&p, std::slice::from_ref(&g), 1.0, 0.1).unwrap();
        assert!((norm - 50.0).abs() < 1e-4);
        let state = opt.state_tensors(&p);
        let mut again = AdamW::new(AdamWConfig::default(), &p).unwrap();
        again.load_state(&p, opt.t, &state).unwrap();
        let before = p[0].var.as_tensor().to_vec1::<f32>().unwrap();
        opt.step(&p, std::slice::from_ref(&g), 1.0, 0.1).unwrap();
        let a = p[0].var.as_tensor().to_vec1::<f32>().unwrap();
        p[0].var
            .set(&Tensor::new(before.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        again.step(&p, &[g], 1.0, 0.1).unwrap();
        assert_eq!(a, p[0].var.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn schedule_shapes() {
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 110, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 110, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 110, 60) - 0.5).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 10, 110, 110).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 2.0, 0, 100, 50) - 1.0).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 3.0, 0, 10, 9), 3.0);
    }
}
