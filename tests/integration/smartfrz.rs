//! SmartFRZ's whole procedure on a tiny model: runs in the plugin's record
//! mode write the training data, `smartfrz-train` trains a predictor on it
//! (checking the plugin's forward against libtorch's), and a run with that
//! predictor file freezes with it.

use std::process::Command;

use simfreeze_field::smartfrz::{Predictor, Snapshot};
use simfreeze_tests::{plugin, profile_dir, simfreeze, simfreeze_bin, text, tiny_run_config};

fn run(dir: &std::path::Path, name: &str, seed: u64, policy_options: &str) -> serde_json::Value {
    let cfg = tiny_run_config(dir, name, &format!("seed: {seed}"), "");
    let lib = plugin("smartfrz");
    let out = simfreeze(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--policy",
        lib.to_str().unwrap(),
        "--policy-config",
        policy_options,
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary = dir.join(format!("runs/{name}-001/summary.json"));
    serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap()
}

#[test]
fn recordings_train_a_predictor_that_a_run_then_freezes_with() {
    let dir = tempfile::tempdir().unwrap();
    let mut recordings = Vec::new();
    for seed in [0u64, 1] {
        let rec = dir.path().join(format!("rec-{seed}.jsonl"));
        let options = format!(
            "(record: Some({:?}), every: Some(1))",
            rec.to_str().unwrap()
        );
        let summary = run(dir.path(), &format!("record-{seed}"), seed, &options);
        assert!(
            summary["freeze_step"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f.is_null()),
            "record mode never freezes: {summary}"
        );
        let lines: Vec<Snapshot> = std::fs::read_to_string(&rec)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 16 steps, every step observed from the second on (asked one step
        // ahead), the last included.
        assert_eq!(
            lines.len(),
            15,
            "{:?}",
            lines.iter().map(|l| l.step).collect::<Vec<_>>()
        );
        assert_eq!((lines[0].layers, lines[0].samples), (3, 64));
        assert_eq!(lines[0].grams.len(), 3 * lines[0].rows * lines[0].rows);
        recordings.push(rec);
    }
    simfreeze_bin(); // the workspace, smartfrz-train included, is built
    let predictor = dir.path().join("predictor.json");
    let out = Command::new(profile_dir().join("smartfrz-train"))
        .args(&recordings)
        .args(["--window", "3", "--recorded-every", "1", "--every", "2"])
        .args(["--tau", "0.9", "--epochs", "20", "--hidden", "8", "--out"])
        .arg(&predictor)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("plugin forward against libtorch"),
        "{stdout}"
    );
    let p = Predictor::from_json(&std::fs::read_to_string(&predictor).unwrap()).unwrap();
    assert_eq!((p.window, p.every, p.hidden, p.samples), (3, 2, 8, 64));
    let (pos, neg) = p.provenance.windows;
    assert!(pos + neg > 0);
    // Threshold 0: the first full window of each block freezes it.
    let options = format!(
        "(predictor: Some({:?}), threshold: 0.0)",
        predictor.to_str().unwrap()
    );
    let summary = run(dir.path(), "use", 0, &options);
    let freeze = summary["freeze_step"].as_array().unwrap();
    assert!(freeze[0].is_u64() && freeze[1].is_u64(), "{summary}");
    assert!(
        freeze[2].is_null(),
        "the last block never freezes: {summary}"
    );
}
