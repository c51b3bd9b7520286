//! Template policy: freeze one more block every `every` steps.
//!
//! The smallest complete simfreeze policy plugin, written to be copied (see
//! this crate's README). It shows the three things every policy does:
//! parse its options (RON, unknown fields rejected), decide after every step,
//! and save/restore its state so a resumed run continues identically.
//!
//! Options: `every` (steps between two freezes, default 100) and
//! `keep_trainable` (the last blocks that never freeze, default 0).

use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};

/// The policy's options, parsed from RON such as `(every: 50)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Steps between two freezes.
    pub every: u64,
    /// Number of final blocks that are never frozen.
    pub keep_trainable: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            every: 100,
            keep_trainable: 0,
        }
    }
}

/// The policy. Its only state is the step at which it last froze a block.
pub struct EveryN {
    options: Options,
    state: State,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    last_freeze: u64,
}

impl Policy for EveryN {
    fn decide(&mut self, step: &Step<'_>) -> Result<Decision, PolicyError> {
        let limit = step.layers.saturating_sub(self.options.keep_trainable);
        let done = step.step + 1; // steps completed so far
        let mut frontier = step.frontier;
        if frontier < limit && done - self.state.last_freeze >= self.options.every {
            frontier += 1;
            self.state.last_freeze = done;
        }
        let decision = Decision::frontier(frontier);
        if frontier == step.frontier {
            return Ok(decision);
        }
        // Scalars are logged per step; log one only when something happens.
        Ok(decision.with_scalar("frozen", frontier as f64))
    }

    fn save_state(&self) -> Result<Vec<u8>, PolicyError> {
        ron::to_string(&self.state)
            .map(String::into_bytes)
            .map_err(PolicyError::state)
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), PolicyError> {
        let text = std::str::from_utf8(state).map_err(PolicyError::state)?;
        self.state = ron::from_str(text).map_err(PolicyError::state)?;
        Ok(())
    }
}

impl PolicyPlugin for EveryN {
    fn info() -> Info {
        Info {
            name: "template",
            version: env!("CARGO_PKG_VERSION"),
            description: "Freezes one more block every `every` steps (the example to copy).",
            options: &[
                OptionDoc {
                    name: "every",
                    default: "100",
                    doc: "steps between two freezes",
                },
                OptionDoc {
                    name: "keep_trainable",
                    default: "0",
                    doc: "final blocks never frozen",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let options: Options = if options.trim().is_empty() {
            Options::default()
        } else {
            ron::from_str(options).map_err(PolicyError::options)?
        };
        if options.every == 0 {
            return Err(PolicyError::options("`every` must be at least 1"));
        }
        Ok(EveryN {
            options,
            state: State::default(),
        })
    }
}

simfreeze_abi::export_policy!(EveryN);

// `cargo test` drives the policy in-process through simfreeze's own freeze
// contract and synthetic world: the checks the shipped policies pass.
#[cfg(test)]
mod tests {
    use simfreeze_runtime::simulate::SimConfig;
    use simfreeze_runtime::testkit::PolicyTest;

    fn world() -> SimConfig {
        SimConfig {
            layers: 4,
            steps: 300,
            ..SimConfig::default()
        }
    }

    #[test]
    fn freezes_one_block_every_n_steps_within_the_contract() {
        let test = PolicyTest::new(crate::plugin_module())
            .unwrap()
            .with_options("(every: 50, keep_trainable: 1)");
        let report = test.simulate(&world()).unwrap();
        // Block i is frozen from step 50 * (i + 1); the last one never is.
        assert_eq!(
            report.freeze_step,
            vec![Some(50), Some(100), Some(150), None]
        );
    }

    #[test]
    fn a_restored_policy_continues_identically() {
        let test = PolicyTest::new(crate::plugin_module())
            .unwrap()
            .with_options("(every: 40)");
        for at in [0, 39, 40, 41, 120, 299] {
            test.check_resume(&world(), at).unwrap();
        }
    }

    #[test]
    fn passes_the_conformance_suite_every_shipped_policy_passes() {
        // Hostile observations (NaN, unseen labels, batches of one, 1 to 12
        // blocks) and save/restore at random steps; `simfreeze check` runs
        // the same suite on the built `.so`.
        let test = PolicyTest::new(crate::plugin_module())
            .unwrap()
            .with_options("(every: 3)");
        test.conformance(64).unwrap();
    }

    #[test]
    fn a_bad_option_is_refused_with_the_valid_names() {
        let test = PolicyTest::new(crate::plugin_module())
            .unwrap()
            .with_options("(evry: 5)");
        let e = test.policy().err().unwrap().to_string();
        assert!(e.contains("every") && e.contains("keep_trainable"), "{e}");
    }
}
