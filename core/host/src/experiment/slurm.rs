//! A plan as Slurm batch scripts: the pretraining as one job, the
//! fine-tunes as a job array that starts after it (`afterok`), the collect
//! as one job after the array (`afterany`), each running the same
//! `simfreeze compare --job` / `--collect` as any other scheduler would.
//! With a confirmation, that collect makes the selection, and a second
//! array (the confirmation's jobs, `afterok` on it) and a second collect
//! follow.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::error::UsageError;
use crate::experiment::plan::{stage_ranges, Job, JOBS_FILE};

/// The folder of the scripts inside the experiment directory.
pub const SLURM_DIR: &str = "slurm";
/// The array script, also used to resubmit single tasks.
pub const ARRAY_SCRIPT: &str = "finetune.sbatch";
/// The confirmation's array script.
pub const CONFIRM_SCRIPT: &str = "confirm.sbatch";

/// What every job asks of Slurm.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gpus` per job (none: no GPU asked).
    pub gpus_per_job: Option<u32>,
    /// `--cpus-per-task` per job; also each fine-tune's `--threads`.
    pub cpus_per_job: Option<u32>,
    /// `--time` per job (Slurm's formats, e.g. `2:00:00`).
    pub time: Option<String>,
    /// `--mem` per job (e.g. `16G`).
    pub mem: Option<String>,
    /// At most this many array tasks at once (`--array=...%K`).
    pub max_running: Option<u32>,
    /// Any other `#SBATCH` option, verbatim (`--account=x`, `--qos=y`).
    pub extra: Vec<String>,
}

