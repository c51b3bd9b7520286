//! SmartFRZ (Li et al., ICLR 2023; no public code or data): an
//! attention-based predictor reads a window of snapshots of each active
//! block's weights and says whether the block has converged; converged
//! blocks freeze.
//!
//! Here: every `every` steps the policy asks the host for the blocks'
//! sampled weights (`Needs::SAMPLED_WEIGHTS`, 64 per block at fixed
//! indices) and keeps the last `W` snapshots of every unfrozen block. Once
//! the frontier block has `W`, the [`Predictor`] reads them; at a
//! probability of at least `threshold` the block freezes, and the next one
//! is asked at the same step (so several blocks may freeze at once).
//!
//! The predictor is trained offline, on labels from the CKA of each block's
//! output on a fixed batch against the same block at the end of training,
//! from simfreeze runs on the source task only (`record` mode below writes
//! them; `tools/smartfrz-train` trains; the shipped weights say in their
//! `provenance` how they were made; docs/policies.md).
//!
//! Deviations: SmartFRZ may freeze any converged layer; the contract
//! freezes front to back, so a converged block waits for the blocks before
//! it. The paper samples 1,024 weights per layer; the host offers 64 (a
//! host offering another count gets its samples cut or repeated to the
//! predictor's).

mod predictor;

use std::io::Write;

pub use predictor::{linear_cka, window_features, Linear, Predictor, Provenance, FORMAT, SHIPPED};
use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, Needs, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};

/// Options.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Smallest predicted probability of convergence that freezes.
    pub threshold: f64,
    /// Steps between two snapshots (None: the predictor's own cadence).
    pub every: Option<u64>,
    /// Largest frontier (None: L - 1).
    pub max_frozen: Option<usize>,
    /// A predictor file (None: the one shipped with the plugin).
    pub predictor: Option<String>,
    /// Record mode: never freeze; every `every` steps (and at the last
    /// step) append to this file one JSON line with the step, every block's
    /// sampled weights and the Gram matrix of its tokens on the fixed batch
    /// (the predictor's training data).
    pub record: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threshold: 0.5,
            every: None,
            max_frozen: None,
            predictor: None,
            record: None,
        }
    }
}

/// One line of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The step observed (its weights before the update).
    pub step: u64,
    /// Blocks.
    pub layers: usize,
    /// Sampled weights per block.
    pub samples: usize,
    /// `layers × samples`.
    pub weights: Vec<f32>,
    /// Probe samples (B).
    pub rows: usize,
    /// `layers × B × B`: per block, `X Xᵀ` of its pooled tokens on the
    /// fixed batch.
    pub grams: Vec<f32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Per block, its last snapshots (oldest first).
    windows: Vec<Vec<Vec<f32>>>,
    /// Lines recorded so far (record mode).
    recorded: u64,
}

/// The policy.
pub struct SmartFrz {
    o: Options,
    predictor: Predictor,
    every: u64,
    s: State,
}

impl SmartFrz {
    fn record(&mut self, s: &Step<'_>, path: &str) -> Result<(), PolicyError> {
        let w = s.sampled_weights()?;
        let probe = s.fixed_blocks()?;
        let mut grams = Vec::new();
        for i in 0..s.layers {
            let t = probe.tokens(i)?;
            for a in t.iter_rows() {
                for b in t.iter_rows() {
                    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x * *y)).sum();
                    grams.push(dot as f32);
                }
            }
        }
        let line = Snapshot {
            step: s.step,
            layers: s.layers,
            samples: w.cols(),
            weights: w.as_slice().to_vec(),
            rows: probe.rows(),
            grams,
        };
        let text = serde_json::to_string(&line).map_err(|e| PolicyError::invalid(e.to_string()))?;
        // The first line of a run starts the file afresh; a resumed run
        // appends (a step recorded twice after a crash: the later line wins).
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.s.recorded > 0)
            .truncate(self.s.recorded == 0)
            .open(path)
            .map_err(|e| PolicyError::invalid(format!("cannot write the recording {path}: {e}")))?;
        writeln!(file, "{text}")
            .map_err(|e| PolicyError::invalid(format!("cannot write the recording {path}: {e}")))?;
        self.s.recorded += 1;
        Ok(())
    }
}

/// `row` fitted to the predictor's `size` samples: the first `size`, or
/// repeated cyclically when the host samples fewer (the host samples 64,
/// the predictor reads 64; the simulator and `simfreeze check` offer other
/// counts). No samples at all: zeros (a block that does not move).
fn fit(row: &[f32], size: usize) -> Vec<f32> {
    if row.is_empty() {
        return vec![0.0; size];
    }
    row.iter().cycle().take(size).copied().collect()
}

impl Policy for SmartFrz {
    fn needs(&self) -> Needs {
        if self.o.record.is_some() {
            Needs::SAMPLED_WEIGHTS | Needs::BLOCK_TOKENS | Needs::FIXED_BATCH
        } else {
            Needs::SAMPLED_WEIGHTS
        }
    }

    fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
        let mut d = s.keep();
        let last = s.step + 2 == s.total_steps;
        if let Some(path) = self.o.record.clone() {
            if s.has(Needs::SAMPLED_WEIGHTS) {
                self.record(s, &path)?;
            }
            if (s.step + 2) % self.every == 0 || last {
                d = d.observe_next(self.needs());
            }
            return Ok(d);
        }
        let limit = self
            .o
            .max_frozen
            .unwrap_or(s.layers.saturating_sub(1))
            .min(s.layers);
        if s.frontier >= limit {
            self.s.windows.clear();
            return Ok(d);
        }
        if s.has(Needs::SAMPLED_WEIGHTS) {
            let w = s.sampled_weights()?;
            let window = self.predictor.window;
            let size = self.predictor.samples;
            self.s.windows.resize(s.layers, Vec::new());
            for (i, kept) in self.s.windows.iter_mut().enumerate() {
                if i < s.frontier {
                    kept.clear();
                    continue;
                }
                kept.push(fit(w.row(i), size));
                if kept.len() > window {
                    kept.remove(0);
                }
            }
            let mut k = s.frontier;
            let mut asked = 0u64;
            while k < limit && self.s.windows[k].len() == window {
                let snaps: Vec<&[f32]> = self.s.windows[k].iter().map(|v| &v[..]).collect();
                let p = self.predictor.probability(&window_features(&snaps));
                asked += 1;
                if k == s.frontier {
                    d = d.with_scalar("p_converged", p);
                }
                if p.is_nan() || p < self.o.threshold {
                    break;
                }
                self.s.windows[k].clear();
                k += 1;
            }
            if asked > 0 {
                d = d.with_scalar("predictor_macs", (asked * self.predictor.macs()) as f64);
            }
            d.frontier = k;
        }
        if (s.step + 2) % self.every == 0 {
            d = d.observe_next(Needs::SAMPLED_WEIGHTS);
        }
        Ok(d)
    }

    simfreeze_options::serde_state!(s);
}

