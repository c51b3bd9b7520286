//! One process, one device: the engine every run used before there was a
//! choice. A step runs the forward with the frozen prefix outside autograd,
//! refuses a non-finite loss before any update, backpropagates into the
//! trainable blocks only and steps the optimizer on them.
//!
//! Invariant: frozen parameters receive no update of any kind (no weight
//! decay, no momentum drift): they are bit-identical across steps.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::data::Dataset;
use crate::engine::optim::{Optimizer, Recipe};
use crate::engine::{reads, Batch, Engine, StepError, StepOut, StepPlan};
use crate::error::{torch_guard, TorchError};
use crate::model::precision::Precision;
use crate::model::weights::{self, Checkpoint, HeadInit};
use crate::model::{Forward, PrefixModel, Vit, VitConfig};

/// The model's shape as JSON beside the final weights (its LayerNorm
/// epsilon is read back when the weights are loaded).
pub const MODEL_INFO_FILE: &str = "model.json";

/// A ViT, its variables and its optimizer on one device.
pub struct SingleEngine {
    pub(crate) vs: nn::VarStore,
    pub(crate) model: Vit,
    pub(crate) opt: Optimizer,
    pub(crate) device: Device,
}

impl SingleEngine {
    /// Builds the model (initialised from libtorch's current seed) and its
    /// optimizer on `device`.
    pub fn new(
        cfg: &VitConfig,
        precision: Precision,
        recipe: Recipe,
        device: Device,
    ) -> Result<Self, TorchError> {
        if device.is_cuda() {
            // TF32 for float32 matrix products (docs/gpu.md).
            crate::model::precision::cuda_matmul_tf32(true);
        }
        torch_guard(
            || format!("building the model on {device:?}"),
            || {
                let vs = nn::VarStore::new(device);
                let model = Vit::build(&vs, cfg, precision);
                let opt = Optimizer::new(&vs, &model, recipe);
                SingleEngine {
                    vs,
                    model,
                    opt,
                    device,
                }
            },
        )
    }
}

impl SingleEngine {
    /// The model's parameters by name.
    pub(crate) fn model_tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.variables().into_iter().collect()
    }
}

impl Engine for SingleEngine {
    fn model(&self) -> &dyn PrefixModel {
        &self.model
    }

    fn device(&self) -> Device {
        self.device
    }

    fn import_weights(&mut self, ck: Checkpoint, head: HeadInit) -> Result<String> {
        Ok(weights::load_into(&self.vs, &self.model.cfg, ck, head)?.to_string())
    }

    fn lr_at(&self, step: u64, total: u64) -> f64 {
        self.opt.recipe().lr_at(step, total)
    }

    fn step(
        &mut self,
        batch: Batch,
        y: &Tensor,
        plan: &StepPlan<'_>,
    ) -> Result<StepOut, StepError> {
        let (model, opt) = (&self.model, &mut self.opt);
        torch_guard(
            || "in a training step".into(),
            || train_step(model, opt, batch, y, plan),
        )
        .map_err(StepError::Torch)?
        .map_err(StepError::Diverged)
    }

    fn evaluate(&self, data: &Dataset) -> Result<(f64, f64), TorchError> {
        torch_guard(
            || "evaluating".into(),
            || evaluate(&self.model, data, self.device),
        )
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        // Optimizer state is named `<kind>/<parameter>`; no variable name
        // has a `/`.
        tensors.extend(self.opt.state());
        tensors.extend(self.opt.grad_sum_state());
        tensors
    }

