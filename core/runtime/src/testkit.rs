//! The in-process test kit for policy authors: a policy linked into an
//! ordinary `cargo test` (its crate's rlib) runs through the same freeze
//! contract, policy loop and synthetic world as `simfreeze simulate` and the
//! trainer, without a `.so`, a subprocess or libtorch.
//!
//! ```ignore
//! use simfreeze_runtime::simulate::SimConfig;
//! use simfreeze_runtime::testkit::PolicyTest;
//!
//! let test = PolicyTest::new(my_policy::plugin_module()).unwrap().with_options("(every: 50)");
//! let world = SimConfig { layers: 4, steps: 300, ..SimConfig::default() };
//! let report = test.simulate(&world).unwrap(); // the contract is checked every step
//! assert_eq!(report.freeze_step[0], Some(50));
//! test.check_resume(&world, 120).unwrap(); // save/restore continues identically
//! test.conformance(64).unwrap(); // hostile observations, random cut points
//! ```
//!
//! Invariant: every decision the policy makes here passes the host's own
//! [`crate::contract`] check; a decision the trainer would refuse fails the
//! test with the trainer's message.

use simfreeze_abi::sdk::PluginModules;

use crate::conformance::{self, state_in_words, ConformanceFailure};
use crate::contract::FreezeState;
use crate::driver::{DriverError, PolicyDriver, StepInput};
use crate::loader::{LoadError, Plugin, PolicyCallError, PolicyHandle};
use crate::simulate::{simulate, SimConfig, SimReport, SyntheticWorld};

/// Why a policy failed its test.
#[derive(thiserror::Error)]
pub enum TestKitError {
    /// The plugin or policy could not be built.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The policy failed, panicked or broke the freezing contract.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Saving or restoring its state failed.
    #[error(transparent)]
    State(#[from] PolicyCallError),
    /// A restored policy did not continue as the original did.
    #[error(
        "a restored policy did not continue as the original did: the original ran {saved} \
         steps and saved its state, a fresh policy was restored from it, and at step {step} \
         {detail} (replay: check_resume(&world, {saved}) on the same world)"
    )]
    Diverged {
        /// Steps run before the state was saved (the restored policy's
        /// first decision is after step `saved`).
        saved: u64,
        /// First step that differed.
        step: u64,
        /// What differed.
        detail: String,
    },
}

/// As [`Display`](std::fmt::Display): a failed `check_resume(..).unwrap()`
/// in a plugin's test reads as prose, not as a struct.
impl std::fmt::Debug for TestKitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// What one scripted step shows the policy (see [`PolicyTest::replay`]);
/// what a policy did not ask for in its `needs` is not passed on.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The batch loss.
    pub loss: f32,
    /// Features, `B × feature_dim`, row-major.
    pub features: Vec<f32>,
    /// Width of a feature row.
    pub feature_dim: usize,
    /// Labels, one per sample.
    pub labels: Vec<i64>,
    /// Classes of the task.
    pub num_classes: usize,
    /// One gradient norm per block.
    pub grad_norms: Vec<f32>,
    /// The step's learning rate.
    pub lr: Option<f64>,
}

/// A policy under test, linked into the test binary.
pub struct PolicyTest {
    plugin: Plugin,
    options: String,
}

impl PolicyTest {
    /// Wraps the root module a plugin crate exports (`export_policy!`
    /// generates `plugin_module()`), exactly as the host wraps a `.so`.
    pub fn new(module: impl Into<PluginModules>) -> Result<PolicyTest, TestKitError> {
        let plugin = Plugin::from_module(module, "in-process".into())?;
        Ok(PolicyTest {
            plugin,
            options: String::new(),
        })
    }

    /// Uses these RON options (as `--policy-config` would).
    pub fn with_options(mut self, options: &str) -> PolicyTest {
        self.options = options.to_string();
        self
    }

