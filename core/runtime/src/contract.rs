//! The freeze controller: the host's record of which blocks are frozen, and
//! the gate every policy decision passes through.
//!
//! Invariant (the freezing contract, docs/architecture.md): blocks `[0, frontier)`
//! are frozen for good and the frontier never decreases; a probe is only ever
//! the frontier block (so blocks freeze first to last); learning-rate factors
//! are one per block, finite and >= 0. A decision that breaks any rule is
//! refused as a whole, with an error naming the policy, the step and the
//! decision, and the state stays as it was.

use std::fmt;
use std::ops::Range;

use simfreeze_abi::ffi::{Decision, DecisionV2, Needs, ReferenceRequest};

/// The freeze state during a step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FreezeState {
    /// Number of encoder blocks L.
    pub layers: u32,
    /// Blocks `[0, frontier)` are frozen for good.
    pub frontier: u32,
    /// The frontier block, when it is frozen temporarily.
    pub probe: Option<u32>,
    /// Learning-rate factor per block (all 1 unless a policy sets them).
    pub lr_factors: Vec<f32>,
    /// The on-demand observations (contract 2, [`Needs`] bits) the host
    /// computes at this step: what the policy asked for after the last one.
    #[serde(default)]
    pub observe: u64,
}

impl FreezeState {
    /// Everything trainable.
    pub fn new(layers: u32) -> Self {
        FreezeState {
            layers,
            frontier: 0,
            probe: None,
            lr_factors: vec![1.0; layers as usize],
            observe: 0,
        }
    }

    /// The on-demand observations of this step.
    pub fn observe(&self) -> Needs {
        Needs(self.observe)
    }

    /// Blocks frozen during this step, the probe included: `[0, frozen)`.
    pub fn frozen_prefix(&self) -> u32 {
        self.frontier + u32::from(self.probe.is_some())
    }

    /// Whether block `i` is frozen (for good or probed) during this step.
    pub fn is_frozen(&self, block: u32) -> bool {
        block < self.frozen_prefix()
    }
}

/// How a decision breaks the contract.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// The frontier went down: that would unfreeze committed blocks.
    FrontierDecreased {
        /// Frontier before.
        from: u32,
        /// Frontier asked for.
        to: u32,
    },
    /// The frontier is past the last block.
    FrontierBeyondLayers {
        /// Frontier asked for.
        frontier: u32,
        /// Number of blocks.
        layers: u32,
    },
    /// A probe of a block the model does not have.
    ProbeBeyondModel {
        /// Probe asked for.
        probe: u32,
        /// Number of blocks.
        layers: u32,
    },
    /// A probe of a block other than the frontier block.
    ProbeNotAtFrontier {
        /// Probe asked for.
        probe: u32,
        /// The (new) frontier.
        frontier: u32,
    },
    /// Learning-rate factors given, but not one per block.
    LrFactorCount {
        /// Number given.
        got: usize,
        /// Number of blocks.
        layers: u32,
    },
    /// A learning-rate factor that is NaN, infinite or negative.
    LrFactorInvalid {
        /// Block index.
        block: usize,
        /// The value.
        value: f32,
    },
    /// Observations asked for that `needs()` did not declare (or that are
    /// not asked step by step).
    ObserveUndeclared {
        /// The bits asked for but not declared.
        missing: Needs,
    },
    /// A reference snapshot asked for without declaring `Needs::REFERENCE`.
    ReferenceUndeclared,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::FrontierDecreased { from, to } => write!(
                f,
                "frontier went down from {from} to {to} (frozen blocks never unfreeze)"
            ),
            Violation::FrontierBeyondLayers { frontier, layers } => {
                write!(
                    f,
                    "frontier {frontier} is beyond the model's {layers} blocks"
                )
            }
            Violation::ProbeBeyondModel { probe, layers } => write!(
                f,
                "probe of block {probe}, but the model has only {layers} blocks (0 to {}): \
                 block {probe} does not exist",
                layers.saturating_sub(1)
            ),
            Violation::ProbeNotAtFrontier { probe, frontier } => write!(
                f,
                "probe of block {probe}, but only the frontier block {frontier} may be probed"
            ),
            Violation::LrFactorCount { got, layers } => write!(
                f,
                "{got} learning-rate factors for {layers} blocks (give none or one per block)"
            ),
            Violation::LrFactorInvalid { block, value } => write!(
                f,
                "learning-rate factor {value} for block {block} (must be finite and >= 0)"
            ),
            Violation::ObserveUndeclared { missing } => {
                let names: Vec<String> = missing
                    .names()
                    .into_iter()
                    .map(|n| format!("Needs::{n}"))
                    .collect();
                write!(
                    f,
                    "asked to observe {} at the next step without declaring it in `fn needs` \
                     (only the on-demand bits a policy declares can be asked for)",
                    names.join(" | ")
                )
            }
            Violation::ReferenceUndeclared => write!(
                f,
                "asked for a reference snapshot without declaring Needs::REFERENCE in `fn needs`"
            ),
        }
    }
}

