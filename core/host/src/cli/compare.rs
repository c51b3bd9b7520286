//! `simfreeze compare`: the whole comparison in one process, or as a plan
//! of jobs (`--plan`, `--job`, `--collect`), `--parallel` on one machine.

use std::path::PathBuf;

use anyhow::Result;

use simfreeze_runtime::loader::SearchPath;

use crate::error::UsageError;
use crate::experiment::collect::{self, rerun_list, write_outputs};
use crate::experiment::compare::{self, CompareConfig, Schedule};
use crate::experiment::job::{run_job, Outcome};
use crate::experiment::plan;
use crate::experiment::slurm::{self, SlurmOptions};
use crate::experiment::stages::{advance, Advanced, Stages};
use crate::run::RunControl;

#[derive(Debug, clap::Args)]
pub(super) struct CompareArgs {
    /// The RON experiment file (e.g. configs/quickstart.ron).
    #[arg(long, required_unless_present_any = ["resume", "job", "collect"])]
    config: Option<PathBuf>,
    /// Continue the experiment in this directory (finished fine-tunes kept,
    /// an interrupted one resumed, the rest run).
    #[arg(long, value_name = "EXPERIMENT_DIR", conflicts_with_all = ["config", "sets"])]
    resume: Option<PathBuf>,
    /// Override a config value, e.g. `--set finetune.train.epochs=1`
    /// or `--set seeds=[0,1]` (value is RON).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Only create the experiment directory and its job list (pretraining
    /// first, then every fine-tune), and print how to run them.
    #[arg(long, requires = "config", conflicts_with = "parallel")]
    plan: bool,
    /// Run job N of the experiment in EXPERIMENT_DIR only: a finished job
    /// is kept, an interrupted one resumes; jobs may run at the same time.
    #[arg(
        long,
        num_args = 2,
        value_names = ["EXPERIMENT_DIR", "N"],
        conflicts_with_all = ["config", "resume", "collect", "parallel"]
    )]
    job: Option<Vec<String>>,
    /// With `--job`: the fine-tune's CPU threads (0: as configured).
    #[arg(long, requires = "job", default_value_t = 0)]
    threads: usize,
    /// Write the table, results.csv and plots of the experiment in this
    /// directory from whatever finished, and list what did not with the
    /// command that runs it.
    #[arg(
        long,
        value_name = "EXPERIMENT_DIR",
        conflicts_with_all = ["config", "resume", "parallel"]
    )]
    collect: Option<PathBuf>,
    /// Run the fine-tunes N at a time as child processes, the configured
    /// threads split between them.
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Plan the comparison and write Slurm batch scripts for it (in
    /// `<experiment>/slurm/`): the pretraining as one job, the fine-tunes
    /// as a job array after it, the collect after the array.
    #[arg(long, requires = "config", conflicts_with_all = ["parallel", "plan"])]
    slurm: bool,
    /// With `--slurm`: submit the scripts with `sbatch` and print the job ids.
    #[arg(long, requires = "slurm")]
    submit: bool,
    /// Run one fine-tune of the comparison only: the point with this label
    /// (as the table names it: `baseline`, `head-only`, `slf`, a grid
    /// point `slf[t0: 0.3]`) on `--seed`, from the shipped backbone or
    /// the cached pretraining (pretraining first when there is neither),
    /// in an experiment directory of its own.
    #[arg(
        long,
        value_name = "LABEL",
        requires_all = ["config", "seed"],
        conflicts_with_all = ["plan", "slurm", "parallel"]
    )]
    only: Option<String>,
    /// With `--only`: the fine-tuning seed (any seed, not only the
    /// config's).
    #[arg(long, requires = "only")]
    seed: Option<u64>,
    #[command(flatten)]
    sbatch: SbatchArgs,
}

