//! Egeria (Wang et al., EuroSys 2023; no public code found): a reference
//! model, refreshed from a quantized snapshot of the training model and
//! run off the critical path, and per layer the *plasticity*: the SP loss
//! (Tung & Mori 2019) between the training model's and the reference's
//! activations on the same batch. A layer whose plasticity stops changing
//! freezes, front to back.
//!
//! Here: every `every` steps the policy asks the host for the frontier
//! block's row-normalised Gram matrix on the batch through the model and
//! through the reference (`Needs::BLOCK_GRAMS | Needs::REFERENCE`); the
//! plasticity is `sp_loss` of the two. The reference is refreshed (kept as
//! `dtype`, int8 like the paper's) every `refresh` measurements, from the
//! weights after the measured step's update, and the next measurement reads
//! the weights before its step's update: with the default `refresh: 1` the
//! plasticity is how far the block moved over `every - 1` updates (so
//! `every` is at least 2). The block freezes when, over the last `window`
//! measurements, the fitted line's change relative to their mean,
//! `|slope| * (window - 1) / mean`, is at most `threshold`. The paper gives
//! no window, threshold or refresh period: these are choices, put on a grid
//! in `configs/regime-cpu.ron`.
//!
//! Deviations: Egeria also unfreezes layers when the learning rate changes;
//! the contract never unfreezes (frozen blocks stay frozen), so that part is
//! left out. Its reference runs on the CPU beside the GPU; simfreeze runs it
//! on the training device at the steps it is asked for (its cost is in
//! docs/performance.md).

use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    sp_loss, Decision, HostServices, Info, Needs, OptionDoc, Policy, PolicyError, PolicyPlugin,
    ReferenceDtype, Step,
};

/// How the reference is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Dtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
    /// int8 weight matrices (the paper's quantized reference).
    #[default]
    Int8,
}

/// Options.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Steps between two measurements (None: T / 50).
    pub every: Option<u64>,
    /// Measurements the convergence test looks at.
    pub window: usize,
    /// Largest relative change over the window of a converged block.
    pub threshold: f64,
    /// Measurements between two reference refreshes.
    pub refresh: u64,
    /// How the reference is kept.
    pub dtype: Dtype,
    /// Largest frontier (None: L - 1).
    pub max_frozen: Option<usize>,
    /// Also log every unfrozen block's plasticity (`plasticity.<block>`),
    /// to see when each block settles.
    pub log_blocks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            every: None,
            window: 5,
            threshold: 0.2,
            refresh: 1,
            dtype: Dtype::Int8,
            max_frozen: None,
            log_blocks: false,
        }
    }
}

/// The change of `values` over their span relative to their mean, from the
/// least-squares line: `|slope| * (n - 1) / |mean|` (0 when the mean is 0:
/// a block that does not move at all has converged).
pub fn relative_change(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return f64::INFINITY;
    }
    let nf = n as f64;
    let mean_x = (nf - 1.0) / 2.0;
    let mean_y = values.iter().sum::<f64>() / nf;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in values.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    let slope = sxy / sxx;
    if mean_y.abs() < 1e-300 {
        return 0.0;
    }
    slope.abs() * (nf - 1.0) / mean_y.abs()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// The frontier block's plasticity, one per measurement.
    history: Vec<f64>,
    /// The block `history` is of.
    block: usize,
    /// Measurements so far.
    measured: u64,
}

/// The policy.
pub struct Egeria {
    o: Options,
    s: State,
}

impl Egeria {
    fn reference_dtype(&self) -> ReferenceDtype {
        match self.o.dtype {
            Dtype::F32 => ReferenceDtype::F32,
            Dtype::Bf16 => ReferenceDtype::Bf16,
            Dtype::Int8 => ReferenceDtype::Int8,
        }
    }
}

impl Policy for Egeria {
    fn needs(&self) -> Needs {
        Needs::BLOCK_GRAMS | Needs::REFERENCE
    }

    fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
        let limit = self
            .o
            .max_frozen
            .unwrap_or(s.layers.saturating_sub(1))
            .min(s.layers);
        let every = self.o.every.unwrap_or(s.total_steps / 50).max(2);
        let mut d = s.keep();
        if s.reference_step().is_none() {
            d = d.take_reference(self.reference_dtype());
        }
        if s.frontier != self.s.block {
            self.s.history.clear();
            self.s.block = s.frontier;
        }
        let measuring = s.frontier < limit || self.o.log_blocks;
        if s.has(Needs::BLOCK_GRAMS) && measuring && s.frontier < s.layers {
            let k = s.frontier;
            if let Some(reference) = s.batch_reference_blocks()? {
                if self.o.log_blocks {
                    for i in k..s.layers {
                        let p = sp_loss(s.batch_blocks()?.gram(i)?, reference.gram(i)?)?;
                        d = d.with_scalar(format!("plasticity.{i}"), p);
                    }
                }
                let p = sp_loss(s.batch_blocks()?.gram(k)?, reference.gram(k)?)?;
                if p.is_finite() {
                    self.s.history.push(p);
                    d = d.with_scalar("plasticity", p);
                }
            }
            self.s.measured += 1;
            if self.s.measured % self.o.refresh.max(1) == 0 {
                d = d.take_reference(self.reference_dtype());
            }
            let w = self.o.window;
            if self.s.history.len() >= w && k < limit {
                let change = relative_change(&self.s.history[self.s.history.len() - w..]);
                d = d.with_scalar("plasticity_change", change);
                if change <= self.o.threshold {
                    d.frontier = k + 1;
                    self.s.history.clear();
                    self.s.block = k + 1;
                }
            }
        }
        if measuring && s.frontier < s.layers && (s.step + 2) % every == 0 {
            d = d.observe_next(Needs::BLOCK_GRAMS | Needs::REFERENCE);
        }
        Ok(d)
    }

    simfreeze_options::serde_state!(s);
}

