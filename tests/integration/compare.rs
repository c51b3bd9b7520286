//! `simfreeze compare` end to end on a tiny synthetic task: pretraining is
//! cached and reused, every (policy, seed) gets a row, the outputs exist.

use simfreeze_tests::{simfreeze, text};

pub(crate) fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = format!(
        r#"(
    name: "tiny",
    output: {out:?},
    model: (preset: "tiny_fmnist", image_size: 8, patch: 4, dim: 12, depth: 3, heads: 3, mlp_ratio: 2.0),
    data: (source: Synthetic(train: 96, eval: 48, classes: 4)),
    pretrain: (classes: [0, 1], train: (epochs: 1, batch: 8, threads: 1, device: "cpu", sgd: (lr: 0.05))),
    finetune: (classes: [2, 3], train: (epochs: 2, batch: 8, threads: 1, device: "cpu", sgd: (lr: 0.02))),
    seeds: [0, 1],
    policies: [
        (plugin: "atsf", options: "(record_steps: 2, compare_steps: 2)"),
        (plugin: "ucf"),
    ],
)"#,
        out = dir.join("exp").to_str().unwrap()
    );
    let path = dir.join("compare.ron");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `simfreeze compare --config cfg --set set`; asserts success and returns
/// its standard error.
pub(crate) fn compare_ok(cfg: &std::path::Path, set: &str) -> String {
    let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap(), "--set", set]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn compare_writes_table_results_and_plots_and_reuses_pretraining() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pretraining (cached afterwards"),
        "{stderr}"
    );
    for label in ["| baseline |", "| head-only |", "| atsf |", "| ucf |"] {
        assert!(stdout.contains(label), "{label} missing from\n{stdout}");
    }
    assert!(stdout.contains("Regime: head-only"), "{stdout}");
    let exp = dir.path().join("exp/tiny-001");
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 8, "{csv}");
    // Head-only froze every block from step 0: the compute model's 3x.
    let head: Vec<&str> = rows[1].split(',').collect();
    assert_eq!(
        (head[0], head[6], head[7]),
        ("head-only", "3.0000", "3"),
        "{csv}"
    );
    // The baseline's d-acc is 0 and its speedups 1 by definition.
    let baseline: Vec<&str> = rows[0].split(',').collect();
    assert_eq!(&baseline[..3], ["baseline", "0", "completed"]);
    assert_eq!(baseline[4], "0.00");
    assert_eq!(
        std::fs::read_to_string(exp.join("table.md"))
            .unwrap()
            .trim(),
        stdout.trim()
    );
    for stem in ["timeline", "accuracy-speedup", "eta-atsf"] {
        for ext in ["svg", "png"] {
            let f = exp.join(format!("{stem}.{ext}"));
            assert!(
                f.metadata().map(|m| m.len() > 500).unwrap_or(false),
                "{}",
                f.display()
            );
        }
    }
    // Every fine-tune started from the same pretrained weights.
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("exp"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pretrain-"))
        .collect();
    assert_eq!(cached.len(), 1);

    // Second run: pretraining comes from the cache, a new experiment dir.
    let stderr = compare_ok(&cfg, "seeds=[3]");
    assert!(stderr.contains("pretraining: cached"), "{stderr}");
    assert!(dir.path().join("exp/tiny-002/table.md").is_file());

    // A pretraining run that finished but never reached the cache (the
    // process died in between, or it was resumed by hand) is adopted.
    let cache = cached[0].path();
    std::fs::remove_file(cache.join("model.safetensors")).unwrap();
    let stderr = compare_ok(&cfg, "seeds=[4]");
    assert!(stderr.contains("adopting the finished run"), "{stderr}");
    assert!(cache.join("model.safetensors").is_file() && cache.join("model.json").is_file());
}

#[test]
fn overlapping_source_and_target_classes_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "finetune.classes=[1, 2]",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("class 1"), "{stderr}");
}

#[test]
fn a_bad_policy_option_fails_before_anything_trains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        r#"policies=[(plugin: "ucf", options: "(t0: 7.0)")]"#,
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(!stderr.contains("pretraining"), "{stderr}");
    assert!(
        !dir.path().join("exp").exists(),
        "nothing should be written"
    );
}

