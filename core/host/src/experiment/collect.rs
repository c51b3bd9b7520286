//! The rows of a comparison: one per fine-tune, read from its summary
//! and metrics, relative to the same seed's baseline; `results.csv`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::error::Status;
use crate::experiment::charts::plots;
use crate::experiment::config::CompareConfig;
use crate::experiment::job::last_run_dir;
use crate::experiment::plan::{self, Job, LOCK_DIR};
use crate::experiment::slurm::{ARRAY_SCRIPT, SLURM_DIR};
use crate::experiment::table::table;
use crate::run::dir::{RunDir, SUMMARY_FILE};
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

/// A completed row (the tests of the table and the fronts).
#[cfg(test)]
pub(super) fn done_row(label: &str, seed: u64, top1: f64, speed: f64) -> Row {
    Row {
        top1: Some(top1),
        d_acc: Some(0.0),
        compute_speedup: speed,
        status: "completed".into(),
        ..failed_row(label, seed, PathBuf::new())
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

/// A fine-tune of the plan with no result yet.
#[derive(Debug, Clone)]
pub struct Unfinished {
    /// Its index in the plan.
    pub index: usize,
    /// `label, seed N`.
    pub job: String,
    /// Not started, running, interrupted (resumable), or killed.
    pub state: String,
}

/// Every fine-tune's row, in plan order, read from the runs in `exp`
/// (the last run directory of each); a fine-tune with no ended run is a
/// `missing` row and is listed as unfinished.
pub fn rows(cfg: &CompareConfig, exp: &Path) -> (Vec<Row>, Vec<Unfinished>) {
    let runs = exp.join("runs");
    let mut rows = Vec::new();
    let mut unfinished = Vec::new();
    let mut baseline: Option<(u64, f64, f64)> = None;
    for (index, job) in plan::jobs(cfg).into_iter().enumerate() {
        let Job::Finetune {
            label,
            run_name,
            seed,
            family,
            ..
        } = &job
        else {
            continue;
        };
        let last = last_run_dir(&runs, &format!("{run_name}-s{seed}-"));
        let summary = last
            .as_ref()
            .and_then(|d| RunDir::existing(d).read_json::<Summary>(SUMMARY_FILE).ok());
        let is_baseline = label == "baseline";
        if is_baseline {
            baseline = None;
        }
        let mut row = match summary {
            Some(s) if s.status == Status::Completed => {
                let base = baseline.filter(|b| b.0 == *seed).map(|b| (b.1, b.2));
                row_of(label, *seed, &s, is_baseline, base)
            }
            Some(s) if s.status == Status::Failed => failed_row(label, *seed, s.run_dir),
            other => {
                let locked = plan::is_locked(&exp.join(LOCK_DIR).join(format!("job-{index}.lock")));
                let state = match (&last, other, locked) {
                    (_, _, true) => "running".to_string(),
                    (None, _, _) => "not started".to_string(),
                    (Some(_), Some(_), _) => "interrupted (resumes from its checkpoint)".into(),
                    (Some(d), None, _) => format!("stopped without a summary ({})", d.display()),
                };
                unfinished.push(Unfinished {
                    index,
                    job: job.describe(),
                    state,
                });
                Row {
                    status: "missing".into(),
                    ..failed_row(label, *seed, last.unwrap_or_default())
                }
            }
        };
        row.family = family.clone();
        if is_baseline && row.status == "completed" {
            baseline = Some((*seed, row.top1.unwrap_or(f64::NAN), row.train_seconds));
        }
        rows.push(row);
    }
    (rows, unfinished)
}

/// What `--collect` and a finished comparison write in `exp`:
/// `results.csv`, `table.md` (with a note on what has not finished) and
/// the plots; prints the table. Returns the rows and what is unfinished.
pub fn write_outputs(cfg: &CompareConfig, exp: &Path) -> Result<(Vec<Row>, Vec<Unfinished>)> {
    let _lock = plan::lock(
        &exp.join(LOCK_DIR).join("collect.lock"),
        "another process is collecting this experiment; waiting for it",
    )?;
    let (rows, unfinished) = rows(cfg, exp);
    write_results(exp, &rows)?;
    let mut table = table(cfg, &rows);
    if !unfinished.is_empty() {
        table.push_str(&format!(
            "\nIncomplete: {} of {} fine-tunes have not finished (`missing` in results.csv); \
             `simfreeze compare --collect` lists them with the command that runs each.\n",
            unfinished.len(),
            rows.len()
        ));
    }
    fs::write(exp.join("table.md"), &table)?;
    plots(cfg, exp, &rows)?;
    println!("{table}");
    eprintln!("experiment directory: {}", exp.display());
    Ok((rows, unfinished))
}

/// The unfinished and failed fine-tunes, each with the command that
/// (re)runs it; empty when every fine-tune completed.
pub fn rerun_list(
    cfg: &CompareConfig,
    exp: &Path,
    rows: &[Row],
    unfinished: &[Unfinished],
) -> String {
    let mut s = String::new();
    for u in unfinished {
        s.push_str(&format!(
            "  job {} ({}): {}\n    {}\n",
            u.index,
            u.job,
            u.state,
            plan::job_command(exp, u.index)
        ));
        if let Some(sbatch) = array_script(exp) {
            s.push_str(&format!("    or: sbatch --array={} {sbatch}\n", u.index));
        }
    }
    let offset = usize::from(cfg.pretrain.is_some());
    for (i, r) in rows.iter().enumerate() {
        if r.status == "failed" {
            s.push_str(&format!(
                "  job {} ({}, seed {}): failed (kept as a failed row); to run it again, remove \
                 {} and run\n    {}\n",
                i + offset,
                r.policy,
                r.seed,
                r.run_dir.display(),
                plan::job_command(exp, i + offset)
            ));
        }
    }
    s
}

/// The Slurm array script of `exp`, when `--slurm` wrote one.
fn array_script(exp: &Path) -> Option<String> {
    let p = exp.join(SLURM_DIR).join(ARRAY_SCRIPT);
    let p = fs::canonicalize(p).ok()?;
    Some(p.display().to_string())
}
