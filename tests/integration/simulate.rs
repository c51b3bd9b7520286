//! `simfreeze simulate`: the JSON timeline contract and determinism.

use simfreeze_tests::{plugin, simfreeze, text};

fn simulate_json(extra: &[&str]) -> serde_json::Value {
    let lib = plugin("template");
    let mut args = vec!["simulate", "--policy", lib.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = simfreeze(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "exactly one JSON line: {stdout}");
    serde_json::from_str(&stdout).expect("valid JSON")
}

#[test]
fn json_timeline_has_the_documented_shape() {
    let v = simulate_json(&["--layers", "12", "--steps", "1000"]);
    let obj = v.as_object().unwrap();
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "freeze_step",
            "layers",
            "policy",
            "probe_steps",
            "scalars",
            "steps",
            "version"
        ]
    );
    assert_eq!(v["policy"], "template");
    assert_eq!(v["layers"], 12);
    assert_eq!(v["steps"], 1000);
    let fs = v["freeze_step"].as_array().unwrap();
    assert_eq!(fs.len(), 12);
    // Template default: one more block every 100 steps, so block i is frozen
    // from step 100 * (i + 1); blocks 10 and 11 never freeze in 1000 steps.
    for (i, s) in fs.iter().enumerate() {
        if i < 10 {
            assert_eq!(s.as_u64(), Some(100 * (i as u64 + 1)), "block {i}");
        } else {
            assert!(s.is_null(), "block {i}");
        }
    }
    assert_eq!(v["probe_steps"], 0);
    let frozen = v["scalars"]["frozen"].as_array().unwrap();
    assert_eq!(frozen.len(), 10);
    assert_eq!(frozen[0], serde_json::json!([99, 1.0]));
}

#[test]
fn options_reach_the_policy() {
    let v = simulate_json(&[
        "--layers",
        "6",
        "--steps",
        "100",
        "--policy-config",
        "(every: 10, keep_trainable: 2)",
    ]);
    let fs: Vec<_> = v["freeze_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64())
        .collect();
    assert_eq!(fs, [Some(10), Some(20), Some(30), Some(40), None, None]);
}

#[test]
fn same_seed_same_timeline() {
    let a = simulate_json(&["--steps", "300", "--seed", "3"]);
    let b = simulate_json(&["--steps", "300", "--seed", "3"]);
    assert_eq!(a, b);
}

#[test]
fn human_output_shows_the_timeline() {
    let lib = plugin("template");
    let out = simfreeze(&[
        "simulate",
        "--policy",
        lib.to_str().unwrap(),
        "--layers",
        "3",
        "--steps",
        "250",
    ]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("compute-model speedup"), "{stdout}");
    assert!(stdout.contains("    1  200"), "{stdout}");
}

#[test]
fn zero_layers_is_a_usage_error() {
    let lib = plugin("template");
    let out = simfreeze(&[
        "simulate",
        "--policy",
        lib.to_str().unwrap(),
        "--layers",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--layers must be at least 1"));
}
