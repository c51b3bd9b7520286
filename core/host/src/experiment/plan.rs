//! A comparison as a plan of independent jobs: the experiment directory
//! with its configuration, the job list with stable indices (the
//! pretraining first when there is one, then every fine-tune, seed by
//! seed: the baseline, head-only, every policy point), and the locks that
//! let several processes work in one experiment directory at once.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::UsageError;
use crate::experiment::config::{arms, CompareConfig, Point};
use crate::experiment::stages::{arm, Phase, Stages, BANDS};
use crate::run::dir::RunDir;

/// The configuration file an experiment directory keeps.
pub const COMPARE_FILE: &str = "compare.ron";
/// The job list an experiment directory keeps (for people and schedulers;
/// the jobs themselves are derived from `compare.ron`).
pub const JOBS_FILE: &str = "jobs.json";
/// Where the locks live, inside the experiment directory.
pub const LOCK_DIR: &str = "locks";

/// One job of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// The pretraining stage (shared through the cache by every experiment
    /// with the same pretraining configuration).
    Pretrain,
    /// One fine-tune: one arm (baseline, head-only or a policy point) and
    /// one seed.
    Finetune {
        /// Its label in the table.
        label: String,
        /// Its arm's run name (`slf-g1`): its run directories are
        /// `runs/<run_name>-s<seed>-NNN`.
        run_name: String,
        /// The fine-tuning seed.
        seed: u64,
        /// Plugin name or path; empty for the baseline and head-only.
        plugin: String,
        /// The policy's RON options.
        options: String,
        /// The front it belongs to.
        family: String,
        /// The stage it belongs to.
        #[serde(default)]
        stage: Phase,
    },
    /// A confirmation slot (one policy, one band, one seed) before the
    /// selection has picked its point.
    Awaiting {
        /// The policy.
        family: String,
        /// The band.
        band: f64,
        /// The confirmation seed.
        seed: u64,
    },
    /// A confirmation slot with nothing to run: no point of the policy
    /// reaches the band, or its pick is confirmed in another slot.
    Skip {
        /// The policy.
        family: String,
        /// The band.
        band: f64,
        /// The confirmation seed.
        seed: u64,
        /// Why.
        why: String,
    },
}

impl Job {
    /// `pretraining` or `<label>, seed <seed>`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Job::Pretrain => "pretraining".into(),
            Job::Finetune {
                label, seed, stage, ..
            } => match stage {
                Phase::Grid => format!("{label}, seed {seed}"),
                Phase::Confirm => format!("{label}, seed {seed} (confirmation)"),
            },
            Job::Awaiting { family, band, seed } => {
                format!("{family} at {band}x, seed {seed} (confirmation, awaiting the selection)")
            }
            Job::Skip {
                family,
                band,
                seed,
                why,
            } => format!("{family} at {band}x, seed {seed} (confirmation): nothing to run, {why}"),
        }
    }

    /// The arm this fine-tune runs (none for the pretraining).
    pub fn point(&self) -> Option<Point> {
        match self {
            Job::Pretrain | Job::Awaiting { .. } | Job::Skip { .. } => None,
            Job::Finetune {
                label,
                run_name,
                plugin,
                options,
                family,
                ..
            } => Some(Point {
                family: family.clone(),
                label: label.clone(),
                run_name: run_name.clone(),
                plugin: plugin.clone(),
                options: options.clone(),
            }),
        }
    }
}