/// What every Slurm job asks for (with `--slurm`).
#[derive(Debug, clap::Args)]
struct SbatchArgs {
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    partition: Option<String>,
    /// GPUs per job (`--gpus`).
    #[arg(long, requires = "slurm", value_name = "N")]
    gpus_per_job: Option<u32>,
    /// CPUs per job (`--cpus-per-task`; also each fine-tune's threads).
    #[arg(long, requires = "slurm", value_name = "N")]
    cpus_per_job: Option<u32>,
    /// Time limit per job, in Slurm's format (e.g. `4:00:00`).
    #[arg(long, requires = "slurm", value_name = "T")]
    time: Option<String>,
    /// Memory per job (e.g. `32G`).
    #[arg(long, requires = "slurm")]
    mem: Option<String>,
    /// At most this many array tasks at once.
    #[arg(long, requires = "slurm", value_name = "K")]
    max_running: Option<u32>,
    /// Any other sbatch option, verbatim (repeatable), e.g.
    /// `--sbatch-arg=--account=lab`.
    #[arg(long = "sbatch-arg", requires = "slurm", value_name = "OPTION")]
    sbatch_args: Vec<String>,
}

pub(super) fn compare_cmd(a: CompareArgs, search: &SearchPath, control: RunControl) -> Result<()> {
    let schedule = Schedule {
        parallel: match a.parallel {
            Some(0) => return Err(UsageError("--parallel must be at least 1".into()).into()),
            Some(n) => n,
            None => 0,
        },
    };
    if let Some(job) = &a.job {
        let dir = PathBuf::from(&job[0]);
        let index: usize = job[1].parse().map_err(|_| {
            UsageError(format!(
                "--job takes an experiment directory and a job number; `{}` is not a number",
                job[1]
            ))
        })?;
        return job_cmd(dir, index, a.threads, search, &control);
    }
    if let Some(dir) = &a.collect {
        return collect_cmd(dir);
    }
    if let Some(dir) = &a.resume {
        compare::resume(dir, search, &control, schedule)?;
        return Ok(());
    }
    let config = a.config.expect("clap requires --config here");
    let cfg = CompareConfig::load(&config)?;
    let cfg = crate::config::apply_overrides(cfg, &a.sets)?;
    if a.plan {
        compare::plan_only(&cfg, search)?;
        return Ok(());
    }
    if let (Some(label), Some(seed)) = (&a.only, a.seed) {
        return only_cmd(cfg, label, seed, search, &control);
    }
    if a.slurm {
        return slurm_cmd(&cfg, search, a.sbatch, a.submit);
    }
    compare::compare(&cfg, search, &control, schedule)?;
    Ok(())
}

/// `--only LABEL --seed N`: one point of the comparison on one seed.
fn only_cmd(
    mut cfg: CompareConfig,
    label: &str,
    seed: u64,
    search: &SearchPath,
    control: &RunControl,
) -> Result<()> {
    cfg.seeds = vec![seed];
    cfg.confirm_seeds = None;
    cfg.precision_pp = None;
    let jobs = plan::jobs(&cfg, &Stages::default());
    let found = jobs
        .iter()
        .position(|j| matches!(j, plan::Job::Finetune { label: l, .. } if l.as_str() == label));
    let Some(index) = found else {
        let labels: Vec<String> = jobs
            .iter()
            .filter_map(|j| match j {
                plan::Job::Finetune { label, .. } => Some(format!("`{label}`")),
                _ => None,
            })
            .collect();
        return Err(UsageError(format!(
            "--only {label:?}: the comparison has no such point; its labels are {}",
            labels.join(", ")
        ))
        .into());
    };
    let exp = compare::plan_only_quiet(&cfg, search)?;
    if matches!(jobs.first(), Some(plan::Job::Pretrain)) {
        job_cmd(exp.clone(), 0, 0, search, control)?;
    }
    job_cmd(exp.clone(), index, 0, search, control)?;
    eprintln!(
        "experiment directory: {} (its table: {} compare --collect {})",
        exp.display(),
        crate::error::command_name(),
        exp.display()
    );
    Ok(())
}

fn job_cmd(
    dir: PathBuf,
    index: usize,
    threads: usize,
    search: &SearchPath,
    control: &RunControl,
) -> Result<()> {
    match run_job(&dir, index, threads, search, control)? {
        Outcome::Pretrained => eprintln!("job {index}: pretraining done"),
        Outcome::Skipped(what) => eprintln!("job {index}: {what}"),
        Outcome::Finetuned(s) => match s.final_top1 {
            Some(top1) if s.reason.is_none() => eprintln!(
                "job {index}: done, top-1 {top1:.2}%, compute speedup {:.2}x, {:.0}s ({})",
                s.compute_speedup,
                s.train_seconds,
                s.run_dir.display()
            ),
            _ => eprintln!(
                "job {index}: the run ended {:?}: {} (a failed row of the table; {})",
                s.status,
                s.reason.unwrap_or_default(),
                s.run_dir.display()
            ),
        },
    }
    Ok(())
}

