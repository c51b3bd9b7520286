//! The statistics of `simfreeze compare` end to end: paired intervals and
//! verdicts in `points.csv`, the selection and its confirmation through a
//! plan of jobs (equal to the sequential comparison, an interrupted
//! confirmation job resumed), seeds added to a precision, and the compute
//! speedup charged with what a policy observes.

use std::path::Path;
use std::process::Command;

use simfreeze_tests::{fixture, simfreeze, simfreeze_bin, text};

use crate::compare::{config, results_without_wall};

/// `points.csv` of `exp` as rows of fields (a quoted label kept whole).
fn points(exp: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(exp.join("points.csv")).unwrap();
    text.lines().skip(1).map(split_csv).collect()
}

fn split_csv(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// `points.csv` without its wall-clock columns (the last four but one).
fn points_without_wall(exp: &Path) -> Vec<Vec<String>> {
    points(exp)
        .into_iter()
        .map(|mut f| {
            f.drain(18..21);
            f
        })
        .collect()
}

fn field<'a>(row: &'a [String], header: &str) -> &'a str {
    let names: Vec<&str> = "stage,label,family,n,top1_mean,d_acc_mean,d_acc_std,d_acc_ci_low,\
        d_acc_ci_high,d_acc_half_width,verdict,within_margin,compute_speedup,compute_ci_low,\
        compute_ci_high,train_compute_speedup,train_compute_ci_low,train_compute_ci_high,\
        wall_speedup,wall_ci_low,wall_ci_high,frozen_blocks"
        .split(',')
        .collect();
    let i = names.iter().position(|n| *n == header).unwrap();
    &row[i]
}