/// Every job of `cfg`, in index order, with what `stages` has decided:
/// the pretraining (when there is one); every arm on every seed of the grid;
/// with `confirm_seeds`, for each of them the baseline, head-only and one
/// slot per policy and band (awaiting the selection, then its point or
/// nothing); then the precision rounds' fine-tunes. Indices never move: a
/// later decision only resolves slots or appends.
pub fn jobs(cfg: &CompareConfig, stages: &Stages) -> Vec<Job> {
    let mut out = Vec::new();
    // A shipped backbone is the pretraining's result: nothing to run.
    if cfg.pretrain.is_some() && cfg.backbone.is_none() {
        out.push(Job::Pretrain);
    }
    let arms = arms(cfg);
    for &seed in &cfg.seeds {
        for a in &arms {
            out.push(finetune_job(a, seed, Phase::Grid));
        }
    }
    for &seed in cfg.confirm_seeds.iter().flatten() {
        for a in arms.iter().filter(|a| a.plugin.is_empty()) {
            out.push(finetune_job(a, seed, Phase::Confirm));
        }
        for family in cfg.families() {
            let mut confirmed: Vec<String> = Vec::new();
            for band in BANDS {
                let Some(selection) = &stages.selection else {
                    out.push(Job::Awaiting {
                        family: family.clone(),
                        band,
                        seed,
                    });
                    continue;
                };
                let pick = selection.pick(&family, band).and_then(|p| p.point.clone());
                let skip = |why: String| Job::Skip {
                    family: family.clone(),
                    band,
                    seed,
                    why,
                };
                out.push(match pick {
                    None => skip(format!("no point of it reaches {band}x")),
                    Some(l) if confirmed.contains(&l) => {
                        skip(format!("its pick `{l}` is confirmed at a lower band"))
                    }
                    Some(l) => match arm(cfg, &l) {
                        Some(a) => {
                            confirmed.push(l);
                            finetune_job(&a, seed, Phase::Confirm)
                        }
                        None => skip(format!("`{l}` is no longer in the configuration")),
                    },
                });
            }
        }
    }
    let stage = Phase::headline(cfg);
    for round in &stages.rounds {
        for label in &round.labels {
            if let Some(a) = arm(cfg, label) {
                out.push(finetune_job(&a, round.seed, stage));
            }
        }
    }
    out
}

fn finetune_job(a: &Point, seed: u64, stage: Phase) -> Job {
    Job::Finetune {
        label: a.label.clone(),
        run_name: a.run_name.clone(),
        seed,
        plugin: a.plugin.clone(),
        options: a.options.clone(),
        family: a.family.clone(),
        stage,
    }
}

/// Rewrites `jobs.json` of the experiment in `exp` for its jobs now.
pub fn write_jobs(exp: &Path, jobs: &[Job]) -> Result<()> {
    let list = JobsFile {
        experiment: exp.to_owned(),
        jobs: jobs
            .iter()
            .cloned()
            .enumerate()
            .map(|(index, job)| IndexedJob { index, job })
            .collect(),
    };
    fs::write(exp.join(JOBS_FILE), serde_json::to_string_pretty(&list)?)?;
    Ok(())
}

