//! The policy loop shared by the trainer and the simulator: after each step,
//! build the observation (only what the policy asked for), call the policy,
//! pass its decision through the [`FreezeController`], and keep the freeze
//! timeline and the compute-model cost.
//!
//! Invariant: the timeline records what actually ran. `frozen(step)` counts
//! the blocks frozen during that step, the probe included, and the compute
//! model charges each step `3L - 2 * frozen(step)` units (forward 1, backward
//! 2 per block) against `3L` for full fine-tuning. What the host computes
//! only for the policy (contract 2's block observations, reference forwards
//! and snapshots, sampled weights, gradient sums) is charged on top, in the
//! same units, through [`PolicyDriver::charge_observation`]: the compute
//! speedup counts it, the training-only speedup does not.

use std::collections::BTreeMap;

use abi_stable::std_types::{ROption, RSlice, RStr};
use serde::Serialize;
use simfreeze_abi::ffi::{NamedValues, Needs, Observation, ObservationV2, ReferenceRequest};

use crate::contract::{Change, ContractViolation, FreezeController, FreezeState};
use crate::loader::{PolicyCallError, PolicyHandle};
use crate::more::MoreData;
use crate::observations::ObservationRecord;

/// What the trainer or simulator measured in one step.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Step index, from 0.
    pub step: u64,
    /// Epoch of the step, from 0.
    pub epoch: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// Steps in the run.
    pub total_steps: u64,
    /// Mean batch loss.
    pub loss: f32,
    /// Batch size.
    pub batch: usize,
    /// Class-token features, `batch × feature_dim` (empty if not needed).
    pub features: &'a [f32],
    /// Feature width.
    pub feature_dim: usize,
    /// Labels (empty if not needed).
    pub labels: &'a [i64],
    /// Number of classes.
    pub num_classes: usize,
    /// Gradient norm per block (empty if not needed).
    pub grad_norms: &'a [f32],
    /// The step's base learning rate, when there is one (runs; not the
    /// simulator).
    pub lr: Option<f64>,
    /// The on-demand observations (contract 2) the host computed for this
    /// step: what [`PolicyDriver::state`]`().observe()` asked for (the
    /// driver hands the policy only those).
    pub more: ObservationV2<'a>,
}

/// The freeze timeline of a run.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Timeline {
    /// Number of blocks.
    pub layers: u32,
    /// Steps run so far.
    pub steps: u64,
    /// Per block: the first step that ran with it committed frozen (the number
    /// of steps it trained), or `None` if it never froze.
    pub freeze_step: Vec<Option<u64>>,
    /// Steps that ran with a probe.
    pub probe_steps: u64,
    /// Policy scalars: name -> `(step, value)`.
    pub scalars: BTreeMap<String, Vec<(u64, f64)>>,
    /// Compute-model units spent.
    pub cost: f64,
    /// Compute-model units full fine-tuning would have spent.
    pub full_cost: f64,
    /// Compute-model units the host spent observing for the policy (0 in
    /// timelines written before it was charged).
    #[serde(default)]
    pub observe_cost: f64,
}

impl Timeline {
    /// Full fine-tuning cost over the cost spent training and observing
    /// (1 = no saving, at most 3; below 1 when observing costs more than
    /// freezing saves).
    pub fn compute_speedup(&self) -> f64 {
        let spent = self.cost + self.observe_cost;
        if spent > 0.0 {
            self.full_cost / spent
        } else {
            1.0
        }
    }

    /// Full fine-tuning cost over the training cost alone (what freezing
    /// saves, observation left out).
    pub fn train_compute_speedup(&self) -> f64 {
        if self.cost > 0.0 {
            self.full_cost / self.cost
        } else {
            1.0
        }
    }
}

/// A policy failure during the loop.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The policy returned an error or panicked.
    #[error(transparent)]
    Policy(#[from] PolicyCallError),
    /// The policy's decision broke the freezing contract.
    #[error(transparent)]
    Contract(#[from] ContractViolation),
}

/// What one step's decision did.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Freeze changes.
    pub change: Change,
    /// Scalars the policy logged.
    pub scalars: Vec<(String, f64)>,
}

impl StepOutcome {
    /// The reference snapshot the host takes now, from the weights after
    /// the step (contract 2).
    pub fn reference(&self) -> ReferenceRequest {
        self.change.reference
    }
}

/// Runs the policy (or none: the full fine-tuning baseline) step by step.
pub struct PolicyDriver {
    policy: Option<PolicyHandle>,
    controller: FreezeController,
    timeline: Timeline,
    /// Whether each step's observation is kept as a record.
    recording: bool,
    /// Whether the records hold the on-demand observations' values.
    recording_more: bool,
    record: Option<ObservationRecord>,
}

impl PolicyDriver {
    /// A driver for a model with `layers` blocks.
    pub fn new(policy: Option<PolicyHandle>, layers: u32) -> Self {
        let name = policy
            .as_ref()
            .map_or_else(|| "none".to_string(), |p| p.meta.name.clone());
        PolicyDriver {
            policy,
            controller: FreezeController::new(name, layers),
            timeline: Timeline {
                layers,
                freeze_step: vec![None; layers as usize],
                ..Timeline::default()
            },
            recording: false,
            recording_more: false,
            record: None,
        }
    }

    /// Keeps, from now on, each step's observation as the policy received
    /// it and the state its decision set: [`Self::take_record`].
    pub fn record_observations(&mut self) {
        self.recording = true;
    }

    /// Records also hold the values of the on-demand observations (contract
    /// 2) a step carried, so that a replay of them is exact.
    pub fn record_on_demand(&mut self) {
        self.recording = true;
        self.recording_more = true;
    }

