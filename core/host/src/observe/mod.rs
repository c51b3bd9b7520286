//! Observation: the one place where a step's tensors become what a policy
//! sees. Between the engine (which steps the model) and the loop (which
//! drives the policy): [`observe_with`] copies to host memory what the
//! policy asked for and hands the step to the [`PolicyDriver`], and the
//! [`observer`] computes contract 2's on-demand observations (block tokens
//! and Gram matrices, the reference, sampled weights, gradient sums) and
//! what each costs in the compute model. The engine knows nothing of
//! policies; `run` and `bench` use this layer.

pub mod observer;
mod reference;

use anyhow::Result;
use simfreeze_abi::Needs;
use simfreeze_runtime::driver::{PolicyDriver, StepInput, StepOutcome};
use simfreeze_runtime::more::MoreData;
use tch::Tensor;

use crate::engine::StepOut;

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
    observe_with(driver, out, y_host, feature_dim, at, &MoreData::default())
}

/// [`observe`], with the on-demand observations of contract 2 the host
/// computed for this step.
pub fn observe_with(
    driver: &mut PolicyDriver,
    out: &StepOut,
    y_host: &Tensor,
    feature_dim: i64,
    at: StepAt,
    more: &MoreData,
) -> Result<StepOutcome> {
    let needs = driver.needs();
    let features = match &out.cls_host {
        Some(c) if needs.contains(Needs::CLS_FEATURES) => Vec::try_from(c.flatten(0, -1))?,
        _ => Vec::new(),
    };
    // A data-parallel step observes the global batch: its labels come
    // with the gathered features.
    let y_host = out.labels_host.as_ref().unwrap_or(y_host);
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
        more: more.view(),
    })?)
}