/// The job list as written to `jobs.json`.
#[derive(Debug, Serialize, Deserialize)]
struct JobsFile {
    /// The experiment directory.
    experiment: PathBuf,
    /// Index of each job is its position.
    jobs: Vec<IndexedJob>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexedJob {
    index: usize,
    #[serde(flatten)]
    job: Job,
}

/// Creates the experiment directory `<output>/<name>-NNN` with
/// `compare.ron` (plugin paths made absolute, so jobs run from anywhere)
/// and `jobs.json`; returns it.
pub fn create(cfg: &CompareConfig) -> Result<PathBuf> {
    let mut cfg = cfg.clone();
    for e in &mut cfg.policies {
        e.plugin = crate::plan::absolute_plugin(&e.plugin);
    }
    if let Some(b) = &mut cfg.backbone {
        if let Ok(abs) = fs::canonicalize(&b.path) {
            b.path = abs;
        }
    }
    fs::create_dir_all(&cfg.output)
        .with_context(|| format!("cannot create {}", cfg.output.display()))?;
    let output = fs::canonicalize(&cfg.output)?;
    let text = ron::ser::to_string_pretty(&cfg, Default::default())?;
    if let Some(exp) = untouched(&output, &cfg.name, &text) {
        eprintln!(
            "reusing {}: planned from the same configuration, and nothing has run in it yet",
            exp.display()
        );
        return Ok(exp);
    }
    let exp = RunDir::create(&output, &cfg.name)?.path;
    fs::write(exp.join(COMPARE_FILE), text)?;
    write_jobs(&exp, &jobs(&cfg, &Stages::default()))?;
    fs::create_dir_all(exp.join(LOCK_DIR))?;
    Ok(exp)
}

/// The newest experiment directory `<output>/<name>-NNN` planned from the
/// same configuration (`text`, as `create` writes it) in which nothing has
/// run: no run directory, no Slurm scripts, no outputs. `--plan` followed
/// by `--slurm` (or another `--plan`) reuses it instead of leaving it
/// orphaned.
fn untouched(output: &Path, name: &str, text: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(output)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(name)?.strip_prefix('-'))
                .is_some_and(|n| n.len() >= 3 && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    dirs.sort();
    let exp = dirs.pop()?;
    let same = fs::read_to_string(exp.join(COMPARE_FILE)).ok()? == text;
    let ran = ["runs", "slurm", "logs", "results.csv", "selection.json"]
        .iter()
        .any(|f| exp.join(f).exists());
    (same && !ran).then_some(exp)
}

/// The configuration of the experiment in `dir`, its pretraining cache
/// beside it (wherever the directory is now).
pub fn load(dir: &Path) -> Result<CompareConfig> {
    let file = dir.join(COMPARE_FILE);
    if !file.is_file() {
        return Err(UsageError(format!(
            "{} has no {COMPARE_FILE}: not an experiment directory of `simfreeze compare`",
            dir.display()
        ))
        .into());
    }
    let mut cfg = CompareConfig::load(&file)?;
    if let Some(parent) = dir.parent() {
        cfg.output = parent.to_owned();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The command that runs job `index` of the experiment in `dir`.
pub fn job_command(dir: &Path, index: usize) -> String {
    format!(
        "{} compare --job {} {index}",
        crate::error::command_name(),
        dir.display()
    )
}

/// An inclusive range of job indices.
pub type Range = (usize, usize);

/// The index range of the grid's fine-tunes and of the confirmation's
/// jobs (slots included), each `None` when the plan has none.
pub fn stage_ranges(jobs: &[Job]) -> (Option<Range>, Option<Range>) {
    let range = |is: &dyn Fn(&Job) -> bool| -> Option<Range> {
        let idx: Vec<usize> = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| is(j))
            .map(|(i, _)| i)
            .collect();
        Some((*idx.first()?, *idx.last()?))
    };
    let grid = range(&|j| {
        matches!(
            j,
            Job::Finetune {
                stage: Phase::Grid,
                ..
            }
        )
    });
    let confirm = range(&|j| {
        matches!(
            j,
            Job::Awaiting { .. }
                | Job::Skip { .. }
                | Job::Finetune {
                    stage: Phase::Confirm,
                    ..
                }
        )
    });
    (grid, confirm)
}

/// How to run the plan's jobs, printed by `--plan`.
pub fn instructions(dir: &Path, jobs: &[Job]) -> String {
    let exe = crate::error::command_name();
    let d = dir.display();
    let first = usize::from(matches!(jobs.first(), Some(Job::Pretrain)));
    let (grid, confirm) = stage_ranges(jobs);
    let last = grid.map_or(jobs.len().saturating_sub(1), |g| g.1);
    let mut s = format!(
        "planned {} jobs in {d} (list: {d}/{JOBS_FILE}):\n",
        jobs.len()
    );
    for (i, j) in jobs.iter().enumerate() {
        s.push_str(&format!("  {i:>4}  {}\n", j.describe()));
    }
    if first == 1 {
        s.push_str(&format!(
            "run the pretraining first:\n  {exe} compare --job {d} 0\nthen the fine-tunes \
             {first}..={last}, in any order and at the same time, on any machine that sees {d}:\n"
        ));
    } else {
        s.push_str(&format!(
            "run the fine-tunes 0..={last}, in any order and at the same time:\n"
        ));
    }
    s.push_str(&format!(
        "  for i in $(seq {first} {last}); do {exe} compare --job {d} $i; done\n"
    ));
    if let Some((a, b)) = confirm {
        s.push_str(&format!(
            "then collect: once the grid has finished, it selects each policy's point per band \
             and plans the confirmation (jobs {a}..={b}):\n  {exe} compare --collect {d}\n\
             then run the confirmation, in any order and at the same time:\n  \
             for i in $(seq {a} {b}); do {exe} compare --job {d} $i; done\n"
        ));
    }
    s.push_str(&format!(
        "then collect the table, results and plots (any time; it lists what is missing, and \
         with precision_pp it plans the next round of seeds):\n  {exe} compare --collect {d}\n"
    ));
    s
}

/// An exclusive lock on a file, held until dropped (`flock`, released by
/// the kernel when the process dies).
pub struct Lock {
    _file: fs::File,
}

/// Takes the lock `path` (created if missing); when another process holds
/// it, says so with `waiting` and waits.
pub fn lock(path: &Path, waiting: &str) -> Result<Lock> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the lock {}", path.display()))?;
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("{waiting}");
        let _ = std::io::stderr().flush();
        // SAFETY: as above; blocks until the holder releases it.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(Lock { _file: file })
}

/// Whether another process holds the lock `path` now.
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = fs::OpenOptions::new().write(true).open(path) else {
        return false;
    };
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; released on drop.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::stages::{Pick, Round, Selection};