/// The scripts written for an experiment.
#[derive(Debug, Clone)]
pub struct Scripts {
    /// The pretraining job (none without a pretraining stage).
    pub pretrain: Option<PathBuf>,
    /// The fine-tunes' array job.
    pub array: PathBuf,
    /// The indices the array covers (`first..=last`).
    pub tasks: (usize, usize),
    /// The collect job (also the selection's, with a confirmation).
    pub collect: PathBuf,
    /// The confirmation's array job and the indices it covers.
    pub confirm: Option<(PathBuf, (usize, usize))>,
    /// A shell script submitting them all with their dependencies.
    pub submit: PathBuf,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `<exp>/slurm/{pretrain,finetune,collect}.sbatch` and `submit.sh`
/// for the plan `jobs` of the experiment in `exp`.
pub fn write(exp: &Path, jobs: &[Job], opts: &SlurmOptions) -> Result<Scripts> {
    let exp = fs::canonicalize(exp).with_context(|| format!("cannot find {}", exp.display()))?;
    let dir = exp.join(SLURM_DIR);
    fs::create_dir_all(dir.join("logs"))?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let exe = quote(&exe.display().to_string());
    let exp_q = quote(&exp.display().to_string());
    let name = exp
        .file_name()
        .map_or("compare".into(), |n| n.to_string_lossy().into_owned());
    let first = usize::from(matches!(jobs.first(), Some(Job::Pretrain)));
    let (grid, confirm) = stage_ranges(jobs);
    let Some((_, last)) = grid else {
        return Err(UsageError("the plan has no fine-tunes".into()).into());
    };
    let logs = dir.join("logs");
    let mut common = Vec::new();
    let cwd = std::env::current_dir()?;
    common.push(format!("--chdir={}", cwd.display()));
    if let Some(p) = &opts.partition {
        common.push(format!("--partition={p}"));
    }
    if let Some(t) = &opts.time {
        common.push(format!("--time={t}"));
    }
    if let Some(m) = &opts.mem {
        common.push(format!("--mem={m}"));
    }
    if let Some(c) = opts.cpus_per_job {
        common.push(format!("--cpus-per-task={c}"));
    }
    common.extend(opts.extra.iter().cloned());
    let mut env = String::new();
    if let Some(p) = std::env::var_os("SIMFREEZE_PLUGIN_PATH") {
        env = format!(
            "export SIMFREEZE_PLUGIN_PATH={}\n",
            quote(&p.to_string_lossy())
        );
    }
    let script = |job_name: &str, extra: &[String], log: &str, body: &str| -> String {
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!("#SBATCH --job-name={name}-{job_name}\n"));
        s.push_str(&format!("#SBATCH --output={}/{log}\n", logs.display()));
        for o in common.iter().chain(extra) {
            s.push_str(&format!("#SBATCH {o}\n"));
        }
        s.push_str(&format!(
            "# Written by `simfreeze compare --slurm` for {}; jobs: {}/{JOBS_FILE}.\n\
             set -euo pipefail\n{env}{body}\n",
            exp.display(),
            exp.display()
        ));
        s
    };
    let gpus: Vec<String> = opts
        .gpus_per_job
        .map(|g| vec![format!("--gpus={g}")])
        .unwrap_or_default();
    let pretrain = (first == 1).then(|| dir.join("pretrain.sbatch"));
    if let Some(p) = &pretrain {
        let body = format!("exec {exe} compare --job {exp_q} 0");
        fs::write(p, script("pretrain", &gpus, "pretrain-%j.out", &body))?;
    }
    let mut array_opts = gpus.clone();
    array_opts.push(match opts.max_running {
        Some(k) => format!("--array={first}-{last}%{k}"),
        None => format!("--array={first}-{last}"),
    });
    let threads = opts
        .cpus_per_job
        .map_or(String::new(), |c| format!(" --threads {c}"));
    let body = format!(
        "# One fine-tune per array task; rerun task N alone with\n\
         #   sbatch --array=N {}\n\
         exec {exe} compare --job {exp_q} \"$SLURM_ARRAY_TASK_ID\"{threads}",
        dir.join(ARRAY_SCRIPT).display()
    );
    let array = dir.join(ARRAY_SCRIPT);
    fs::write(
        &array,
        script("finetune", &array_opts, "finetune-%A_%a.out", &body),
    )?;
    let collect = dir.join("collect.sbatch");
    let body = format!("exec {exe} compare --collect {exp_q}");
    fs::write(&collect, script("collect", &[], "collect-%j.out", &body))?;
    let confirm = match confirm {
        Some((a, b)) => {
            let mut opts_c = gpus.clone();
            opts_c.push(match opts.max_running {
                Some(k) => format!("--array={a}-{b}%{k}"),
                None => format!("--array={a}-{b}"),
            });
            let body = format!(
                "# The confirmation: one job per array task (a slot without a point to \
                 confirm ends at once)\n\
                 exec {exe} compare --job {exp_q} \"$SLURM_ARRAY_TASK_ID\"{threads}"
            );
            let path = dir.join(CONFIRM_SCRIPT);
            fs::write(
                &path,
                script("confirm", &opts_c, "confirm-%A_%a.out", &body),
            )?;
            Some((path, (a, b)))
        }
        None => None,
    };
    let submit = dir.join("submit.sh");
    let mut s = String::from(
        "#!/bin/sh\n# Submits the comparison: pretraining, then the fine-tunes' array, then the collect.\nset -e\ncd \"$(dirname \"$0\")\"\n",
    );
    let dep = if first == 1 {
        s.push_str("pre=$(sbatch --parsable pretrain.sbatch | cut -d';' -f1)\n");
        "--dependency=afterok:$pre "
    } else {
        s.push_str("pre=none\n");
        ""
    };
    s.push_str(&format!(
        "arr=$(sbatch --parsable {dep}{ARRAY_SCRIPT} | cut -d';' -f1)\n\
         col=$(sbatch --parsable --dependency=afterany:$arr collect.sbatch | cut -d';' -f1)\n"
    ));
    match &confirm {
        Some((_, (a, b))) => s.push_str(&format!(
            "conf=$(sbatch --parsable --dependency=afterok:$col {CONFIRM_SCRIPT} | cut -d';' -f1)\n\
             fin=$(sbatch --parsable --dependency=afterany:$conf collect.sbatch | cut -d';' -f1)\n\
             echo \"pretraining: $pre  fine-tunes (array {first}-{last}): $arr  selection: $col  \
             confirmation (array {a}-{b}): $conf  collect: $fin\"\n"
        )),
        None => s.push_str(&format!(
            "echo \"pretraining: $pre  fine-tunes (array {first}-{last}): $arr  collect: $col\"\n"
        )),
    }
    fs::write(&submit, s)?;
    use std::os::unix::fs::PermissionsExt;
    for f in [&array, &collect, &submit]
        .into_iter()
        .chain(pretrain.as_ref())
        .chain(confirm.as_ref().map(|c| &c.0))
    {
        fs::set_permissions(f, fs::Permissions::from_mode(0o755))?;
    }
    Ok(Scripts {
        pretrain,
        array,
        tasks: (first, last),
        collect,
        confirm,
        submit,
    })
}