/// A refused decision.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy `{policy}` broke the freezing contract at step {step}: {violation}; decision: {decision}")]
pub struct ContractViolation {
    /// Policy name.
    pub policy: String,
    /// Step after which the decision was made.
    pub step: u64,
    /// The decision, as text.
    pub decision: String,
    /// The broken rule.
    pub violation: Violation,
}

/// Checks `d` against the state it would replace.
pub fn check(state: &FreezeState, d: &Decision) -> Result<(), Violation> {
    if d.frontier < state.frontier {
        return Err(Violation::FrontierDecreased {
            from: state.frontier,
            to: d.frontier,
        });
    }
    if d.frontier > state.layers {
        return Err(Violation::FrontierBeyondLayers {
            frontier: d.frontier,
            layers: state.layers,
        });
    }
    if let Some(probe) = d.probe.into_option() {
        // Also refuses a probe when every block is already frozen.
        if probe >= state.layers {
            return Err(Violation::ProbeBeyondModel {
                probe,
                layers: state.layers,
            });
        }
        if probe != d.frontier {
            return Err(Violation::ProbeNotAtFrontier {
                probe,
                frontier: d.frontier,
            });
        }
    }
    if !d.lr_factors.is_empty() {
        if d.lr_factors.len() != state.layers as usize {
            return Err(Violation::LrFactorCount {
                got: d.lr_factors.len(),
                layers: state.layers,
            });
        }
        if let Some((block, &value)) = d
            .lr_factors
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(Violation::LrFactorInvalid { block, value });
        }
    }
    Ok(())
}

/// Checks the contract-2 part of `d` against what the policy declared.
pub fn check_v2(declared: Needs, d: &DecisionV2) -> Result<(), Violation> {
    let allowed = declared.intersection(Needs::ON_DEMAND);
    let missing = d.observe.difference(allowed);
    if !missing.is_empty() {
        return Err(Violation::ObserveUndeclared { missing });
    }
    if d.reference != ReferenceRequest::Keep && !declared.contains(Needs::REFERENCE) {
        return Err(Violation::ReferenceUndeclared);
    }
    Ok(())
}

/// What an accepted decision changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Change {
    /// Blocks committed frozen by this decision.
    pub committed: Range<u32>,
    /// Probe before and after, when it changed.
    pub probe: Option<(Option<u32>, Option<u32>)>,
    /// The reference snapshot to take after this step (contract 2).
    pub reference: ReferenceRequest,
}

/// Owns the freeze state of a run and applies checked decisions.
#[derive(Debug, Clone)]
pub struct FreezeController {
    policy: String,
    state: FreezeState,
}

impl FreezeController {
    /// A controller for `layers` blocks, all trainable.
    pub fn new(policy: impl Into<String>, layers: u32) -> Self {
        FreezeController {
            policy: policy.into(),
            state: FreezeState::new(layers),
        }
    }

    /// The current state.
    pub fn state(&self) -> &FreezeState {
        &self.state
    }