impl PolicyPlugin for Egeria {
    fn info() -> Info {
        Info {
            name: "egeria",
            version: env!("CARGO_PKG_VERSION"),
            description: "Egeria (Wang et al. 2023): freezes the frontier block once its \
                          plasticity (SP loss of its activations against a refreshed, quantized \
                          reference snapshot) stops changing over a window of measurements.",
            options: &[
                OptionDoc {
                    name: "every",
                    default: "None",
                    doc: "steps between two measurements, at least 2 (None: T/50)",
                },
                OptionDoc {
                    name: "window",
                    default: "5",
                    doc: "measurements in the convergence test",
                },
                OptionDoc {
                    name: "threshold",
                    default: "0.2",
                    doc: "largest |slope| (window - 1) / mean of a converged block",
                },
                OptionDoc {
                    name: "refresh",
                    default: "1",
                    doc: "measurements between two reference refreshes",
                },
                OptionDoc {
                    name: "dtype",
                    default: "Int8",
                    doc: "how the reference is kept: F32, Bf16 or Int8",
                },
                OptionDoc {
                    name: "max_frozen",
                    default: "None",
                    doc: "largest frontier (None: L - 1)",
                },
                OptionDoc {
                    name: "log_blocks",
                    default: "false",
                    doc: "also log every unfrozen block's plasticity (plasticity.<block>)",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if o.every.is_some_and(|e| e < 2) || o.refresh == 0 {
            return Err(PolicyError::options(
                "every must be at least 2 (a measurement compares with the weights after the \
                 last one's update) and refresh at least 1",
            ));
        }
        if o.window < 2 {
            return Err(PolicyError::options("window must be at least 2"));
        }
        if o.threshold.is_nan() || o.threshold < 0.0 {
            return Err(PolicyError::options("threshold must be >= 0"));
        }
        Ok(Egeria {
            o,
            s: State::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simfreeze_abi::ffi::{BlockObservations, ObservationV2};

    #[test]
    fn relative_change_is_the_fitted_lines_span_over_the_mean() {
        // y = 1, 2, 3: slope 1, span 2, mean 2 -> 1.
        assert!((relative_change(&[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        // Flat: 0.
        assert_eq!(relative_change(&[0.5, 0.5, 0.5, 0.5]), 0.0);
        // y = 4, 3, 3, 2: slope -0.6, span 1.8, mean 3 -> 0.6.
        assert!((relative_change(&[4.0, 3.0, 3.0, 2.0]) - 0.6).abs() < 1e-12);
        // Nothing moves at all: converged.
        assert_eq!(relative_change(&[0.0, 0.0]), 0.0);
    }

    /// One measurement step: the frontier block's Gram matrices through
    /// the model and the reference differ by `delta` in one entry.
    fn measured<'a>(grams: &'a [f32], reference: &'a [f32]) -> ObservationV2<'a> {
        let b = |g: &'a [f32]| BlockObservations {
            blocks: 2,
            rows: 2,
            dim: 1,
            grams: g.into(),
            ..BlockObservations::EMPTY
        };
        ObservationV2 {
            provided: Needs::BLOCK_GRAMS | Needs::REFERENCE,
            batch: b(grams),
            batch_reference: b(reference),
            reference_step: abi_stable::std_types::ROption::RSome(0),
            ..ObservationV2::EMPTY
        }
    }

    #[test]
    fn freezes_the_frontier_once_its_plasticity_flattens() {
        let mut p = Egeria::new(
            "(every: 2, window: 3, threshold: 0.1)",
            &HostServices::none(),
        )
        .unwrap();
        let reference = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        // Plasticity of block 0 (one entry off by delta: delta^2 / 4):
        // falling, then flat.
        let deltas = [0.8f32, 0.4, 0.2, 0.2, 0.2, 0.2];
        let mut frontier = 0;
        let mut froze_at = None;
        for (i, delta) in deltas.iter().enumerate() {
            let mut g = reference;
            g[1] += delta;
            let s = Step::builder(i as u64 + 1, 3)
                .frontier(frontier)
                .more(measured(&g, &reference))
                .build();
            let d = p.decide(&s).unwrap();
            assert_eq!(
                d.take_reference,
                Some(ReferenceDtype::Int8),
                "refreshed every time"
            );
            if d.frontier > frontier && froze_at.is_none() {
                froze_at = Some(i);
            }
            frontier = d.frontier;
        }
        // Windows: [0.16, 0.04, 0.01] change 2.14; [0.04, 0.01, 0.01] 1.5;
        // [0.01, 0.01, 0.01] 0 -> freezes at the fifth measurement.
        assert_eq!(froze_at, Some(4));
        assert_eq!(frontier, 1);
    }

    #[test]
    fn log_blocks_logs_every_unfrozen_blocks_plasticity_and_max_frozen_0_never_freezes() {
        let o = "(every: 2, window: 2, threshold: 10.0, max_frozen: 0, log_blocks: true)";
        let mut p = Egeria::new(o, &HostServices::none()).unwrap();
        let reference = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let mut g = reference;
        g[5] += 0.2; // block 1 moved, block 0 did not
        for i in 0..3u64 {
            let s = Step::builder(i + 1, 2)
                .more(measured(&g, &reference))
                .build();
            let d = p.decide(&s).unwrap();
            assert_eq!(d.frontier, 0);
            let names: Vec<&str> = d.scalars.iter().map(|(n, _)| n.as_str()).collect();
            assert!(
                names.contains(&"plasticity.0") && names.contains(&"plasticity.1"),
                "{names:?}"
            );
            let value = |n: &str| d.scalars.iter().find(|(m, _)| m == n).unwrap().1;
            assert_eq!(value("plasticity.0"), 0.0);
            assert!(value("plasticity.1") > 0.0);
        }
    }
}
