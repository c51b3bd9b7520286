//! PipeTransformer's freezing (`Distributed-AI/PipeTransformer`,
//! `pipe_transformer/freeze/auto_freeze.py`, read at the repository's
//! newest commit).
//!
//! **Schedule** (the code's `is_hand_crafted = True`, the branch its
//! experiments ran): during epoch `e` (from 0) the first
//! `ceil(L * (1 - (1 - alpha)^e))` blocks are frozen; the code computes it
//! as `(1 - alpha)^e * (L alpha / (1 - alpha) + sum_{k=2..e} L alpha /
//! (1 - alpha)^k)`, which is the same sum, and so does this crate (so the
//! rounding matches). `alpha` is 0.5 in `arguments.py`, 1/3 in the
//! CIFAR-100 sweep and 0.07 in the ImageNet one. Its code freezes up to all
//! L blocks; `max_frozen` (default L) caps it.
//!
//! **Gradient branch** (dormant in that code, `branch: Gradient` here):
//! at each epoch start from the second on, per block the L1 norm `G` of
//! the gradient accumulated over the past epoch, the ratio
//! `|G_prev - G| / G_prev` (0 where `G` is 0), the 50th percentile over the
//! blocks not yet frozen, and the frontier moved to just after the first
//! block whose ratio is at or above it. The code reads the accumulated
//! gradients of the parameters (`torch.norm(grad, p=1)`); here they come
//! from the host's `Needs::ACC_GRAD_NORMS`, asked for at each epoch's last
//! step. The code never takes the frontier back; neither does the contract.
//!
//! No SVCCA anywhere in the public code (the SimFreeze paper says it uses
//! one), and the pipelining and data-parallel gains of the system are not
//! a freezing rule's: only the schedule is compared here.

use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, Needs, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};

/// Which of the code's two rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Branch {
    /// The geometric schedule.
    #[default]
    Schedule,
    /// The accumulated-gradient rule.
    Gradient,
}

/// Options.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// The schedule's rate.
    pub alpha: f64,
    /// The rule.
    pub branch: Branch,
    /// Largest frontier (None: L).
    pub max_frozen: Option<usize>,
    /// The gradient branch's percentile of the ratios.
    pub percentile: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            alpha: 0.5,
            branch: Branch::Schedule,
            max_frozen: None,
            percentile: 50.0,
        }
    }
}

/// The schedule: blocks frozen during epoch `epoch` (from 0) of a model
/// with `layers` blocks, as the code computes it.
pub fn frozen_after(layers: usize, alpha: f64, epoch: u64) -> usize {
    if epoch == 0 {
        return 0;
    }
    let la = layers as f64 * alpha;
    let second: f64 = (2..=epoch).map(|k| la / (1.0 - alpha).powi(k as i32)).sum();
    let n = (1.0 - alpha).powi(epoch as i32) * (la / (1.0 - alpha) + second);
    (n.ceil().max(0.0) as usize).min(layers)
}

/// `np.percentile(values, q)` with its default linear interpolation.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The gradient branch's frontier from two epochs' per-block L1 norms,
/// `frontier` blocks frozen.
pub fn grad_branch_pick(prev: &[f64], cur: &[f64], frontier: usize, q: f64) -> usize {
    let ratio: Vec<f64> = prev
        .iter()
        .zip(cur)
        .map(|(p, c)| {
            if *c > 0.0 && *p > 0.0 {
                (p - c).abs() / p
            } else {
                0.0
            }
        })
        .collect();
    if frontier >= ratio.len() {
        return frontier;
    }
    let threshold = percentile(&ratio[frontier..], q);
    match ratio.iter().position(|r| *r >= threshold) {
        Some(i) => (i + 1).max(frontier),
        None => frontier,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    prev: Option<Vec<f64>>,
}

/// The policy.
pub struct PipeTransformer {
    o: Options,
    s: State,
}

impl Policy for PipeTransformer {
    fn needs(&self) -> Needs {
        match self.o.branch {
            Branch::Schedule => Needs::NONE,
            Branch::Gradient => Needs::ACC_GRAD_NORMS,
        }
    }

    fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
        let limit = self.o.max_frozen.unwrap_or(s.layers).min(s.layers);
        let mut d = s.keep();
        if self.o.branch == Branch::Gradient && crate::before_epoch_end(s.step, s.steps_per_epoch) {
            d = d.observe_next(Needs::ACC_GRAD_NORMS);
        }
        if !crate::ends_epoch(s.step, s.steps_per_epoch) {
            return Ok(d);
        }
        let next_epoch = (s.step + 1) / s.steps_per_epoch.max(1);
        let k = match self.o.branch {
            Branch::Schedule => frozen_after(s.layers, self.o.alpha, next_epoch),
            Branch::Gradient => {
                if !s.has(Needs::ACC_GRAD_NORMS) {
                    return Ok(d);
                }
                let cur: Vec<f64> = s.acc_grad_norms()?.l1.to_vec();
                let k = match self.s.prev.as_ref().filter(|p| p.len() == cur.len()) {
                    Some(prev) => grad_branch_pick(prev, &cur, s.frontier, self.o.percentile),
                    None => s.frontier,
                };
                self.s.prev = Some(cur);
                k
            }
        };
        d.frontier = k.min(limit).max(s.frontier);
        Ok(d)
    }

    simfreeze_options::serde_state!(s);
}

