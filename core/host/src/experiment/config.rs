//! The `simfreeze compare` configuration: the stages, the policies and
//! their grids, what a comparison runs per seed (`arms`), and the
//! pretraining cache key.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{
    check_classes, check_name, parse_ron, DataSection, ModelSection, RunConfig, TrainSection,
};
use crate::error::UsageError;

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
    /// The entry's label: `label`, else the plugin's file stem.
    pub fn label(&self) -> String {
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
    /// Select, then confirm: after the grid has run on `seeds`, each
    /// policy's best point per speedup band (the selection) runs again, with
    /// the baseline and head-only, on these seeds (disjoint from `seeds`);
    /// the headline table and fronts come from these runs only.
    pub confirm_seeds: Option<Vec<u64>>,
    /// The margin `m` (percentage points) of "within m points": a point is
    /// within it when its paired Δ top-1's 95 % interval lies above `-m`.
    pub margin_pp: f64,
    /// Seeds to a precision: add seeds, in rounds, to the headline stage's
    /// points whose Δ top-1 interval is wider than ± this (pp), until every
    /// point is within it or has `max_seeds` seeds.
    pub precision_pp: Option<f64>,
    /// With `precision_pp`: the most seeds a point gets (default 10).
    pub max_seeds: Option<usize>,
    /// A shipped pretrained backbone: the pretraining stage's result,
    /// checked by its SHA-256. With it the fine-tunes start from this file
    /// and the pretraining does not run (`--set backbone=None` pretrains
    /// from scratch as the `pretrain` stage says).
    pub backbone: Option<Backbone>,
}

/// A pretrained checkpoint named by path and SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backbone {
    /// The weights file (`model.safetensors`, with its `model.json` beside
    /// it); relative to the working directory.
    pub path: PathBuf,
    /// Its SHA-256, 64 lower-case hex digits.
    pub sha256: String,
}

impl Backbone {
    /// The file, once its SHA-256 is the one named; else an error that
    /// names the file and both digests.
    pub fn verify(&self) -> Result<PathBuf, UsageError> {
        let actual = crate::run::provenance::sha256_of(&self.path).map_err(|e| {
            UsageError(format!(
                "cannot read the backbone {}: {e} (restore it with `git checkout -- {}`, or \
                 pretrain from scratch with `--set backbone=None`)",
                self.path.display(),
                self.path.display()
            ))
        })?;
        if actual != self.sha256 {
            return Err(UsageError(format!(
                "the backbone {} has sha256 {actual}, but the configuration names sha256 {}: \
                 it is not the file the configuration was made with; restore it (`git \
                 checkout -- {}`), or pretrain from scratch with `--set backbone=None`",
                self.path.display(),
                self.sha256,
                self.path.display()
            )));
        }
        Ok(self.path.clone())
    }
}