    /// A plugin loaded elsewhere (`simfreeze check` loads the `.so`).
    pub fn from_plugin(plugin: Plugin) -> PolicyTest {
        PolicyTest {
            plugin,
            options: String::new(),
        }
    }

    /// A fresh policy built with the options.
    pub fn policy(&self) -> Result<PolicyHandle, TestKitError> {
        Ok(self.plugin.new_policy(&self.options)?)
    }

    /// The conformance suite ([`crate::conformance`]) on `cases` hostile
    /// run shapes per property: what the shipped policies pass and what
    /// `simfreeze check` runs.
    pub fn conformance(&self, cases: u32) -> Result<(), ConformanceFailure> {
        let make = || {
            self.plugin
                .new_policy(&self.options)
                .map_err(|e| e.to_string())
        };
        conformance::check(&make, cases)
    }

    /// Drives a fresh policy through `cfg.steps` synthetic steps (what
    /// `simfreeze simulate` does) and returns its timeline.
    pub fn simulate(&self, cfg: &SimConfig) -> Result<SimReport, TestKitError> {
        Ok(simulate(self.policy()?, cfg, |_| {})?)
    }

    /// Feeds a fresh policy the observations of `script`, one per step, on
    /// a model of `layers` blocks, through the freeze contract; returns the
    /// freeze state after each step. For tests that need exact inputs
    /// (a gradient norm that stalls, features of a given class).
    pub fn replay(
        &self,
        layers: u32,
        script: &[Observed],
    ) -> Result<Vec<FreezeState>, TestKitError> {
        let mut driver = PolicyDriver::new(Some(self.policy()?), layers);
        let total = script.len() as u64;
        let mut states = Vec::with_capacity(script.len());
        for (step, o) in script.iter().enumerate() {
            let batch = o
                .features
                .len()
                .checked_div(o.feature_dim)
                .unwrap_or(o.labels.len());
            driver.after_step(&StepInput {
                step: step as u64,
                epoch: 0,
                steps_per_epoch: total.max(1),
                total_steps: total.max(1),
                loss: o.loss,
                batch: batch.max(1),
                features: &o.features,
                feature_dim: o.feature_dim,
                labels: &o.labels,
                num_classes: o.num_classes,
                grad_norms: &o.grad_norms,
                lr: o.lr,
                more: simfreeze_abi::ffi::ObservationV2::EMPTY,
            })?;
            states.push(driver.state().clone());
        }
        Ok(states)
    }