    /// Restores a saved state (resume).
    pub fn restore(&mut self, state: FreezeState) {
        self.state = state;
    }

    /// Applies the decision made after `step`, or refuses it unchanged.
    pub fn apply(&mut self, step: u64, d: &Decision) -> Result<Change, ContractViolation> {
        self.apply_v2(step, &DecisionV2::from_v1(d.clone()), Needs::ALL)
    }

    /// Applies a contract-2 decision made after `step` by a policy that
    /// declared `declared`, or refuses it unchanged.
    pub fn apply_v2(
        &mut self,
        step: u64,
        d2: &DecisionV2,
        declared: Needs,
    ) -> Result<Change, ContractViolation> {
        let d = &d2.decision;
        check(&self.state, d)
            .and_then(|()| check_v2(declared, d2))
            .map_err(|violation| ContractViolation {
                policy: self.policy.clone(),
                step,
                decision: describe_v2(d2),
                violation,
            })?;
        let probe = d.probe.into_option();
        let change = Change {
            committed: self.state.frontier..d.frontier,
            probe: (probe != self.state.probe).then_some((self.state.probe, probe)),
            reference: d2.reference,
        };
        self.state.observe = d2.observe.0;
        self.state.frontier = d.frontier;
        self.state.probe = probe;
        if d.lr_factors.is_empty() {
            self.state.lr_factors.fill(1.0);
        } else {
            self.state.lr_factors.copy_from_slice(&d.lr_factors);
        }
        Ok(change)
    }
}

/// A contract-2 decision in one line, for errors and logs.
pub fn describe_v2(d: &DecisionV2) -> String {
    let mut s = describe(&d.decision);
    if !d.observe.is_empty() {
        s.push_str(&format!(" observe={}", d.observe.names().join("|")));
    }
    if d.reference != ReferenceRequest::Keep {
        s.push_str(&format!(" reference={:?}", d.reference));
    }
    s
}