fn slurm_cmd(cfg: &CompareConfig, search: &SearchPath, o: SbatchArgs, submit: bool) -> Result<()> {
    if cfg.precision_pp.is_some() {
        return Err(UsageError(
            "precision_pp adds seeds as results come in, and a Slurm job array is sized when it \
             is submitted: run it with `compare --parallel N` or `--plan` (collect plans each \
             round), or list the seeds"
                .into(),
        )
        .into());
    }
    let exp = compare::plan_only(cfg, search)?;
    let opts = SlurmOptions {
        partition: o.partition,
        gpus_per_job: o.gpus_per_job,
        cpus_per_job: o.cpus_per_job,
        time: o.time,
        mem: o.mem,
        max_running: o.max_running,
        extra: o.sbatch_args,
    };
    let scripts = slurm::write(
        &exp,
        &plan::jobs(&plan::load(&exp)?, &Stages::default()),
        &opts,
    )?;
    println!(
        "Slurm scripts: {} (submit all three with {})",
        scripts.array.parent().unwrap_or(&exp).display(),
        scripts.submit.display()
    );
    if submit {
        let ids = slurm::submit(&scripts)?;
        println!(
            "submitted: pretraining {}, fine-tunes array {} (tasks {}-{}), collect {}",
            ids.pretrain.as_deref().unwrap_or("none"),
            ids.array,
            scripts.tasks.0,
            scripts.tasks.1,
            ids.collect
        );
        if let (Some((conf, fin)), Some((_, (a, b)))) = (&ids.confirm, &scripts.confirm) {
            println!(
                "confirmation array {conf} (tasks {a}-{b}) after the selection, collect {fin}"
            );
        }
    }
    Ok(())
}

/// Writes the outputs of the experiment in `dir` from whatever finished;
/// when the stage it waits for has ended, decides the next one (the
/// selection, a precision round), prints its jobs and succeeds.
fn collect_cmd(dir: &std::path::Path) -> Result<()> {
    let cfg = plan::load(dir)?;
    let (rows, unfinished) = collect::rows(&cfg, dir)?;
    let complete = unfinished.is_empty();
    let advanced = advance(&cfg, dir, &rows, complete)?;
    let jobs = plan::jobs(&cfg, &Stages::load(dir)?);
    plan::write_jobs(dir, &jobs)?;
    let (rows, unfinished) = write_outputs(&cfg, dir)?;
    let list = rerun_list(dir, &rows, &unfinished);
    let new_jobs =
        |what: &str| {
            let idx: Vec<usize> = unfinished.iter().map(|u| u.index).collect();
            eprintln!(
            "{what}; run its jobs {}, then collect again:\n  for i in {}; do {} compare --job {} \
             $i; done",
            idx.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
            idx.iter().map(usize::to_string).collect::<Vec<_>>().join(" "),
            crate::error::command_name(),
            dir.display()
        );
        };
    match advanced {
        Advanced::Selected(s) => {
            new_jobs(&format!(
                "selection made (on seeds {:?}): {}; the confirmation is planned",
                cfg.seeds,
                s.points().join(", ")
            ));
            return Ok(());
        }
        Advanced::Round(r) => {
            new_jobs(&format!(
                "precision: {} still wider than ±{} pp; seed {} is planned",
                r.labels[1..].join(", "),
                cfg.precision_pp.unwrap_or_default(),
                r.seed
            ));
            return Ok(());
        }
        Advanced::Nothing => {}
    }
    if !list.is_empty() {
        eprintln!("not finished or failed:\n{list}");
    }
    if !unfinished.is_empty() {
        anyhow::bail!(
            "{} of {} fine-tunes have not finished; the table and results have the others",
            unfinished.len(),
            rows.len() + unfinished.iter().filter(|u| u.awaiting).count()
        );
    }
    Ok(())
}
