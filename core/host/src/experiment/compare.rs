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

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use simfreeze_runtime::loader::SearchPath;

use crate::config::{
    check_classes, check_name, parse_ron, DataSection, ModelSection, PolicySection, RunConfig,
    TrainSection,
};
use crate::engine::single::MODEL_INFO_FILE;
use crate::error::{RunStopped, Status, UsageError};
use crate::experiment::plot::{self, Chart, Series, Style};
use crate::model::weights::HeadInit;
use crate::plan::Plan;
use crate::run::dir::{RunDir, MODEL_FILE, SUMMARY_FILE};
use crate::run::records::{EventKind, Summary};
use crate::run::{self, checkpoint, RunControl};

/// One training stage: which classes, how much data, how to train.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage {
    /// The task's classes, relabelled 0..k in this order.
    pub classes: Option<Vec<i64>>,
    /// At most this many training samples.
    pub train_limit: Option<i64>,
    /// At most this many evaluation samples.
    pub eval_limit: Option<i64>,
    /// Training (its `seed` is replaced by each of `seeds` when fine-tuning).
    pub train: TrainSection,
}

/// A policy of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Plugin name or path.
    pub plugin: String,
    /// Its RON options.
    #[serde(default)]
    pub options: String,
    /// Name in tables and plots (default: the plugin's name); needed when
    /// one plugin appears twice with different options.
    #[serde(default)]
    pub label: Option<String>,
    /// Several option sets (RON each) instead of `options`: every one is a
    /// point of this policy's accuracy-speedup front.
    #[serde(default)]
    pub grid: Vec<String>,
}

/// One policy configuration a comparison runs: an entry, or one point of
/// an entry's grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The entry's label: the front this point belongs to.
    pub family: String,
    /// Its name in tables (`slf`, or `slf (t0: 0.3)` for a grid point).
    pub label: String,
    /// Its run directories' name (`slf`, `slf-g1`).
    pub run_name: String,
    /// Plugin name or path.
    pub plugin: String,
    /// RON options.
    pub options: String,
}

/// The label of the reference row with every block frozen from step 0.
pub const HEAD_ONLY: &str = "head-only";

impl Entry {
    fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| {
            let stem = Path::new(&self.plugin)
                .file_stem()
                .map_or(self.plugin.clone(), |s| s.to_string_lossy().into_owned());
            stem.strip_prefix("lib").unwrap_or(&stem).to_string()
        })
    }
}

/// A `simfreeze compare` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// Experiment name (`<output>/<name>-NNN`).
    pub name: String,
    /// Directory for experiments and the pretraining cache.
    pub output: PathBuf,
    /// The model (its `weights`, if any, initialise the pretraining stage,
    /// or the fine-tuning when there is no pretraining stage).
    pub model: ModelSection,
    /// Data source and normalisation shared by both stages.
    pub data: DataSection,
    /// The source task; none fine-tunes `model.weights` (or a fresh model)
    /// directly.
    pub pretrain: Option<Stage>,
    /// The target task.
    pub finetune: Stage,
    /// Fine-tuning seeds (head initialisation and data order).
    pub seeds: Vec<u64>,
    /// The policies compared against the baseline (no policy).
    pub policies: Vec<Entry>,
    /// Also fine-tune with every block frozen from step 0 (`head-only`:
    /// linear probing of the source features), to tell the regime.
    pub head_only: bool,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            name: "compare".into(),
            output: "experiments".into(),
            model: ModelSection::default(),
            data: DataSection::default(),
            pretrain: None,
            finetune: Stage::default(),
            seeds: vec![0],
            policies: Vec::new(),
            head_only: true,
        }
    }
}

impl CompareConfig {
    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<CompareConfig, UsageError> {
        let text = fs::read_to_string(path)
            .map_err(|e| UsageError(format!("cannot read config {}: {e}", path.display())))?;
        parse_ron(&text, &path.display().to_string())
    }

