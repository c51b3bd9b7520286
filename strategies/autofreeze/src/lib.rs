//! AutoFreeze (Liu, Agarwal, Venkataraman, 2021), the extra adaptive
//! baseline: every `interval` steps (default T/10), per active block, `G` =
//! the gradient norm accumulated over the interval and
//! `r = |G_prev - G_cur| / G_prev`; freeze up to (not including) the first
//! active block whose `r` is at least the median of `r` over the active
//! blocks.
//!
//! `gradient` picks what `G` is. The reference code takes the L1 norm of
//! the gradient accumulated over the interval: `gradient: Accumulated`
//! asks the host for exactly that (`Needs::ACC_GRAD_NORMS`, at each
//! interval's last step). The default, `PerStep`, is the form simfreeze
//! shipped first, when policies could only see per-step L2 norms: the sum
//! of those over the interval (a documented deviation, kept so results and
//! compiled plugins stay comparable). Options: `interval` (steps, default
//! T/10), `max_frozen` (default L - 1), `gradient` (default `PerStep`).

use serde::{Deserialize, Serialize};
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};
use simfreeze_abi::Needs;

/// AutoFreeze's options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Steps per evaluation interval (default: total steps / 10).
    pub interval: Option<u64>,
    /// Largest frontier (default L - 1).
    pub max_frozen: Option<usize>,
    /// What the interval's gradient norm is.
    pub gradient: Gradient,
}

/// AutoFreeze's per-interval gradient norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Gradient {
    /// The sum of the per-step L2 norms over the interval.
    #[default]
    PerStep,
    /// The L1 norm of the gradient accumulated over the interval (the
    /// reference code's).
    Accumulated,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    acc: Vec<f64>,
    prev: Option<Vec<f64>>,
    done: u64,
}

/// The AutoFreeze policy.
pub struct AutoFreeze {
    o: Options,
    s: State,
}

/// The frontier AutoFreeze picks from two interval totals, given the current
/// frontier (exposed for tests).
pub fn pick(prev: &[f64], cur: &[f64], frontier: usize) -> usize {
    let active: Vec<(usize, f64)> = (frontier..cur.len())
        .filter(|&i| prev[i] > 0.0 && prev[i].is_finite() && cur[i].is_finite())
        .map(|i| (i, (prev[i] - cur[i]).abs() / prev[i]))
        .collect();
    if active.is_empty() {
        return frontier;
    }
    let mut rs: Vec<f64> = active.iter().map(|a| a.1).collect();
    rs.sort_by(f64::total_cmp);
    let median = if rs.len() % 2 == 1 {
        rs[rs.len() / 2]
    } else {
        0.5 * (rs[rs.len() / 2 - 1] + rs[rs.len() / 2])
    };
    active
        .iter()
        .find(|a| a.1 >= median)
        .map_or(frontier, |a| a.0)
}

impl Policy for AutoFreeze {
    fn needs(&self) -> Needs {
        match self.o.gradient {
            Gradient::PerStep => Needs::GRAD_NORMS,
            Gradient::Accumulated => Needs::ACC_GRAD_NORMS,
        }
    }

    fn decide(&mut self, step: &Step<'_>) -> Result<Decision, PolicyError> {
        let l = step.layers;
        let limit = self.o.max_frozen.unwrap_or(l.saturating_sub(1)).min(l);
        let interval = self.o.interval.unwrap_or(step.total_steps / 10).max(1);
        if self.s.acc.len() != l {
            self.s.acc = vec![0.0; l];
        }
        if self.o.gradient == Gradient::PerStep {
            for (acc, g) in self.s.acc.iter_mut().zip(step.grad_norms()?) {
                if g.is_finite() {
                    *acc += f64::from(*g);
                }
            }
        }
        self.s.done += 1;
        let mut frontier = step.frontier;
        if self.s.done >= interval {
            if self.o.gradient == Gradient::Accumulated {
                if !step.has(Needs::ACC_GRAD_NORMS) {
                    // Not asked for (a resumed interval's first read, or
                    // an interval of one): ask and decide at the next step.
                    return Ok(Decision::frontier(frontier).observe_next(Needs::ACC_GRAD_NORMS));
                }
                let norms = step.acc_grad_norms()?;
                for (acc, g) in self.s.acc.iter_mut().zip(norms.l1) {
                    *acc = if g.is_finite() { *g } else { 0.0 };
                }
            }
            let cur = std::mem::replace(&mut self.s.acc, vec![0.0; l]);
            if let Some(prev) = self.s.prev.as_ref().filter(|p| p.len() == l) {
                frontier = pick(prev, &cur, frontier).clamp(frontier, limit.max(frontier));
            }
            self.s.prev = Some(cur);
            self.s.done = 0;
        }
        let d = Decision::frontier(frontier);
        // The accumulated norm is read at the interval's last step, so it
        // is asked for at the step before (a read resets the host's sums:
        // never ask at any other step).
        let ask = self.o.gradient == Gradient::Accumulated && self.s.done + 1 >= interval;
        Ok(if ask {
            d.observe_next(Needs::ACC_GRAD_NORMS)
        } else {
            d
        })
    }

