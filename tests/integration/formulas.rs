//! FreezeOut's freeze steps through the real plugins and `simfreeze
//! simulate --json`, against `floor(t_i * T)` with
//! `t_i = f(t0 + (1 - t0) * i / L)`.

use simfreeze_tests::{plugin, simfreeze, text};

fn freeze_steps(policy: &str, options: &str, layers: u32, steps: u64) -> Vec<Option<u64>> {
    let lib = plugin(policy);
    let out = simfreeze(&[
        "simulate",
        "--policy",
        lib.to_str().unwrap(),
        "--policy-config",
        options,
        "--layers",
        &layers.to_string(),
        "--steps",
        &steps.to_string(),
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    v["freeze_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64())
        .collect()
}

fn expected(cubic: bool, t0: f64, layers: u32, steps: u64) -> Vec<Option<u64>> {
    (0..layers)
        .map(|i| {
            let x = t0 + (1.0 - t0) * f64::from(i) / f64::from(layers);
            let t = if cubic { x * x * x } else { x };
            Some((t * steps as f64).floor() as u64)
        })
        .collect()
}

#[test]
fn freezeout_freeze_steps_match_the_formula() {
    for (policy, cubic) in [("slf", false), ("ulf", false), ("scf", true), ("ucf", true)] {
        for (t0, layers, steps) in [(0.5, 12, 1000), (0.3, 8, 777), (0.8, 24, 5000)] {
            let got = freeze_steps(policy, &format!("(t0: {t0})"), layers, steps);
            assert_eq!(
                got,
                expected(cubic, t0, layers, steps),
                "{policy} t0={t0} L={layers} T={steps}"
            );
        }
    }
}

#[test]
fn freezeout_default_t0_is_one_half() {
    assert_eq!(
        freeze_steps("ucf", "", 12, 1000),
        expected(true, 0.5, 12, 1000)
    );
}