    /// Checks what the stages cannot check alone.
    pub fn validate(&self) -> Result<(), UsageError> {
        if self.seeds.is_empty() {
            return Err(UsageError("seeds is empty: give at least one".into()));
        }
        check_name("name", &self.name)?;
        // The stages set these per stage; in `data` they would be ignored.
        let per_stage = [
            ("classes", self.data.classes.is_some()),
            ("train_limit", self.data.train_limit.is_some()),
            ("eval_limit", self.data.eval_limit.is_some()),
        ];
        if let Some((key, _)) = per_stage.iter().find(|(_, set)| *set) {
            return Err(UsageError(format!(
                "data.{key} has no effect in a comparison: each stage sets its own; use \
                 finetune.{key} (and pretrain.{key} for the source task)"
            )));
        }
        check_classes("finetune.classes", self.finetune.classes.as_deref())?;
        self.finetune
            .train
            .recipe()
            .validate("finetune.train")
            .map_err(UsageError)?;
        if let Some(pre) = &self.pretrain {
            check_classes("pretrain.classes", pre.classes.as_deref())?;
            pre.train
                .recipe()
                .validate("pretrain.train")
                .map_err(UsageError)?;
        }
        if let Some(e) = self
            .policies
            .iter()
            .find(|e| !e.grid.is_empty() && !e.options.is_empty())
        {
            return Err(UsageError(format!(
                "policy `{}` gives both `options` and `grid`: put every option set in `grid`",
                e.label()
            )));
        }
        let mut labels: Vec<String> = self.policies.iter().map(Entry::label).collect();
        labels.push("baseline".into());
        labels.push(HEAD_ONLY.into());
        labels.sort();
        if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
            return Err(UsageError(format!(
                "two policies are labelled `{}` (`baseline` and `{HEAD_ONLY}` are the reference \
                 runs); give them distinct `label`s",
                w[0]
            )));
        }
        if let Some(pre) = &self.pretrain {
            let (Some(p), Some(t)) = (&pre.classes, &self.finetune.classes) else {
                return Err(UsageError(
                    "with a pretrain stage, give both pretrain.classes and finetune.classes: \
                     the source task must be disjoint from the target"
                        .into(),
                ));
            };
            if let Some(c) = p.iter().find(|c| t.contains(c)) {
                return Err(UsageError(format!(
                    "class {c} is in both pretrain.classes and finetune.classes; \
                     the source task must be disjoint from the target"
                )));
            }
        }
        Ok(())
    }

    fn stage_config(&self, stage: &Stage, name: String, output: PathBuf) -> RunConfig {
        let mut data = self.data.clone();
        data.classes = stage.classes.clone();
        data.train_limit = stage.train_limit;
        data.eval_limit = stage.eval_limit;
        RunConfig {
            name,
            output,
            model: self.model.clone(),
            data,
            train: stage.train.clone(),
            policy: None,
        }
    }

    /// Every policy configuration to run: each entry, its grid expanded.
    pub fn points(&self) -> Vec<Point> {
        let mut out = Vec::new();
        for e in &self.policies {
            let family = e.label();
            if e.grid.is_empty() {
                out.push(Point {
                    label: family.clone(),
                    run_name: family.clone(),
                    family,
                    plugin: e.plugin.clone(),
                    options: e.options.clone(),
                });
                continue;
            }
            for (i, options) in e.grid.iter().enumerate() {
                out.push(Point {
                    label: format!("{family} {}", options.trim()),
                    run_name: format!("{family}-g{}", i + 1),
                    family: family.clone(),
                    plugin: e.plugin.clone(),
                    options: options.clone(),
                });
            }
        }
        out
    }

    /// The pretraining run's configuration (name and output are set when
    /// it runs; they do not enter the cache key).
    pub fn pretrain_config(&self) -> Option<RunConfig> {
        let stage = self.pretrain.as_ref()?;
        Some(self.stage_config(stage, String::new(), PathBuf::new()))
    }
}

