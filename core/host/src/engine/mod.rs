//! The training engine seam: [`Engine`] takes one optimizer step of a batch
//! under a freeze state, evaluates, and saves and restores its tensors. The
//! run loop (`crate::run`) and `bench` see only this trait, so a
//! data-parallel engine plugs in beside [`single::SingleEngine`] without
//! touching the loop.
//!
//! - [`single`]: one process, one device (today's step);
//! - [`optim`]: per-block SGD with our own momentum state and the cosine
//!   schedule (libtorch's fused SGD kernel through a small C++ shim);
//! - [`cache`]: the frozen-prefix activation cache.
//!
//! Invariant every engine keeps: a step trains exactly under the freeze
//! state it is given (blocks `[0, frozen)` frozen, probe included), the
//! optimizer never touches a frozen block, and a step whose loss is not
//! finite updates nothing.

pub mod cache;
pub mod optim;
pub mod single;

use std::path::Path;

use anyhow::Result;
use simfreeze_abi::Needs;
use simfreeze_runtime::driver::{PolicyDriver, StepInput, StepOutcome};
use tch::{Device, Tensor};

use crate::data::Dataset;
use crate::error::TorchError;
use crate::model::weights::{Checkpoint, HeadInit};
use crate::model::PrefixModel;

pub use single::SingleEngine;

/// How to take one step.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan<'a> {
    /// Learning rate.
    pub lr: f64,
    /// Blocks `[0, frozen)` are frozen (probe included).
    pub frozen: usize,
    /// Per-block learning-rate factors (empty: all 1).
    pub lr_factors: &'a [f32],
    /// Compute per-block gradient norms (one extra host sync).
    pub grad_norms: bool,
    /// Copy the features the head sees to host memory for the policy.
    pub features: bool,
}

impl StepPlan<'_> {
    /// A plain step: everything at `lr`, `frozen` blocks frozen.
    pub fn simple(lr: f64, frozen: usize) -> StepPlan<'static> {
        StepPlan {
            lr,
            frozen,
            lr_factors: &[],
            grad_norms: false,
            features: false,
        }
    }
}

/// What one step produced.
pub struct StepOut {
    /// Mean batch loss.
    pub loss: f64,
    /// The features the head saw, `[B, D]`.
    pub cls: Tensor,
    /// The same in host memory, float32, if the plan asked for them.
    pub cls_host: Option<Tensor>,
    /// Per-block gradient norms, if asked for.
    pub grad_norms: Vec<f32>,
}

/// What a step starts from.
pub enum Batch {
    /// Input images `[B, C, H, W]`.
    Images(Tensor),
    /// The output of blocks `[0, after)` (from the activation cache).
    Boundary {
        /// `[B, T, D]`.
        h: Tensor,
        /// Blocks already applied.
        after: usize,
    },
}

/// Why a step did not update the model.
#[derive(Debug)]
pub enum StepError {
    /// The loss was NaN or infinite; nothing was updated.
    Diverged(f64),
    /// libtorch refused an operation of the step.
    Torch(TorchError),
}

/// Trains a [`PrefixModel`] with an optimizer on some device(s). Every
/// method that runs libtorch returns its errors (CUDA out of memory, ...)
/// as [`TorchError`]s instead of panicking.
pub trait Engine {
    /// The model (for the activation cache and the policy's shapes).
    fn model(&self) -> &dyn PrefixModel;

    /// Where batches go.
    fn device(&self) -> Device;

    /// Loads pretrained weights into the model; returns what was loaded.
    fn import_weights(&mut self, ck: Checkpoint, head: HeadInit) -> Result<String>;

    /// The learning rate of `step` of `total`.
    fn lr_at(&self, step: u64, total: u64) -> f64;

    /// One optimizer step. A NaN or infinite loss is refused before
    /// anything is updated.
    fn step(&mut self, batch: Batch, y: &Tensor, plan: &StepPlan<'_>)
        -> Result<StepOut, StepError>;

    /// Top-1 accuracy (%) and mean loss on `data`.
    fn evaluate(&self, data: &Dataset) -> Result<(f64, f64), TorchError>;

    /// Every tensor a checkpoint must hold (weights, optimizer state),
    /// under stable names.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores [`Engine::state_tensors`] read from `path`.
    fn load_state_tensors(&mut self, path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()>;

    /// Writes the final weights (timm names) and the model's shape beside
    /// them.
    fn save_model(&self, path: &Path) -> Result<()>;
}

/// Where a step sits in the run, as the policy observes it.
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    /// The step (0-based).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// Steps in the run.
    pub total_steps: u64,
    /// Classes of the task.
    pub num_classes: usize,
    /// The step's base learning rate.
    pub lr: f64,
}

/// Hands a finished step to the policy (through the driver, which checks
/// its decision): copies to host memory what the policy asked for, and
/// nothing else. Shared by the run loop and `bench`.
pub fn observe(
    driver: &mut PolicyDriver,
    out: &StepOut,
    y_host: &Tensor,
    feature_dim: i64,
    at: StepAt,
) -> Result<StepOutcome> {
    let needs = driver.needs();
    let features = match &out.cls_host {
        Some(c) if needs.contains(Needs::CLS_FEATURES) => Vec::try_from(c.flatten(0, -1))?,
        _ => Vec::new(),
    };
    let labels = if needs.contains(Needs::LABELS) {
        Vec::try_from(y_host)?
    } else {
        Vec::new()
    };
    Ok(driver.after_step(&StepInput {
        step: at.step,
        epoch: at.epoch,
        steps_per_epoch: at.steps_per_epoch,
        total_steps: at.total_steps,
        loss: out.loss as f32,
        batch: y_host.size()[0] as usize,
        features: &features,
        feature_dim: feature_dim as usize,
        labels: &labels,
        num_classes: at.num_classes,
        grad_norms: &out.grad_norms,
        lr: Some(at.lr),
    })?)
}
