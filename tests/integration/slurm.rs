//! `simfreeze compare --slurm --submit` against a real single-node Slurm
//! (scripts/slurm-local.sh: slurmctld, slurmd and munge on this machine,
//! 2 CPUs, every file in a temporary directory): the plan runs as a job
//! array, one task killed with `scancel` mid-run is resubmitted alone, and
//! the collected results equal a sequential comparison's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use simfreeze_tests::{repo_root, simfreeze, simfreeze_bin, text};

use crate::compare::{compare_ok, config, results_without_wall};

/// The cluster, stopped when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Option<Cluster> {
        let script = repo_root().join("scripts/slurm-local.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(dir)
            .output()
            .expect("run scripts/slurm-local.sh");
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("apt-get is not available") {
                return None;
            }
            panic!("the local Slurm cluster did not start:\n{stderr}");
        }
        Some(Cluster {
            dir: dir.to_owned(),
            conf: dir.join("slurm.conf"),
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Waits until none of `ids` is queued or running.
    fn wait(&self, ids: &[&str]) {
        let started = Instant::now();
        loop {
            let out = self
                .cmd("squeue")
                .args(["-h", "-o", "%i %T", "-j", &ids.join(",")])
                .output()
                .unwrap();
            let queued = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if queued.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "Slurm jobs still queued after 10 minutes:\n{queued}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A job's state from `scontrol` (kept after it ends: MinJobAge).
    fn state(&self, id: &str) -> String {
        let out = self
            .cmd("scontrol")
            .args(["show", "job", "-o", id])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .find_map(|f| f.strip_prefix("JobState="))
            .unwrap_or("unknown")
            .to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/slurm-local.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The job id after `label` in `simfreeze compare --submit`'s line.
fn id_after<'a>(line: &'a str, label: &str) -> &'a str {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("{label} in {line}"))
        + label.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
}

#[test]
fn a_plan_runs_as_a_slurm_array_and_a_cancelled_task_is_resubmitted_alone() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::start(&dir.path().join("slurm")) else {
        eprintln!(
            "\n\n*** SKIPPED: Slurm is not installed and apt-get is not available to install \
             it (scripts/slurm-local.sh install); the Slurm test did not run ***\n\n"
        );
        return;
    };
    let cfg = config(dir.path());
    // Long enough fine-tunes (80 epochs of a tiny model, seconds each) to
    // cancel one mid-run.
    let epochs = "finetune.train.epochs=80";
    let out = cluster
        .cmd(simfreeze_bin().to_str().unwrap())
        .args([
            "compare",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            epochs,
        ])
        .args([
            "--set",
            r#"name="array""#,
            "--slurm",
            "--cpus-per-job",
            "1",
            "--submit",
        ])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("submitted:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("(tasks 1-8)"), "{line}");
    let (pre, array, collect) = (
        id_after(line, "pretraining"),
        id_after(line, "array"),
        id_after(line, "collect"),
    );
    let exp = dir.path().join("exp/array-001");
    let slurm_dir = std::fs::canonicalize(exp.join("slurm")).unwrap();

    // Cancel task 8 (ucf, seed 1) once it has trained an epoch.
    let metrics = exp.join("runs/ucf-s1-001/metrics.csv");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "task 8 never trained an epoch; slurmd log:\n{}",
            std::fs::read_to_string(cluster.dir.join("slurmd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let task = format!("{array}_8");
    let status = cluster.cmd("scancel").arg(&task).status().unwrap();
    assert!(status.success());
    cluster.wait(&[pre, array, collect]);
    assert_eq!(cluster.state(pre), "COMPLETED");
    assert_eq!(cluster.state(&task), "CANCELLED");
    // The collect job ran after the array and found task 8 missing.
    let log =
        std::fs::read_to_string(slurm_dir.join(format!("logs/collect-{collect}.out"))).unwrap();
    let resubmit = format!(
        "sbatch --array=8 {}",
        slurm_dir.join("finetune.sbatch").display()
    );
    assert!(
        log.contains("job 8 (ucf, seed 1): interrupted") && log.contains(&resubmit),
        "{log}"
    );

    // Resubmit it alone, as the collect says; it resumes from its checkpoint.
    let out = cluster
        .cmd("sbatch")
        .args(["--parsable", "--array=8"])
        .arg(slurm_dir.join("finetune.sbatch"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let again = String::from_utf8_lossy(&out.stdout).trim().to_string();
    cluster.wait(&[&again]);
    let log =
        std::fs::read_to_string(slurm_dir.join(format!("logs/finetune-{again}_8.out"))).unwrap();
    assert!(log.contains("resuming"), "{log}");

    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    compare_ok(&cfg, epochs);
    let seq = results_without_wall(&dir.path().join("exp/tiny-001"));
    assert_eq!(seq.len(), 9);
    assert_eq!(results_without_wall(&exp), seq);
}

#[test]
fn a_confirmation_runs_as_a_second_slurm_array_after_the_selection() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::start(&dir.path().join("slurm")) else {
        eprintln!("\n\n*** SKIPPED: Slurm is not installed (see the test above) ***\n\n");
        return;
    };
    let cfg = config(dir.path());
    let sets = [
        "--set",
        r#"policies=[(plugin: "slf", grid: ["(t0: 0.1)", "(t0: 0.6)"]), (plugin: "ucf")]"#,
        "--set",
        "confirm_seeds=Some([4])",
    ];
    let out = cluster
        .cmd(simfreeze_bin().to_str().unwrap())
        .args(["compare", "--config", cfg.to_str().unwrap()])
        .args(sets)
        .args([
            "--set",
            r#"name="confirm""#,
            "--slurm",
            "--cpus-per-job",
            "1",
            "--submit",
        ])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // 1 + 2 seeds x 5 arms; the confirmation: 1 seed x (2 + 2 x 3).
    let line = stdout
        .lines()
        .find(|l| l.starts_with("submitted:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("(tasks 1-10)"), "{line}");
    let second = stdout
        .lines()
        .find(|l| l.starts_with("confirmation array"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(second.contains("(tasks 11-18)"), "{second}");
    let ids = [
        id_after(line, "pretraining"),
        id_after(line, "array"),
        id_after(line, "collect"),
        id_after(second, "confirmation array"),
        id_after(second, "collect"),
    ];
    cluster.wait(&ids);
    for id in ids {
        assert_eq!(cluster.state(id), "COMPLETED", "job {id}");
    }
    let exp = dir.path().join("exp/confirm-001");
    assert!(exp.join("selection.json").is_file());
    let mut args = vec!["compare", "--config", cfg.to_str().unwrap()];
    args.extend(sets);
    let out = simfreeze(&args);
    assert!(out.status.success(), "{}", text(&out).1);
    let seq = dir.path().join("exp/tiny-001");
    assert_eq!(results_without_wall(&exp), results_without_wall(&seq));
    let table = std::fs::read_to_string(exp.join("table.md")).unwrap();
    assert!(
        table.contains("Confirmation: the selected points"),
        "{table}"
    );
}