/// The cache key of a pretraining configuration: the first 16 hex digits
/// of the SHA-256 of what it sets differently from the defaults (so a new
/// configuration field with a default does not invalidate caches).
pub fn cache_key(c: &RunConfig) -> String {
    let value = serde_json::to_value(c).expect("configs serialise");
    let defaults = serde_json::to_value(RunConfig::default()).expect("configs serialise");
    let json = serde_json::to_string(&non_default(&value, &defaults)).expect("serialise");
    let d = Sha256::digest(json.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The parts of `v` that differ from `default` (objects compared key by key).
fn non_default(v: &serde_json::Value, default: &serde_json::Value) -> serde_json::Value {
    match (v, default) {
        (serde_json::Value::Object(m), serde_json::Value::Object(d)) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, x)| d.get(*k) != Some(*x))
                .map(|(k, x)| {
                    let sub = d.get(k).map_or(x.clone(), |dx| non_default(x, dx));
                    (k.clone(), sub)
                })
                .collect(),
        ),
        _ => v.clone(),
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

/// Runs (or reuses) the pretraining stage; returns the weights file.
fn pretrain(
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

fn done(summary: Summary) -> PathBuf {
    eprintln!(
        "pretraining done: top-1 {:.2}% on the source task, {:.0}s",
        summary.final_top1.unwrap_or(f64::NAN),
        summary.train_seconds
    );
    summary.run_dir
}

/// The last `<prefix>NNN` directory in `dir`, if any.
fn last_run_dir(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut runs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    runs.sort();
    runs.pop()
}

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
fn prepare(cfg: &CompareConfig, search: &SearchPath) -> Result<()> {
    cfg.validate()?;
    for p in cfg.points() {
        search.load(&p.plugin)?.new_policy(&p.options)?;
    }
    Ok(())
}

/// An interrupted pretraining is continued by running the comparison again.
fn pretraining_stopped(e: anyhow::Error) -> anyhow::Error {
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

/// Every fine-tune of the experiment in `exp` (finished ones kept,
/// checkpointed ones resumed), then the outputs.
fn finish(
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

/// What a comparison runs per seed, in order: the baseline, the head-only
/// reference (unless off), then every policy point.
fn arms(cfg: &CompareConfig) -> Vec<Point> {
    let reference = |label: &str| Point {
        family: label.into(),
        label: label.into(),
        run_name: label.into(),
        plugin: String::new(),
        options: String::new(),
    };
    let mut out = vec![reference("baseline")];
    if cfg.head_only {
        out.push(reference(HEAD_ONLY));
    }
    out.extend(cfg.points());
    out
}

/// One fine-tune of the experiment: the summary of a run of it that already
/// ended (kept as it is), the resumed run when one has a checkpoint, else a
/// new run.
fn finetune(run_cfg: RunConfig, search: &SearchPath, control: &RunControl) -> Result<Summary> {
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

fn failed_row(label: &str, seed: u64, dir: PathBuf) -> Row {
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
fn row_of(
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

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |v| format!("{v:.digits$}"))
}

fn write_results(dir: &Path, rows: &[Row]) -> Result<()> {
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

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

fn cell(v: &[f64], digits: usize, suffix: &str) -> String {
    if v.is_empty() {
        return "failed".into();
    }
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{m:.digits$}{suffix} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}{suffix}")
    }
}

/// Policy labels in configuration order, baseline first.
fn labels(cfg: &CompareConfig) -> Vec<String> {
    arms(cfg).into_iter().map(|a| a.label).collect()
}

/// The top-1 gain over a run's last epoch, from its `metrics.csv`.
fn last_epoch_gain(run_dir: &Path) -> Option<f64> {
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

/// The Markdown table: one row per policy, mean ± standard deviation
/// over seeds.
pub fn table(cfg: &CompareConfig, rows: &[Row]) -> String {
    let depth = rows.iter().map(|r| r.freeze_step.len()).max().unwrap_or(0);
    let seeds: Vec<String> = cfg.seeds.iter().map(|s| s.to_string()).collect();
    let mut t = format!(
        "Fine-tuning on {} from {}; seeds {} (mean ± sample std). \
         Wall speedup: baseline training seconds over the policy's, same seed, evaluation excluded.\n\n",
        cfg.finetune
            .classes
            .as_ref()
            .map_or("all classes".to_string(), |c| format!("classes {c:?}")),
        match (&cfg.pretrain, &cfg.model.weights) {
            (Some(p), _) => format!(
                "a model pretrained on {}",
                p.classes
                    .as_ref()
                    .map_or("all classes".to_string(), |c| format!("classes {c:?}"))
            ),
            (None, Some(w)) => w.display().to_string(),
            (None, None) => "scratch".into(),
        },
        seeds.join(", ")
    );
    t.push_str(
        "| policy | top-1 (%) | Δ acc (pp) | compute speedup | wall speedup | frozen blocks |\n",
    );
    t.push_str("|---|---:|---:|---:|---:|---:|\n");
    let mut flagged = false;
    for label in labels(cfg) {
        let ok: Vec<&Row> = rows
            .iter()
            .filter(|r| r.policy == label && r.status == "completed")
            .collect();
        let col = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|r| f(r)).collect()
        };
        let frontier = col(&|r| Some(r.frontier as f64));
        let doubtful = ok.iter().any(|r| wall_time_doubtful(r));
        flagged |= doubtful;
        let wall = cell(&col(&|r| r.wall_speedup), 2, "x") + if doubtful { " †" } else { "" };
        t.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} / {depth} |\n",
            cell(&col(&|r| r.top1), 2, ""),
            if label == "baseline" {
                "—".into()
            } else {
                cell(&col(&|r| r.d_acc), 2, "")
            },
            cell(&col(&|r| Some(r.compute_speedup)), 2, "x"),
            wall,
            if frontier.is_empty() {
                "—".into()
            } else {
                format!("{:.1}", mean_std(&frontier).0)
            },
        ));
    }
    if flagged {
        t.push_str(
            "\n† The wall speedup of a seed disagrees with its compute speedup beyond what \
             this machine's kernels explain (0.75x to 1.35x of it, or more than ±10 % for a \
             policy that froze nothing): other work on the machine most likely slowed one of \
             the two runs. Trust the compute speedup, or rerun on a quiet machine.\n",
        );
    }
    if let Some(r) = regime(rows) {
        t.push('\n');
        t.push_str(&r);
    }
    if cfg.policies.iter().any(|e| !e.grid.is_empty()) {
        t.push('\n');
        t.push_str(&fronts_table(cfg, rows));
    }
    t
}

/// Compute speedups at which `fronts_table` reports each policy's best
/// accuracy.
pub const FRONT_SPEEDUPS: [f64; 3] = [1.3, 1.6, 2.0];

