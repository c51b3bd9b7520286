//! The rows of a comparison: one per fine-tune, read from its summary and
//! metrics (`Row`), the stage each belongs to, and the small formatting
//! helpers `results.csv` and `points.csv` share. Everything that reads or
//! reports rows imports them from here.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::experiment::config::CompareConfig;
use crate::run::records::{Provenance, Summary};

/// Which stage of the comparison a run belongs to: the grid or the
/// confirmation (written `stage` in `results.csv` and `points.csv`; not a
/// training stage, which is `config::Stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Every point on `seeds` (and its precision rounds when there is no
    /// confirmation).
    #[default]
    Grid,
    /// The selected points, the baseline and head-only on `confirm_seeds`
    /// (and their precision rounds).
    Confirm,
}

impl Phase {
    /// `grid` or `confirm`, as in `results.csv` and `points.csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Grid => "grid",
            Phase::Confirm => "confirm",
        }
    }

    /// The stage the headline table reports.
    pub fn headline(cfg: &CompareConfig) -> Phase {
        match cfg.confirm_seeds {
            Some(_) => Phase::Confirm,
            None => Phase::Grid,
        }
    }
}

/// One fine-tuning run's result (a row of `results.csv`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Policy label (`baseline` for none).
    pub policy: String,
    /// Fine-tuning seed.
    pub seed: u64,
    /// `completed` or `failed`.
    pub status: String,
    /// Final top-1 (%).
    pub top1: Option<f64>,
    /// Top-1 minus the same seed's baseline, percentage points.
    pub d_acc: Option<f64>,
    /// Baseline training seconds over this run's (evaluation excluded).
    pub wall_speedup: Option<f64>,
    /// Compute-model speedup.
    pub compute_speedup: f64,
    /// Blocks that ran frozen by the end ([`ran_frozen`]).
    pub frontier: usize,
    /// Training seconds.
    pub train_seconds: f64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Per block: first frozen step.
    #[serde(skip)]
    pub freeze_step: Vec<Option<u64>>,
    /// Steps run.
    #[serde(skip)]
    pub steps: u64,
    /// The front this row belongs to (its entry's label).
    #[serde(skip)]
    pub family: String,
    /// Top-1 gain (pp) over the run's last epoch (none with one epoch).
    #[serde(skip)]
    pub last_epoch_gain: Option<f64>,
    /// The stage the run belongs to.
    #[serde(skip)]
    pub stage: Phase,
    /// Compute-model speedup of training alone (observation not charged).
    #[serde(skip)]
    pub train_compute_speedup: f64,
    /// Compute-model units spent observing for the policy.
    #[serde(skip)]
    pub observe_cost: f64,
    /// Steps that ran with a probe (a block frozen for one step to test it).
    #[serde(skip)]
    pub probe_steps: u64,
    /// The main thread's seconds per step outside the training step.
    #[serde(skip)]
    pub host_seconds_per_step: Option<f64>,
    /// Whether the run served frozen prefixes from the activation cache.
    #[serde(skip)]
    pub cached: bool,
    /// The run's provenance.
    #[serde(skip)]
    pub provenance: Option<Provenance>,
    /// Its job's index in the plan.
    #[serde(skip)]
    pub job: usize,
}

pub fn failed_row(label: &str, seed: u64, dir: PathBuf) -> Row {
    Row {
        policy: label.into(),
        seed,
        status: "failed".into(),
        top1: None,
        d_acc: None,
        wall_speedup: None,
        compute_speedup: f64::NAN,
        frontier: 0,
        train_seconds: f64::NAN,
        run_dir: dir,
        freeze_step: Vec::new(),
        steps: 0,
        family: label.into(),
        last_epoch_gain: None,
        stage: Phase::Grid,
        train_compute_speedup: f64::NAN,
        observe_cost: 0.0,
        probe_steps: 0,
        host_seconds_per_step: None,
        cached: false,
        provenance: None,
        job: 0,
    }
}

/// A completed row (the tests of the table and the fronts).
#[cfg(test)]
pub fn done_row(label: &str, seed: u64, top1: f64, speed: f64) -> Row {
    Row {
        top1: Some(top1),
        d_acc: Some(0.0),
        compute_speedup: speed,
        train_compute_speedup: speed,
        status: "completed".into(),
        ..failed_row(label, seed, PathBuf::new())
    }
}

/// Blocks that ran frozen in a run of `steps` steps: a freeze takes effect
/// from the step after its decision (`freeze_step`), so one decided after
/// the last step (`freeze_step == steps`) never ran and is not counted, as
/// the run's own log does not count it.
pub fn ran_frozen(freeze_step: &[Option<u64>], steps: u64) -> usize {
    freeze_step
        .iter()
        .filter(|f| f.is_some_and(|f| f < steps))
        .count()
}

/// The completed row of `label` and `seed` from its summary (its Δ and
/// wall speedup are filled in by pairing it with its baseline).
pub fn row_of(label: &str, seed: u64, s: &Summary) -> Row {
    let top1 = s.final_top1;
    Row {
        policy: label.into(),
        seed,
        status: "completed".into(),
        top1,
        d_acc: None,
        wall_speedup: None,
        compute_speedup: s.compute_speedup,
        frontier: ran_frozen(&s.freeze_step, s.steps),
        train_seconds: s.train_seconds,
        run_dir: s.run_dir.clone(),
        freeze_step: s.freeze_step.clone(),
        steps: s.steps,
        family: label.into(),
        last_epoch_gain: last_epoch_gain(&s.run_dir),
        stage: Phase::Grid,
        train_compute_speedup: s.train_compute_speedup.unwrap_or(s.compute_speedup),
        observe_cost: s.observe_cost,
        probe_steps: s.probe_steps,
        host_seconds_per_step: s.host_seconds_per_step,
        cached: cache_on(&s.run_dir),
        provenance: s.provenance.clone(),
        job: 0,
    }
}

/// Whether the run in `run_dir` used the activation cache
/// (`train.cache_frozen` in its `config.ron`).
fn cache_on(run_dir: &Path) -> bool {
    let file = run_dir.join(crate::run::dir::CONFIG_FILE);
    fs::read_to_string(file)
        .ok()
        .and_then(|t| crate::config::parse_ron::<crate::config::RunConfig>(&t, "config").ok())
        .is_some_and(|c| c.train.cache_frozen)
}

/// A CSV field: quoted when it holds a comma or a quote.
pub fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

pub fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |v| format!("{v:.digits$}"))
}

/// The top-1 gain over a run's last epoch, from its `metrics.csv`.
pub fn last_epoch_gain(run_dir: &Path) -> Option<f64> {
    let text = fs::read_to_string(run_dir.join(crate::run::dir::METRICS_FILE)).ok()?;
    let top1: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(3)?.parse().ok())
        .collect();
    match top1.as_slice() {
        [.., a, b] => Some(b - a),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_decided_after_the_last_step_is_not_counted() {
        // 300 steps: block 0 ran frozen from step 120; block 1's freeze was
        // decided after step 299 and never ran.
        assert_eq!(ran_frozen(&[Some(120), Some(300), None], 300), 1);
        assert_eq!(ran_frozen(&[Some(0), Some(299)], 300), 2);
        assert_eq!(ran_frozen(&[None, None], 300), 0);
    }
}