#[test]
fn compare_config_holes_are_refused_before_anything_trains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    for (set, expected) in [
        (
            "pretrain.classes=[0, 0, 1]",
            "pretrain.classes lists class 0 twice",
        ),
        (
            "finetune.classes=[2, 3, 3]",
            "finetune.classes lists class 3 twice",
        ),
        ("finetune.train.sgd.lr=-1.0", "finetune.train.sgd.lr is -1"),
        (
            "pretrain.train.sgd.momentum=1.5",
            "pretrain.train.sgd.momentum is 1.5",
        ),
        (r#"name="a/b""#, r#"name is "a/b""#),
    ] {
        let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap(), "--set", set]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {stderr}");
        assert!(stderr.contains(expected), "{set}: {stderr}");
    }
    assert!(
        !dir.path().join("exp").exists(),
        "nothing should be written"
    );
}

/// results.csv without the wall-clock columns (wall speedup, seconds) and
/// the run directories.
pub(crate) fn results_without_wall(exp: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(exp.join("results.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            [&f[..5], &f[6..8]].concat().join(",")
        })
        .collect()
}

#[test]
fn an_interrupted_comparison_resumes_to_the_same_results() {
    use std::process::{Command, Stdio};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    compare_ok(&cfg, r#"name="full""#);

    let child = Command::new(simfreeze_tests::simfreeze_bin())
        .args([
            "compare",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            r#"name="cut""#,
        ])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exp = dir.path().join("exp/cut-001");
    let started_atsf = exp.join("runs/atsf-s0-001/events.jsonl");
    simfreeze_tests::interrupt_once_exists(&child, &started_atsf, Duration::ZERO);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let hint = format!("compare --resume {}", exp.display());
    assert!(stderr.contains(&hint), "{stderr}");
    assert!(!exp.join("results.csv").exists(), "stopped before the end");

    // From another working directory: the experiment finds its cache.
    let out = Command::new(simfreeze_tests::simfreeze_bin())
        .args(["compare", "--resume", exp.to_str().unwrap()])
        .current_dir(std::env::temp_dir())
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("pretraining: cached"), "{stderr}");
    assert!(stderr.contains("kept: "), "{stderr}");
    assert_eq!(
        results_without_wall(&dir.path().join("exp/full-001")),
        results_without_wall(&exp)
    );
}

#[test]
fn a_grid_runs_every_point_and_reports_the_fronts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let stderr = compare_ok(
        &cfg,
        r#"policies=[(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.9)"]), (plugin: "ucf")]"#,
    );
    assert!(
        stderr.contains("fine-tuning: slf (t0: 0.3), seed 1"),
        "{stderr}"
    );
    let exp = dir.path().join("exp/tiny-001");
    let table = std::fs::read_to_string(exp.join("table.md")).unwrap();
    assert!(
        table.contains("| slf (t0: 0.3) |") && table.contains("| slf (t0: 0.9) |"),
        "{table}"
    );
    assert!(
        table.contains("| slf | 2 |") && table.contains("| ucf | 1 |"),
        "{table}"
    );
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    assert!(
        csv.contains("\"slf (t0: 0.3)\",0,completed") || csv.contains("slf (t0: 0.3),0,completed"),
        "{csv}"
    );
    assert!(exp.join("runs/slf-g2-s1-001").is_dir());
    for ext in ["svg", "png"] {
        assert!(exp.join(format!("fronts.{ext}")).is_file());
    }
}

#[test]
fn per_stage_keys_in_data_and_unknown_keys_are_refused_with_what_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    for (set, expected) in [
        ("data.train_limit=Some(12)", "use finetune.train_limit"),
        ("data.classes=Some([0, 1])", "use finetune.classes"),
        (
            "train_limit=12",
            "the top level has backbone, confirm_seeds, data, finetune",
        ),
        (
            "finetune.train.epoks=1",
            "`finetune.train` has adamw, batch",
        ),
    ] {
        let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap(), "--set", set]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {stderr}");
        assert!(stderr.contains(expected), "{set}: {stderr}");
    }
}