/// Which regime the proxy is in: the baseline's top-1 gain over its last
/// epoch (converged below 0.3 pp) and head-only's distance to the baseline
/// (the paper's ImageNet-21k features: linear probing 2 to 7 points below
/// full fine-tuning). None without a head-only row.
pub fn regime(rows: &[Row]) -> Option<String> {
    let done = |label: &str| -> Vec<&Row> {
        rows.iter()
            .filter(|r| r.policy == label && r.status == "completed")
            .collect()
    };
    let gains: Vec<f64> = done("baseline")
        .iter()
        .filter_map(|r| r.last_epoch_gain)
        .collect();
    let gaps: Vec<f64> = done(HEAD_ONLY)
        .iter()
        .filter_map(|r| r.d_acc.map(|d| -d))
        .collect();
    if gaps.is_empty() {
        return None;
    }
    let gap = mean_std(&gaps);
    let mut verdict = Vec::new();
    let mut text = format!(
        "Regime: head-only (every block frozen from step 0: linear probing of the source \
         features) is {} pp below the baseline",
        cell(&gaps, 2, "")
    );
    if !(2.0..=7.0).contains(&gap.0) {
        verdict.push(if gap.0 < 2.0 {
            "the source features already solve the target (head-only within 2 pp)"
        } else {
            "the source features do not serve the target (head-only more than 7 pp below)"
        });
    }
    if !gains.is_empty() {
        let gain = mean_std(&gains);
        text.push_str(&format!(
            "; the baseline gained {} pp over its last epoch",
            cell(&gains, 2, "")
        ));
        if gain.0 >= 0.3 {
            verdict.push("the baseline is still learning at its end (last-epoch gain >= 0.3 pp)");
        }
    }
    text.push_str(". ");
    if verdict.is_empty() {
        text.push_str(
            "This is the paper's regime (strong source features, a fine-tune that converges).\n",
        );
    } else {
        text.push_str(&format!(
            "Not the paper's regime: {}.\n",
            verdict.join("; ")
        ));
    }
    Some(text)
}

/// Mean compute speedup and mean top-1 of each point (over its completed
/// seeds), by family.
fn point_means(cfg: &CompareConfig, rows: &[Row]) -> Vec<(String, String, f64, f64)> {
    let mut out = Vec::new();
    for p in cfg.points() {
        let ok: Vec<&Row> = rows
            .iter()
            .filter(|r| r.policy == p.label && r.status == "completed")
            .collect();
        let speed: Vec<f64> = ok.iter().map(|r| r.compute_speedup).collect();
        let top1: Vec<f64> = ok.iter().filter_map(|r| r.top1).collect();
        if !speed.is_empty() && !top1.is_empty() {
            out.push((p.family, p.label, mean_std(&speed).0, mean_std(&top1).0));
        }
    }
    out
}

/// The non-dominated points of `(speedup, accuracy)`: none other is at
/// least as fast and more accurate, or faster and as accurate; sorted by
/// speedup.
pub fn pareto(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(s, a)| {
            !points
                .iter()
                .any(|&(s2, a2)| (s2 >= s && a2 > a) || (s2 > s && a2 >= a))
        })
        .collect();
    front.sort_by(|x, y| x.0.total_cmp(&y.0));
    front.dedup();
    front
}

/// Per policy: the best mean top-1 among its points whose mean compute
/// speedup reaches 1.3x, 1.6x and 2.0x.
pub fn fronts_table(cfg: &CompareConfig, rows: &[Row]) -> String {
    let means = point_means(cfg, rows);
    let mut t = String::from(
        "Fronts: each policy's best mean top-1 (%) over its points at a mean compute speedup of \
         at least\n\n| policy | points | >= 1.3x | >= 1.6x | >= 2.0x |\n|---|---:|---:|---:|---:|\n",
    );
    let mut families: Vec<String> = Vec::new();
    for (f, ..) in &means {
        if !families.contains(f) {
            families.push(f.clone());
        }
    }
    for family in families {
        let pts: Vec<(&str, f64, f64)> = means
            .iter()
            .filter(|m| m.0 == family)
            .map(|m| (m.1.as_str(), m.2, m.3))
            .collect();
        let cells: Vec<String> = FRONT_SPEEDUPS
            .iter()
            .map(|&at| {
                pts.iter()
                    .filter(|p| p.1 >= at)
                    .max_by(|a, b| a.2.total_cmp(&b.2))
                    .map_or("none".to_string(), |p| {
                        format!("{:.2} ({}, {:.2}x)", p.2, p.0, p.1)
                    })
            })
            .collect();
        t.push_str(&format!(
            "| {family} | {} | {} |\n",
            pts.len(),
            cells.join(" | ")
        ));
    }
    t
}

