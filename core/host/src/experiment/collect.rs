//! Collecting a comparison: every fine-tune's row read back from whatever
//! finished, paired with the same stage's and seed's baseline, what has
//! not finished, `results.csv`, and the outputs written from them.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::error::Status;
use crate::experiment::charts::plots;
use crate::experiment::config::CompareConfig;
use crate::experiment::job::last_run_dir;
use crate::experiment::plan::{self, Job, LOCK_DIR};
use crate::experiment::points::{point_stats, write_points};
pub use crate::experiment::rows::Row;
use crate::experiment::rows::{csv_field, failed_row, opt, row_of, Phase};
use crate::experiment::slurm::{ARRAY_SCRIPT, SLURM_DIR};
use crate::experiment::stages::{stage_labels, Stages};
use crate::experiment::table::table;
use crate::run::dir::{RunDir, SUMMARY_FILE};
use crate::run::records::Summary;

/// The header of `results.csv`.
pub const RESULTS_HEADER: &str = "policy,seed,status,top1,d_acc_pp,wall_speedup,compute_speedup,\
final_frontier,train_seconds,run_dir,stage,train_compute_speedup,observe_units,probe_steps,\
weights_sha256,machine,libtorch,revision";

pub(super) fn write_results(dir: &Path, rows: &[Row]) -> Result<()> {
    let mut s = format!("{RESULTS_HEADER}\n");
    for r in rows {
        let p = r.provenance.as_ref();
        // Grid labels hold RON options, commas included.
        s.push_str(&format!(
            "{},{},{},{},{},{},{:.4},{},{:.2},{},{},{},{:.1},{},{},{},{},{}\n",
            csv_field(&r.policy),
            r.seed,
            r.status,
            opt(r.top1, 2),
            opt(r.d_acc, 2),
            opt(r.wall_speedup, 3),
            r.compute_speedup,
            r.frontier,
            r.train_seconds,
            csv_field(&r.run_dir.display().to_string()),
            r.stage.as_str(),
            if r.train_compute_speedup.is_finite() {
                format!("{:.4}", r.train_compute_speedup)
            } else {
                String::new()
            },
            r.observe_cost,
            r.probe_steps,
            p.and_then(|p| p.weights_sha256.clone()).unwrap_or_default(),
            csv_field(&p.map(|p| p.machine()).unwrap_or_default()),
            p.map(|p| p.libtorch.clone()).unwrap_or_default(),
            p.map(|p| p.revision.clone()).unwrap_or_default(),
        ));
    }
    fs::write(dir.join("results.csv"), s).context("cannot write results.csv")
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
    /// A confirmation slot that waits for the selection (no row yet).
    pub awaiting: bool,
}

/// Every fine-tune's row, in plan order, read from the runs in `exp`
/// (the last run directory of each); a fine-tune with no ended run is a
/// `missing` row and is listed as unfinished, and so is a confirmation
/// job that waits for the selection. Each row's Δ and wall speedup are
/// against the baseline of the same stage and seed.
pub fn rows(cfg: &CompareConfig, exp: &Path) -> Result<(Vec<Row>, Vec<Unfinished>)> {
    let stages = Stages::load(exp)?;
    let runs = exp.join("runs");
    let mut rows = Vec::new();
    let mut unfinished = Vec::new();
    for (index, job) in plan::jobs(cfg, &stages).into_iter().enumerate() {
        let (label, run_name, seed, family, stage) = match &job {
            Job::Finetune {
                label,
                run_name,
                seed,
                family,
                stage,
                ..
            } => (label, run_name, seed, family, *stage),
            Job::Awaiting { .. } => {
                unfinished.push(Unfinished {
                    index,
                    job: job.describe(),
                    state: "waits for the selection (collect the grid first)".into(),
                    awaiting: true,
                });
                continue;
            }
            Job::Pretrain | Job::Skip { .. } => continue,
        };
        let last = last_run_dir(&runs, &format!("{run_name}-s{seed}-"));
        let summary = last
            .as_ref()
            .and_then(|d| RunDir::existing(d).read_json::<Summary>(SUMMARY_FILE).ok());
        let mut row = match summary {
            Some(s) if s.status == Status::Completed => row_of(label, *seed, &s),
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
                    awaiting: false,
                });
                Row {
                    status: "missing".into(),
                    ..failed_row(label, *seed, last.unwrap_or_default())
                }
            }
        };
        row.family = family.clone();
        row.stage = stage;
        row.job = index;
        rows.push(row);
    }
    pair_with_baselines(&mut rows);
    Ok((rows, unfinished))
}

