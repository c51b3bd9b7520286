//! `simfreeze compare`: the paper's comparison as one command.
//!
//! An experiment pretrains a model on a source task (cached under
//! `<output>/pretrain-<hash>` by a hash of everything that shapes it, so a
//! re-run skips it), then fine-tunes that same checkpoint on a disjoint
//! target task once without a policy (the baseline) and once per listed
//! policy, for every seed: the same weights, seed and data order, only the
//! policy differs. The experiment directory `<output>/<name>-NNN` gets
//! `compare.ron` (the resolved configuration), `runs/` (one ordinary run
//! directory per fine-tune), `results.csv`, `table.md` and the plots
//! (`<scalar>-<policy>` for every scalar a policy logs, e.g. ATSF's
//! `eta-<policy>`; `timeline`, `accuracy-speedup`, each `.svg` and `.png`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use simfreeze_runtime::loader::SearchPath;

use crate::config::PolicySection;
use crate::error::{RunStopped, Status, UsageError};
use crate::experiment::charts::plots;
pub use crate::experiment::collect::Row;
use crate::experiment::collect::{failed_row, row_of, write_results};
use crate::experiment::config::arms;
pub use crate::experiment::config::{cache_key, CompareConfig, Entry, Point, Stage, HEAD_ONLY};
use crate::experiment::job::{finetune, pretrain, pretraining_stopped};
use crate::experiment::table::table;
use crate::model::weights::HeadInit;
use crate::run::dir::RunDir;
use crate::run::RunControl;

/// The configuration file an experiment directory keeps.
pub const COMPARE_FILE: &str = "compare.ron";

/// Runs the whole experiment; returns the experiment directory and rows.
/// Policies (and their metrics) are loaded from `search`.
pub fn compare(
    cfg: &CompareConfig,
    search: &SearchPath,
    control: &RunControl,
) -> Result<(PathBuf, Vec<Row>)> {
    prepare(cfg, search)?;
    // Plugin paths are recorded absolute, so `--resume` works from anywhere.
    let mut cfg = cfg.clone();
    for e in &mut cfg.policies {
        e.plugin = crate::plan::absolute_plugin(&e.plugin);
    }
    let cfg = &cfg;
    let weights = pretrain(cfg, search, control).map_err(pretraining_stopped)?;
    let exp = RunDir::create(&cfg.output, &cfg.name)?;
    fs::write(
        exp.path.join(COMPARE_FILE),
        ron::ser::to_string_pretty(cfg, Default::default())?,
    )?;
    finish(cfg, &exp.path, weights, search, control)
}

/// Continues the experiment in `dir` with the configuration it started
/// with: finished fine-tunes are kept, an interrupted one is resumed from
/// its checkpoint, the rest run; then the table, results and plots are
/// written as an uninterrupted run would have written them.
pub fn resume(
    dir: &Path,
    search: &SearchPath,
    control: &RunControl,
) -> Result<(PathBuf, Vec<Row>)> {
    let file = dir.join(COMPARE_FILE);
    if !file.is_file() {
        return Err(UsageError(format!(
            "{} has no {COMPARE_FILE}: not an experiment directory of `simfreeze compare`",
            dir.display()
        ))
        .into());
    }
    let mut cfg = CompareConfig::load(&file)?;
    // The pretraining cache sits beside the experiment, wherever this runs.
    if let Some(parent) = dir.parent() {
        cfg.output = parent.to_owned();
    }
    prepare(&cfg, search)?;
    let weights = pretrain(&cfg, search, control).map_err(pretraining_stopped)?;
    eprintln!("resuming the comparison in {}", dir.display());
    finish(&cfg, dir, weights, search, control)
}

/// Checks the configuration, and finds and constructs every plugin once
/// before anything trains, so a typo in a policy or its options fails now,
/// not after the baseline.
pub(super) fn prepare(cfg: &CompareConfig, search: &SearchPath) -> Result<()> {
    cfg.validate()?;
    for p in cfg.points() {
        search.load(&p.plugin)?.new_policy(&p.options)?;
    }
    Ok(())
}

/// Every fine-tune of the experiment in `exp` (finished ones kept,
/// checkpointed ones resumed), then the outputs.
pub(super) fn finish(
    cfg: &CompareConfig,
    exp: &Path,
    weights: Option<PathBuf>,
    search: &SearchPath,
    control: &RunControl,
) -> Result<(PathBuf, Vec<Row>)> {
    let runs_dir = exp.join("runs");
    let arms = arms(cfg);
    let total = arms.len() * cfg.seeds.len();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &seed in &cfg.seeds {
        let mut baseline: Option<(f64, f64)> = None;
        for arm in &arms {
            let (label, family) = (arm.label.clone(), arm.family.clone());
            eprintln!(
                "[{}/{total}] fine-tuning: {label}, seed {seed}",
                rows.len() + 1
            );
            let name = format!("{}-s{seed}", arm.run_name);
            let mut run_cfg = cfg.stage_config(&cfg.finetune, name, runs_dir.clone());
            run_cfg.train.seed = seed;
            if cfg.pretrain.is_some() || weights.is_some() {
                run_cfg.model.weights = weights.clone();
                if cfg.pretrain.is_some() {
                    run_cfg.model.head = HeadInit::New;
                }
            }
            if label == HEAD_ONLY {
                run_cfg.train.frozen_from_start = u32::MAX;
            }
            run_cfg.policy = (!arm.plugin.is_empty()).then(|| PolicySection {
                plugin: arm.plugin.clone(),
                options: arm.options.clone(),
            });
            let is_baseline = label == "baseline";
            let summary = match finetune(run_cfg, search, control) {
                Ok(s) if s.status == Status::Completed => s,
                Ok(s) => {
                    let reason = s.reason.clone().unwrap_or_default();
                    eprintln!("  {label} seed {seed} failed: {reason}");
                    failures.push(format!("{label} seed {seed}: {reason}"));
                    rows.push(failed_row(&label, seed, s.run_dir.clone()));
                    continue;
                }
                Err(e) => match e.downcast::<RunStopped>() {
                    Ok(s) => {
                        return Err(RunStopped {
                            resume: format!(
                                "\nresume the comparison with: {} compare --resume {}",
                                crate::error::command_name(),
                                exp.display()
                            ),
                            ..s
                        }
                        .into())
                    }
                    Err(e) => return Err(e),
                },
            };
            let mut row = row_of(&label, seed, &summary, is_baseline, baseline);
            row.family = family;
            if is_baseline {
                baseline = Some((row.top1.unwrap_or(f64::NAN), row.train_seconds));
            }
            eprintln!(
                "  top-1 {:.2}%, compute speedup {:.2}x, {:.0}s",
                row.top1.unwrap_or(f64::NAN),
                row.compute_speedup,
                row.train_seconds
            );
            rows.push(row);
        }
    }
    write_results(exp, &rows)?;
    let table = table(cfg, &rows);
    fs::write(exp.join("table.md"), &table)?;
    plots(cfg, exp, &rows)?;
    println!("{table}");
    eprintln!("experiment directory: {}", exp.display());
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {total} fine-tuning runs failed (kept in the table as failed):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok((exp.to_owned(), rows))
}