/// Whether a row's wall speedup is outside what the compute model and this
/// machine's measured kernels explain: a frozen block saves somewhat more
/// wall time than the model's 2 of 3 units on a CPU (K = L measured at
/// 3.4-3.6x against the model's 3x), never several times more; a policy
/// that froze nothing saves nothing.
fn wall_time_doubtful(r: &Row) -> bool {
    let Some(wall) = r.wall_speedup else {
        return false;
    };
    let ratio = wall / r.compute_speedup;
    if r.compute_speedup < 1.005 {
        return (wall - 1.0).abs() > 0.10;
    }
    !(0.75..=1.35).contains(&ratio)
}

/// One chart's curves: a plain scalar's one curve under `None`, the
/// curves of `<name>.<block>` scalars under their block.
type Curves = BTreeMap<Option<usize>, Vec<(f64, f64)>>;

/// Every scalar a run's policy logged (its `scalar` events), grouped into
/// one chart per name: `eta.0`, `eta.1`, ... (a name ending in `.<block>`)
/// are the curves of chart `eta`; `plasticity` is chart `plasticity` with
/// one curve. Points are (step, value); non-finite values are left out.
fn scalar_curves(run_dir: &Path) -> Result<BTreeMap<String, Curves>> {
    let mut charts: BTreeMap<String, Curves> = BTreeMap::new();
    for event in RunDir::existing(run_dir).read_events()? {
        let EventKind::Scalar { name, value } = event.kind else {
            continue;
        };
        let (chart, block) = match name.rsplit_once('.') {
            Some((stem, b)) if !stem.is_empty() => match b.parse::<usize>() {
                Ok(b) => (stem.to_string(), Some(b)),
                Err(_) => (name, None),
            },
            _ => (name, None),
        };
        let curve = charts.entry(chart).or_default().entry(block).or_default();
        if value.is_finite() {
            curve.push((event.step as f64, value));
        }
    }
    // A scalar that was never finite has no curve to draw.
    for curves in charts.values_mut() {
        curves.retain(|_, points| !points.is_empty());
    }
    charts.retain(|_, curves| !curves.is_empty());
    Ok(charts)
}

/// The chart of one logged scalar `name` of `policy`'s run, and its file
/// stem (`<name>-<policy>`; `scalar-` in front of a name that would take
/// another chart's file).
fn scalar_chart(policy: &str, seed: u64, name: &str, curves: Curves) -> (Chart, String) {
    let per_block = curves.keys().any(Option::is_some);
    let title = match per_block {
        true => format!("{policy}: {name} per block (seed {seed})"),
        false => format!("{policy}: {name} (seed {seed})"),
    };
    let y_label = match name {
        "eta" => "eta (mean similarity to the class memory)".to_string(),
        other => other.to_string(),
    };
    let series = curves
        .into_iter()
        .enumerate()
        .map(|(i, (block, points))| Series {
            name: block.map_or_else(|| name.to_string(), |b| format!("block {b}")),
            // Markers while they stay apart; a line for a per-step curve.
            style: match points.len() {
                0..=100 => Style::LineMarkers,
                _ => Style::Line,
            },
            points,
            color: block.unwrap_or(i),
        })
        .collect();
    let chart = Chart {
        title,
        x_label: "step".into(),
        y_label,
        series,
        ..Default::default()
    };
    let stem = format!("{}-{}", file_stem(name), file_stem(policy));
    let stem = match ["timeline", "accuracy-speedup", "fronts"].contains(&stem.as_str()) {
        true => format!("scalar-{stem}"),
        false => stem,
    };
    (chart, stem)
}