    /// Runs a policy to step `at`, saves its state, restores it into a
    /// fresh policy and checks that both continue identically to
    /// `cfg.steps`: same freeze state and the same scalars at every step
    /// (what a resumed training run relies on).
    pub fn check_resume(&self, cfg: &SimConfig, at: u64) -> Result<(), TestKitError> {
        let mut world = SyntheticWorld::new(cfg);
        let mut a = PolicyDriver::new(Some(self.policy()?), cfg.layers);
        for step in 0..at.min(cfg.steps) {
            world.drive(&mut a, step)?;
        }
        let saved = a.policy().map_or(Ok(Vec::new()), |p| p.save_state(at))?;
        // An empty state is the usual cause of a divergence: say so.
        let empty = match saved.is_empty() {
            true => " (restored from an empty state: save_state returned no bytes)",
            false => "",
        };
        let mut restored = self.policy()?;
        restored.load_state(at, &saved)?;
        let mut b = PolicyDriver::new(Some(restored), cfg.layers);
        b.restore_state(a.state().clone());
        for step in at..cfg.steps {
            let asked = a.state().observe();
            let loss = world.step(a.state().frozen_prefix() as usize);
            let more = world.more(asked);
            let mut input = world.input(step, loss);
            input.more = more.view();
            let oa = a.after_step(&input)?;
            let ob = b.after_step(&input)?;
            if oa.reference() != simfreeze_abi::ffi::ReferenceRequest::Keep {
                world.take_reference(step);
            }
            let diverged = |detail: String| TestKitError::Diverged {
                saved: at,
                step,
                detail,
            };
            if a.state() != b.state() {
                return Err(diverged(format!(
                    "the restored policy{empty} decided {}; the original decided {}",
                    state_in_words(b.state()),
                    state_in_words(a.state())
                )));
            }
            // NaN scalars compare unequal; compare their bit patterns.
            let bits = |s: &[(String, f64)]| -> Vec<(String, u64)> {
                s.iter().map(|(n, v)| (n.clone(), v.to_bits())).collect()
            };
            if bits(&oa.scalars) != bits(&ob.scalars) {
                return Err(diverged(format!(
                    "the restored policy{empty} logged the scalars {:?}; the original logged {:?}",
                    ob.scalars, oa.scalars
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use simfreeze_abi::sdk::{
        policy_module, Decision, HostServices, Info, Policy, PolicyError, PolicyPlugin, Step,
    };

    use super::*;

    /// Freezes one block per step; `forgetful` saves no state, so a
    /// restored copy starts counting again; `shrinking` moves the frontier
    /// back at step 5.
    struct Counter<const FORGETFUL: bool, const SHRINKING: bool> {
        steps: u64,
    }

    impl<const F: bool, const S: bool> Policy for Counter<F, S> {
        fn decide(&mut self, step: &Step<'_>) -> Result<Decision, PolicyError> {
            self.steps += 1;
            if S && step.step == 5 {
                return Ok(Decision::frontier(0));
            }
            let frontier = (self.steps as usize / 3).min(step.layers);
            Ok(Decision::frontier(frontier.max(step.frontier)).with_scalar("n", self.steps as f64))
        }
        fn save_state(&self) -> Result<Vec<u8>, PolicyError> {
            Ok(if F {
                Vec::new()
            } else {
                self.steps.to_le_bytes().to_vec()
            })
        }
        fn load_state(&mut self, state: &[u8]) -> Result<(), PolicyError> {
            if let Ok(bytes) = <[u8; 8]>::try_from(state) {
                self.steps = u64::from_le_bytes(bytes);
            }
            Ok(())
        }
    }

    impl<const F: bool, const S: bool> PolicyPlugin for Counter<F, S> {
        fn info() -> Info {
            Info {
                name: "counter",
                version: "0",
                description: "test policy",
                options: &[],
            }
        }
        fn new(_options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
            Ok(Counter { steps: 0 })
        }
    }

    fn world() -> SimConfig {
        SimConfig {
            layers: 4,
            steps: 30,
            ..SimConfig::default()
        }
    }

    #[test]
    fn a_policy_that_keeps_its_state_passes_both_checks() {
        let test = PolicyTest::new(policy_module::<Counter<false, false>>()).unwrap();
        let r = test.simulate(&world()).unwrap();
        assert_eq!(r.freeze_step, vec![Some(3), Some(6), Some(9), Some(12)]);
        test.check_resume(&world(), 4).unwrap();
    }

    #[test]
    fn a_policy_that_forgets_its_state_fails_the_resume_check_at_the_first_difference() {
        let test = PolicyTest::new(policy_module::<Counter<true, false>>()).unwrap();
        let e = test.check_resume(&world(), 4).unwrap_err();
        match &e {
            TestKitError::Diverged { saved: 4, step, .. } => assert_eq!(*step, 4),
            other => panic!("{other:?}"),
        }
        // In words, as `unwrap` shows it: which side is which, the empty
        // state, and the call that replays it.
        let text = format!("{e:?}");
        assert_eq!(text, e.to_string());
        assert!(!text.contains("Diverged {"), "{text}");
        for says in [
            "the original ran 4 steps and saved its state",
            "at step 4 the restored policy (restored from an empty state: save_state returned no bytes)",
            "logged the scalars [(\"n\", 1.0)]; the original logged [(\"n\", 5.0)]",
            "check_resume(&world, 4)",
        ] {
            assert!(text.contains(says), "{says:?} missing from: {text}");
        }
    }

    #[test]
    fn the_conformance_suite_passes_a_sound_policy_and_shrinks_a_failure() {
        let sound = PolicyTest::new(policy_module::<Counter<false, false>>()).unwrap();
        sound.conformance(32).unwrap();
        let forgetful = PolicyTest::new(policy_module::<Counter<true, false>>()).unwrap();
        let e = forgetful.conformance(32).unwrap_err();
        assert_eq!(e.property, conformance::PROPERTIES[1]);
        // A forgetful counter diverges as soon as it is cut after a step;
        // the failure shrinks to one block, a batch of one and a few steps.
        let run = e.run.clone().unwrap();
        assert_eq!((run.layers, run.batch, run.dim), (1, 1, 1), "{e}");
        assert!(run.steps <= 3 && run.cut >= 1, "{e}");
        // The failure in words, as `unwrap` shows it too: the run, the
        // sides, the empty state and how to replay it in the test kit.
        let text = format!("{e:?}");
        assert_eq!(text, e.to_string());
        assert!(
            !text.contains("HostileRun") && !text.contains("cut:"),
            "{text}"
        );
        let world = format!(
            "let world = SimConfig {{ layers: 1, steps: {}, steps_per_epoch: 10, classes: {}, \
             dim: 1, batch: 1, seed: {}, ..SimConfig::default() }};",
            run.steps, run.classes, run.seed
        );
        for says in [
            "smallest failing run: 1 block, ".to_string(),
            "batches of 1, features 1 wide".to_string(),
            format!(
                "the policy ran {} and saved its state",
                match run.cut {
                    1 => "1 step".to_string(),
                    n => format!("{n} steps"),
                }
            ),
            "the restored one (restored from an empty state: its save_state returned no bytes)"
                .to_string(),
            "; the original [(\"n\", 2.0)]".to_string(),
            world,
            format!("test.check_resume(&world, {}).unwrap();", run.cut),
        ] {
            assert!(text.contains(&says), "{says:?} missing from: {text}");
        }
        let shrinking = PolicyTest::new(policy_module::<Counter<false, true>>()).unwrap();
        let e = shrinking.conformance(32).unwrap_err();
        assert_eq!(e.property, conformance::PROPERTIES[0], "{e}");
        assert!(
            e.to_string().contains("test.simulate(&world).unwrap();"),
            "{e}"
        );
    }

    #[test]
    fn a_freeze_state_reads_in_words() {
        let mut s = FreezeState::new(4);
        assert_eq!(state_in_words(&s), "nothing frozen (frontier 0 of 4)");
        s.frontier = 2;
        s.probe = Some(2);
        assert_eq!(
            state_in_words(&s),
            "blocks 0 to 1 frozen (frontier 2 of 4), block 2 probed"
        );
        s.lr_factors[3] = 0.5;
        assert!(state_in_words(&s).ends_with("learning-rate factors [1.0, 1.0, 1.0, 0.5]"));
    }

    #[test]
    fn a_script_replays_step_by_step_through_the_contract() {
        let test = PolicyTest::new(policy_module::<Counter<false, false>>()).unwrap();
        let script = vec![Observed::default(); 7];
        let frontiers: Vec<u32> = test
            .replay(2, &script)
            .unwrap()
            .iter()
            .map(|s| s.frontier)
            .collect();
        assert_eq!(frontiers, [0, 0, 1, 1, 1, 2, 2]);
    }

    #[test]
    fn a_decision_that_breaks_the_contract_fails_with_the_hosts_message() {
        let test = PolicyTest::new(policy_module::<Counter<false, true>>()).unwrap();
        let e = test.simulate(&world()).unwrap_err();
        assert!(
            matches!(e, TestKitError::Driver(DriverError::Contract(_))),
            "{e}"
        );
        assert!(e.to_string().contains("step 5"), "{e}");
    }
}