    fn load_state_tensors(&mut self, path: &Path, loaded: Vec<(String, Tensor)>) -> Result<()> {
        let mut vars = self.vs.variables();
        let mut state = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in loaded {
                if name.contains('/') {
                    state.push((name, t));
                } else if let Some(mut v) = vars.remove(&name) {
                    if v.size() != t.size() {
                        bail!(
                            "{}: {name} has shape {:?}, the model {:?}",
                            path.display(),
                            t.size(),
                            v.size()
                        );
                    }
                    v.copy_(&t);
                } else {
                    bail!("{}: unknown tensor {name}", path.display());
                }
            }
            Ok(())
        })?;
        if let Some(missing) = vars.keys().next() {
            bail!("{}: no tensor for {missing}", path.display());
        }
        self.opt
            .load_state(state)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn read_grad_sums(&mut self, frozen: usize) -> (Vec<f64>, Vec<f64>, u64) {
        let layers = self.model.depth();
        self.opt.read_grad_sums(layers, frozen)
    }

    fn save_model(&self, path: &Path) -> Result<()> {
        let (vs, cfg) = (&self.vs, &self.model.cfg);
        let info = path.with_file_name(MODEL_INFO_FILE);
        fs::write(&info, serde_json::to_string_pretty(cfg)?)
            .with_context(|| format!("cannot write {}", info.display()))?;
        let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let tmp = path.with_extension("tmp");
        Tensor::write_safetensors(&tensors, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// One optimizer step. Shared by `run` and `bench`. A NaN or infinite loss
/// is returned as `Err(loss)` and the step updates nothing, so a diverged
/// step never reaches the weights.
pub fn train_step(
    model: &dyn PrefixModel,
    opt: &mut Optimizer,
    batch: Batch,
    y: &Tensor,
    plan: &StepPlan<'_>,
) -> Result<StepOut, f64> {
    let on_gpu = y.device().is_cuda();
    train_step_checked(model, opt, batch, y, plan, on_gpu)
}

/// [`train_step`]; with `defer_check` the loss is read only after the
/// backward and the update are queued, and the fused kernel skips the
/// update itself when the loss is not finite. On a GPU this saves the host
/// synchronisation between forward and backward; on the CPU reading the
/// loss first costs nothing and skips a wasted backward.
fn train_step_checked(
    model: &dyn PrefixModel,
    opt: &mut Optimizer,
    batch: Batch,
    y: &Tensor,
    plan: &StepPlan<'_>,
    defer_check: bool,
) -> Result<StepOut, f64> {
    let out = forward(model, batch, plan.frozen);
    let loss_t = loss_of(&out.logits, y, opt.recipe().label_smoothing);
    // The feature copy is queued right behind the forward, before the loss
    // is read: reading the loss waits for it too, and the backward is not
    // held up by a second synchronisation after it. Non-blocking
    // device-to-host copies land in pinned memory; on the CPU this is the
    // tensor itself.
    let cls_host = plan.features.then(|| to_host(&out.cls));
    // The one read of the loss (`reads`): first on the CPU, where it costs
    // nothing and skips a wasted backward; after the update is queued on
    // a GPU.
    let early = match defer_check {
        true => None,
        false => {
            let loss = reads::scalar(&loss_t);
            if !loss.is_finite() {
                return Err(loss);
            }
            Some(loss)
        }
    };
    let mut grads = opt.backward(&loss_t, plan.frozen);
    let found_inf = defer_check.then(|| {
        loss_t
            .detach()
            .isfinite()
            .logical_not()
            .to_kind(Kind::Float)
    });
    let norms = opt.update(&mut grads, plan, model.depth(), found_inf.as_ref());
    let loss = match early {
        Some(loss) => loss,
        None => reads::scalar(&loss_t),
    };
    if !loss.is_finite() {
        return Err(loss);
    }
    Ok(StepOut {
        loss,
        cls: out.cls,
        cls_host,
        grad_norms: norms.as_ref().map_or_else(Vec::new, reads::f32s),
        labels_host: None,
        stop: plan.stop_vote,
        comm: None,
    })
}

/// The forward pass of a step under `frozen`.
pub(crate) fn forward(model: &dyn PrefixModel, batch: Batch, frozen: usize) -> Forward {
    match batch {
        Batch::Images(x) => model.forward_frozen(&x, frozen),
        Batch::Boundary { h, after } => model.forward_from(h, after, frozen),
    }
}

/// The mean training loss: cross-entropy, label-smoothed when asked.
pub(crate) fn loss_of(logits: &Tensor, y: &Tensor, smoothing: f64) -> Tensor {
    if smoothing > 0.0 {
        logits.cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, smoothing)
    } else {
        logits.cross_entropy_for_logits(y)
    }
}

/// Features copied to host memory, float32: non-blocking into pinned
/// memory from a GPU, the tensor itself on the CPU.
pub(crate) fn to_host(cls: &Tensor) -> Tensor {
    cls.detach()
        .to_kind(Kind::Float)
        .to_device_(Device::Cpu, Kind::Float, true, false)
}

/// Top-1 accuracy (%) and mean loss on `data`.
pub fn evaluate(model: &dyn PrefixModel, data: &Dataset, device: Device) -> (f64, f64) {
    let (correct, loss_sum, n) = evaluate_counts(model, data, 0..data.len(), device);
    let n = n.max(1) as f64;
    (100.0 * correct as f64 / n, loss_sum / n)
}

/// Correct predictions, summed loss and count over the samples `rows` of
/// `data` (a data-parallel rank's share).
pub(crate) fn evaluate_counts(
    model: &dyn PrefixModel,
    data: &Dataset,
    rows: std::ops::Range<i64>,
    device: Device,
) -> (i64, f64, i64) {
    tch::no_grad(|| {
        // The counts stay on the device and are read once, at the end: the
        // host queues every batch without waiting for the previous one.
        // The loss sum adds each batch's float32 sum in float64, as the
        // host did when it read every batch.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let bs = 256;
        let (mut start, n) = (rows.start, rows.end);
        while start < n {
            let len = bs.min(n - start);
            let x = upload(&data.images.narrow(0, start, len), device);
            let y = upload(&data.labels.narrow(0, start, len), device);
            let logits = model.forward_frozen(&x, model.depth()).logits;
            let batch_loss =
                logits.cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0);
            loss_sum += batch_loss.to_kind(Kind::Double);
            correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
            start += len;
        }
        let sums = reads::f64s(&Tensor::stack(
            &[correct.to_kind(Kind::Double), loss_sum],
            0,
        ));
        (sums[0] as i64, sums[1], rows.end - rows.start)
    })
}