impl PolicyPlugin for SmartFrz {
    fn info() -> Info {
        Info {
            name: "smartfrz",
            version: env!("CARGO_PKG_VERSION"),
            description: "SmartFRZ (Li et al. 2023): an attention-based predictor, trained \
                          offline on the source task, reads a window of snapshots of each \
                          block's sampled weights and freezes the blocks it finds converged, \
                          front to back.",
            options: &[
                OptionDoc {
                    name: "threshold",
                    default: "0.5",
                    doc: "smallest predicted probability of convergence that freezes",
                },
                OptionDoc {
                    name: "every",
                    default: "None",
                    doc: "steps between two weight snapshots (None: the predictor's)",
                },
                OptionDoc {
                    name: "max_frozen",
                    default: "None",
                    doc: "largest frontier (None: L - 1)",
                },
                OptionDoc {
                    name: "predictor",
                    default: "None",
                    doc: "a predictor file from tools/smartfrz-train (None: the shipped one)",
                },
                OptionDoc {
                    name: "record",
                    default: "None",
                    doc: "record mode: never freeze, write the predictor's training data \
                          (sampled weights, probe-batch Gram matrices) to this JSON-lines file",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if o.threshold.is_nan() || !(0.0..=1.0).contains(&o.threshold) {
            return Err(PolicyError::options("threshold must be in [0, 1]"));
        }
        if o.every == Some(0) {
            return Err(PolicyError::options("every must be at least 1"));
        }
        let predictor = match &o.predictor {
            None => Predictor::from_json(SHIPPED),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {path}: {e}"))
                .and_then(|t| Predictor::from_json(&t)),
        }
        .map_err(|e| PolicyError::options(format!("predictor: {e}")))?;
        let every = o.every.unwrap_or(predictor.every);
        Ok(SmartFrz {
            o,
            predictor,
            every,
            s: State::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simfreeze_abi::ffi::ObservationV2;

    /// A predictor whose logit is `bias + gain * relu(-moved)` (`moved` the
    /// log relative movement, input `S`): it calls a block converged once
    /// it moves less than 10^(bias / gain) of its size over a window.
    fn movement_predictor(samples: usize, window: usize, gain: f32, bias: f32) -> Predictor {
        let h = 2;
        let zeros = |o: usize, i: usize| Linear {
            out: o,
            inp: i,
            weight: vec![0.0; o * i],
            bias: vec![0.0; o],
        };
        let mut embed1 = zeros(h, samples + 1);
        // h0 = relu(-moved): moved is <= 0 for a block that moves less
        // than its own size.
        embed1.weight[samples] = -1.0;
        let mut embed2 = zeros(h, h);
        embed2.weight[0] = 1.0;
        let mut value = zeros(h, h);
        value.weight[0] = 1.0;
        let mut out1 = zeros(h, h);
        out1.weight[0] = 1.0;
        let mut out2 = zeros(1, h);
        out2.weight[0] = gain;
        out2.bias[0] = bias;
        Predictor {
            format: FORMAT.into(),
            samples,
            window,
            every: 2,
            hidden: h,
            embed1,
            embed2,
            query: zeros(h, h),
            key: zeros(h, h),
            value,
            out1,
            out2,
            provenance: Provenance::default(),
        }
    }

    #[test]
    fn freezes_a_prefix_of_the_blocks_the_predictor_calls_converged() {
        // Logit = -4 + relu(-moved): converged once the movement is under
        // 1e-4 of the size.
        let predictor = movement_predictor(2, 2, 1.0, -4.0);
        let mut p = SmartFrz {
            o: Options::default(),
            every: 2,
            predictor,
            s: State::default(),
        };
        // Block 0 moves 1e-6 of its size, block 1 1e-3, block 2 1e-6.
        let mut step_of = |i: u64, frontier: usize, w: &[f32]| -> Decision {
            let more = ObservationV2 {
                provided: Needs::SAMPLED_WEIGHTS,
                sampled_weights: w.into(),
                samples_per_block: 2,
                ..ObservationV2::EMPTY
            };
            let s = Step::builder(i, 3)
                .schedule(0, 100, 100)
                .frontier(frontier)
                .more(more)
                .build();
            p.decide(&s).unwrap()
        };
        let d = step_of(1, 0, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(d.frontier, 0, "one snapshot is not a window");
        let d = step_of(3, 0, &[1.000001, 1.0, 1.001, 1.0, 1.000001, 1.0]);
        assert_eq!(d.frontier, 1, "block 0 converged, block 1 not: {d:?}");
        let p0 = d
            .scalars
            .iter()
            .find(|(n, _)| n == "p_converged")
            .unwrap()
            .1;
        assert!(p0 > 0.5);
        // Block 1 moves again; block 2 is still but waits behind it.
        let d = step_of(5, 1, &[1.0, 1.0, 1.002, 1.0, 1.000001, 1.0]);
        assert_eq!(d.frontier, 1, "block 1 still moving: {d:?}");
        // Block 1 still now: it freezes, and block 2 would too, but never
        // past max_frozen (L - 1 = 2).
        let d = step_of(7, 1, &[1.0, 1.0, 1.002, 1.0, 1.000001, 1.0]);
        assert_eq!(d.frontier, 2);
        let d = step_of(8, 2, &[1.0, 1.0, 1.002, 1.0, 1.000001, 1.0]);
        assert_eq!(d.frontier, 2);
        assert_eq!(
            d.observe,
            Needs::NONE,
            "nothing left to freeze: nothing asked"
        );
    }

    #[test]
    fn record_mode_writes_one_line_per_observed_step_and_never_freezes() {
        let dir = std::env::temp_dir().join(format!("smartfrz-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.jsonl");
        std::fs::write(&path, "stale line\n").unwrap();
        let o = format!("(record: Some({:?}), every: 2)", path.to_str().unwrap());
        let mut p = SmartFrz::new(&o, &HostServices::none()).unwrap();
        assert!(p.needs().contains(Needs::FIXED_BATCH | Needs::BLOCK_TOKENS));
        let w = [1.0f32, 2.0, 3.0, 4.0];
        // Probe: 2 samples x 1 dim per block, 2 blocks.
        let tokens = [1.0f32, 2.0, 3.0, 4.0];
        let probe = simfreeze_abi::ffi::BlockObservations {
            blocks: 2,
            rows: 2,
            dim: 1,
            tokens: tokens[..].into(),
            ..simfreeze_abi::ffi::BlockObservations::EMPTY
        };
        for step in [1u64, 3] {
            let more = ObservationV2 {
                provided: p.needs(),
                sampled_weights: w[..].into(),
                samples_per_block: 2,
                probe,
                ..ObservationV2::EMPTY
            };
            let s = Step::builder(step, 2)
                .schedule(0, 10, 10)
                .more(more)
                .build();
            let d = p.decide(&s).unwrap();
            assert_eq!(d.frontier, 0);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Snapshot> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "the stale line is gone: {text}");
        assert_eq!(lines[1].step, 3);
        // Block 1's tokens 3, 4: Gram [[9, 12], [12, 16]].
        assert_eq!(
            lines[0].grams,
            vec![1.0, 2.0, 2.0, 4.0, 9.0, 12.0, 12.0, 16.0]
        );
        assert_eq!(lines[0].weights, w.to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_sample_counts_are_cut_or_repeated_to_the_predictors() {
        assert_eq!(fit(&[1.0, 2.0, 3.0], 2), vec![1.0, 2.0]);
        assert_eq!(fit(&[1.0, 2.0], 5), vec![1.0, 2.0, 1.0, 2.0, 1.0]);
        assert_eq!(fit(&[], 3), vec![0.0; 3]);
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let e = |o: &str| match SmartFrz::new(o, &HostServices::none()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{o} accepted"),
        };
        assert!(e("(threshold: 1.5)").contains("threshold"));
        assert!(e("(every: Some(0))").contains("every"));
        assert!(e("(predictor: Some(\"/nonexistent.json\"))").contains("cannot read"));
    }
}
