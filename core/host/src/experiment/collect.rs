//! The rows of a comparison: one per fine-tune, read from its summary
//! and metrics, relative to the same seed's baseline; `results.csv`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::run::records::Summary;

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
    /// Blocks frozen at the end.
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
}

pub(super) fn failed_row(label: &str, seed: u64, dir: PathBuf) -> Row {
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
    }
}

/// A row; `baseline` is the same seed's baseline (top-1, seconds), none
/// when this row is the baseline or the baseline failed (then the
/// relative columns stay empty).
pub(super) fn row_of(
    label: &str,
    seed: u64,
    s: &Summary,
    is_baseline: bool,
    baseline: Option<(f64, f64)>,
) -> Row {
    let top1 = s.final_top1;
    let (d_acc, wall_speedup) = match (is_baseline, top1, baseline) {
        (true, Some(_), _) => (Some(0.0), Some(1.0)),
        (false, Some(t), Some((b, bs))) => (Some(t - b), Some(bs / s.train_seconds)),
        _ => (None, None),
    };
    Row {
        policy: label.into(),
        seed,
        status: "completed".into(),
        top1,
        d_acc,
        wall_speedup,
        compute_speedup: s.compute_speedup,
        frontier: s.freeze_step.iter().filter(|f| f.is_some()).count(),
        train_seconds: s.train_seconds,
        run_dir: s.run_dir.clone(),
        freeze_step: s.freeze_step.clone(),
        steps: s.steps,
        family: label.into(),
        last_epoch_gain: last_epoch_gain(&s.run_dir),
    }
}

pub(super) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |v| format!("{v:.digits$}"))
}

pub(super) fn write_results(dir: &Path, rows: &[Row]) -> Result<()> {
    let mut s = String::from(
        "policy,seed,status,top1,d_acc_pp,wall_speedup,compute_speedup,final_frontier,train_seconds,run_dir\n",
    );
    for r in rows {
        // Grid labels hold RON options, commas included.
        let policy = if r.policy.contains([',', '"']) {
            format!("\"{}\"", r.policy.replace('"', "\"\""))
        } else {
            r.policy.clone()
        };
        s.push_str(&format!(
            "{},{},{},{},{},{},{:.4},{},{:.2},{}\n",
            policy,
            r.seed,
            r.status,
            opt(r.top1, 2),
            opt(r.d_acc, 2),
            opt(r.wall_speedup, 3),
            r.compute_speedup,
            r.frontier,
            r.train_seconds,
            r.run_dir.display()
        ));
    }
    fs::write(dir.join("results.csv"), s).context("cannot write results.csv")
}

/// The top-1 gain over a run's last epoch, from its `metrics.csv`.
pub(super) fn last_epoch_gain(run_dir: &Path) -> Option<f64> {
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
