//! SGD with momentum (optionally Nesterov) and L2 weight decay, with
//! PyTorch's update rule; one parameter group per block plus the head, and a cosine learning-rate schedule with optional linear warm-up.
//!
//! The momentum buffers are our own tensors (tch cannot save its optimizer
//! state; checkpoints need them). Invariant: a group that is frozen for a
//! step is not touched at all: no gradient is computed for it, and it gets
//! no update, no weight decay and no momentum update, so frozen parameters
//! stay bit-identical.

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Tensor};

use crate::model::{group_of, Group};

/// Optimizer settings (the paper's recipe by default: SGD, momentum 0.9,
/// lr 0.003, cosine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.003,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            warmup_steps: 0,
        }
    }
}

impl SgdConfig {
    /// Learning rate at `step` of `total`: linear warm-up, then cosine to 0.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = (step - self.warmup_steps) as f64 / span;
        0.5 * self.lr * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
    }
}

struct Param {
    name: String,
    group: Group,
    value: Tensor,
    momentum: Option<Tensor>,
}

/// SGD over a `VarStore`'s variables, grouped by block.
pub struct Sgd {
    cfg: SgdConfig,
    params: Vec<Param>,
}

impl Sgd {
    /// Groups every variable of `vs` by its timm name.
    pub fn new(vs: &VarStore, cfg: SgdConfig) -> Self {
        let mut params: Vec<Param> = vs
            .variables()
            .into_iter()
            .map(|(name, value)| Param {
                group: group_of(&name),
                name,
                value,
                momentum: None,
            })
            .collect();
        // Deterministic order (HashMap order is not).
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Sgd { cfg, params }
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// The momentum buffers that exist, by parameter name (checkpoints).
    pub fn momentum_state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| {
                p.momentum
                    .as_ref()
                    .map(|m| (p.name.clone(), m.shallow_clone()))
            })
            .collect()
    }

    /// Restores momentum buffers saved by [`Self::momentum_state`];
    /// parameters not named keep none.
    pub fn load_momentum(&mut self, state: Vec<(String, Tensor)>) -> Result<(), String> {
        let mut by_name: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
        for p in &mut self.params {
            p.momentum = match by_name.remove(&p.name) {
                Some(m) if m.size() == p.value.size() => Some(m.to_device(p.value.device())),
                Some(m) => {
                    return Err(format!(
                        "momentum of {} has shape {:?}, the parameter {:?}",
                        p.name,
                        m.size(),
                        p.value.size()
                    ))
                }
                None => None,
            };
        }
        match by_name.keys().next() {
            Some(extra) => Err(format!("momentum for unknown parameter {extra}")),
            None => Ok(()),
        }
    }

    /// Gradients of `loss` for the parameters of the trainable blocks
    /// (`[frozen, L)`) and the head, computed with `run_backward`: nothing
    /// accumulates in `.grad`, so there is nothing to zero, and frozen
    /// parameters are not even asked for a gradient.
    pub fn backward(&self, loss: &Tensor, frozen: usize) -> Grads {
        let index: Vec<usize> = (0..self.params.len())
            .filter(|&i| !matches!(self.params[i].group, Group::Block(b) if b < frozen))
            .collect();
        let inputs: Vec<&Tensor> = index.iter().map(|&i| &self.params[i].value).collect();
        let grads = Tensor::run_backward(&[loss], &inputs, false, false);
        Grads { index, grads }
    }

    /// One update at learning rate `lr` of the parameters in `grads`;
    /// `factors[i]` scales block `i`'s learning rate (empty: all 1).
    pub fn step(&mut self, grads: &Grads, lr: f64, factors: &[f32]) {
        let cfg = &self.cfg;
        tch::no_grad(|| {
            for (&i, grad) in grads.index.iter().zip(&grads.grads) {
                let p = &mut self.params[i];
                let factor = match p.group {
                    Group::Block(b) => f64::from(factors.get(b).copied().unwrap_or(1.0)),
                    Group::Head => 1.0,
                };
                let mut d = if cfg.weight_decay != 0.0 {
                    grad + &p.value * cfg.weight_decay
                } else {
                    grad.shallow_clone()
                };
                if cfg.momentum != 0.0 {
                    let buf = match p.momentum.take() {
                        None => d.detach().copy(),
                        Some(mut b) => {
                            let _ = b.g_mul_scalar_(cfg.momentum).g_add_(&d);
                            b
                        }
                    };
                    d = if cfg.nesterov {
                        &d + &buf * cfg.momentum
                    } else {
                        buf.shallow_clone()
                    };
                    p.momentum = Some(buf);
                }
                let _ = p.value.g_sub_(&(d * (lr * factor)));
            }
        });
    }

    /// L2 norm of the gradient of each block `0..layers` (0 for a block
    /// without gradient); one host sync for all blocks.
    pub fn grad_norms(&self, grads: &Grads, layers: usize) -> Vec<f32> {
        let mut sq: Vec<Option<Tensor>> = (0..layers).map(|_| None).collect();
        for (&i, g) in grads.index.iter().zip(&grads.grads) {
            if let Group::Block(b) = self.params[i].group {
                if b < layers {
                    let s = g.square().sum(tch::Kind::Float);
                    sq[b] = Some(match sq[b].take() {
                        None => s,
                        Some(acc) => acc + s,
                    });
                }
            }
        }
        let zero = Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
        let all: Vec<Tensor> = sq
            .into_iter()
            .map(|s| s.map_or_else(|| zero.shallow_clone(), |t| t.to_device(tch::Device::Cpu)))
            .collect();
        Vec::try_from(Tensor::stack(&all, 0).sqrt()).unwrap_or_default()
    }
}

/// Gradients of one step, for the parameters that were trainable.
pub struct Grads {
    index: Vec<usize>,
    grads: Vec<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn cosine_schedule_with_warmup() {
        let c = SgdConfig {
            lr: 1.0,
            warmup_steps: 10,
            ..Default::default()
        };
        assert_relative_eq!(c.lr_at(0, 110), 0.1);
        assert_relative_eq!(c.lr_at(9, 110), 1.0);
        assert_relative_eq!(c.lr_at(10, 110), 1.0);
        assert_relative_eq!(c.lr_at(60, 110), 0.5, epsilon = 1e-12);
        assert!(c.lr_at(109, 110) < 0.001);
    }

    #[test]
    fn matches_pytorch_sgd_momentum_update_rule() {
        // buf_1 = g; p_1 = p_0 - lr * buf_1; buf_2 = m * buf_1 + g;
        // p_2 = p_1 - lr * buf_2 (constant gradient g = 2 * p_0 for p^2 ...
        // here a linear loss so g is constant).
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs
            .root()
            .sub("head")
            .var("weight", &[1], tch::nn::Init::Const(1.0));
        let mut opt = Sgd::new(
            &vs,
            SgdConfig {
                momentum: 0.9,
                ..Default::default()
            },
        );
        for _ in 0..2 {
            let grads = opt.backward(&(&w * 3.0).sum(tch::Kind::Float), 0);
            opt.step(&grads, 0.1, &[]);
        }
        // p1 = 1 - 0.1*3 = 0.7; buf2 = 0.9*3 + 3 = 5.7; p2 = 0.7 - 0.57 = 0.13
        assert_relative_eq!(w.double_value(&[0]), 0.13, epsilon = 1e-6);
    }
}
