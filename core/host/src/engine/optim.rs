//! The optimizers: SGD with momentum (optionally Nesterov) and L2 weight
//! decay, or AdamW (decoupled weight decay, bias correction), each with
//! PyTorch's update rule run by libtorch's fused kernel; one learning rate
//! per block (the policies' factors times timm's layer-wise decay), a
//! cosine schedule with optional linear warm-up, and optional
//! gradient-norm clipping.
//!
//! The optimizer state (momentum buffers, Adam moments and step counts) is
//! our own tensors (tch cannot save its optimizer state; checkpoints need
//! them). Invariant: a group that is frozen for a step is not touched at
//! all: no gradient is computed for it, and it gets no update, no weight
//! decay and no state update (AdamW's step count included, as PyTorch
//! skips a parameter without gradient), so frozen parameters stay
//! bit-identical.

use std::os::raw::{c_char, c_int};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::TorchPanic;
use crate::model::{Group, PrefixModel};

/// Which update rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// `train.sgd` (the paper's recipe).
    #[default]
    Sgd,
    /// `train.adamw` (the BEiT / MAE / DINOv2 fine-tuning recipe).
    AdamW,
}

/// SGD settings (the paper's recipe by default: momentum 0.9, lr 0.003,
/// cosine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient (of every parameter, as
    /// `torch.optim.SGD(model.parameters())`).
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

/// AdamW settings (defaults: timm's fine-tuning values, lr 1e-4, betas
/// 0.9 / 0.999, eps 1e-8, weight decay 0.05).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, skipped (as timm does) on one-dimensional
    /// parameters (norms, biases, LayerScale), the position embedding and
    /// the class and register tokens.
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
            warmup_steps: 0,
        }
    }
}

/// Everything that decides an update: the rule, its settings, the
/// layer-wise decay, clipping and label smoothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recipe {
    /// The rule.
    pub kind: OptimizerKind,
    /// Its settings when SGD.
    pub sgd: SgdConfig,
    /// Its settings when AdamW.
    pub adamw: AdamWConfig,
    /// Layer-wise learning-rate decay (1: none): a parameter of timm's layer
    /// `id` gets `layer_decay^(depth + 1 - id)` (block `i`: `^(depth - i)`,
    /// the embedding `^(depth + 1)`, the head 1).
    pub layer_decay: f64,
    /// Gradient-norm clipping over all trainable parameters (0: none).
    pub clip_grad_norm: f64,
    /// Label smoothing of the training loss (0: none).
    pub label_smoothing: f64,
}

impl Recipe {
    /// Plain SGD with these settings, nothing else.
    pub fn sgd(sgd: SgdConfig) -> Self {
        Recipe {
            sgd,
            layer_decay: 1.0,
            ..Default::default()
        }
    }

    /// Plain AdamW with these settings, nothing else.
    pub fn adamw(adamw: AdamWConfig) -> Self {
        Recipe {
            kind: OptimizerKind::AdamW,
            adamw,
            layer_decay: 1.0,
            ..Default::default()
        }
    }

    /// Checks the values; `at` names the section in messages (`train`).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let non_negative = |key: &str, v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{at}.{key} is {v}: {what} must be finite and >= 0"))
            }
        };
        match self.kind {
            OptimizerKind::Sgd => {
                let s = &self.sgd;
                non_negative("sgd.lr", s.lr, "the learning rate")?;
                if !(0.0..1.0).contains(&s.momentum) {
                    return Err(format!(
                        "{at}.sgd.momentum is {}: momentum must be in [0, 1)",
                        s.momentum
                    ));
                }
                non_negative("sgd.weight_decay", s.weight_decay, "weight decay")?;
            }
            OptimizerKind::AdamW => {
                let a = &self.adamw;
                non_negative("adamw.lr", a.lr, "the learning rate")?;
                for (key, b) in [("beta1", a.beta1), ("beta2", a.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(format!("{at}.adamw.{key} is {b}: it must be in [0, 1)"));
                    }
                }
                if !(a.eps.is_finite() && a.eps > 0.0) {
                    return Err(format!("{at}.adamw.eps is {}: it must be > 0", a.eps));
                }
                non_negative("adamw.weight_decay", a.weight_decay, "weight decay")?;
            }
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err(format!(
                "{at}.layer_decay is {}: it must be in (0, 1] (1: no decay; timm's fine-tuning \
                 recipes use 0.65 to 0.75)",
                self.layer_decay
            ));
        }
        non_negative("clip_grad_norm", self.clip_grad_norm, "the clipping norm")?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "{at}.label_smoothing is {}: it must be in [0, 1)",
                self.label_smoothing
            ));
        }
        Ok(())
    }

    /// Peak learning rate and warm-up of the chosen rule.
    fn schedule(&self) -> (f64, u64) {
        match self.kind {
            OptimizerKind::Sgd => (self.sgd.lr, self.sgd.warmup_steps),
            OptimizerKind::AdamW => (self.adamw.lr, self.adamw.warmup_steps),
        }
    }

    /// Learning rate at `step` of `total`: linear warm-up, then cosine to 0.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let (lr, warmup) = self.schedule();
        cosine_lr(lr, warmup, step, total)
    }
}