/// The default `margin_pp`: the paper's form of claim, "within 0.5 points".
pub const DEFAULT_MARGIN_PP: f64 = 0.5;
/// The default `max_seeds` with `precision_pp`.
pub const DEFAULT_MAX_SEEDS: usize = 10;

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
            confirm_seeds: None,
            margin_pp: DEFAULT_MARGIN_PP,
            precision_pp: None,
            max_seeds: None,
            backbone: None,
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
        self.validate_seeds()?;
        if let Some(b) = &self.backbone {
            let hex = b.sha256.len() == 64
                && b.sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex {
                return Err(UsageError(format!(
                    "backbone.sha256 must be 64 lower-case hex digits (`sha256sum {}`), not `{}`",
                    b.path.display(),
                    b.sha256
                )));
            }
        }
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

    /// The seed lists, the margin and the precision.
    fn validate_seeds(&self) -> Result<(), UsageError> {
        let mut sorted = self.seeds.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(UsageError(format!(
                "seed {} is listed twice in seeds",
                w[0]
            )));
        }
        if let Some(confirm) = &self.confirm_seeds {
            if confirm.is_empty() {
                return Err(UsageError(
                    "confirm_seeds is empty: give the seeds the selected points are confirmed \
                     on (disjoint from seeds), or leave it out to report the grid's seeds"
                        .into(),
                ));
            }
            let shared: Vec<String> = confirm
                .iter()
                .filter(|s| self.seeds.contains(s))
                .map(u64::to_string)
                .collect();
            if !shared.is_empty() {
                return Err(UsageError(format!(
                    "confirm_seeds and seeds share seed(s) {}: a confirmation on the seeds the \
                     points were selected on keeps the winner's curse; give new seeds",
                    shared.join(", ")
                )));
            }
            let mut c = confirm.clone();
            c.sort_unstable();
            if let Some(w) = c.windows(2).find(|w| w[0] == w[1]) {
                return Err(UsageError(format!(
                    "seed {} is listed twice in confirm_seeds",
                    w[0]
                )));
            }
        }
        if !(self.margin_pp.is_finite() && self.margin_pp > 0.0) {
            return Err(UsageError(format!(
                "margin_pp must be a positive number of percentage points, not {}",
                self.margin_pp
            )));
        }
        match (self.precision_pp, self.max_seeds) {
            (None, Some(_)) => Err(UsageError(
                "max_seeds has no effect without precision_pp: give both, or list the seeds".into(),
            )),
            (Some(x), _) if !(x.is_finite() && x > 0.0) => Err(UsageError(format!(
                "precision_pp must be a positive half-width in percentage points, not {x}"
            ))),
            (Some(_), Some(n)) if n < self.headline_seeds().len() => Err(UsageError(format!(
                "max_seeds {n} is below the {} seeds already listed for the headline stage \
                 ({}): raise max_seeds or list fewer seeds",
                self.headline_seeds().len(),
                if self.confirm_seeds.is_some() {
                    "confirm_seeds"
                } else {
                    "seeds"
                }
            ))),
            _ => Ok(()),
        }
    }

    /// The seeds of the stage the headline table reports: `confirm_seeds`
    /// when there is a confirmation, else `seeds`.
    pub fn headline_seeds(&self) -> &[u64] {
        self.confirm_seeds.as_deref().unwrap_or(&self.seeds)
    }

    /// `max_seeds`, or its default when a precision is asked for.
    pub fn seed_cap(&self) -> usize {
        self.max_seeds.unwrap_or(DEFAULT_MAX_SEEDS)
    }

    /// The entries' labels in configuration order (one front each).
    pub fn families(&self) -> Vec<String> {
        self.policies.iter().map(Entry::label).collect()
    }

    /// A run configuration for `stage` with the shared model and data.
    pub(super) fn stage_config(&self, stage: &Stage, name: String, output: PathBuf) -> RunConfig {
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
pub(super) fn non_default(v: &serde_json::Value, default: &serde_json::Value) -> serde_json::Value {
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

/// What a comparison runs per seed, in order: the baseline, the head-only
/// reference (unless off), then every policy point.
pub(super) fn arms(cfg: &CompareConfig) -> Vec<Point> {
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

/// Policy labels in configuration order, baseline first.
pub(super) fn labels(cfg: &CompareConfig) -> Vec<String> {
    arms(cfg).into_iter().map(|a| a.label).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> CompareConfig {
        parse_ron(text, "c").unwrap()
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
    fn confirmation_seeds_margin_and_precision_are_checked() {
        let c = cfg("(seeds: [0, 1], confirm_seeds: Some([1, 2]))");
        let e = c.validate().unwrap_err().0;
        assert!(
            e.contains("share seed(s) 1") && e.contains("winner's curse"),
            "{e}"
        );
        let c = cfg("(seeds: [0, 1], confirm_seeds: Some([]))");
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .contains("confirm_seeds is empty"));
        let c = cfg("(seeds: [0, 1], confirm_seeds: Some([5, 6]))");
        c.validate().unwrap();
        assert_eq!(c.headline_seeds(), [5, 6]);
        let c = cfg("(margin_pp: 0.0)");
        assert!(c.validate().unwrap_err().0.contains("margin_pp"));
        let c = cfg("(precision_pp: Some(0.0))");
        assert!(c.validate().unwrap_err().0.contains("precision_pp must be"));
        let c = cfg("(precision_pp: Some(-1.0))");
        assert!(c.validate().is_err());
        let c = cfg("(seeds: [0, 1, 2], precision_pp: Some(0.3), max_seeds: Some(2))");
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("max_seeds 2 is below the 3 seeds"), "{e}");
        let c = cfg("(seeds: [0], max_seeds: Some(4))");
        assert!(c.validate().unwrap_err().0.contains("without precision_pp"));
        let c = cfg("(seeds: [0, 1], precision_pp: Some(0.3))");
        c.validate().unwrap();
        assert_eq!(c.seed_cap(), DEFAULT_MAX_SEEDS);
        assert_eq!(c.margin_pp, DEFAULT_MARGIN_PP);
        let c = cfg("(seeds: [0, 0])");
        assert!(c.validate().unwrap_err().0.contains("listed twice"));
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
}
