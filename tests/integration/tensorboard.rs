//! TensorBoard event files, read back with the real `tensorboard` package
//! (tests/tensorboard/read_scalars.py): every tag with the right steps and
//! values, and a resumed run's file without duplicated or missing steps.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use simfreeze_tests::{repo_root, simfreeze, text, tiny_run_config, venv_python};

type Scalars = BTreeMap<String, Vec<(u64, f64)>>;

fn read_scalars(run: &Path) -> Scalars {
    let out = Command::new(venv_python())
        .arg("-W")
        .arg("ignore")
        .arg(repo_root().join("tests/tensorboard/read_scalars.py"))
        .arg(run)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let raw: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_str(&stdout).unwrap();
    raw
}

const ATSF: &str =
    r#"policy: (plugin: "atsf", options: "(record_steps: 2, compare_steps: 2, max_frozen: 3)"),"#;

fn steps(s: &Scalars, tag: &str) -> Vec<u64> {
    s.get(tag)
        .unwrap_or_else(|| panic!("no {tag} in {:?}", s.keys()))
        .iter()
        .map(|p| p.0)
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

#[test]
fn every_tag_is_read_back_with_its_steps_and_values() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_run_config(d.path(), "tb", "sgd: (lr: 0.05)", ATSF);
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let run = d.path().join("runs/tb-001");
    let s = read_scalars(&run);

    // Per step: loss, lr, freeze state; 2 epochs of 8 steps.
    let all: Vec<u64> = (0..16).collect();
    for tag in ["train/loss", "train/lr", "freeze/frontier", "freeze/probe"] {
        assert_eq!(steps(&s, tag), all, "{tag}");
    }
    // Per epoch, at its last step: the rows of metrics.csv.
    let metrics = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<f64>> = metrics
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    for tag in [
        "eval/top1",
        "eval/loss",
        "train/epoch_loss",
        "perf/images_per_sec",
    ] {
        assert_eq!(steps(&s, tag), vec![7, 15], "{tag}");
    }
    for (i, row) in rows.iter().enumerate() {
        // The row's frozen blocks are the frontier its last step ran with.
        let last = (i + 1) * 8 - 1;
        assert_eq!(s["freeze/frontier"][last], (last as u64, row[5]), "{row:?}");
        assert!(close(s["train/epoch_loss"][i].1, row[1]), "{row:?}");
        assert!(close(s["eval/loss"][i].1, row[2]), "{row:?}");
        assert!(close(s["eval/top1"][i].1, row[3]), "{row:?}");
        // The epoch's loss is the mean of its steps' losses.
        let mean: f64 = s["train/loss"][i * 8..(i + 1) * 8]
            .iter()
            .map(|p| p.1)
            .sum::<f64>()
            / 8.0;
        assert!(close(mean, row[1]), "{mean} vs {}", row[1]);
    }
    // Every policy scalar of events.jsonl, at its step.
    let events = fs::read_to_string(run.join("events.jsonl")).unwrap();
    let mut policy: Scalars = BTreeMap::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["event"] == "scalar" {
            let tag = format!("policy/{}", e["name"].as_str().unwrap());
            let point = (e["step"].as_u64().unwrap(), e["value"].as_f64().unwrap());
            policy.entry(tag).or_default().push(point);
        }
    }
    assert!(!policy.is_empty(), "ATSF logs eta");
    for (tag, points) in &policy {
        let got = &s[tag];
        assert_eq!(got.len(), points.len(), "{tag}");
        for (g, p) in got.iter().zip(points) {
            assert!(g.0 == p.0 && close(g.1, p.1), "{tag}: {g:?} vs {p:?}");
        }
    }
    // The frontier reaches what the summary says.
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let frozen = summary["freeze_step"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v.is_null())
        .count() as f64;
    let last_frontier = s["freeze/frontier"].last().unwrap().1;
    assert!(last_frontier <= frozen && frozen - last_frontier <= 1.0);
}

#[test]
fn a_resumed_runs_event_file_has_every_step_once() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_run_config(d.path(), "tb", "sgd: (lr: 0.05), checkpoint_every: 3", ATSF);
    let cfg = cfg.to_str().unwrap();
    let full = simfreeze(&["run", "--config", cfg]);
    assert!(full.status.success(), "{}", text(&full).1);
    // A libtorch failure at step 7: the last checkpoint is after step 5
    // (every 3 steps), and step 6's scalars were written after it; the
    // resume must cut them and write them once.
    let failed = Command::new(simfreeze_tests::simfreeze_bin())
        .args(["run", "--config", cfg])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .env("SIMFREEZE_FAULT_AT_STEP", "7")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(7), "{}", text(&failed).1);
    let b = d.path().join("runs/tb-002");
    let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);

    let (sa, sb) = (
        read_scalars(&d.path().join("runs/tb-001")),
        read_scalars(&b),
    );
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (tag, a) in &sa {
        let b = &sb[tag];
        let (sa_steps, sb_steps): (Vec<u64>, Vec<u64>) = (
            a.iter().map(|p| p.0).collect(),
            b.iter().map(|p| p.0).collect(),
        );
        assert_eq!(sa_steps, sb_steps, "{tag}: no step twice, none missing");
        if !tag.starts_with("perf/") {
            for (x, y) in a.iter().zip(b) {
                assert!(close(x.1, y.1), "{tag}: {x:?} vs {y:?}");
            }
        }
    }
}

#[test]
fn tensorboard_off_writes_no_event_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_run_config(d.path(), "tb", "sgd: (lr: 0.05), tensorboard: false", "");
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let run = d.path().join("runs/tb-001");
    assert!(run.join("metrics.csv").is_file());
    assert!(!run.join("events.out.tfevents.simfreeze").exists());
}
