//! One job of a comparison: the pretraining (cached by its key, adopted
//! or resumed when a run of it is left in the cache) or one fine-tune
//! (kept when it ended, resumed from its checkpoint, else started).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use simfreeze_runtime::loader::SearchPath;

use crate::config::PolicySection;
use crate::config::RunConfig;
use crate::engine::single::MODEL_INFO_FILE;
use crate::error::{RunStopped, Status, UsageError};
use crate::experiment::config::{cache_key, CompareConfig, Point, HEAD_ONLY};
use crate::experiment::plan::{self, is_locked, lock, Job, LOCK_DIR};
use crate::experiment::stages::Stages;
use crate::model::weights::HeadInit;
use crate::plan::Plan;
use crate::run::dir::{RunDir, MODEL_FILE, SUMMARY_FILE};
use crate::run::records::Summary;
use crate::run::{self, checkpoint, RunControl};

/// Runs (or reuses) the pretraining stage; returns the weights file.
pub(super) fn pretrain(
    cfg: &CompareConfig,
    search: &SearchPath,
    control: &RunControl,
) -> Result<Option<PathBuf>> {
    if let Some(b) = &cfg.backbone {
        let path = b.verify()?;
        eprintln!(
            "pretraining: the shipped backbone {} (sha256 verified)",
            path.display()
        );
        return Ok(Some(path));
    }
    let Some(mut run_cfg) = cfg.pretrain_config() else {
        return Ok(cfg.model.weights.clone());
    };
    let key = cache_key(&run_cfg);
    let cache = cfg.output.join(format!("pretrain-{key}"));
    let weights = cache.join(MODEL_FILE);
    if weights.is_file() {
        eprintln!("pretraining: cached, {}", weights.display());
        return Ok(Some(weights));
    }
    // One process pretrains; any other (a concurrent job or comparison
    // with the same pretraining) waits for it and takes the cache.
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let _lock = lock(
        &cache.join(LOCK_FILE),
        "pretraining: another process is running it; waiting for it to finish",
    )?;
    if weights.is_file() {
        eprintln!("pretraining: cached, {}", weights.display());
        return Ok(Some(weights));
    }
    run_cfg.name = "pretrain".into();
    run_cfg.output = cache.clone();
    // A pretraining run left in the cache (interrupted, or resumed by hand
    // with `simfreeze run --resume`) is continued or adopted, not redone.
    let last = last_run_dir(&cache, "pretrain-");
    let run_dir = match last {
        Some(dir) if dir.join(MODEL_FILE).is_file() => {
            eprintln!("pretraining: adopting the finished run {}", dir.display());
            dir
        }
        Some(dir) if checkpoint::load_meta(&dir)?.is_some() => {
            eprintln!("pretraining: resuming {}", dir.display());
            done(run::resume(&dir, search, None, control)?)
        }
        _ => {
            eprintln!("pretraining (cached afterwards as {})", cache.display());
            done(run::run(Plan::resolve(run_cfg.clone(), search)?, control)?)
        }
    };
    fs::write(
        cache.join("pretrain.ron"),
        ron::ser::to_string_pretty(&run_cfg, Default::default())?,
    )?;
    // The model's shape (LayerNorm epsilon included) travels beside it.
    let sidecar = run_dir.join(MODEL_INFO_FILE);
    if sidecar.is_file() {
        fs::copy(&sidecar, cache.join(MODEL_INFO_FILE))
            .with_context(|| format!("cannot copy {}", sidecar.display()))?;
    }
    let from = run_dir.join(MODEL_FILE);
    let tmp = cache.join("model.tmp");
    fs::copy(&from, &tmp).with_context(|| format!("cannot copy {}", from.display()))?;
    fs::rename(&tmp, &weights).with_context(|| format!("cannot write {}", weights.display()))?;
    Ok(Some(weights))
}

pub(super) fn done(summary: Summary) -> PathBuf {
    eprintln!(
        "pretraining done: top-1 {:.2}% on the source task, {:.0}s",
        summary.final_top1.unwrap_or(f64::NAN),
        summary.train_seconds
    );
    summary.run_dir
}

/// The last `<prefix>NNN` directory in `dir`, if any.
pub(super) fn last_run_dir(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut runs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    runs.sort();
    runs.pop()
}

/// An interrupted pretraining is continued by running the comparison again.
pub(super) fn pretraining_stopped(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<RunStopped>() {
        Ok(s) if s.status == Status::Interrupted => RunStopped {
            resume: "\nrun the same `compare` command again: it resumes the pretraining from \
                     its checkpoint"
                .into(),
            ..s
        }
        .into(),
        Ok(s) => s.into(),
        Err(e) => e,
    }
}

/// One fine-tune of the experiment: the summary of a run of it that already
/// ended (kept as it is), the resumed run when one has a checkpoint, else a
/// new run.
pub(super) fn finetune(
    run_cfg: RunConfig,
    search: &SearchPath,
    control: &RunControl,
) -> Result<Summary> {
    let prefix = format!("{}-", run_cfg.name);
    let mut resumable = None;
    if let Some(dir) = last_run_dir(&run_cfg.output, &prefix) {
        let previous = RunDir::existing(&dir);
        if let Ok(summary) = previous.read_json::<Summary>(SUMMARY_FILE) {
            if summary.status != Status::Interrupted {
                eprintln!("  kept: {} ({:?})", dir.display(), summary.status);
                return Ok(summary);
            }
        }
        if checkpoint::load_meta(&dir)?.is_some() {
            resumable = Some(dir);
        }
    }
    let started = match resumable {
        Some(dir) => {
            eprintln!("  resuming {}", dir.display());
            run::resume(&dir, search, None, control)
        }
        None => run::run(Plan::resolve(run_cfg, search)?, control),
    };
    // A run that failed wrote its summary: the comparison keeps it as a
    // failed row, as it keeps one found on resume.
    match started {
        Err(e) => match e.downcast::<RunStopped>() {
            Ok(s) if s.status == Status::Failed => RunDir::existing(&s.dir).read_json(SUMMARY_FILE),
            Ok(s) => Err(s.into()),
            Err(e) => Err(e),
        },
        ok => ok,
    }
}