/// Submitted job ids.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The pretraining job.
    pub pretrain: Option<String>,
    /// The array job.
    pub array: String,
    /// The collect job (the selection's, with a confirmation).
    pub collect: String,
    /// With a confirmation: its array job and the final collect.
    pub confirm: Option<(String, String)>,
}

fn sbatch(args: &[&str], script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .context("cannot run sbatch: is Slurm installed and on PATH?")?;
    if !out.status.success() {
        anyhow::bail!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() {
        anyhow::bail!("sbatch {} printed no job id", script.display());
    }
    Ok(id)
}

/// Submits the scripts with `sbatch`, each with its dependency.
pub fn submit(s: &Scripts) -> Result<Submitted> {
    let pretrain = match &s.pretrain {
        Some(p) => Some(sbatch(&[], p)?),
        None => None,
    };
    let dep = pretrain
        .as_ref()
        .map(|id| format!("--dependency=afterok:{id}"));
    let args: Vec<&str> = dep.iter().map(String::as_str).collect();
    let array = sbatch(&args, &s.array)?;
    let collect = sbatch(&[&format!("--dependency=afterany:{array}")], &s.collect)?;
    let confirm = match &s.confirm {
        Some((script, _)) => {
            let conf = sbatch(&[&format!("--dependency=afterok:{collect}")], script)?;
            let fin = sbatch(&[&format!("--dependency=afterany:{conf}")], &s.collect)?;
            Some((conf, fin))
        }
        None => None,
    };
    Ok(Submitted {
        pretrain,
        array,
        collect,
        confirm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_array_covers_the_fine_tunes_and_depends_on_the_pretraining() {
        let d = tempfile::tempdir().unwrap();
        let ft = |seed| Job::Finetune {
            label: "baseline".into(),
            run_name: "baseline".into(),
            seed,
            plugin: String::new(),
            options: String::new(),
            family: "baseline".into(),
            stage: Default::default(),
        };
        let jobs = [Job::Pretrain, ft(0), ft(1), ft(2)];
        let opts = SlurmOptions {
            partition: Some("gpu".into()),
            gpus_per_job: Some(1),
            cpus_per_job: Some(4),
            time: Some("1:00:00".into()),
            max_running: Some(2),
            extra: vec!["--account=lab".into()],
            ..Default::default()
        };
        let s = write(d.path(), &jobs, &opts).unwrap();
        assert_eq!(s.tasks, (1, 3));
        let array = fs::read_to_string(&s.array).unwrap();
        for want in [
            "#SBATCH --array=1-3%2",
            "#SBATCH --gpus=1",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=1:00:00",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --account=lab",
            "\"$SLURM_ARRAY_TASK_ID\" --threads 4",
        ] {
            assert!(array.contains(want), "{want} missing:\n{array}");
        }
        let submit = fs::read_to_string(&s.submit).unwrap();
        assert!(
            submit.contains("--dependency=afterok:$pre finetune.sbatch")
                && submit.contains("--dependency=afterany:$arr collect.sbatch"),
            "{submit}"
        );
        let collect = fs::read_to_string(&s.collect).unwrap();
        assert!(collect.contains("compare --collect") && !collect.contains("--gpus"));
        // Without a pretraining stage the array starts at 0, depending on nothing.
        let s = write(d.path(), &jobs[1..], &SlurmOptions::default()).unwrap();
        assert!(s.pretrain.is_none() && s.tasks == (0, 2));
        let submit = fs::read_to_string(&s.submit).unwrap();
        assert!(!submit.contains("afterok"), "{submit}");
        assert!(s.confirm.is_none());
        // A confirmation: a second array after the first collect (the
        // selection), and a second collect after it.
        let slot = |band| Job::Awaiting {
            family: "slf".into(),
            band,
            seed: 9,
        };
        let with = [Job::Pretrain, ft(0), ft(1), slot(1.3), slot(1.6), slot(2.0)];
        let s = write(d.path(), &with, &SlurmOptions::default()).unwrap();
        assert_eq!(s.tasks, (1, 2));
        let (confirm, range) = s.confirm.clone().unwrap();
        assert_eq!(range, (3, 5));
        let script = fs::read_to_string(&confirm).unwrap();
        assert!(script.contains("#SBATCH --array=3-5"), "{script}");
        let submit = fs::read_to_string(&s.submit).unwrap();
        assert!(
            submit.contains("--dependency=afterok:$col confirm.sbatch")
                && submit.contains("--dependency=afterany:$conf collect.sbatch"),
            "{submit}"
        );
    }
}
