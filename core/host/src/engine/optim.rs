//! SGD with momentum (optionally Nesterov) and L2 weight decay, with
//! PyTorch's update rule; one parameter group per block plus the head, and a cosine learning-rate schedule with optional linear warm-up.
//!
//! The momentum buffers are our own tensors (tch cannot save its optimizer
//! state; checkpoints need them). Invariant: a group that is frozen for a
//! step is not touched at all: no gradient is computed for it, and it gets
//! no update, no weight decay and no momentum update, so frozen parameters
//! stay bit-identical.

use std::os::raw::{c_char, c_int};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Tensor};
use torch_sys::C_tensor;

use crate::error::TorchPanic;
use crate::model::{Group, PrefixModel};

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
    /// Checks the values; `at` names the section in the message
    /// (`train.sgd`).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if !self.lr.is_finite() || self.lr < 0.0 {
            return Err(format!(
                "{at}.lr is {}: the learning rate must be finite and >= 0",
                self.lr
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "{at}.momentum is {}: momentum must be in [0, 1)",
                self.momentum
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(format!(
                "{at}.weight_decay is {}: weight decay must be finite and >= 0",
                self.weight_decay
            ));
        }
        Ok(())
    }

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

extern "C" {
    // csrc/sgd.cpp
    fn simfreeze_fused_sgd(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        bufs: *const *const C_tensor,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: c_int,
        first_step: c_int,
        found_inf: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
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
    /// Every variable of `vs`, in the block the model says it belongs to.
    pub fn new(vs: &VarStore, model: &dyn PrefixModel, cfg: SgdConfig) -> Self {
        Self::with_groups(vs, cfg, |name| model.group_of(name))
    }

    /// Every variable of `vs`, grouped by `group`.
    pub fn with_groups(vs: &VarStore, cfg: SgdConfig, group: impl Fn(&str) -> Group) -> Self {
        let mut params: Vec<Param> = vs
            .variables()
            .into_iter()
            .map(|(name, value)| Param {
                group: group(&name),
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
    ///
    /// PyTorch's rule, run by libtorch's fused SGD kernel: one call per
    /// distinct learning rate (and per first step of a momentum buffer)
    /// instead of five to eight tensor operations per parameter.
    pub fn step(&mut self, grads: &Grads, lr: f64, factors: &[f32]) {
        self.step_unless(grads, lr, factors, None);
    }

    /// [`Sgd::step`], skipped inside the kernel when `found_inf` (a scalar
    /// float tensor on the parameters' device) holds 1: nothing moves, no
    /// weight, no momentum. A GPU can then queue the step before the loss
    /// is known to be finite.
    pub fn step_unless(
        &mut self,
        grads: &Grads,
        lr: f64,
        factors: &[f32],
        found_inf: Option<&Tensor>,
    ) {
        let cfg = &self.cfg;
        // (learning rate, first step of its momentum buffer) -> parameters.
        let mut groups: Vec<((f64, bool), Vec<usize>)> = Vec::new();
        for (k, &i) in grads.index.iter().enumerate() {
            let p = &mut self.params[i];
            let factor = match p.group {
                Group::Block(b) => f64::from(factors.get(b).copied().unwrap_or(1.0)),
                Group::Head => 1.0,
            };
            let first = cfg.momentum != 0.0 && p.momentum.is_none();
            if first {
                p.momentum = Some(p.value.zeros_like());
            }
            let key = (lr * factor, first);
            match groups.iter_mut().find(|(g, _)| *g == key) {
                Some((_, members)) => members.push(k),
                None => groups.push((key, vec![k])),
            }
        }
        for ((lr, first), members) in groups {
            let mut params = Vec::with_capacity(members.len());
            let mut bufs = Vec::with_capacity(members.len());
            let mut grad_ptrs = Vec::with_capacity(members.len());
            for &k in &members {
                let p = &self.params[grads.index[k]];
                params.push(p.value.as_ptr());
                bufs.push(p.momentum.as_ref().map_or(p.value.as_ptr(), Tensor::as_ptr));
                grad_ptrs.push(grads.grads[k].as_ptr());
            }
            let mut err = [0 as c_char; 512];
            // SAFETY: every pointer is a live tensor handle owned by `self`
            // or `grads` for the duration of the call; the shim catches C++
            // exceptions and writes a NUL-terminated message into `err`.
            let rc = unsafe {
                simfreeze_fused_sgd(
                    params.as_ptr(),
                    grad_ptrs.as_ptr(),
                    bufs.as_ptr(),
                    params.len(),
                    cfg.weight_decay,
                    cfg.momentum,
                    lr,
                    c_int::from(cfg.nesterov),
                    c_int::from(first),
                    found_inf.map_or(std::ptr::null(), Tensor::as_ptr),
                    err.as_mut_ptr(),
                    err.len(),
                )
            };
            if rc != 0 {
                // SAFETY: the shim NUL-terminated `err`.
                let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
                // libtorch refused the update (a device error, say): raised
                // like tch's own errors, so the run's guard reports it.
                std::panic::panic_any(TorchPanic(format!(
                    "fused SGD step: {}",
                    msg.to_string_lossy()
                )));
            }
        }
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
        // One copy to host memory per step, not one per block.
        let Some(device) = grads.grads.first().map(Tensor::device) else {
            return vec![0.0; layers];
        };
        let zero = Tensor::zeros([], (tch::Kind::Float, device));
        let all: Vec<Tensor> = sq
            .into_iter()
            .map(|s| s.unwrap_or_else(|| zero.shallow_clone()))
            .collect();
        Vec::try_from(Tensor::stack(&all, 0).sqrt().to_device(tch::Device::Cpu)).unwrap_or_default()
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
    use crate::model::vit::group_of;
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

    /// PyTorch's SGD rule in plain tensor operations, for one parameter.
    fn reference_update(
        p: &Tensor,
        buf: &mut Option<Tensor>,
        g: &Tensor,
        cfg: &SgdConfig,
        lr: f64,
    ) -> Tensor {
        let mut d = g + p * cfg.weight_decay;
        if cfg.momentum != 0.0 {
            let b = match buf.take() {
                None => d.copy(),
                Some(b) => b * cfg.momentum + &d,
            };
            d = if cfg.nesterov {
                &d + &b * cfg.momentum
            } else {
                b.copy()
            };
            *buf = Some(b);
        }
        p - d * lr
    }

    #[test]
    fn fused_step_follows_pytorch_rule_with_nesterov_decay_factors_and_late_unfreezing() {
        for (momentum, nesterov) in [(0.9, true), (0.9, false), (0.0, false)] {
            let cfg = SgdConfig {
                momentum,
                nesterov,
                weight_decay: 0.01,
                ..Default::default()
            };
            let vs = VarStore::new(tch::Device::Cpu);
            let root = vs.root();
            let names = [
                "blocks.0.mlp.fc1.weight",
                "blocks.1.attn.qkv.weight",
                "head.weight",
            ];
            let vars: Vec<Tensor> = names
                .iter()
                .map(|n| {
                    let mut path = root.clone();
                    let parts: Vec<&str> = n.split('.').collect();
                    for part in &parts[..parts.len() - 1] {
                        path = path.sub(*part);
                    }
                    path.var(
                        parts[parts.len() - 1],
                        &[3, 4],
                        tch::nn::Init::Randn {
                            mean: 0.0,
                            stdev: 1.0,
                        },
                    )
                })
                .collect();
            let mut shadow: Vec<Tensor> = vars.iter().map(|v| v.detach().copy()).collect();
            let mut bufs: Vec<Option<Tensor>> = vec![None, None, None];
            let mut opt = Sgd::with_groups(&vs, cfg.clone(), group_of);
            let factors = [0.5f32, 2.0];
            for step in 0..4 {
                // Block 0 is frozen for the first two steps, then trains.
                let frozen = if step < 2 { 1 } else { 0 };
                let loss = vars
                    .iter()
                    .map(|v| (v * v).sum(tch::Kind::Float) + v.sin().sum(tch::Kind::Float))
                    .fold(
                        Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                        |a, b| a + b,
                    );
                let grads = opt.backward(&loss, frozen);
                let lr = 0.1 / (step + 1) as f64;
                for (i, s) in shadow.iter_mut().enumerate() {
                    if i < frozen {
                        continue;
                    }
                    let g = s.shallow_clone() * 2.0 + s.cos();
                    let factor = if i < 2 { f64::from(factors[i]) } else { 1.0 };
                    *s = reference_update(s, &mut bufs[i], &g, &cfg, lr * factor);
                }
                opt.step(&grads, lr, &factors);
                for (v, s) in vars.iter().zip(&shadow) {
                    let diff = (v.detach() - s).abs().max().double_value(&[]);
                    assert!(
                        diff < 1e-5,
                        "momentum {momentum} nesterov {nesterov} step {step}: {diff}"
                    );
                }
            }
        }
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
        let mut opt = Sgd::with_groups(
            &vs,
            SgdConfig {
                momentum: 0.9,
                ..Default::default()
            },
            group_of,
        );
        for _ in 0..2 {
            let grads = opt.backward(&(&w * 3.0).sum(tch::Kind::Float), 0);
            opt.step(&grads, 0.1, &[]);
        }
        // p1 = 1 - 0.1*3 = 0.7; buf2 = 0.9*3 + 3 = 5.7; p2 = 0.7 - 0.57 = 0.13
        assert_relative_eq!(w.double_value(&[0]), 0.13, epsilon = 1e-6);
    }
}
