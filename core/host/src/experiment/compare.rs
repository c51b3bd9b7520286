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
//!
//! The comparison is a plan of independent jobs ([`plan`](super::plan)):
//! this module runs them in one process, one after another (or `parallel`
//! at a time as child processes running `--job`), then collects them
//! ([`collect`](super::collect)), exactly as `--plan`, `--job` and
//! `--collect` do across machines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};

use simfreeze_runtime::loader::SearchPath;

use crate::error::{RunStopped, Status};
use crate::experiment::collect::{self, write_outputs};
pub use crate::experiment::config::{cache_key, CompareConfig, Entry, Point, Stage, HEAD_ONLY};
use crate::experiment::job::{finetune, finetune_config, pretrain, pretraining_stopped};
pub use crate::experiment::plan::COMPARE_FILE;
use crate::experiment::plan::{self, lock, Job, LOCK_DIR};
pub use crate::experiment::rows::Row;
use crate::experiment::stages::{advance, Advanced, Stages};
use crate::run::RunControl;

/// How the fine-tunes run: in this process one after another
/// (`parallel` 0), or `parallel` at a time as child processes of
/// `simfreeze compare --job`, the configured threads split between them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schedule {
    /// Jobs at a time (0: in this process).
    pub parallel: usize,
}

/// Runs the whole experiment; returns the experiment directory and rows.
/// Policies (and their metrics) are loaded from `search`.
pub fn compare(
    cfg: &CompareConfig,
    search: &SearchPath,
    control: &RunControl,
    schedule: Schedule,
) -> Result<(PathBuf, Vec<Row>)> {
    prepare(cfg, search)?;
    let weights = pretrain(cfg, search, control).map_err(pretraining_stopped)?;
    let exp = plan::create(cfg)?;
    let cfg = plan::load(&exp)?;
    finish(&cfg, &exp, weights, search, control, schedule)
}

/// Continues the experiment in `dir` with the configuration it started
/// with: finished fine-tunes are kept, an interrupted one is resumed from
/// its checkpoint, the rest run; then the table, results and plots are
/// written as an uninterrupted run would have written them.
pub fn resume(
    dir: &Path,
    search: &SearchPath,
    control: &RunControl,
    schedule: Schedule,
) -> Result<(PathBuf, Vec<Row>)> {
    let cfg = plan::load(dir)?;
    prepare(&cfg, search)?;
    let weights = pretrain(&cfg, search, control).map_err(pretraining_stopped)?;
    eprintln!("resuming the comparison in {}", dir.display());
    finish(&cfg, dir, weights, search, control, schedule)
}

/// Creates the experiment directory and its job list without running
/// anything (`--plan`); returns the directory.
pub fn plan_only(cfg: &CompareConfig, search: &SearchPath) -> Result<PathBuf> {
    prepare(cfg, search)?;
    let exp = plan::create(cfg)?;
    println!(
        "{}",
        plan::instructions(&exp, &plan::jobs(&plan::load(&exp)?, &Stages::default()))
    );
    Ok(exp)
}

/// What `plan_only` does, without printing the instructions.
pub fn plan_only_quiet(cfg: &CompareConfig, search: &SearchPath) -> Result<PathBuf> {
    prepare(cfg, search)?;
    plan::create(cfg)
}

/// Checks the configuration, and finds and constructs every plugin once
/// before anything trains, so a typo in a policy or its options fails now,
/// not after the baseline.
pub(super) fn prepare(cfg: &CompareConfig, search: &SearchPath) -> Result<()> {
    cfg.validate()?;
    if let Some(b) = &cfg.backbone {
        b.verify()?;
    }
    for p in cfg.points() {
        search.load(&p.plugin)?.new_policy(&p.options)?;
    }
    Ok(())
}