#[test]
fn a_shipped_backbone_replaces_the_pretraining_and_a_tampered_one_is_refused() {
    use simfreeze::run::provenance::sha256_of;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    compare_ok(&cfg, "seeds=[0]");
    let cache = std::fs::read_dir(dir.path().join("exp"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("pretrain-"))
        .unwrap()
        .path();
    // Ship the pretraining's result, as backbones/ does.
    let shipped = dir.path().join("backbone");
    std::fs::create_dir_all(&shipped).unwrap();
    for f in ["model.safetensors", "model.json"] {
        std::fs::copy(cache.join(f), shipped.join(f)).unwrap();
    }
    let weights = shipped.join("model.safetensors");
    let sha = sha256_of(&weights).unwrap();
    let set = format!(
        "backbone=Some((path: {:?}, sha256: {sha:?}))",
        weights.to_str().unwrap()
    );
    let out_dir = dir.path().join("fresh");
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "seeds=[0]",
        "--set",
        &set,
        "--set",
        &format!("output={:?}", out_dir.to_str().unwrap()),
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the shipped backbone") && stderr.contains("sha256 verified"),
        "{stderr}"
    );
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("pretrain-")),
        "nothing pretrains: {names:?}"
    );
    let exp = out_dir.join("tiny-001");
    // The same weights, seeds and data: the same results as the run that
    // pretrained them; every row records the backbone's digest.
    assert_eq!(
        results_without_wall(&exp),
        results_without_wall(&dir.path().join("exp/tiny-001"))
    );
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    assert_eq!(
        csv.lines().skip(1).filter(|l| l.contains(&sha)).count(),
        4,
        "{csv}"
    );

    // One byte changed: refused before anything trains, both digests named.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let tampered = sha256_of(&weights).unwrap();
    let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap(), "--set", &set]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&sha) && stderr.contains(&tampered) && stderr.contains("model.safetensors"),
        "{stderr}"
    );
}

/// `compare --only LABEL --seed N` runs that one fine-tune (after the
/// pretraining the config needs), on a seed the config does not list, in
/// an experiment of its own; an unknown label is refused with the labels.
#[test]
fn only_runs_one_point_of_a_comparison_on_any_seed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let c = cfg.to_str().unwrap();
    let out = simfreeze(&["compare", "--config", c, "--only", "ucf", "--seed", "7"]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let runs: Vec<String> = std::fs::read_dir(dir.path().join("exp/tiny-001/runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(runs, ["ucf-s7-001"], "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("exp/tiny-001/runs/ucf-s7-001/summary.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary["status"], "completed");
    assert!(stderr.contains("compare --collect"), "{stderr}");

    let out = simfreeze(&["compare", "--config", c, "--only", "sfl", "--seed", "0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no such point")
            && stderr.contains("`ucf`")
            && stderr.contains("`baseline`"),
        "{stderr}"
    );
}

/// `--plan` and then `--slurm` (or `--plan` again) on the same
/// configuration reuse the planned experiment directory in which nothing
/// ran, instead of leaving it orphaned; once something ran, a new one is
/// made.
#[test]
fn a_planned_experiment_is_reused_until_something_runs_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let c = cfg.to_str().unwrap();
    for args in [
        vec!["compare", "--config", c, "--plan"],
        vec!["compare", "--config", c, "--plan"],
        vec!["compare", "--config", c, "--slurm"],
    ] {
        let out = simfreeze(&args);
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
    }
    let exps = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path().join("exp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("tiny-"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(exps(), ["tiny-001"]);
    assert!(dir.path().join("exp/tiny-001/slurm").is_dir());
    // Its Slurm scripts are written: the next plan is another experiment.
    let out = simfreeze(&["compare", "--config", c, "--plan"]);
    assert!(out.status.success());
    assert_eq!(exps(), ["tiny-001", "tiny-002"]);
    // Another configuration never reuses it.
    let out = simfreeze(&["compare", "--config", c, "--plan", "--set", "seeds=[5]"]);
    assert!(out.status.success());
    assert_eq!(exps(), ["tiny-001", "tiny-002", "tiny-003"]);
}