impl PolicyPlugin for PipeTransformer {
    fn info() -> Info {
        Info {
            name: "pipetransformer",
            version: env!("CARGO_PKG_VERSION"),
            description: "PipeTransformer (He et al. 2021): during epoch e the first \
                          ceil(L (1 - (1 - alpha)^e)) blocks are frozen; or, with `branch: \
                          Gradient`, its accumulated-gradient rule at each epoch start.",
            options: &[
                OptionDoc {
                    name: "alpha",
                    default: "0.5",
                    doc: "the schedule's rate (the code: 0.5; CIFAR-100 1/3; ImageNet 0.07)",
                },
                OptionDoc {
                    name: "branch",
                    default: "Schedule",
                    doc: "Schedule or Gradient (the code's dormant rule)",
                },
                OptionDoc {
                    name: "max_frozen",
                    default: "None",
                    doc: "largest frontier (None: L)",
                },
                OptionDoc {
                    name: "percentile",
                    default: "50.0",
                    doc: "Gradient: the percentile of the ratios",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if !(o.alpha > 0.0 && o.alpha < 1.0) {
            return Err(PolicyError::options("alpha must be in (0, 1)"));
        }
        if !(0.0..=100.0).contains(&o.percentile) {
            return Err(PolicyError::options("percentile must be in [0, 100]"));
        }
        Ok(PipeTransformer {
            o,
            s: State::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simfreeze_abi::ffi::ObservationV2;

    #[test]
    fn the_schedule_is_the_closed_form_rounded_up() {
        // L = 12, alpha 0.5: 12 (1 - 0.5^e) = 6, 9, 10.5, 11.25.
        let got: Vec<usize> = (0..6).map(|e| frozen_after(12, 0.5, e)).collect();
        assert_eq!(got, [0, 6, 9, 11, 12, 12]);
        // alpha 1/3: 12 (1 - (2/3)^e) = 4, 6.67, 8.44, 9.63.
        let got: Vec<usize> = (0..5).map(|e| frozen_after(12, 1.0 / 3.0, e)).collect();
        assert_eq!(got, [0, 4, 7, 9, 10]);
        // alpha 0.07, 12 blocks: 0.84, 1.62, 2.35.
        let got: Vec<usize> = (0..4).map(|e| frozen_after(12, 0.07, e)).collect();
        assert_eq!(got, [0, 1, 2, 3]);
    }

    #[test]
    fn the_gradient_branch_freezes_through_the_first_block_at_the_median() {
        // Ratios [0.1, 0.5, 0.2, 0.4]: median 0.3; first >= is block 1,
        // so blocks 0 and 1 freeze (the code: `frozen_layer_idx + 1`).
        let prev = [10.0, 10.0, 10.0, 10.0];
        let cur = [9.0, 5.0, 8.0, 6.0];
        assert_eq!(grad_branch_pick(&prev, &cur, 0, 50.0), 2);
        // With block 0 frozen (ratio 0: no gradient), the median of
        // [0.5, 0.2, 0.4] is 0.4 and block 1 is still first.
        let cur = [0.0, 5.0, 8.0, 6.0];
        assert_eq!(grad_branch_pick(&prev, &cur, 1, 50.0), 2);
        // Never behind the frontier.
        assert_eq!(grad_branch_pick(&prev, &[9.0, 9.9, 9.9, 9.9], 3, 50.0), 3);
    }

    #[test]
    fn the_schedule_moves_at_epoch_starts() {
        let mut p = PipeTransformer::new("(alpha: 0.5)", &HostServices::none()).unwrap();
        let mut frontier = 0;
        let mut seen = Vec::new();
        for step in 0..8u64 {
            let s = Step::builder(step, 4)
                .schedule(step / 2, 2, 8)
                .frontier(frontier)
                .build();
            frontier = p.decide(&s).unwrap().frontier;
            seen.push(frontier);
        }
        // 4 blocks: epochs 1, 2, 3 freeze 2, 3, 4 (3.5 rounded up).
        assert_eq!(seen, [0, 2, 2, 3, 3, 4, 4, 4]);
    }

    #[test]
    fn the_gradient_branch_asks_before_each_epoch_end_and_reads_at_it() {
        let mut p = PipeTransformer::new("(branch: Gradient)", &HostServices::none()).unwrap();
        let l1s = [[10.0, 10.0, 10.0, 10.0], [9.0, 5.0, 8.0, 6.0]];
        let l2 = [1.0; 4];
        let mut frontier = 0;
        for (epoch, l1) in l1s.iter().enumerate() {
            let first = (epoch * 3) as u64;
            let s = Step::builder(first + 1, 4)
                .schedule(epoch as u64, 3, 6)
                .frontier(frontier)
                .build();
            let d = p.decide(&s).unwrap();
            assert!(
                d.observe.contains(Needs::ACC_GRAD_NORMS),
                "asks before the end"
            );
            let more = ObservationV2 {
                provided: Needs::ACC_GRAD_NORMS,
                acc_grad_l1: l1.as_slice().into(),
                acc_grad_l2: l2.as_slice().into(),
                acc_grad_steps: 3,
                ..ObservationV2::EMPTY
            };
            let s = Step::builder(first + 2, 4)
                .schedule(epoch as u64, 3, 6)
                .frontier(frontier)
                .more(more)
                .build();
            frontier = p.decide(&s).unwrap().frontier;
        }
        assert_eq!(frontier, 2);
    }
}