/// Fills each completed row's Δ top-1 and wall speedup from the completed
/// baseline of the same stage and seed (left empty without one).
fn pair_with_baselines(rows: &mut [Row]) {
    let baselines: Vec<(Phase, u64, f64, f64)> = rows
        .iter()
        .filter(|r| r.policy == "baseline" && r.status == "completed")
        .filter_map(|r| Some((r.stage, r.seed, r.top1?, r.train_seconds)))
        .collect();
    for r in rows.iter_mut().filter(|r| r.status == "completed") {
        let base = baselines
            .iter()
            .find(|b| b.0 == r.stage && b.1 == r.seed)
            .map(|b| (b.2, b.3));
        let is_baseline = r.policy == "baseline";
        (r.d_acc, r.wall_speedup) = match (is_baseline, r.top1, base) {
            (true, Some(_), _) => (Some(0.0), Some(1.0)),
            (false, Some(t), Some((b, bs))) => (Some(t - b), Some(bs / r.train_seconds)),
            _ => (None, None),
        };
    }
}

/// What `--collect` and a finished comparison write in `exp`:
/// `results.csv`, `points.csv`, `table.md` (with a note on what has not
/// finished) and the plots; prints the table. Returns the rows and what is
/// unfinished.
pub fn write_outputs(cfg: &CompareConfig, exp: &Path) -> Result<(Vec<Row>, Vec<Unfinished>)> {
    let _lock = plan::lock(
        &exp.join(LOCK_DIR).join("collect.lock"),
        "another process is collecting this experiment; waiting for it",
    )?;
    let (rows, unfinished) = rows(cfg, exp)?;
    let stages = Stages::load(exp)?;
    write_results(exp, &rows)?;
    let mut points = Vec::new();
    for stage in [Phase::Grid, Phase::Confirm] {
        if let Some(labels) = stage_labels(cfg, &stages, stage) {
            if rows.iter().any(|r| r.stage == stage) {
                points.extend(point_stats(cfg, &rows, stage, &labels));
            }
        }
    }
    write_points(exp, &points)?;
    let mut table = table(cfg, &stages, &rows);
    if !unfinished.is_empty() {
        table.push_str(&format!(
            "\nIncomplete: {} of {} fine-tunes have not finished (`missing` in results.csv); \
             `simfreeze compare --collect` lists them with the command that runs each.\n",
            unfinished.len(),
            rows.len() + unfinished.iter().filter(|u| u.awaiting).count()
        ));
    }
    fs::write(exp.join("table.md"), &table)?;
    plots(cfg, exp, &rows, &points)?;
    println!("{table}");
    eprintln!("experiment directory: {}", exp.display());
    Ok((rows, unfinished))
}

/// The unfinished and failed fine-tunes, each with the command that
/// (re)runs it; empty when every fine-tune completed.
pub fn rerun_list(exp: &Path, rows: &[Row], unfinished: &[Unfinished]) -> String {
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
    for r in rows.iter().filter(|r| r.status == "failed") {
        s.push_str(&format!(
            "  job {} ({}, seed {}): failed (kept as a failed row); to run it again, remove \
             {} and run\n    {}\n",
            r.job,
            r.policy,
            r.seed,
            r.run_dir.display(),
            plan::job_command(exp, r.job)
        ));
    }
    s
}

/// The Slurm array script of `exp`, when `--slurm` wrote one.
fn array_script(exp: &Path) -> Option<String> {
    let p = exp.join(SLURM_DIR).join(ARRAY_SCRIPT);
    let p = fs::canonicalize(p).ok()?;
    Some(p.display().to_string())
}