    #[test]
    fn jobs_are_pretraining_then_every_arm_seed_by_seed() {
        let c: CompareConfig = parse_ron(
            r#"(pretrain: (classes: [0]), finetune: (classes: [1]), seeds: [3, 4],
                policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)"])])"#,
            "c",
        )
        .unwrap();
        let j = jobs(&c, &Stages::default());
        assert_eq!(j.len(), 1 + 2 * 4);
        assert_eq!(j[0], Job::Pretrain);
        let names: Vec<String> = j[1..5]
            .iter()
            .map(|j| match j {
                Job::Finetune { run_name, .. } => run_name.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(names, ["baseline", "head-only", "slf-g1", "slf-g2"]);
        assert_eq!(j[5].describe(), "baseline, seed 4");
        let mut no_pre = c.clone();
        no_pre.pretrain = None;
        assert_eq!(
            jobs(&no_pre, &Stages::default())[0].describe(),
            "baseline, seed 3"
        );
    }

    #[test]
    fn confirmation_slots_keep_their_indices_from_plan_to_selection() {
        let c: CompareConfig = parse_ron(
            r#"(seeds: [0], confirm_seeds: Some([7, 8]), policies: [
                (plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)"]), (plugin: "ucf")])"#,
            "c",
        )
        .unwrap();
        let before = jobs(&c, &Stages::default());
        // Grid: 5 arms; per confirmation seed: 2 references + 2 policies x 3 bands.
        assert_eq!(before.len(), 5 + 2 * (2 + 6));
        assert_eq!(stage_ranges(&before), (Some((0, 4)), Some((5, 20))));
        assert!(matches!(
            before[7],
            Job::Awaiting {
                band: 1.3,
                seed: 7,
                ..
            }
        ));
        let pick = |family: &str, band, point: Option<&str>| Pick {
            family: family.into(),
            band,
            point: point.map(String::from),
        };
        let stages = Stages {
            selection: Some(Selection {
                picks: vec![
                    pick("slf", 1.3, Some("slf (t0: 0.5)")),
                    pick("slf", 1.6, Some("slf (t0: 0.5)")),
                    pick("slf", 2.0, None),
                    pick("ucf", 1.3, Some("ucf")),
                    pick("ucf", 1.6, None),
                    pick("ucf", 2.0, None),
                ],
            }),
            rounds: vec![Round {
                seed: 9,
                labels: vec!["baseline".into(), "ucf".into()],
            }],
        };
        let after = jobs(&c, &stages);
        assert_eq!(after.len(), before.len() + 2);
        assert_eq!(after[..7], before[..7]);
        assert_eq!(after[7].describe(), "slf (t0: 0.5), seed 7 (confirmation)");
        assert!(after[8].describe().contains("confirmed at a lower band"));
        assert!(after[9].describe().contains("no point of it reaches 2x"));
        assert_eq!(after[10].describe(), "ucf, seed 7 (confirmation)");
        assert_eq!(after[22].describe(), "ucf, seed 9 (confirmation)");
    }

    #[test]
    fn a_held_lock_is_seen_and_released_with_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("locks/x.lock");
        assert!(!is_locked(&p));
        let held = lock(&p, "waiting").unwrap();
        assert!(is_locked(&p));
        drop(held);
        assert!(!is_locked(&p));
    }
}