/// `peak` after a linear warm-up of `warmup` steps, then cosine to 0 at
/// `total`.
pub fn cosine_lr(peak: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = (step - warmup) as f64 / span;
    0.5 * peak * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
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

    // csrc/foreach.cpp
    fn simfreeze_foreach_norms(
        ts: *const *const C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_foreach_scale(
        ts: *const *const C_tensor,
        n: usize,
        scale: *const C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    // csrc/adamw.cpp
    fn simfreeze_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A parameter's optimizer state, created at its first update.
enum State {
    Momentum(Tensor),
    Adam {
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: Tensor,
    },
}

/// Checkpoint names of the state tensors, `<prefix>/<parameter>`.
const MOMENTUM: &str = "momentum";
const EXP_AVG: &str = "adamw.exp_avg";
const EXP_AVG_SQ: &str = "adamw.exp_avg_sq";
const STEP: &str = "adamw.step";

struct Param {
    name: String,
    group: Group,
    /// Layer-wise learning-rate scale.
    scale: f64,
    /// Whether weight decay applies.
    decays: bool,
    value: Tensor,
    state: Option<State>,
}

/// One of the two optimizers over a `VarStore`'s variables, grouped by
/// block.
pub struct Optimizer {
    recipe: Recipe,
    params: Vec<Param>,
    /// Per parameter, the sum of its gradients since the policy last read
    /// them (`Needs::ACC_GRAD_NORMS`), and the steps summed.
    grad_sum: Vec<Option<Tensor>>,
    sum_steps: u64,
    /// Each trainable gradient's block, and the same on the device, for
    /// the per-block gradient norms (kept until the trainable set
    /// changes).
    block_index: Option<(Vec<i64>, Tensor)>,
}

/// Checkpoint names of the gradient sums: `grad_sum/<parameter>`, and the
/// step count as a one-element tensor.
const GRAD_SUM: &str = "grad_sum";
const GRAD_SUM_STEPS: &str = "grad_sum/#steps";

impl Optimizer {
    /// Every variable of `vs`, in the block the model says it belongs to,
    /// with the model's layer-wise decay and weight-decay exemptions.
    pub fn new(vs: &VarStore, model: &dyn PrefixModel, recipe: Recipe) -> Self {
        let top = model.depth() + 1;
        let decay = recipe.layer_decay;
        Self::build(vs, recipe, |name, value| {
            let scale = decay.powi((top - model.layer_id(name).min(top)) as i32);
            let exempt = value.dim() <= 1 || name.ends_with(".bias") || model.no_weight_decay(name);
            (model.group_of(name), scale, !exempt)
        })
    }

    /// Every variable of `vs`, grouped by `group`, no layer-wise decay,
    /// weight decay everywhere.
    pub fn with_groups(vs: &VarStore, recipe: Recipe, group: impl Fn(&str) -> Group) -> Self {
        Self::build(vs, recipe, |name, _| (group(name), 1.0, true))
    }

    fn build(
        vs: &VarStore,
        recipe: Recipe,
        info: impl Fn(&str, &Tensor) -> (Group, f64, bool),
    ) -> Self {
        let sgd = recipe.kind == OptimizerKind::Sgd;
        let mut params: Vec<Param> = vs
            .variables()
            .into_iter()
            .map(|(name, value)| {
                let (group, scale, decays) = info(&name, &value);
                Param {
                    group,
                    scale,
                    // SGD decays every parameter, as the paper's recipe does.
                    decays: decays || sgd,
                    name,
                    value,
                    state: None,
                }
            })
            .collect();
        // Deterministic order (HashMap order is not).
        params.sort_by(|a, b| a.name.cmp(&b.name));
        let grad_sum = params.iter().map(|_| None).collect();
        Optimizer {
            recipe,
            params,
            grad_sum,
            sum_steps: 0,
            block_index: None,
        }
    }

    /// Adds this step's gradients (before clipping) to the sums a policy
    /// reads with [`Self::read_grad_sums`].
    pub fn accumulate(&mut self, grads: &Grads) {
        tch::no_grad(|| {
            for (&i, g) in grads.index.iter().zip(&grads.grads) {
                match &mut self.grad_sum[i] {
                    Some(sum) => {
                        let _ = sum.g_add_(g);
                    }
                    slot => *slot = Some(g.detach().copy()),
                }
            }
        });
        self.sum_steps += 1;
    }

    /// Per block (of `layers`), the L1 and L2 norms of the summed
    /// gradients and the steps summed; the sums start again from zero.
    /// Blocks `[0, frozen)` read 0 (a frozen block has no gradient to
    /// sum; what it summed before it froze is dropped).
    pub fn read_grad_sums(&mut self, layers: usize, frozen: usize) -> (Vec<f64>, Vec<f64>, u64) {
        let (mut l1, mut l2) = (vec![0f64; layers], vec![0f64; layers]);
        let mut parts: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for (p, sum) in self.params.iter().zip(&mut self.grad_sum) {
            let Some(sum) = sum.take() else { continue };
            if let Group::Block(b) = p.group {
                if b < layers && b >= frozen {
                    // Norms accumulated in float64, without a float64 copy.
                    let l1 = sum.norm_scalaropt_dtype(1.0, Kind::Double);
                    let l2 = sum.norm_scalaropt_dtype(2.0, Kind::Double);
                    parts.push((b, l1, l2.square()));
                }
            }
        }
        // One copy to host memory per read, not two per parameter.
        if !parts.is_empty() {
            let sums: Vec<Tensor> = parts
                .iter()
                .flat_map(|p| [p.1.shallow_clone(), p.2.shallow_clone()])
                .collect();
            let host = Vec::<f64>::try_from(Tensor::stack(&sums, 0).to_device(tch::Device::Cpu))
                .unwrap_or_default();
            for ((b, _, _), v) in parts.iter().zip(host.chunks(2)) {
                l1[*b] += v[0];
                l2[*b] += v[1];
            }
        }
        let steps = std::mem::take(&mut self.sum_steps);
        (l1, l2.into_iter().map(f64::sqrt).collect(), steps)
    }

    /// The gradient sums as checkpoint tensors.
    pub fn grad_sum_state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.grad_sum)
            .filter_map(|(p, s)| {
                let s = s.as_ref()?;
                Some((format!("{GRAD_SUM}/{}", p.name), s.shallow_clone()))
            })
            .collect();
        if self.sum_steps > 0 || !out.is_empty() {
            let steps = Tensor::from_slice(&[self.sum_steps as i64]);
            out.push((GRAD_SUM_STEPS.to_string(), steps));
        }
        out
    }

    /// Splits the gradient sums off checkpoint state and restores them.
    fn load_grad_sums(&mut self, state: &mut Vec<(String, Tensor)>) -> Result<(), String> {
        let prefix = format!("{GRAD_SUM}/");
        for (name, t) in std::mem::take(state) {
            if name == GRAD_SUM_STEPS {
                self.sum_steps = t.int64_value(&[0]) as u64;
            } else if let Some(param) = name.strip_prefix(&prefix) {
                let i = self
                    .params
                    .iter()
                    .position(|p| p.name == param)
                    .ok_or_else(|| format!("gradient sum of unknown parameter {param}"))?;
                self.grad_sum[i] = Some(t.to_device(self.params[i].value.device()));
            } else {
                state.push((name, t));
            }
        }
        Ok(())
    }

    /// The settings.
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// The learning-rate scale and whether weight decay applies, by
    /// parameter name (for tests and reports).
    pub fn param_settings(&self) -> Vec<(String, f64, bool)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.scale, p.decays))
            .collect()
    }

    /// The optimizer state that exists, as `<kind>/<parameter>` tensors
    /// (checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            match &p.state {
                None => {}
                Some(State::Momentum(m)) => {
                    out.push((format!("{MOMENTUM}/{}", p.name), m.shallow_clone()))
                }
                Some(State::Adam {
                    exp_avg,
                    exp_avg_sq,
                    step,
                }) => {
                    for (kind, t) in [(EXP_AVG, exp_avg), (EXP_AVG_SQ, exp_avg_sq), (STEP, step)] {
                        out.push((format!("{kind}/{}", p.name), t.shallow_clone()));
                    }
                }
            }
        }
        out
    }

    /// Restores state saved by [`Self::state`]; parameters not named keep
    /// none. State of the other optimizer is an error that says so.
    pub fn load_state(&mut self, mut state: Vec<(String, Tensor)>) -> Result<(), String> {
        self.load_grad_sums(&mut state)?;
        let mut by_name: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
        let sgd = self.recipe.kind == OptimizerKind::Sgd;
        if let Some(other) = by_name.keys().find(|k| {
            let momentum = k.starts_with(&format!("{MOMENTUM}/"));
            if sgd {
                !momentum
            } else {
                momentum
            }
        }) {
            return Err(format!(
                "the checkpoint holds {} state ({other}), the run trains with {:?}: resume with \
                 the optimizer it was started with",
                if sgd { "AdamW" } else { "SGD" },
                self.recipe.kind
            ));
        }
        for p in &mut self.params {
            let mut take = |kind: &str| -> Result<Option<Tensor>, String> {
                let Some(t) = by_name.remove(&format!("{kind}/{}", p.name)) else {
                    return Ok(None);
                };
                let want = if kind == STEP {
                    Vec::new()
                } else {
                    p.value.size()
                };
                if t.size() != want {
                    return Err(format!(
                        "{kind} of {} has shape {:?}, expected {want:?}",
                        p.name,
                        t.size()
                    ));
                }
                Ok(Some(t.to_device(p.value.device())))
            };
            p.state = if sgd {
                take(MOMENTUM)?.map(State::Momentum)
            } else {
                match (take(EXP_AVG)?, take(EXP_AVG_SQ)?, take(STEP)?) {
                    (Some(exp_avg), Some(exp_avg_sq), Some(step)) => Some(State::Adam {
                        exp_avg,
                        exp_avg_sq,
                        step,
                    }),
                    (None, None, None) => None,
                    _ => return Err(format!("incomplete AdamW state for {}", p.name)),
                }
            };
        }
        match by_name.keys().next() {
            Some(extra) => Err(format!("optimizer state for unknown parameter {extra}")),
            None => Ok(()),
        }
    }

    /// Gradients of `loss` for the parameters of the trainable blocks
    /// (`[frozen, L)`) and the head, computed with `run_backward`: nothing
    /// accumulates in `.grad`, so there is nothing to zero, and frozen
    /// parameters are not even asked for a gradient.
    pub fn backward(&self, loss: &Tensor, frozen: usize) -> Grads {
        self.backward_with::<std::convert::Infallible>(frozen, |inputs| {
            Ok(Tensor::run_backward(&[loss], inputs, false, false))
        })
        .unwrap_or_else(|never| match never {})
    }

    /// The gradients `backward` computes from the parameters trainable
    /// with `frozen` blocks frozen (in the optimizer's order, the same on
    /// every rank): a data-parallel engine's backward that all-reduces as
    /// it goes.
    pub fn backward_with<E>(
        &self,
        frozen: usize,
        backward: impl FnOnce(&[&Tensor]) -> Result<Vec<Tensor>, E>,
    ) -> Result<Grads, E> {
        let index = self.trainable(frozen);
        let inputs: Vec<&Tensor> = index.iter().map(|&i| &self.params[i].value).collect();
        let grads = backward(&inputs)?;
        assert_eq!(grads.len(), index.len(), "one gradient per parameter");
        Ok(Grads::new(index, grads))
    }

    fn trainable(&self, frozen: usize) -> Vec<usize> {
        (0..self.params.len())
            .filter(|&i| !matches!(self.params[i].group, Group::Block(b) if b < frozen))
            .collect()
    }

    /// Gradients from elsewhere (a reference implementation, another
    /// process), by parameter name, for the parameters trainable with
    /// `frozen` blocks frozen; a trainable parameter without one is an
    /// error.
    pub fn grads_from(
        &self,
        named: &std::collections::HashMap<String, Tensor>,
        frozen: usize,
    ) -> Result<Grads, String> {
        let index = self.trainable(frozen);
        let grads = index
            .iter()
            .map(|&i| {
                let name = &self.params[i].name;
                named
                    .get(name)
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| format!("no gradient for {name}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Grads::new(index, grads))
    }

    /// Scales the gradients so that their global L2 norm is at most
    /// `recipe.clip_grad_norm`, as `torch.nn.utils.clip_grad_norm_`
    /// (`foreach`): the per-tensor norms in one `_foreach_norm` (shared
    /// with [`Self::grad_norms`] in the same step), the scaling in one
    /// `_foreach_mul`, on the device, without a host read.
    pub fn clip(&self, grads: &mut Grads) {
        let max = self.recipe.clip_grad_norm;
        if max <= 0.0 || grads.grads.is_empty() {
            return;
        }
        let total = grads.norms().norm();
        let coef = (total + 1e-6).reciprocal().g_mul_scalar(max).clamp_max(1.0);
        // Out of place: autograd may hand back gradients that share memory
        // (with one image, the class token's is a view of the position
        // embedding's), which an in-place product would scale twice.
        grads.grads = foreach_scale(&grads.grads, &coef);
        grads.norms = None;
    }

    /// One update at learning rate `lr` of the parameters in `grads`;
    /// `factors[i]` scales block `i`'s learning rate (empty: all 1).
    pub fn step(&mut self, grads: &Grads, lr: f64, factors: &[f32]) {
        self.step_unless(grads, lr, factors, None);
    }

    /// [`Optimizer::step`], skipped inside the kernel when `found_inf` (a
    /// scalar float tensor on the parameters' device) holds 1: nothing
    /// moves, no weight, no state. A GPU can then queue the step before
    /// the loss is known to be finite.
    ///
    /// PyTorch's rules, run by libtorch's fused kernels: one call per
    /// distinct (learning rate, weight decay) and, for SGD, per first step
    /// of a momentum buffer, instead of several tensor operations per
    /// parameter.
    pub fn step_unless(
        &mut self,
        grads: &Grads,
        lr: f64,
        factors: &[f32],
        found_inf: Option<&Tensor>,
    ) {
        let recipe = &self.recipe;
        let (momentum, wd) = match recipe.kind {
            OptimizerKind::Sgd => (recipe.sgd.momentum, recipe.sgd.weight_decay),
            OptimizerKind::AdamW => (0.0, recipe.adamw.weight_decay),
        };
        // (learning rate, weight decay, first step of a momentum buffer)
        // -> positions in `grads`.
        let mut groups: Vec<((u64, u64, bool), Vec<usize>)> = Vec::new();
        for (k, &i) in grads.index.iter().enumerate() {
            let p = &mut self.params[i];
            let factor = match p.group {
                Group::Block(b) => f64::from(factors.get(b).copied().unwrap_or(1.0)),
                Group::Head => 1.0,
            };
            let first = p.state.is_none();
            match recipe.kind {
                OptimizerKind::Sgd if first && momentum != 0.0 => {
                    p.state = Some(State::Momentum(p.value.zeros_like()))
                }
                OptimizerKind::AdamW if first => {
                    p.state = Some(State::Adam {
                        exp_avg: p.value.zeros_like(),
                        exp_avg_sq: p.value.zeros_like(),
                        step: Tensor::zeros([], (Kind::Float, p.value.device())),
                    })
                }
                _ => {}
            }
            let first = first && recipe.kind == OptimizerKind::Sgd && momentum != 0.0;
            let decay = if p.decays { wd } else { 0.0 };
            let key = ((lr * factor * p.scale).to_bits(), decay.to_bits(), first);
            match groups.iter_mut().find(|(g, _)| *g == key) {
                Some((_, members)) => members.push(k),
                None => groups.push((key, vec![k])),
            }
        }
        for ((lr, decay, first), members) in groups {
            let (lr, decay) = (f64::from_bits(lr), f64::from_bits(decay));
            let rc = self.fused(grads, &members, lr, decay, first, found_inf);
            if let Err(msg) = rc {
                // libtorch refused the update (a device error, say): raised
                // like tch's own errors, so the run's guard reports it.
                std::panic::panic_any(TorchPanic(msg));
            }
        }
    }

    /// One fused kernel call over `members` (positions in `grads`).
    fn fused(
        &self,
        grads: &Grads,
        members: &[usize],
        lr: f64,
        decay: f64,
        first: bool,
        found_inf: Option<&Tensor>,
    ) -> Result<(), String> {
        let n = members.len();
        let (mut params, mut grad_ptrs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
        for &k in members {
            let p = &self.params[grads.index[k]];
            params.push(p.value.as_ptr());
            grad_ptrs.push(grads.grads[k].as_ptr());
            match &p.state {
                Some(State::Momentum(m)) => s1.push(m.as_ptr()),
                Some(State::Adam {
                    exp_avg,
                    exp_avg_sq,
                    step,
                }) => {
                    s1.push(exp_avg.as_ptr());
                    s2.push(exp_avg_sq.as_ptr());
                    s3.push(step.as_ptr());
                }
                // SGD without momentum: the buffers are ignored.
                None => s1.push(p.value.as_ptr()),
            }
        }
        let skip = found_inf.map_or(std::ptr::null(), Tensor::as_ptr);
        let mut err = [0 as c_char; 512];
        let (what, rc) = match self.recipe.kind {
            OptimizerKind::Sgd => {
                let s = &self.recipe.sgd;
                // SAFETY: every pointer is a live tensor handle owned by
                // `self` or `grads` for the duration of the call; the shim
                // catches C++ exceptions and writes a NUL-terminated message
                // into `err`.
                let rc = unsafe {
                    simfreeze_fused_sgd(
                        params.as_ptr(),
                        grad_ptrs.as_ptr(),
                        s1.as_ptr(),
                        n,
                        decay,
                        s.momentum,
                        lr,
                        c_int::from(s.nesterov),
                        c_int::from(first),
                        skip,
                        err.as_mut_ptr(),
                        err.len(),
                    )
                };
                ("SGD", rc)
            }
            OptimizerKind::AdamW => {
                let a = &self.recipe.adamw;
                // SAFETY: as above; every parameter has its Adam state.
                let rc = unsafe {
                    simfreeze_fused_adamw(
                        params.as_ptr(),
                        grad_ptrs.as_ptr(),
                        s1.as_ptr(),
                        s2.as_ptr(),
                        s3.as_ptr(),
                        n,
                        lr,
                        a.beta1,
                        a.beta2,
                        decay,
                        a.eps,
                        skip,
                        err.as_mut_ptr(),
                        err.len(),
                    )
                };
                ("AdamW", rc)
            }
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the shim NUL-terminated `err`.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        Err(format!("fused {what} step: {}", msg.to_string_lossy()))
    }

    /// L2 norm of the gradient of each block `0..layers` (0 for a block
    /// without gradient), as a float tensor `[layers]` on the device, not
    /// read: the caller reads it after the update is queued. The
    /// per-tensor norms come from one `_foreach_norm`; each block's is the
    /// root of the sum of its tensors' squared norms (one `index_add`).
    pub fn grad_norms(&mut self, grads: &mut Grads, layers: usize) -> Tensor {
        let Some(device) = grads.grads.first().map(Tensor::device) else {
            return Tensor::zeros([layers as i64], (Kind::Float, tch::Device::Cpu));
        };
        // Each gradient's block (`layers` for the head and the final norm,
        // a slot dropped below), uploaded once per set of trainable
        // parameters: an upload from pageable memory waits for the device.
        let blocks: Vec<i64> = grads
            .index
            .iter()
            .map(|&i| match self.params[i].group {
                Group::Block(b) if b < layers => b as i64,
                _ => layers as i64,
            })
            .collect();
        if self.block_index.as_ref().map(|(b, _)| b) != Some(&blocks) {
            let index = Tensor::from_slice(&blocks).to_device(device);
            self.block_index = Some((blocks, index));
        }
        let index = &self.block_index.as_ref().expect("set above").1;
        let sq = grads.norms().square();
        Tensor::zeros([layers as i64 + 1], (Kind::Float, device))
            .index_add(0, index, &sq)
            .narrow(0, 0, layers as i64)
            .sqrt()
    }
}

/// The L2 norm of each tensor, `[n]` float32 on their device, in one
/// `_foreach_norm` (`csrc/foreach.cpp`).
fn foreach_norms(ts: &[Tensor]) -> Tensor {
    let ptrs: Vec<*const C_tensor> = ts.iter().map(Tensor::as_ptr).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    // SAFETY: the handles are live for the call; on success the shim
    // writes a new tensor handle that the returned Tensor owns.
    let rc = unsafe {
        simfreeze_foreach_norms(
            ptrs.as_ptr(),
            ptrs.len(),
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    shim_result(rc, &err, "gradient norms");
    // SAFETY: rc == 0, so `out` is a fresh handle from the shim.
    unsafe { Tensor::from_ptr(out) }.to_kind(Kind::Float)
}

/// `ts[i] * scale` for every tensor, out of place, in one `_foreach_mul`
/// (`csrc/foreach.cpp`).
fn foreach_scale(ts: &[Tensor], scale: &Tensor) -> Vec<Tensor> {
    let ptrs: Vec<*const C_tensor> = ts.iter().map(Tensor::as_ptr).collect();
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); ts.len()];
    let mut err = [0 as c_char; 512];
    // SAFETY: as in `foreach_norms`; `out` has room for one handle per
    // tensor.
    let rc = unsafe {
        simfreeze_foreach_scale(
            ptrs.as_ptr(),
            ptrs.len(),
            scale.as_ptr(),
            out.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    shim_result(rc, &err, "gradient clipping");
    // SAFETY: rc == 0, so every slot holds a fresh handle from the shim.
    out.into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect()
}

/// A failed shim call raised like tch's own errors, so the run's guard
/// reports it.
fn shim_result(rc: c_int, err: &[c_char], what: &str) {
    if rc != 0 {
        // SAFETY: the shim NUL-terminated `err`.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        std::panic::panic_any(TorchPanic(format!("{what}: {}", msg.to_string_lossy())));
    }
}

/// Gradients of one step, for the parameters that were trainable.
pub struct Grads {
    index: Vec<usize>,
    grads: Vec<Tensor>,
    /// Each gradient's L2 norm, `[n]`, once computed (gradient norms and
    /// clipping share it).
    norms: Option<Tensor>,
}

impl Grads {
    fn new(index: Vec<usize>, grads: Vec<Tensor>) -> Self {
        Grads {
            index,
            grads,
            norms: None,
        }
    }

    /// Each gradient's L2 norm, computed at the first call.
    fn norms(&mut self) -> &Tensor {
        let grads = &self.grads;
        self.norms.get_or_insert_with(|| foreach_norms(grads))
    }

    /// The gradients, in the optimizer's parameter order (the same on
    /// every rank).
    pub fn tensors(&self) -> &[Tensor] {
        &self.grads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vit::group_of;
    use approx::assert_relative_eq;

    #[test]
    fn cosine_schedule_with_warmup() {
        let c = Recipe::sgd(SgdConfig {
            lr: 1.0,
            warmup_steps: 10,
            ..Default::default()
        });
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
            let mut opt = Optimizer::with_groups(&vs, Recipe::sgd(cfg.clone()), group_of);
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
        let mut opt = Optimizer::with_groups(
            &vs,
            Recipe::sgd(SgdConfig {
                momentum: 0.9,
                ..Default::default()
            }),
            group_of,
        );
        for _ in 0..2 {
            let grads = opt.backward(&(&w * 3.0).sum(tch::Kind::Float), 0);
            opt.step(&grads, 0.1, &[]);
        }
        // p1 = 1 - 0.1*3 = 0.7; buf2 = 0.9*3 + 3 = 5.7; p2 = 0.7 - 0.57 = 0.13
        assert_relative_eq!(w.double_value(&[0]), 0.13, epsilon = 1e-6);
    }

    fn one_var(vs: &VarStore, name: &str, shape: &[i64]) -> Tensor {
        let mut path = vs.root();
        let parts: Vec<&str> = name.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            path = path.sub(*part);
        }
        path.var(
            parts[parts.len() - 1],
            shape,
            tch::nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )
    }

    #[test]
    fn adamw_step_skipped_on_found_inf_leaves_weights_moments_and_step_count() {
        let vs = VarStore::new(tch::Device::Cpu);
        let w = one_var(&vs, "blocks.0.mlp.fc1.weight", &[3, 4]);
        let mut opt = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
        let loss = |w: &Tensor| (w * w).sum(tch::Kind::Float);
        let grads = opt.backward(&loss(&w), 0);
        opt.step(&grads, 0.01, &[]);
        let before: Vec<(String, Tensor)> = opt
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let w_before = w.detach().copy();
        assert_eq!(before.len(), 3);
        let grads = opt.backward(&loss(&w), 0);
        let inf = Tensor::ones([], (tch::Kind::Float, tch::Device::Cpu));
        opt.step_unless(&grads, 0.01, &[], Some(&inf));
        assert!(w.detach().equal(&w_before), "weights moved");
        for ((n, a), (_, b)) in before.iter().zip(opt.state()) {
            assert!(a.equal(&b), "{n} changed");
        }
        let step = &opt.state()[2].1;
        assert_eq!(step.double_value(&[]), 1.0);
        let fine = Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
        opt.step_unless(&grads, 0.01, &[], Some(&fine));
        assert!(!w.detach().equal(&w_before));
        assert_eq!(opt.state()[2].1.double_value(&[]), 2.0);
    }

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit_only() {
        let vs = VarStore::new(tch::Device::Cpu);
        let a = one_var(&vs, "blocks.0.attn.qkv.weight", &[4, 4]);
        let b = one_var(&vs, "head.weight", &[2, 4]);
        for (limit, scale) in [(1.0, 30.0), (1e6, 1.0)] {
            let recipe = Recipe {
                clip_grad_norm: limit,
                ..Recipe::sgd(Default::default())
            };
            let opt = Optimizer::with_groups(&vs, recipe, group_of);
            let loss = (&a * scale).sum(tch::Kind::Float) + (&b * scale).sum(tch::Kind::Float);
            let mut grads = opt.backward(&loss, 0);
            let norm = |g: &Grads| {
                g.grads
                    .iter()
                    .map(|t| t.square().sum(tch::Kind::Float).double_value(&[]))
                    .sum::<f64>()
                    .sqrt()
            };
            let raw = norm(&grads);
            opt.clip(&mut grads);
            let clipped = norm(&grads);
            if raw > limit {
                assert!((clipped - limit).abs() < 1e-4 * limit, "{raw} -> {clipped}");
            } else {
                assert_eq!(clipped, raw);
            }
        }
    }

    /// The one-kernel norms and scaling compute on the CPU exactly what
    /// the per-tensor loop they replaced computed (clipping), and the
    /// per-block norms agree with sums of squares to float rounding.
    #[test]
    fn foreach_clipping_and_block_norms_match_the_per_tensor_loop() {
        tch::manual_seed(7);
        let vs = VarStore::new(tch::Device::Cpu);
        let vars: Vec<Tensor> = [
            ("blocks.0.attn.qkv.weight", vec![6, 4]),
            ("blocks.0.attn.qkv.bias", vec![6]),
            ("blocks.1.mlp.fc1.weight", vec![5, 3]),
            ("head.weight", vec![2, 4]),
        ]
        .iter()
        .map(|(n, shape)| one_var(&vs, n, shape))
        .collect();
        let loss = vars
            .iter()
            .map(|v| (v * v * 3.0).sum(tch::Kind::Float) + v.sin().sum(tch::Kind::Float))
            .fold(
                Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                |a, b| a + b,
            );
        let recipe = Recipe {
            clip_grad_norm: 0.1,
            ..Recipe::sgd(Default::default())
        };
        let mut opt = Optimizer::with_groups(&vs, recipe, group_of);
        let mut grads = opt.backward(&loss, 0);
        let raw: Vec<Tensor> = grads.grads.iter().map(|g| g.copy()).collect();
        // Per block, the loop: sums of squares, then a root.
        let mut want = [0f64; 2];
        for (&i, g) in grads.index.iter().zip(&raw) {
            if let Group::Block(b) = opt.params[i].group {
                want[b] += g.square().sum(tch::Kind::Float).double_value(&[]);
            }
        }
        let norms: Vec<f32> = Vec::try_from(opt.grad_norms(&mut grads, 2)).unwrap();
        for b in 0..2 {
            let w = want[b].sqrt();
            assert!(
                (f64::from(norms[b]) - w).abs() <= 1e-6 * w,
                "{norms:?} {want:?}"
            );
        }
        // Clipping, the loop it replaced.
        let total = Tensor::stack(
            &raw.iter()
                .map(|g| g.norm().to_kind(tch::Kind::Float))
                .collect::<Vec<_>>(),
            0,
        )
        .norm();
        let coef = (total + 1e-6).reciprocal().g_mul_scalar(0.1).clamp_max(1.0);
        opt.clip(&mut grads);
        for (g, r) in grads.grads.iter().zip(&raw) {
            assert!(g.equal(&(r * &coef)), "clipping changed a number");
        }
    }

    #[test]
    fn state_of_the_other_optimizer_is_refused_naming_both() {
        let vs = VarStore::new(tch::Device::Cpu);
        let w = one_var(&vs, "head.weight", &[2, 2]);
        let mut adamw = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
        let grads = adamw.backward(&w.sum(tch::Kind::Float), 0);
        adamw.step(&grads, 0.1, &[]);
        let mut sgd = Optimizer::with_groups(&vs, Recipe::sgd(Default::default()), group_of);
        let e = sgd.load_state(adamw.state()).unwrap_err();
        assert!(e.contains("AdamW state") && e.contains("Sgd"), "{e}");
        let mut again = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
        again.load_state(adamw.state()).unwrap();
        assert_eq!(again.state().len(), 3);
        let partial: Vec<_> = adamw.state().into_iter().take(2).collect();
        let e = again.load_state(partial).unwrap_err();
        assert!(e.contains("incomplete"), "{e}");
    }
}
