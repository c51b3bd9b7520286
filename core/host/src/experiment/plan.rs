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
    },
}

impl Job {
    /// `pretraining` or `<label>, seed <seed>`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Job::Pretrain => "pretraining".into(),
            Job::Finetune { label, seed, .. } => format!("{label}, seed {seed}"),
        }
    }

    /// The arm this fine-tune runs (none for the pretraining).
    pub fn point(&self) -> Option<Point> {
        match self {
            Job::Pretrain => None,
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

/// Every job of `cfg`, in index order.
pub fn jobs(cfg: &CompareConfig) -> Vec<Job> {
    let mut out = Vec::new();
    if cfg.pretrain.is_some() {
        out.push(Job::Pretrain);
    }
    let arms = arms(cfg);
    for &seed in &cfg.seeds {
        for a in &arms {
            out.push(Job::Finetune {
                label: a.label.clone(),
                run_name: a.run_name.clone(),
                seed,
                plugin: a.plugin.clone(),
                options: a.options.clone(),
                family: a.family.clone(),
            });
        }
    }
    out
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
    fs::create_dir_all(&cfg.output)
        .with_context(|| format!("cannot create {}", cfg.output.display()))?;
    let output = fs::canonicalize(&cfg.output)?;
    let exp = RunDir::create(&output, &cfg.name)?.path;
    fs::write(
        exp.join(COMPARE_FILE),
        ron::ser::to_string_pretty(&cfg, Default::default())?,
    )?;
    let list = JobsFile {
        experiment: exp.clone(),
        jobs: jobs(&cfg)
            .into_iter()
            .enumerate()
            .map(|(index, job)| IndexedJob { index, job })
            .collect(),
    };
    fs::write(exp.join(JOBS_FILE), serde_json::to_string_pretty(&list)?)?;
    fs::create_dir_all(exp.join(LOCK_DIR))?;
    Ok(exp)
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

/// How to run the plan's jobs, printed by `--plan`.
pub fn instructions(dir: &Path, jobs: &[Job]) -> String {
    let exe = crate::error::command_name();
    let d = dir.display();
    let first = usize::from(matches!(jobs.first(), Some(Job::Pretrain)));
    let last = jobs.len().saturating_sub(1);
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
        "  for i in $(seq {first} {last}); do {exe} compare --job {d} $i; done\n\
         then collect the table, results and plots (any time; it lists what is missing):\n  \
         {exe} compare --collect {d}\n"
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

    #[test]
    fn jobs_are_pretraining_then_every_arm_seed_by_seed() {
        let c: CompareConfig = parse_ron(
            r#"(pretrain: (classes: [0]), finetune: (classes: [1]), seeds: [3, 4],
                policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)"])])"#,
            "c",
        )
        .unwrap();
        let j = jobs(&c);
        assert_eq!(j.len(), 1 + 2 * 4);
        assert_eq!(j[0], Job::Pretrain);
        let names: Vec<String> = j[1..5]
            .iter()
            .map(|j| match j {
                Job::Finetune { run_name, .. } => run_name.clone(),
                Job::Pretrain => unreachable!(),
            })
            .collect();
        assert_eq!(names, ["baseline", "head-only", "slf-g1", "slf-g2"]);
        assert_eq!(j[5].describe(), "baseline, seed 4");
        let mut no_pre = c.clone();
        no_pre.pretrain = None;
        assert_eq!(jobs(&no_pre)[0].describe(), "baseline, seed 3");
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