fn job(exp: &Path, n: usize, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(simfreeze_bin());
    c.args(["compare", "--job", exp.to_str().unwrap(), &n.to_string()]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

const CONFIRM: &str =
    r#"policies=[(plugin: "slf", grid: ["(t0: 0.1)", "(t0: 0.3)", "(t0: 0.6)"]), (plugin: "ucf")]"#;

#[test]
fn a_confirmation_through_a_plan_equals_the_sequential_comparison_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let cfg_s = cfg.to_str().unwrap();
    let sets = ["--set", CONFIRM, "--set", "confirm_seeds=Some([5, 6])"];

    // Sequentially.
    let out = simfreeze(&[&["compare", "--config", cfg_s], &sets[..]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("selection (on seeds [0, 1])"), "{stderr}");
    assert!(
        stdout.contains("Confirmation: the selected points")
            && stdout.contains("### Selection (seeds 0, 1)"),
        "{stdout}"
    );
    let seq = dir.path().join("exp/tiny-001");
    let seq_points = points(&seq);
    let confirmed: Vec<&str> = seq_points
        .iter()
        .filter(|p| p[0] == "confirm")
        .map(|p| p[1].as_str())
        .collect();
    assert_eq!(&confirmed[..2], ["baseline", "head-only"], "{seq_points:?}");
    assert!(confirmed.len() > 2, "{seq_points:?}");
    for stem in ["fronts.png", "fronts-selection.png", "points.csv"] {
        assert!(seq.join(stem).is_file(), "{stem}");
    }

    // As a plan: pretraining, the grid, collect (the selection), the
    // confirmation, collect.
    let out = simfreeze(
        &[
            &[
                "compare",
                "--config",
                cfg_s,
                "--set",
                r#"name="plan""#,
                "--plan",
            ],
            &sets[..],
        ]
        .concat(),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let exp = dir.path().join("exp/plan-001");
    // 1 + 2 seeds x 6 arms; 2 confirmation seeds x (2 + 2 policies x 3 bands).
    assert!(stdout.contains("planned 29 jobs"), "{stdout}");
    assert!(
        stdout.contains("plans the confirmation (jobs 13..=28)"),
        "{stdout}"
    );
    // A confirmation job before the selection says what to do.
    let out = job(&exp, 15, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("compare --collect"), "{stderr}");
    for n in 0..=12 {
        let out = job(&exp, n, &[]);
        assert!(out.status.success(), "job {n}: {}", text(&out).1);
    }
    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the confirmation is planned"), "{stderr}");
    assert!(exp.join("selection.json").is_file());
    // The confirmation, one job killed at its step 9 (after the first
    // epoch's checkpoint) and run again: it resumes.
    for n in 13..=28 {
        if n == 13 {
            let out = job(&exp, n, &[("SIMFREEZE_KILL_RANK_AT_STEP", "0:9")]);
            assert!(!out.status.success(), "the kill hook fired");
            let out = job(&exp, n, &[]);
            let (_, stderr) = text(&out);
            assert!(out.status.success(), "{stderr}");
            assert!(stderr.contains("resuming"), "{stderr}");
            continue;
        }
        let out = job(&exp, n, &[]);
        assert!(out.status.success(), "job {n}: {}", text(&out).1);
    }
    let out = simfreeze(&["compare", "--collect", exp.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(results_without_wall(&exp), results_without_wall(&seq));
    assert_eq!(points_without_wall(&exp), points_without_wall(&seq));

    // Two at a time.
    let out = simfreeze(
        &[
            &[
                "compare",
                "--config",
                cfg_s,
                "--set",
                r#"name="par""#,
                "--parallel",
                "2",
            ],
            &sets[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let par = dir.path().join("exp/par-001");
    assert_eq!(results_without_wall(&par), results_without_wall(&seq));
    assert_eq!(points_without_wall(&par), points_without_wall(&seq));
}

#[test]
fn identical_runs_give_no_difference_and_observation_is_charged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let lib = fixture("observe_all");
    let lib = lib.to_str().unwrap();
    // A policy that never freezes and never asks (twice), one that reads
    // block tokens on the fixed batch every 2 steps, and Egeria.
    let policies = format!(
        r#"policies=[
            (plugin: {lib:?}, label: "never-a", options: "(max_frozen: 0, ask: 0)"),
            (plugin: {lib:?}, label: "never-b", options: "(max_frozen: 0, ask: 0)"),
            (plugin: {lib:?}, label: "probe-tokens", options: "(every: 2, max_frozen: 2, ask: 72)"),
            (plugin: "egeria", options: "(every: 2, window: 2, threshold: 0.4)"),
        ]"#
    );
    let stderr = compare_ok_sets(&cfg, &[&policies, "seeds=[0, 1, 2]"]);
    assert!(!stderr.contains("error"), "{stderr}");
    let exp = dir.path().join("exp/tiny-001");
    let pts = points(&exp);
    let row = |label: &str| pts.iter().find(|p| p[1] == label).unwrap().clone();
    for never in ["never-a", "never-b"] {
        let p = row(never);
        for (h, want) in [
            ("n", "3"),
            ("d_acc_mean", "0.000"),
            ("d_acc_std", "0.000"),
            ("d_acc_ci_low", "0.000"),
            ("d_acc_ci_high", "0.000"),
            ("verdict", "no difference"),
            ("within_margin", "true"),
        ] {
            assert_eq!(
                field(&p, h).trim_start_matches('-'),
                want,
                "{never} {h}: {p:?}"
            );
        }
    }
    for observing in ["probe-tokens", "egeria"] {
        let p = row(observing);
        let charged: f64 = field(&p, "compute_speedup").parse().unwrap();
        let train: f64 = field(&p, "train_compute_speedup").parse().unwrap();
        assert!(charged < train, "{observing}: {charged} vs {train}");
    }
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .contains("train_compute_speedup,observe_units"),
        "{csv}"
    );
    let summary = std::fs::read_to_string(exp.join("runs/egeria-s0-001/summary.json")).unwrap();
    for key in [
        "\"observe_cost\"",
        "\"weights_sha256\"",
        "\"libtorch\"",
        "\"revision\"",
    ] {
        assert!(summary.contains(key), "{key} in {summary}");
    }
}

fn compare_ok_sets(cfg: &Path, sets: &[&str]) -> String {
    let mut args = vec!["compare", "--config", cfg.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = simfreeze(&args);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn seeds_are_added_to_a_precision_and_stop_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let base = [r#"policies=[(plugin: "ucf")]"#, "head_only=false"];
    // Out of reach: rounds until max_seeds.
    let stderr = compare_ok_sets(
        &cfg,
        &[
            base[0],
            base[1],
            r#"name="cap""#,
            "precision_pp=Some(0.001)",
            "max_seeds=Some(4)",
        ],
    );
    assert!(
        stderr.contains("adding seed 2") && stderr.contains("adding seed 3"),
        "{stderr}"
    );
    let pts = points(&dir.path().join("exp/cap-001"));
    let ucf = pts.iter().find(|p| p[1] == "ucf").unwrap();
    assert_eq!(field(ucf, "n"), "4", "{pts:?}");
    // Already within: no round.
    let stderr = compare_ok_sets(
        &cfg,
        &[
            base[0],
            base[1],
            r#"name="wide""#,
            "precision_pp=Some(1000.0)",
        ],
    );
    assert!(!stderr.contains("adding seed"), "{stderr}");
    let pts = points(&dir.path().join("exp/wide-001"));
    assert_eq!(field(pts.iter().find(|p| p[1] == "ucf").unwrap(), "n"), "2");
    // Refused: a precision that is no precision, a cap below the listed
    // seeds, confirmation seeds that overlap the selection's.
    for (set, want) in [
        ("precision_pp=Some(0.0)", "precision_pp must be"),
        ("max_seeds=Some(1)", "max_seeds has no effect"),
        ("confirm_seeds=Some([1, 7])", "share seed(s) 1"),
        ("confirm_seeds=Some([])", "confirm_seeds is empty"),
    ] {
        let out = simfreeze(&["compare", "--config", cfg.to_str().unwrap(), "--set", set]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {stderr}");
        assert!(stderr.contains(want), "{set}: {stderr}");
    }
    let out = simfreeze(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "precision_pp=Some(0.5)",
        "--slurm",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
}