/// Every fine-tune of the experiment in `exp` (finished ones kept,
/// checkpointed ones resumed), stage after stage: the grid, then with
/// `confirm_seeds` the selection and the confirmation, then with
/// `precision_pp` one round of seeds after another; then the outputs.
fn finish(
    cfg: &CompareConfig,
    exp: &Path,
    weights: Option<PathBuf>,
    search: &SearchPath,
    control: &RunControl,
    schedule: Schedule,
) -> Result<(PathBuf, Vec<Row>)> {
    loop {
        let jobs = plan::jobs(cfg, &Stages::load(exp)?);
        plan::write_jobs(exp, &jobs)?;
        let (done, _) = collect::rows(cfg, exp)?;
        let ended = |i: usize| {
            done.iter()
                .any(|r| r.job == i && (r.status == "completed" || r.status == "failed"))
        };
        let finetunes = jobs
            .iter()
            .filter(|j| matches!(j, Job::Finetune { .. }))
            .count();
        let pending: Vec<(usize, Job)> = jobs
            .into_iter()
            .enumerate()
            .filter(|(i, j)| matches!(j, Job::Finetune { .. }) && !ended(*i))
            .collect();
        if pending.len() < finetunes {
            eprintln!(
                "kept: {} of {finetunes} fine-tunes that already ended",
                finetunes - pending.len()
            );
        }
        match schedule.parallel {
            0 => in_process(cfg, exp, &pending, weights.clone(), search, control)?,
            n => children(cfg, exp, &pending, n, control)?,
        };
        let (rows, unfinished) = collect::rows(cfg, exp)?;
        let complete = unfinished.is_empty();
        match advance(cfg, exp, &rows, complete)? {
            Advanced::Nothing => break,
            Advanced::Selected(s) => {
                eprintln!(
                    "selection (on seeds {:?}): {}; confirming on seeds {:?}",
                    cfg.seeds,
                    s.points().join(", "),
                    cfg.confirm_seeds.as_deref().unwrap_or_default()
                );
            }
            Advanced::Round(r) => eprintln!(
                "precision: the interval of {} is wider than ±{} pp; adding seed {}",
                r.labels[1..].join(", "),
                cfg.precision_pp.unwrap_or_default(),
                r.seed
            ),
        }
    }
    plan::write_jobs(exp, &plan::jobs(cfg, &Stages::load(exp)?))?;
    let (rows, _) = write_outputs(cfg, exp)?;
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| r.status != "completed")
        .map(|r| format!("{} seed {}: {}", r.policy, r.seed, r.status))
        .collect();
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} fine-tuning runs failed (kept in the table as failed):\n{}",
            failures.len(),
            rows.len(),
            failures.join("\n")
        );
    }
    Ok((exp.to_owned(), rows))
}

/// The fine-tunes one after another in this process; returns the failed
/// ones (`<label> seed <seed>: <reason>`).
fn in_process(
    cfg: &CompareConfig,
    exp: &Path,
    finetunes: &[(usize, Job)],
    weights: Option<PathBuf>,
    search: &SearchPath,
    control: &RunControl,
) -> Result<Vec<String>> {
    let runs_dir = exp.join("runs");
    let total = finetunes.len();
    let mut failures = Vec::new();
    for (k, (index, job)) in finetunes.iter().enumerate() {
        let (Some(point), Job::Finetune { seed, label, .. }) = (job.point(), job) else {
            continue;
        };
        eprintln!("[{}/{total}] fine-tuning: {label}, seed {seed}", k + 1);
        let _lock = lock(
            &exp.join(LOCK_DIR).join(format!("job-{index}.lock")),
            &format!("job {index} is running in another process; waiting for it"),
        )?;
        let run_cfg = finetune_config(cfg, &point, *seed, &runs_dir, weights.clone());
        let summary = match finetune(run_cfg, search, control) {
            Ok(s) if s.status == Status::Completed => s,
            Ok(s) => {
                let reason = s.reason.clone().unwrap_or_default();
                eprintln!("  {label} seed {seed} failed: {reason}");
                failures.push(format!("{label} seed {seed}: {reason}"));
                continue;
            }
            Err(e) => return Err(resumable(e, exp)),
        };
        eprintln!(
            "  top-1 {:.2}%, compute speedup {:.2}x, {:.0}s",
            summary.final_top1.unwrap_or(f64::NAN),
            summary.compute_speedup,
            summary.train_seconds
        );
    }
    Ok(failures)
}