    simfreeze_options::serde_state!(s);
}

impl PolicyPlugin for AutoFreeze {
    fn info() -> Info {
        Info {
            name: "autofreeze",
            version: env!("CARGO_PKG_VERSION"),
            description: "AutoFreeze (Liu et al. 2021): freezes the blocks before the first one \
                          whose gradient norm still changes by at least the median rate.",
            options: &[
                OptionDoc {
                    name: "interval",
                    default: "None",
                    doc: "steps per evaluation (None: T/10)",
                },
                OptionDoc {
                    name: "max_frozen",
                    default: "None",
                    doc: "largest frontier (None: L - 1)",
                },
                OptionDoc {
                    name: "gradient",
                    default: "PerStep",
                    doc: "PerStep (sum of per-step L2 norms) or Accumulated (L1 of the summed gradient)",
                },
            ],
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if o.interval == Some(0) {
            return Err(PolicyError::options("interval must be at least 1"));
        }
        Ok(AutoFreeze {
            o,
            s: State::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezes_before_the_first_block_still_changing() {
        // r = [0.01, 0.02, 0.5, 0.6]: median 0.26, first >= median is block 2.
        let prev = [100.0, 100.0, 100.0, 100.0];
        let cur = [99.0, 98.0, 50.0, 40.0];
        assert_eq!(pick(&prev, &cur, 0), 2);
        // Never behind the current frontier.
        assert_eq!(pick(&prev, &cur, 3), 3);
        // No information: stay.
        assert_eq!(pick(&[0.0; 4], &cur, 1), 1);
    }

    #[test]
    fn acts_once_per_interval() {
        let mut p = AutoFreeze::new("(interval: 2)", &HostServices::none()).unwrap();
        let norms = [[1.0f32, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 0.2]];
        let mut frontier = 0;
        let mut seen = Vec::new();
        for i in 0..6u64 {
            let g = if i < 2 { &norms[0] } else { &norms[1] };
            let s = Step::builder(i, 4)
                .schedule(0, 10, 100)
                .frontier(frontier)
                .grad_norms(g)
                .build();
            frontier = p.decide(&s).unwrap().frontier;
            seen.push(frontier);
        }
        assert_eq!(seen, [0, 0, 0, 2, 2, 2]);
    }

    #[test]
    fn the_accumulated_form_reads_the_hosts_l1_norm_once_per_interval() {
        use simfreeze_abi::ffi::ObservationV2;
        let o = "(interval: 3, gradient: Accumulated)";
        let mut p = AutoFreeze::new(o, &HostServices::none()).unwrap();
        assert_eq!(p.needs(), Needs::ACC_GRAD_NORMS);
        // L1 norms of the two intervals: r = [0.01, 0.02, 0.5, 0.6].
        let l1 = [[100.0, 100.0, 100.0, 100.0], [99.0, 98.0, 50.0, 40.0]];
        let l2 = [1.0; 4];
        let mut frontier = 0;
        let mut asked_at = Vec::new();
        for i in 0..6u64 {
            let interval = (i / 3) as usize;
            let more = ObservationV2 {
                provided: Needs::ACC_GRAD_NORMS,
                acc_grad_l1: l1[interval].as_slice().into(),
                acc_grad_l2: l2.as_slice().into(),
                acc_grad_steps: 3,
                ..ObservationV2::EMPTY
            };
            let b = Step::builder(i, 4).schedule(0, 10, 100).frontier(frontier);
            let s = match i % 3 == 2 {
                true => b.more(more).build(),
                false => b.needs(Needs::ACC_GRAD_NORMS).build(),
            };
            let d = p.decide(&s).unwrap();
            if d.observe.contains(Needs::ACC_GRAD_NORMS) {
                asked_at.push(i);
            }
            frontier = d.frontier;
        }
        assert_eq!(
            asked_at,
            [1, 4],
            "asked only before each interval's last step"
        );
        assert_eq!(frontier, 2);
    }
}
