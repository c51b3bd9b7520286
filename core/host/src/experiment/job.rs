//! One job of a comparison: the pretraining (cached by its key, adopted
//! or resumed when a run of it is left in the cache) or one fine-tune
//! (kept when it ended, resumed from its checkpoint, else started).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use simfreeze_runtime::loader::SearchPath;

use crate::config::RunConfig;
use crate::engine::single::MODEL_INFO_FILE;
use crate::error::{RunStopped, Status};
use crate::experiment::config::{cache_key, CompareConfig};
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