/// The lock file a pretraining cache directory holds while one process
/// pretrains into it.
pub const LOCK_FILE: &str = "pretrain.lock";

/// The weights a fine-tune of `cfg` starts from, for a job that does not
/// pretrain itself: the shipped backbone (its sha256 checked), the cached
/// pretraining (waited for while another
/// process runs it; an error naming the job to run when it has not run),
/// else `model.weights`.
pub fn pretrained_weights(cfg: &CompareConfig, exp: &Path) -> Result<Option<PathBuf>> {
    if let Some(b) = &cfg.backbone {
        return Ok(Some(b.verify()?));
    }
    let Some(run_cfg) = cfg.pretrain_config() else {
        return Ok(cfg.model.weights.clone());
    };
    let cache = cfg.output.join(format!("pretrain-{}", cache_key(&run_cfg)));
    let weights = cache.join(MODEL_FILE);
    if !weights.is_file() && is_locked(&cache.join(LOCK_FILE)) {
        // Held by the process pretraining now: wait for it.
        drop(lock(
            &cache.join(LOCK_FILE),
            "waiting for the pretraining (job 0), which another process is running",
        )?);
    }
    if !weights.is_file() {
        return Err(UsageError(format!(
            "the pretraining (job 0) has not finished, and the fine-tunes start from its \
             weights ({}); run it first:\n  {}",
            weights.display(),
            plan::job_command(exp, 0)
        ))
        .into());
    }
    Ok(Some(weights))
}

/// The run configuration of fine-tune `point` with `seed`, in `runs_dir`,
/// from `weights`.
pub fn finetune_config(
    cfg: &CompareConfig,
    point: &Point,
    seed: u64,
    runs_dir: &Path,
    weights: Option<PathBuf>,
) -> RunConfig {
    let name = format!("{}-s{seed}", point.run_name);
    let mut run_cfg = cfg.stage_config(&cfg.finetune, name, runs_dir.to_owned());
    run_cfg.train.seed = seed;
    if cfg.pretrain.is_some() || weights.is_some() {
        run_cfg.model.weights = weights;
        if cfg.pretrain.is_some() || cfg.backbone.is_some() {
            run_cfg.model.head = HeadInit::New;
        }
    }
    if point.label == HEAD_ONLY {
        run_cfg.train.frozen_from_start = u32::MAX;
    }
    run_cfg.policy = (!point.plugin.is_empty()).then(|| PolicySection {
        plugin: point.plugin.clone(),
        options: point.options.clone(),
    });
    run_cfg
}

/// The outcome of one job.
#[derive(Debug)]
pub enum Outcome {
    /// The pretraining is in the cache.
    Pretrained,
    /// The fine-tune ended (completed or failed: its summary says which).
    Finetuned(Box<Summary>),
    /// A confirmation slot with nothing to run (why).
    Skipped(String),
}

/// Runs job `index` of the experiment in `exp`: a finished job is kept as
/// it is, an interrupted one resumes from its checkpoint. Holds the job's
/// lock while it runs, so the same job started twice at once runs once.
/// `threads` replaces the fine-tune's thread count (0: as configured).
pub fn run_job(
    exp: &Path,
    index: usize,
    threads: usize,
    search: &SearchPath,
    control: &RunControl,
) -> Result<Outcome> {
    let cfg = plan::load(exp)?;
    let jobs = plan::jobs(&cfg, &Stages::load(exp)?);
    let Some(job) = jobs.get(index) else {
        return Err(UsageError(format!(
            "job {index} is not in the plan of {}: it has jobs 0 to {}",
            exp.display(),
            jobs.len().saturating_sub(1)
        ))
        .into());
    };
    let _lock = lock(
        &exp.join(LOCK_DIR).join(format!("job-{index}.lock")),
        &format!("job {index} is running in another process; waiting for it"),
    )?;
    let seed = match job {
        Job::Finetune { seed, .. } => seed,
        Job::Pretrain => {
            pretrain(&cfg, search, control).map_err(pretraining_stopped)?;
            return Ok(Outcome::Pretrained);
        }
        Job::Skip { .. } => return Ok(Outcome::Skipped(job.describe())),
        Job::Awaiting { .. } => {
            return Err(UsageError(format!(
                "job {index} ({}) belongs to the confirmation, whose points the selection has \
                 not picked yet: once the grid's jobs have finished, collect them, which selects \
                 the points:\n  {} compare --collect {}",
                job.describe(),
                crate::error::command_name(),
                exp.display()
            ))
            .into())
        }
    };
    let point = job.point().expect("a fine-tune has a point");
    if !point.plugin.is_empty() {
        search.load(&point.plugin)?.new_policy(&point.options)?;
    }
    let weights = pretrained_weights(&cfg, exp)?;
    let mut run_cfg = finetune_config(&cfg, &point, *seed, &exp.join("runs"), weights);
    if threads > 0 {
        run_cfg.train.threads = i32::try_from(threads).unwrap_or(i32::MAX);
    }
    finetune(run_cfg, search, control)
        .map(|s| Outcome::Finetuned(Box::new(s)))
        .map_err(|e| match e.downcast::<RunStopped>() {
            Ok(s) => RunStopped {
                resume: format!("\nresume it with: {}", plan::job_command(exp, index)),
                ..s
            }
            .into(),
            Err(e) => e,
        })
}