    /// The record of the last step [`Self::after_step`] accepted, once.
    pub fn take_record(&mut self) -> Option<ObservationRecord> {
        self.record.take()
    }

    /// What the host must compute each step.
    pub fn needs(&self) -> Needs {
        self.policy
            .as_ref()
            .map_or(Needs::NONE, PolicyHandle::needs)
    }

    /// The freeze state for the next step.
    pub fn state(&self) -> &FreezeState {
        self.controller.state()
    }

    /// Restores the freeze state (resume; the policy's own state is restored
    /// through [`PolicyHandle::load_state`]).
    pub fn restore_state(&mut self, state: FreezeState) {
        self.controller.restore(state);
    }

    /// Freezes blocks `[0, k)` before the first step (as if committed at
    /// step 0); `k` is capped at the number of blocks.
    pub fn freeze_from_start(&mut self, k: u32) {
        let mut state = self.controller.state().clone();
        state.frontier = k.min(state.layers);
        for f in &mut self.timeline.freeze_step[..state.frontier as usize] {
            *f = Some(0);
        }
        self.controller.restore(state);
    }

    /// Charges `units` of compute-model cost (one unit: one block's forward
    /// of the step's batch) that the host spent observing for the policy.
    pub fn charge_observation(&mut self, units: f64) {
        if units.is_finite() && units > 0.0 {
            self.timeline.observe_cost += units;
        }
    }

    /// Restores the timeline (resume).
    pub fn restore_timeline(&mut self, timeline: Timeline) {
        self.timeline = timeline;
    }

    /// The policy, mutably (to restore its state).
    pub fn policy_mut(&mut self) -> Option<&mut PolicyHandle> {
        self.policy.as_mut()
    }

    /// The timeline so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The policy, if any.
    pub fn policy(&self) -> Option<&PolicyHandle> {
        self.policy.as_ref()
    }

    /// Records the step that just ran under [`Self::state`], asks the policy
    /// for the next state and applies it.
    pub fn after_step(&mut self, input: &StepInput<'_>) -> Result<StepOutcome, DriverError> {
        let state = self.controller.state();
        let layers = f64::from(state.layers);
        let frozen = f64::from(state.frozen_prefix());
        self.timeline.steps = input.step + 1;
        self.timeline.full_cost += 3.0 * layers;
        self.timeline.cost += 3.0 * layers - 2.0 * frozen;
        if state.probe.is_some() {
            self.timeline.probe_steps += 1;
        }
        let Some(policy) = self.policy.as_mut() else {
            return Ok(StepOutcome::default());
        };
        let needs = policy.needs();
        let pick = |flag: Needs| needs.contains(flag);
        let lr = input.lr.map(|lr| [lr]);
        let lr_values = lr.as_ref().map_or(&[][..], |v| &v[..]);
        let extra = [NamedValues {
            name: RStr::from(simfreeze_abi::sdk::LR_EXTRA),
            values: RSlice::from_slice(lr_values),
        }];
        let extra = if input.lr.is_some() { &extra[..] } else { &[] };
        let obs = Observation {
            step: input.step,
            epoch: input.epoch,
            steps_per_epoch: input.steps_per_epoch,
            total_steps: input.total_steps,
            layers: state.layers,
            frontier: state.frontier,
            probe: ROption::from(state.probe),
            loss: input.loss,
            batch: input.batch as u32,
            feature_dim: if pick(Needs::CLS_FEATURES) {
                input.feature_dim as u32
            } else {
                0
            },
            features: RSlice::from_slice(if pick(Needs::CLS_FEATURES) {
                input.features
            } else {
                &[]
            }),
            labels: RSlice::from_slice(if pick(Needs::LABELS) {
                input.labels
            } else {
                &[]
            }),
            num_classes: if pick(Needs::LABELS) {
                input.num_classes as u32
            } else {
                0
            },
            grad_norms: RSlice::from_slice(if pick(Needs::GRAD_NORMS) {
                input.grad_norms
            } else {
                &[]
            }),
            extra: RSlice::from_slice(extra),
        };
        // Only what the policy asked for after the previous step reaches it
        // (a host may have computed more for another purpose).
        let mut more = input.more;
        more.provided = more.provided.intersection(state.observe());
        let decision = policy.decide_v2(&obs, &more)?;
        let change = self.controller.apply_v2(input.step, &decision, needs)?;
        let decision = decision.decision;
        if self.recording {
            self.record = Some(ObservationRecord {
                step: obs.step,
                epoch: obs.epoch,
                steps_per_epoch: obs.steps_per_epoch,
                total_steps: obs.total_steps,
                loss: f64::from(obs.loss),
                batch: obs.batch as usize,
                feature_dim: obs.feature_dim as usize,
                features: obs.features.to_vec(),
                labels: obs.labels.to_vec(),
                num_classes: obs.num_classes as usize,
                grad_norms: obs.grad_norms.to_vec(),
                lr: input.lr,
                provided: more.provided.names(),
                more: (self.recording_more && !more.provided.is_empty())
                    .then(|| MoreData::of(&more)),
                after: self.controller.state().clone(),
            });
        }
        for block in change.committed.clone() {
            self.timeline.freeze_step[block as usize] = Some(input.step + 1);
        }
        let scalars: Vec<(String, f64)> = decision
            .scalars
            .into_iter()
            .map(|s| (s.name.into_string(), s.value))
            .collect();
        for (name, value) in &scalars {
            self.timeline
                .scalars
                .entry(name.clone())
                .or_default()
                .push((input.step, *value));
        }
        Ok(StepOutcome { change, scalars })
    }
}