/// A label as part of a file name: letters, digits, `_`, `.` and `-`
/// kept, every other run of characters one `-` (`atsf (record_steps: 5)`
/// becomes `atsf-record_steps-5`).
fn file_stem(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() || "_.-".contains(c) {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// The frontier over steps: a staircase from (0, 0) to the last step.
fn frontier_steps(freeze_step: &[Option<u64>], steps: u64) -> Vec<(f64, f64)> {
    let mut at: Vec<u64> = freeze_step.iter().flatten().copied().collect();
    at.sort_unstable();
    let mut pts = vec![(0.0, 0.0)];
    for (i, s) in at.iter().enumerate() {
        pts.push((*s as f64, (i + 1) as f64));
    }
    pts.push((steps as f64, at.len() as f64));
    pts
}

fn plots(cfg: &CompareConfig, dir: &Path, rows: &[Row]) -> Result<()> {
    let first_seed = cfg.seeds[0];
    let labels = labels(cfg);
    let color = |label: &str| labels.iter().position(|l| l == label).unwrap_or(0);
    let done = |r: &&Row| r.status == "completed";
    // Every scalar each policy logs, one chart per name (ATSF's eta.N:
    // one curve per block).
    for r in rows.iter().filter(done).filter(|r| r.seed == first_seed) {
        for (name, curves) in scalar_curves(&r.run_dir)? {
            let (chart, stem) = scalar_chart(&r.policy, first_seed, &name, curves);
            plot::write(&chart, dir, &stem)?;
        }
    }
    let timeline = Chart {
        title: format!("Freeze timeline (seed {first_seed})"),
        x_label: "step".into(),
        y_label: "frozen blocks".into(),
        series: rows
            .iter()
            .filter(done)
            .filter(|r| r.seed == first_seed)
            .map(|r| Series {
                name: r.policy.clone(),
                points: frontier_steps(&r.freeze_step, r.steps),
                style: Style::Steps,
                color: color(&r.policy),
            })
            .collect(),
        ..Default::default()
    };
    plot::write(&timeline, dir, "timeline")?;
    let mut series = Vec::new();
    for label in &labels {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(done)
            .filter(|r| &r.policy == label)
            .filter_map(|r| Some((r.compute_speedup, r.d_acc?)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
        let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
        if pts.len() > 1 {
            series.push(Series {
                name: label.clone(),
                points: pts,
                style: Style::Faint,
                color: color(label),
            });
        }
        series.push(Series {
            name: label.clone(),
            points: vec![(mean_std(&xs).0, mean_std(&ys).0)],
            style: Style::Labelled,
            color: color(label),
        });
    }
    let scatter = Chart {
        title: "Accuracy against speedup".into(),
        x_label: "compute speedup over full fine-tuning (x)".into(),
        y_label: "Δ top-1 vs baseline (pp)".into(),
        series,
        h_lines: vec![(0.0, "baseline".into())],
        ..Default::default()
    };
    plot::write(&scatter, dir, "accuracy-speedup")?;
    if cfg.policies.iter().any(|e| !e.grid.is_empty()) {
        plot::write(&fronts_chart(cfg, rows), dir, "fronts")?;
    }
    Ok(())
}

/// Every point's mean accuracy against its mean compute speedup, with each
/// policy's Pareto front drawn through its non-dominated points.
fn fronts_chart(cfg: &CompareConfig, rows: &[Row]) -> Chart {
    let base: Vec<f64> = rows
        .iter()
        .filter(|r| r.policy == "baseline" && r.status == "completed")
        .filter_map(|r| r.top1)
        .collect();
    let base = if base.is_empty() {
        0.0
    } else {
        mean_std(&base).0
    };
    let means = point_means(cfg, rows);
    let mut series = Vec::new();
    for (color, e) in cfg.policies.iter().enumerate() {
        let family = e.label();
        let pts: Vec<(f64, f64)> = means
            .iter()
            .filter(|m| m.0 == family)
            .map(|m| (m.2, m.3 - base))
            .collect();
        if pts.is_empty() {
            continue;
        }
        series.push(Series {
            name: family.clone(),
            points: pts.clone(),
            style: Style::Faint,
            color: color + 1,
        });
        series.push(Series {
            name: family,
            points: pareto(&pts),
            style: Style::LineMarkers,
            color: color + 1,
        });
    }
    let v_lines: Vec<(f64, String)> = FRONT_SPEEDUPS
        .iter()
        .map(|s| (*s, format!("{s}x")))
        .collect();
    Chart {
        title: "Accuracy-speedup fronts (mean over seeds)".into(),
        x_label: "compute speedup over full fine-tuning (x)".into(),
        y_label: "Δ top-1 vs baseline (pp)".into(),
        series,
        h_lines: vec![(0.0, "baseline".into())],
        v_lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scalar_a_policy_logs_gets_a_chart() {
        let d = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":3,"event":"scalar","name":"eta.0","value":0.5}"#,
            r#"{"step":3,"event":"scalar","name":"eta.10","value":0.25}"#,
            r#"{"step":3,"event":"scalar","name":"plasticity","value":1.5}"#,
            r#"{"step":4,"event":"freeze","blocks":[0],"decided_at":3}"#,
            r#"{"step":4,"event":"scalar","name":"plasticity","value":null}"#,
            r#"{"step":5,"event":"scalar","name":"plasticity","value":1.0}"#,
            r#"{"step":5,"event":"scalar","name":"frozen","value":1.0}"#,
            r#"{"step":5,"event":"scalar","name":"v1.2.x","value":2.0}"#,
            r#"{"step":6,"event":"scalar","name":"nan_only","value":null}"#,
        ];
        std::fs::write(d.path().join("events.jsonl"), lines.join("\n")).unwrap();
        let charts = scalar_curves(d.path()).unwrap();
        let names: Vec<&str> = charts.keys().map(String::as_str).collect();
        assert_eq!(names, ["eta", "frozen", "plasticity", "v1.2.x"]);
        let blocks: Vec<Option<usize>> = charts["eta"].keys().copied().collect();
        assert_eq!(blocks, [Some(0), Some(10)]);
        // The NaN at step 4 is left out.
        assert_eq!(charts["plasticity"][&None], [(3.0, 1.5), (5.0, 1.0)]);

        let (chart, stem) =
            scalar_chart("my policy", 0, "plasticity", charts["plasticity"].clone());
        assert_eq!(stem, "plasticity-my-policy");
        assert_eq!(chart.series.len(), 1);
        assert_eq!(chart.series[0].name, "plasticity");
        let (chart, stem) = scalar_chart("atsf", 0, "eta", charts["eta"].clone());
        assert_eq!(stem, "eta-atsf");
        let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["block 0", "block 10"]);
        // A name that would overwrite another chart's file does not.
        let (_, stem) = scalar_chart("speedup", 0, "accuracy", charts["frozen"].clone());
        assert_eq!(stem, "scalar-accuracy-speedup");
        for (name, curves) in charts {
            let (chart, stem) = scalar_chart("p", 0, &name, curves);
            plot::write(&chart, d.path(), &stem).unwrap();
        }
        for stem in ["eta-p", "frozen-p", "plasticity-p", "v1.2.x-p"] {
            assert!(d.path().join(format!("{stem}.png")).is_file(), "{stem}");
        }
    }

    fn cfg(text: &str) -> CompareConfig {
        parse_ron(text, "c").unwrap()
    }

    fn done_row(label: &str, seed: u64, top1: f64, speed: f64) -> Row {
        Row {
            top1: Some(top1),
            d_acc: Some(0.0),
            compute_speedup: speed,
            status: "completed".into(),
            ..failed_row(label, seed, PathBuf::new())
        }
    }

    #[test]
    fn grids_expand_into_points_of_one_front_each() {
        let c = cfg(r#"(policies: [
            (plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)"]),
            (plugin: "atsf", options: "(record_steps: 5)"),
        ])"#);
        c.validate().unwrap();
        let p = c.points();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].family.as_str(), p[0].label.as_str()),
            ("slf", "slf (t0: 0.3)")
        );
        assert_eq!(
            (p[1].run_name.as_str(), p[1].options.as_str()),
            ("slf-g2", "(t0: 0.5)")
        );
        assert_eq!(
            (p[2].label.as_str(), p[2].run_name.as_str()),
            ("atsf", "atsf")
        );
        let labels = labels(&c);
        assert_eq!(&labels[..2], ["baseline", HEAD_ONLY]);
        let both =
            cfg(r#"(policies: [(plugin: "slf", options: "(t0: 0.3)", grid: ["(t0: 0.5)"])])"#);
        assert!(both.validate().unwrap_err().0.contains("both"));
        let clash = cfg(r#"(policies: [(plugin: "x", label: "head-only")])"#);
        assert!(clash.validate().is_err());
    }

    #[test]
    fn grid_labels_become_plain_file_names() {
        assert_eq!(file_stem("atsf"), "atsf");
        assert_eq!(
            file_stem("atsf (record_steps: 5, history: Continuous)"),
            "atsf-record_steps-5-history-Continuous"
        );
    }

    #[test]
    fn the_front_keeps_only_points_nothing_beats_in_both() {
        let pts = [
            (1.2, 90.0),
            (1.5, 89.0),
            (1.4, 88.0),
            (2.0, 85.0),
            (2.0, 84.0),
            (1.1, 89.5),
        ];
        assert_eq!(pareto(&pts), vec![(1.2, 90.0), (1.5, 89.0), (2.0, 85.0)]);
        assert_eq!(pareto(&[(1.0, 1.0), (1.0, 1.0)]), vec![(1.0, 1.0)]);
    }

    #[test]
    fn fronts_report_the_best_accuracy_at_each_speedup() {
        let c = cfg(
            r#"(seeds: [0, 1], policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.7)"])])"#,
        );
        let rows = vec![
            done_row("slf (t0: 0.3)", 0, 88.0, 1.7),
            done_row("slf (t0: 0.3)", 1, 86.0, 1.7),
            done_row("slf (t0: 0.7)", 0, 90.0, 1.35),
            done_row("slf (t0: 0.7)", 1, 92.0, 1.35),
        ];
        let t = fronts_table(&c, &rows);
        assert!(
            t.contains(
                "| slf | 2 | 91.00 (slf (t0: 0.7), 1.35x) | 87.00 (slf (t0: 0.3), 1.70x) | none |"
            ),
            "{t}"
        );
    }

    #[test]
    fn the_regime_is_told_from_head_only_and_the_baselines_last_epoch() {
        let mut base = done_row("baseline", 0, 90.0, 1.0);
        base.last_epoch_gain = Some(0.1);
        let mut head = done_row(HEAD_ONLY, 0, 86.0, 3.0);
        head.d_acc = Some(-4.0);
        let text = regime(&[base.clone(), head.clone()]).unwrap();
        assert!(
            text.contains("4.00 pp below") && text.contains("This is the paper's regime"),
            "{text}"
        );
        base.last_epoch_gain = Some(1.5);
        head.d_acc = Some(-11.0);
        let text = regime(&[base.clone(), head]).unwrap();
        assert!(
            text.contains("still learning") && text.contains("do not serve"),
            "{text}"
        );
        assert!(regime(&[base]).is_none(), "no head-only row, no verdict");
    }

    #[test]
    fn wall_speedups_the_compute_model_cannot_explain_are_flagged() {
        let row = |label: &str, compute: f64, wall: f64| Row {
            wall_speedup: Some(wall),
            compute_speedup: compute,
            status: "completed".into(),
            ..failed_row(label, 0, PathBuf::new())
        };
        // A policy that froze nothing "sped up" by a slowed baseline.
        assert!(wall_time_doubtful(&row("p", 1.0, 2.34)));
        assert!(!wall_time_doubtful(&row("p", 1.0, 1.04)));
        // Table 1 on the CPU: 1.85x compute, 2.08x wall: the kernels.
        assert!(!wall_time_doubtful(&row("p", 1.85, 2.08)));
        // The quickstart under a concurrent build: 1.77x compute, 5.56x wall.
        assert!(wall_time_doubtful(&row("p", 1.77, 5.56)));
        let c = cfg(r#"(policies: [(plugin: "atsf")])"#);
        let rows = [row("baseline", 1.0, 1.0), row("atsf", 1.77, 5.56)];
        let t = table(&c, &rows);
        assert!(
            t.contains("5.56x †") && t.contains("† The wall speedup"),
            "{t}"
        );
        let calm = [row("baseline", 1.0, 1.0), row("atsf", 1.77, 1.9)];
        assert!(!table(&c, &calm).contains('†'));
    }

    #[test]
    fn overlapping_classes_and_duplicate_labels_are_refused() {
        let c = cfg("(pretrain: (classes: [0, 1]), finetune: (classes: [1, 2]))");
        assert!(c.validate().unwrap_err().0.contains("class 1"));
        let c = cfg("(pretrain: (), finetune: (classes: [1, 2]))");
        assert!(c.validate().unwrap_err().0.contains("both"));
        let c = cfg(r#"(policies: [(plugin: "atsf"), (plugin: "./libatsf.so")])"#);
        assert!(c.validate().unwrap_err().0.contains("`atsf`"));
        let c = cfg(r#"(policies: [(plugin: "atsf"), (plugin: "atsf", label: "atsf-50")])"#);
        c.validate().unwrap();
        let c = cfg("(seeds: [])");
        assert!(c.validate().is_err());
    }

    #[test]
    fn cache_key_follows_what_shapes_the_pretraining_only() {
        let a = cfg("(pretrain: (classes: [0, 1], train: (epochs: 2)), finetune: (classes: [2]))");
        a.validate().unwrap();
        let mut b = a.clone();
        b.finetune.train.epochs = 7;
        b.policies.push(Entry {
            plugin: "atsf".into(),
            options: String::new(),
            label: None,
            grid: Vec::new(),
        });
        b.name = "other".into();
        assert_eq!(
            cache_key(&a.pretrain_config().unwrap()),
            cache_key(&b.pretrain_config().unwrap())
        );
        // Writing a default out explicitly changes nothing.
        b.pretrain.as_mut().unwrap().train.cache_frozen = false;
        assert_eq!(
            cache_key(&a.pretrain_config().unwrap()),
            cache_key(&b.pretrain_config().unwrap())
        );
        b.pretrain.as_mut().unwrap().train.epochs = 3;
        assert_ne!(
            cache_key(&a.pretrain_config().unwrap()),
            cache_key(&b.pretrain_config().unwrap())
        );
    }

    #[test]
    fn table_aggregates_over_seeds() {
        let c = cfg(r#"(seeds: [0, 1], policies: [(plugin: "ucf")])"#);
        let row = |p: &str, seed, top1, d, cs| Row {
            policy: String::from(p),
            seed,
            status: "completed".into(),
            top1: Some(top1),
            d_acc: Some(d),
            wall_speedup: Some(cs),
            compute_speedup: cs,
            frontier: 2,
            train_seconds: 1.0,
            run_dir: PathBuf::new(),
            freeze_step: vec![Some(1), Some(2), None],
            steps: 10,
            family: p.into(),
            last_epoch_gain: None,
        };
        let rows = vec![
            row("baseline", 0, 90.0, 0.0, 1.0),
            row("ucf", 0, 89.0, -1.0, 1.5),
            row("baseline", 1, 92.0, 0.0, 1.0),
            row("ucf", 1, 90.0, -2.0, 1.7),
        ];
        let t = table(&c, &rows);
        assert!(
            t.contains("| baseline | 91.00 ± 1.41 | — | 1.00x ± 0.00"),
            "{t}"
        );
        assert!(
            t.contains("| ucf | 89.50 ± 0.71 | -1.50 ± 0.71 | 1.60x ± 0.14"),
            "{t}"
        );
        assert!(t.contains("2.0 / 3"), "{t}");
    }

    #[test]
    fn frontier_is_a_staircase_to_the_last_step() {
        let pts = frontier_steps(&[Some(5), None, Some(3)], 10);
        assert_eq!(pts, vec![(0.0, 0.0), (3.0, 1.0), (5.0, 2.0), (10.0, 2.0)]);
    }
}
