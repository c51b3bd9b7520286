//! Composer's LayerFreezing (`composer/algorithms/layer_freezing`): at each
//! epoch end, with `t` the fraction of the run elapsed, the fraction of the
//! network frozen is 0 while `t <= freeze_start`, else
//! `freeze_level * (t - freeze_start) / (1 - freeze_start)`. No
//! learning-rate annealing.
//!
//! Deviations: Composer counts the model's leaf modules (every Linear and
//! LayerNorm) and freezes a prefix of them; the contract freezes whole
//! blocks, so the frontier is `floor(fraction * L)` blocks. Composer
//! rounds the start to whole epochs (`int(freeze_start * epochs)`); here
//! `t` and `freeze_start` compare as fractions, which is the same when
//! `freeze_start * epochs` is whole.

use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};

/// Options.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Fraction of the run before freezing starts.
    pub freeze_start: f64,
    /// Fraction of the blocks frozen at the end of the run.
    pub freeze_level: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            freeze_start: 0.5,
            freeze_level: 1.0,
        }
    }
}

/// Blocks frozen (of `layers`) after `t` of the run: the schedule.
pub fn composer_frozen(t: f64, freeze_start: f64, freeze_level: f64, layers: usize) -> usize {
    if t <= freeze_start || freeze_start >= 1.0 {
        return 0;
    }
    let fraction = freeze_level * (t - freeze_start) / (1.0 - freeze_start);
    ((fraction * layers as f64).floor().max(0.0) as usize).min(layers)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {}

/// The policy.
pub struct LayerFreezing {
    o: Options,
}

impl Policy for LayerFreezing {
    fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
        if !crate::ends_epoch(s.step, s.steps_per_epoch) {
            return Ok(s.keep());
        }
        let t = (s.step + 1) as f64 / s.total_steps.max(1) as f64;
        let k = composer_frozen(t, self.o.freeze_start, self.o.freeze_level, s.layers);
        let frontier = k.max(s.frontier);
        Ok(Decision::frontier(frontier)
            .with_scalar("frozen_fraction", k as f64 / s.layers.max(1) as f64))
    }

    fn save_state(&self) -> Result<Vec<u8>, PolicyError> {
        simfreeze_options::save(&State {})
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), PolicyError> {
        let _: State = simfreeze_options::load(state)?;
        Ok(())
    }
}

impl PolicyPlugin for LayerFreezing {
    fn info() -> Info {
        Info {
            name: "layerfreezing",
            version: env!("CARGO_PKG_VERSION"),
            description: "Composer's LayerFreezing: from `freeze_start` of the run on, freezes a \
                          linearly growing fraction of the blocks at each epoch end, reaching \
                          `freeze_level` at the end.",
            options: &[
                OptionDoc {
                    name: "freeze_start",
                    default: "0.5",
                    doc: "fraction of the run before freezing starts",
                },
                OptionDoc {
                    name: "freeze_level",
                    default: "1.0",
                    doc: "fraction of the blocks frozen at the end of the run",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if !(0.0..1.0).contains(&o.freeze_start) {
            return Err(PolicyError::options("freeze_start must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&o.freeze_level) {
            return Err(PolicyError::options("freeze_level must be in [0, 1]"));
        }
        Ok(LayerFreezing { o })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fraction_grows_linearly_after_the_start() {
        // 12 blocks, start 0.5, level 1: t = 0.5 -> 0; 0.75 -> 0.5 -> 6;
        // 0.9 -> 0.8 -> 9.6 -> 9; 1.0 -> 12.
        assert_eq!(composer_frozen(0.5, 0.5, 1.0, 12), 0);
        assert_eq!(composer_frozen(0.75, 0.5, 1.0, 12), 6);
        assert_eq!(composer_frozen(0.9, 0.5, 1.0, 12), 9);
        assert_eq!(composer_frozen(1.0, 0.5, 1.0, 12), 12);
        // level 0.5: at the end half the blocks.
        assert_eq!(composer_frozen(1.0, 0.5, 0.5, 12), 6);
        // start 0: from the first epoch end.
        assert_eq!(composer_frozen(0.25, 0.0, 1.0, 8), 2);
    }

    #[test]
    fn decides_only_at_epoch_ends() {
        let mut p = LayerFreezing::new("", &HostServices::none()).unwrap();
        let mut frontier = 0;
        let mut seen = Vec::new();
        // 4 epochs of 3 steps, 8 blocks.
        for step in 0..12u64 {
            let s = Step::builder(step, 8)
                .schedule(step / 3, 3, 12)
                .frontier(frontier)
                .build();
            frontier = p.decide(&s).unwrap().frontier;
            seen.push(frontier);
        }
        // Epoch ends at t = 0.25, 0.5, 0.75, 1: 0, 0, 4, 8 blocks.
        assert_eq!(seen, [0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 8]);
    }
}