/// An interrupted comparison is resumed with `--resume`.
fn resumable(e: anyhow::Error, exp: &Path) -> anyhow::Error {
    match e.downcast::<RunStopped>() {
        Ok(s) => RunStopped {
            resume: format!(
                "\nresume the comparison with: {} compare --resume {}",
                crate::error::command_name(),
                exp.display()
            ),
            ..s
        }
        .into(),
        Err(e) => e,
    }
}

/// The fine-tunes `n` at a time, each a child process running
/// `compare --job` with its share of the threads, its output in
/// `<exp>/logs/job-<index>.log`. On an interrupt no new job starts, the
/// running ones are asked to checkpoint and stop, and the comparison stops
/// resumable.
fn children(
    cfg: &CompareConfig,
    exp: &Path,
    finetunes: &[(usize, Job)],
    n: usize,
    control: &RunControl,
) -> Result<Vec<String>> {
    let configured = usize::try_from(cfg.finetune.train.threads).unwrap_or(0);
    let total_threads = match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    };
    let threads = (total_threads / n).max(1);
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let logs = exp.join("logs");
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "{} fine-tunes, {n} at a time, {threads} thread(s) each (logs in {})",
        finetunes.len(),
        logs.display()
    );
    let total = finetunes.len();
    let mut pending = finetunes.iter();
    let mut running: Vec<(Child, usize, String)> = Vec::new();
    let mut failures = Vec::new();
    let mut ended = 0;
    let mut stopping = false;
    loop {
        let interrupted = control
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        if interrupted && !stopping {
            stopping = true;
            eprintln!("interrupted: asking the running jobs to checkpoint and stop");
            for (child, ..) in &running {
                let pid = i32::try_from(child.id()).unwrap_or(0);
                // SAFETY: a signal to a child this process started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        while !stopping && running.len() < n {
            let Some((index, job)) = pending.next() else {
                break;
            };
            let log = std::fs::File::create(logs.join(format!("job-{index}.log")))?;
            let child = {
                use std::os::unix::process::CommandExt;
                Command::new(&exe)
                    .args(["compare", "--job"])
                    .arg(exp)
                    .arg(index.to_string())
                    .args(["--threads", &threads.to_string()])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    // Its own process group: a terminal's Ctrl-C reaches
                    // this process only, which forwards one SIGTERM.
                    .process_group(0)
                    .spawn()
                    .with_context(|| format!("cannot start {}", exe.display()))?
            };
            eprintln!("[started] job {index}: {}", job.describe());
            running.push((child, *index, job.describe()));
        }
        if running.is_empty() {
            break;
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].0.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (_, index, what) = running.swap_remove(i);
                    ended += 1;
                    if status.success() {
                        eprintln!("[{ended}/{total}] done: job {index}, {what}");
                    } else {
                        let log = logs.join(format!("job-{index}.log"));
                        eprintln!(
                            "[{ended}/{total}] job {index}, {what}: exit {} (log: {})",
                            status.code().unwrap_or(-1),
                            log.display()
                        );
                        failures.push(format!("{what}: see {}", log.display()));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if stopping {
        return Err(RunStopped {
            status: Status::Interrupted,
            reason: "interrupted".into(),
            dir: exp.to_owned(),
            resume: format!(
                "\nresume the comparison with: {} compare --resume {} --parallel {n}",
                crate::error::command_name(),
                exp.display()
            ),
            exit_code: 130,
        }
        .into());
    }
    Ok(failures)
}
