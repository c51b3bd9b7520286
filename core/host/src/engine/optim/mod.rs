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

use tch::{nn::VarStore, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::TorchPanic;
use crate::model::{Group, PrefixModel};

mod grads;
mod kernels;
mod recipe;
mod state;
#[cfg(test)]
mod tests;

use kernels::{foreach_norms, foreach_scale};
pub use recipe::{cosine_lr, AdamWConfig, OptimizerKind, Recipe, SgdConfig};

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

    /// The update after a backward, as both engines run it: the gradient
    /// sums a policy reads, its per-block gradient norms (taken before
    /// clipping, as a clipped PyTorch loop's hooks would see them; returned
    /// on the device, read after the update is queued), clipping, and the
    /// step, skipped inside the kernel when `found_inf` holds 1.
    pub fn update(
        &mut self,
        grads: &mut Grads,
        plan: &crate::engine::StepPlan<'_>,
        depth: usize,
        found_inf: Option<&Tensor>,
    ) -> Option<Tensor> {
        if plan.accumulate {
            self.accumulate(grads);
        }
        let norms = plan.grad_norms.then(|| self.grad_norms(grads, depth));
        self.clip(grads);
        self.step_unless(grads, plan.lr, plan.lr_factors, found_inf);
        norms
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
