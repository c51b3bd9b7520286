//! `simfreeze compare` as a plan of jobs: `--plan`, `--job` (idempotent,
//! safe at the same time on one experiment directory, waiting for or
//! refusing a missing pretraining), `--collect` and `--parallel`, each
//! against a sequential comparison of the same configuration.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use simfreeze_tests::{simfreeze, simfreeze_bin, text};

use crate::compare::{compare_ok, config, results_without_wall};

/// `simfreeze compare --job exp n` started in the background.
fn spawn_job(exp: &Path, n: usize) -> Child {
    Command::new(simfreeze_bin())
        .args(["compare", "--job", exp.to_str().unwrap(), &n.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// The pretraining cache's lock file, once the pretraining has taken it.
fn pretrain_lock(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir.join("exp"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("pretrain.lock"))
        .find(|p| p.is_file())
}

/// Every run directory under `exp/runs`, sorted.
fn run_dirs(exp: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(exp.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn planned_jobs_run_at_once_and_collect_to_the_sequential_results() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let cfg_s = cfg.to_str().unwrap();

    // The plan: pretraining, then 2 seeds x (baseline, head-only, atsf, ucf).
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg_s,
        "--set",
        r#"name="plan""#,
        "--plan",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let exp = dir.path().join("exp/plan-001");
    let job0 = format!("compare --job {} 0", exp.display());
    assert!(
        stdout.contains("planned 9 jobs") && stdout.contains(&job0),
        "{stdout}"
    );
    assert!(stdout.contains("compare --collect"), "{stdout}");
    let jobs = std::fs::read_to_string(exp.join("jobs.json")).unwrap();
    assert!(jobs.contains(r#""kind": "pretrain""#), "{jobs}");

    // A fine-tune before its pretraining is refused, naming the job to run.
    let out = simfreeze(&["compare", "--job", exp.to_str().unwrap(), "1"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pretraining (job 0) has not finished") && stderr.contains(&job0),
        "{stderr}"
    );
    // Out of range is a usage error too.
    let out = simfreeze(&["compare", "--job", exp.to_str().unwrap(), "9"]);
    assert_eq!(out.status.code(), Some(2));

    // Nothing finished: collect writes what it can and lists every job.
    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("job 8 (ucf, seed 1): not started")
            && stderr.contains(&format!("compare --job {} 8", exp.display())),
        "{stderr}"
    );

    // The pretraining, while two fine-tunes already wait for it.
    let pre = spawn_job(&exp, 0);
    let started = std::time::Instant::now();
    while pretrain_lock(dir.path()).is_none() {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let early = [spawn_job(&exp, 1), spawn_job(&exp, 2)];
    finish(pre);
    // Each waited for the pretraining's lock or found its weights: none
    // was refused.
    for c in early {
        finish(c);
    }
    // Two different jobs and the same job twice, all at once.
    let batch = [spawn_job(&exp, 3), spawn_job(&exp, 4), spawn_job(&exp, 4)];
    let logs: Vec<String> = batch.into_iter().map(finish).collect();
    assert!(
        logs.iter().any(|l| l.contains("kept: ")),
        "the second run of job 4 keeps the first's result: {logs:?}"
    );
    for pair in [[5, 6], [7, 8]] {
        let c = pair.map(|n| spawn_job(&exp, n));
        for c in c {
            finish(c);
        }
    }
    let before = run_dirs(&exp);
    assert_eq!(
        before.len(),
        8,
        "one run directory per fine-tune: {before:?}"
    );
    let summary = exp.join("runs/atsf-s1-001/summary.json");
    let written = std::fs::metadata(&summary).unwrap().modified().unwrap();

    // Run again: a no-op.
    let out = simfreeze(&["compare", "--job", exp.to_str().unwrap(), "7"]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("kept: "), "{stderr}");
    assert_eq!(run_dirs(&exp), before);
    assert_eq!(
        std::fs::metadata(&summary).unwrap().modified().unwrap(),
        written
    );

    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("not finished"), "{stderr}");
    assert!(
        stdout.contains("| atsf |") && !stdout.contains("Incomplete"),
        "{stdout}"
    );

    // The same configuration in one process, and 2 at a time.
    compare_ok(&cfg, r#"name="seq""#);
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg_s,
        "--set",
        r#"name="par""#,
        "--parallel",
        "2",
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 at a time, 1 thread(s) each"), "{stderr}");
    let seq = results_without_wall(&dir.path().join("exp/seq-001"));
    assert_eq!(seq.len(), 9);
    assert_eq!(results_without_wall(&exp), seq);
    assert_eq!(results_without_wall(&dir.path().join("exp/par-001")), seq);
    for stem in ["timeline.png", "accuracy-speedup.svg", "table.md"] {
        assert!(exp.join(stem).is_file(), "{stem}");
    }
}

#[test]
fn collect_of_a_partial_plan_marks_what_is_missing_and_how_to_run_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "seeds=[0]",
        "--set",
        "pretrain=None",
        "--plan",
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
    let exp = dir.path().join("exp/tiny-001");
    // No pretraining stage: the fine-tunes are jobs 0..=3.
    finish(spawn_job(&exp, 0));
    finish(spawn_job(&exp, 2));
    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.contains("Incomplete: 2 of 4 fine-tunes"), "{stdout}");
    assert!(
        stderr.contains("job 1 (head-only, seed 0): not started")
            && stderr.contains("job 3 (ucf, seed 0): not started"),
        "{stderr}"
    );
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    let status: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap())
        .collect();
    assert_eq!(
        status,
        ["completed", "missing", "completed", "missing"],
        "{csv}"
    );
}