/// A decision in one line, for errors and logs.
pub fn describe(d: &Decision) -> String {
    let mut s = format!("frontier={}", d.frontier);
    if let Some(p) = d.probe.into_option() {
        s.push_str(&format!(" probe={p}"));
    }
    if !d.lr_factors.is_empty() {
        s.push_str(&format!(" lr_factors={:?}", d.lr_factors.as_slice()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::{ROption, RVec};
    use proptest::prelude::*;

    fn decision(frontier: u32, probe: Option<u32>, lr: Vec<f32>) -> Decision {
        Decision {
            frontier,
            probe: ROption::from(probe),
            lr_factors: RVec::from(lr),
            scalars: RVec::new(),
            extra: RVec::new(),
        }
    }

    /// Arbitrary decisions, valid or not, for L up to 12.
    fn any_decision(layers: u32) -> impl Strategy<Value = Decision> {
        let lr = prop_oneof![
            Just(vec![]),
            proptest::collection::vec(0.0f32..4.0, layers as usize),
            proptest::collection::vec(
                prop_oneof![
                    Just(f32::NAN),
                    Just(f32::INFINITY),
                    Just(-1.0f32),
                    0.0f32..2.0
                ],
                0..=(layers as usize + 1)
            ),
        ];
        (0..=layers + 2, proptest::option::of(0..=layers + 2), lr)
            .prop_map(|(f, p, lr)| decision(f, p, lr))
    }

    fn run(layers: u32, ds: &[Decision]) -> Vec<(FreezeState, Result<Change, ContractViolation>)> {
        let mut c = FreezeController::new("p", layers);
        ds.iter()
            .enumerate()
            .map(|(i, d)| {
                let r = c.apply(i as u64, d);
                (c.state().clone(), r)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn frontier_never_decreases(layers in 1u32..12, ds in proptest::collection::vec(any_decision(12), 1..60)) {
            let mut last = 0;
            for (state, _) in run(layers, &ds) {
                prop_assert!(state.frontier >= last);
                prop_assert!(state.frontier <= layers);
                last = state.frontier;
            }
        }

        #[test]
        fn probe_is_only_ever_the_frontier_block(layers in 1u32..12, ds in proptest::collection::vec(any_decision(12), 1..60)) {
            for (state, _) in run(layers, &ds) {
                if let Some(p) = state.probe {
                    prop_assert_eq!(p, state.frontier);
                    prop_assert!(p < layers);
                }
            }
        }

        #[test]
        fn blocks_freeze_first_to_last(layers in 1u32..12, ds in proptest::collection::vec(any_decision(12), 1..60)) {
            // The frozen set is always a prefix, and each commit extends it by
            // the blocks just after the old frontier.
            let mut frontier = 0;
            for (state, r) in run(layers, &ds) {
                if let Ok(change) = r {
                    prop_assert_eq!(change.committed.start, frontier);
                    prop_assert_eq!(change.committed.end, state.frontier);
                }
                for b in 0..layers {
                    prop_assert_eq!(state.is_frozen(b), b < state.frozen_prefix());
                }
                frontier = state.frontier;
            }
        }

        #[test]
        fn lr_factors_are_finite_nonnegative_one_per_block(layers in 1u32..12, ds in proptest::collection::vec(any_decision(12), 1..60)) {
            for (state, _) in run(layers, &ds) {
                prop_assert_eq!(state.lr_factors.len(), layers as usize);
                prop_assert!(state.lr_factors.iter().all(|v| v.is_finite() && *v >= 0.0));
            }
        }

        #[test]
        fn refused_decisions_change_nothing(layers in 1u32..12, ds in proptest::collection::vec(any_decision(12), 1..60)) {
            let mut c = FreezeController::new("p", layers);
            for (i, d) in ds.iter().enumerate() {
                let before = c.state().clone();
                if let Err(e) = c.apply(i as u64, d) {
                    prop_assert_eq!(c.state(), &before);
                    prop_assert_eq!(e.step, i as u64);
                    prop_assert_eq!(e.policy.as_str(), "p");
                }
            }
        }

        #[test]
        fn valid_decisions_are_always_accepted(layers in 1u32..12, steps in proptest::collection::vec((0u32..3, any::<bool>()), 1..60)) {
            // Build a valid sequence: non-decreasing frontier, probe at it.
            let mut c = FreezeController::new("p", layers);
            let mut f = 0;
            for (i, (inc, probe)) in steps.into_iter().enumerate() {
                f = (f + inc).min(layers);
                let p = (probe && f < layers).then_some(f);
                prop_assert!(c.apply(i as u64, &decision(f, p, vec![])).is_ok());
            }
        }
    }

    #[test]
    fn violation_message_names_policy_step_and_decision() {
        let mut c = FreezeController::new("atsf", 12);
        c.apply(0, &decision(3, None, vec![])).unwrap();
        let e = c.apply(41, &decision(2, None, vec![])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`atsf`"), "{msg}");
        assert!(msg.contains("step 41"), "{msg}");
        assert!(msg.contains("frontier=2"), "{msg}");
        assert!(msg.contains("from 3 to 2"), "{msg}");
    }

    #[test]
    fn probe_counts_as_frozen_for_the_step() {
        let mut c = FreezeController::new("p", 4);
        c.apply(0, &decision(1, Some(1), vec![])).unwrap();
        assert_eq!(c.state().frozen_prefix(), 2);
        assert!(c.state().is_frozen(1));
        assert!(!c.state().is_frozen(2));
        let ch = c.apply(1, &decision(1, None, vec![])).unwrap();
        assert_eq!(ch.probe, Some((Some(1), None)));
        assert_eq!(c.state().frozen_prefix(), 1);
    }

    #[test]
    fn no_probe_once_everything_is_frozen() {
        let mut c = FreezeController::new("p", 2);
        let e = c.apply(0, &decision(2, Some(2), vec![])).unwrap_err();
        assert!(matches!(e.violation, Violation::ProbeBeyondModel { .. }));
        assert!(e.to_string().contains("block 2 does not exist"), "{e}");
    }
}