/// Moves a host batch (images or labels) to `device`: on a GPU through
/// pinned memory with a non-blocking copy, so that the upload is queued
/// behind the work already there instead of waiting for it
/// (`_pin_memory`: `pin_memory(device)` prints a deprecation warning on
/// every call in libtorch 2.11); on the CPU, or already on `device`, the
/// tensor itself.
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    if t.device() == device {
        t.shallow_clone()
    } else if device.is_cuda() {
        t.internal_pin_memory(device)
            .to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        crate::model::test_config(4)
    }

    fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The tiny model with Nesterov momentum and weight decay: every way a
    /// parameter could move without a gradient.
    fn with_momentum_and_decay() -> (nn::VarStore, Vit, Optimizer) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let cfg = crate::engine::optim::SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.05,
            warmup_steps: 0,
        };
        let opt = Optimizer::new(&vs, &model, Recipe::sgd(cfg));
        (vs, model, opt)
    }

    /// `n` steps at lr 0.1 with `frozen` blocks frozen, on the whole of
    /// `data`.
    fn plain_steps(model: &Vit, opt: &mut Optimizer, data: &Dataset, frozen: usize, n: usize) {
        for _ in 0..n {
            let batch = Batch::Images(data.images.shallow_clone());
            let plan = StepPlan::simple(0.1, frozen);
            train_step(model, opt, batch, &data.labels, &plan).unwrap();
        }
    }

    fn frozen_group(name: &str, k: usize) -> bool {
        matches!(crate::model::vit::group_of(name), crate::model::Group::Block(i) if i < k)
    }

    #[test]
    fn frozen_parameters_are_bit_identical_with_momentum_and_weight_decay() {
        tch::manual_seed(1);
        let (vs, model, mut opt) = with_momentum_and_decay();
        let data = Dataset::synthetic(16, 4, 1, 8, 0);
        // Train everything first, so every block has momentum to drift with.
        plain_steps(&model, &mut opt, &data, 0, 3);
        let before = snapshot(&vs);
        plain_steps(&model, &mut opt, &data, 2, 4);
        let after = snapshot(&vs);
        let mut changed = 0;
        for ((name, a), (_, b)) in before.iter().zip(&after) {
            if frozen_group(name, 2) {
                assert!(a.equal(b), "{name} moved while frozen");
            } else if !a.equal(b) {
                changed += 1;
            }
        }
        assert!(changed > 0, "trainable parameters must still move");
        // A released probe trains again.
        plain_steps(&model, &mut opt, &data, 1, 1);
        let released = snapshot(&vs);
        let moved = before
            .iter()
            .zip(&released)
            .any(|((n, a), (_, b))| n.starts_with("blocks.1.") && !a.equal(b));
        assert!(moved, "block 1 must train once it is no longer frozen");
    }

    #[test]
    fn lr_factor_zero_holds_a_block_still() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let mut opt = Optimizer::new(&vs, &model, Recipe::sgd(Default::default()));
        let data = Dataset::synthetic(8, 4, 1, 8, 1);
        let before = snapshot(&vs);
        let plan = StepPlan {
            lr_factors: &[1.0, 0.0, 1.0],
            ..StepPlan::simple(0.1, 0)
        };
        train_step(
            &model,
            &mut opt,
            Batch::Images(data.images.shallow_clone()),
            &data.labels,
            &plan,
        )
        .unwrap();
        let after = snapshot(&vs);
        for ((n, a), (_, b)) in before.iter().zip(&after) {
            if n.starts_with("blocks.1.") {
                assert!(a.equal(b), "{n}");
            }
            if n.starts_with("blocks.2.mlp") {
                assert!(!a.equal(b), "{n}");
            }
        }
    }

    #[test]
    fn grad_norms_are_zero_exactly_for_frozen_blocks() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let mut opt = Optimizer::new(&vs, &model, Recipe::sgd(Default::default()));
        let data = Dataset::synthetic(8, 4, 1, 8, 2);
        let plan = StepPlan {
            grad_norms: true,
            ..StepPlan::simple(0.01, 1)
        };
        let norms = train_step(
            &model,
            &mut opt,
            Batch::Images(data.images.shallow_clone()),
            &data.labels,
            &plan,
        )
        .unwrap()
        .grad_norms;
        assert_eq!(norms.len(), 3);
        assert_eq!(norms[0], 0.0);
        assert!(norms[1] > 0.0 && norms[2] > 0.0, "{norms:?}");
    }

    /// The host-read rule (`engine::reads`): a step reads once (the
    /// loss), twice with gradient norms, whether the loss is read first
    /// (CPU) or after the queued update (GPU); clipping and the feature
    /// copy add none; an evaluation reads once whatever its batches.
    #[test]
    fn a_step_reads_the_host_once_or_twice_with_norms_and_an_evaluation_once() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let recipe = Recipe {
            clip_grad_norm: 0.5,
            ..Recipe::sgd(Default::default())
        };
        let mut opt = Optimizer::new(&vs, &model, recipe);
        let data = Dataset::synthetic(8, 4, 1, 8, 5);
        for defer_check in [false, true] {
            for (grad_norms, features, want) in [(false, false, 1), (true, true, 2)] {
                let plan = StepPlan {
                    grad_norms,
                    features,
                    ..StepPlan::simple(0.01, 1)
                };
                let batch = Batch::Images(data.images.shallow_clone());
                let before = reads::count();
                let out =
                    train_step_checked(&model, &mut opt, batch, &data.labels, &plan, defer_check)
                        .unwrap();
                assert_eq!(
                    reads::count() - before,
                    want,
                    "grad_norms {grad_norms}, defer_check {defer_check}"
                );
                assert_eq!(out.grad_norms.len(), if grad_norms { 3 } else { 0 });
            }
        }
        // 600 images: three evaluation batches of 256, one read.
        let eval = Dataset::synthetic(600, 4, 1, 8, 6);
        let before = reads::count();
        let (top1, loss) = evaluate(&model, &eval, Device::Cpu);
        assert_eq!(reads::count() - before, 1);
        assert!((0.0..=100.0).contains(&top1) && loss.is_finite() && loss > 0.0);
    }

    /// Evaluation's counts summed on the device give the numbers the
    /// host's per-batch sums gave.
    #[test]
    fn evaluation_counts_on_the_device_equal_per_batch_host_sums() {
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let data = Dataset::synthetic(600, 4, 1, 8, 7);
        let (correct, loss_sum, n) = evaluate_counts(&model, &data, 0..600, Device::Cpu);
        let (mut want_correct, mut want_loss) = (0i64, 0f64);
        tch::no_grad(|| {
            for start in [0i64, 256, 512] {
                let len = 256.min(600 - start);
                let x = data.images.narrow(0, start, len);
                let y = data.labels.narrow(0, start, len);
                let logits = model.forward_frozen(&x, model.depth()).logits;
                want_loss += logits
                    .cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0)
                    .double_value(&[]);
                want_correct += logits
                    .argmax(-1, false)
                    .eq_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
            }
        });
        assert_eq!((correct, n), (want_correct, 600));
        assert_eq!(loss_sum.to_bits(), want_loss.to_bits());
    }

    #[test]
    fn a_non_finite_loss_updates_nothing_whether_checked_first_or_by_the_kernel() {
        for defer_check in [false, true] {
            tch::manual_seed(4);
            let (vs, model, mut opt) = with_momentum_and_decay();
            let data = Dataset::synthetic(8, 4, 1, 8, 3);
            let plan = StepPlan::simple(0.1, 0);
            // A finite step first, so momentum exists and could drift.
            let ok = train_step_checked(
                &model,
                &mut opt,
                Batch::Images(data.images.shallow_clone()),
                &data.labels,
                &plan,
                defer_check,
            );
            assert!(ok.is_ok());
            let before = snapshot(&vs);
            let nan = data.images.full_like(f64::NAN);
            let loss = train_step_checked(
                &model,
                &mut opt,
                Batch::Images(nan),
                &data.labels,
                &plan,
                defer_check,
            )
            .err()
            .expect("a NaN input gives a NaN loss");
            assert!(loss.is_nan());
            for ((name, a), (_, b)) in before.iter().zip(&snapshot(&vs)) {
                assert!(a.equal(b), "{name} moved (defer_check {defer_check})");
            }
            // The next finite step is the same as if the NaN one never was.
            let next = train_step_checked(
                &model,
                &mut opt,
                Batch::Images(data.images.shallow_clone()),
                &data.labels,
                &plan,
                defer_check,
            );
            assert!(next.is_ok());
        }
    }

    #[test]
    fn deferring_the_loss_check_changes_no_number() {
        // Both start from the same weights (copied: libtorch's global seed
        // is shared with tests running beside this one).
        let first = nn::VarStore::new(Device::Cpu);
        let _ = Vit::new(&first.root(), &tiny());
        let run = |defer_check: bool| {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = Vit::new(&vs.root(), &tiny());
            vs.copy(&first).unwrap();
            let mut opt = Optimizer::new(&vs, &model, Recipe::sgd(Default::default()));
            let data = Dataset::synthetic(8, 4, 1, 8, 4);
            for _ in 0..3 {
                let plan = StepPlan::simple(0.05, 1);
                let b = Batch::Images(data.images.shallow_clone());
                train_step_checked(&model, &mut opt, b, &data.labels, &plan, defer_check).unwrap();
            }
            snapshot(&vs)
        };
        let (checked, deferred) = (run(false), run(true));
        assert!(!checked.is_empty());
        for ((name, a), (_, b)) in checked.iter().zip(&deferred) {
            assert!(a.equal(b), "{name}");
        }
    }

    /// `Needs::ACC_GRAD_NORMS` against PyTorch's own accumulation: three
    /// batches backpropagated with `backward()` into `.grad` (which sums
    /// them, as a loop without `zero_grad` does), at lr 0 so the weights
    /// stay put; block 0 is frozen and reads 0.
    #[test]
    fn accumulated_gradient_norms_are_those_of_autograd_summed_grads() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let cfg = crate::engine::optim::SgdConfig {
            lr: 0.0,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            warmup_steps: 0,
        };
        let mut opt = Optimizer::new(&vs, &model, Recipe::sgd(cfg));
        let batches: Vec<Dataset> = (0..3).map(|s| Dataset::synthetic(6, 4, 1, 8, s)).collect();
        for d in &batches {
            let logits = model.forward_frozen(&d.images, 1).logits;
            logits.cross_entropy_for_logits(&d.labels).backward();
        }
        let depth = model.depth();
        let (mut l1, mut l2) = (vec![0f64; depth], vec![0f64; depth]);
        for (name, t) in vs.variables() {
            if let crate::model::Group::Block(b) = model.group_of(&name) {
                let g = t.grad();
                if g.defined() {
                    l1[b] += g.abs().sum(Kind::Double).double_value(&[]);
                    l2[b] += g.square().sum(Kind::Double).double_value(&[]);
                }
            }
        }
        let l2: Vec<f64> = l2.into_iter().map(f64::sqrt).collect();
        let plan = StepPlan {
            accumulate: true,
            ..StepPlan::simple(0.0, 1)
        };
        for d in &batches {
            let batch = Batch::Images(d.images.shallow_clone());
            train_step(&model, &mut opt, batch, &d.labels, &plan).unwrap();
        }
        let (g1, g2, steps) = opt.read_grad_sums(depth, 1);
        assert_eq!(steps, 3);
        assert_eq!((g1[0], g2[0]), (0.0, 0.0));
        for b in 1..depth {
            assert!(l2[b] > 0.0);
            // Tolerance: float32 sums in another order.
            assert!(
                (g1[b] - l1[b]).abs() <= 1e-5 * l1[b],
                "L1 {b}: {} vs {}",
                g1[b],
                l1[b]
            );
            assert!(
                (g2[b] - l2[b]).abs() <= 1e-5 * l2[b],
                "L2 {b}: {} vs {}",
                g2[b],
                l2[b]
            );
        }
        // The read reset the sums.
        let (_, again, steps) = opt.read_grad_sums(depth, 1);
        assert_eq!(steps, 0);
        assert!(again.iter().all(|v| *v == 0.0));
    }
}
