//! The plugin contract across versions: a plugin built against ABI 0.1.0
//! (contract 1) and never rebuilt loads in this host and decides exactly as
//! the same policy built from today's source, and so does a contract-2
//! plugin built against ABI 0.1.1 before the SDK was split; a contract-2
//! policy that asks
//! for every on-demand observation runs, passes `check`, and resumes
//! byte-identically.

use std::fs;
use std::path::Path;
use std::process::Command;

use simfreeze_runtime::loader::Plugin;
use simfreeze_tests::{fixture, plugin, simfreeze, simfreeze_bin, text, tiny_run_config};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn policy(path: &Path, options: &str) -> String {
    format!(
        "policy: (plugin: {:?}, options: {options:?}),",
        path.to_str().unwrap()
    )
}

#[test]
fn a_plugin_built_against_abi_0_1_0_decides_exactly_as_todays_build() {
    let old = fixture("autofreeze_v1");
    let new = plugin("autofreeze");
    let (o, n) = (Plugin::load(&old).unwrap(), Plugin::load(&new).unwrap());
    assert_eq!((o.meta.abi_version.as_str(), o.meta.contract), ("0.1.0", 1));
    assert_eq!(n.meta.contract, 2);
    assert_eq!(o.meta.name, n.meta.name);

    let d = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, lib) in [("old", &old), ("new", &new)] {
        let dir = d.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let cfg = tiny_run_config(&dir, name, "", &policy(lib, "(interval: 2)"));
        let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out).1);
        runs.push(dir.join(format!("runs/{name}-001")));
    }
    let summary = |r: &Path| json(&r.join("summary.json"));
    let (a, b) = (summary(&runs[0]), summary(&runs[1]));
    assert_eq!(a["freeze_step"], b["freeze_step"]);
    assert!(
        a["freeze_step"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| !s.is_null()),
        "AutoFreeze froze nothing: {}",
        a["freeze_step"]
    );
    let model = |r: &Path| fs::read(r.join("model.safetensors")).unwrap();
    assert!(
        model(&runs[0]) == model(&runs[1]),
        "the final weights differ"
    );
}

#[test]
fn a_contract_2_plugin_built_before_the_sdk_split_decides_exactly_as_todays_build() {
    let old = fixture("observe_all_v2");
    let new = fixture("observe_all");
    let (o, n) = (Plugin::load(&old).unwrap(), Plugin::load(&new).unwrap());
    assert_eq!((o.meta.abi_version.as_str(), o.meta.contract), ("0.1.1", 2));
    assert_eq!(n.meta.contract, 2);
    let d = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, lib) in [("old", &old), ("new", &new)] {
        let dir = d.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let options = "(every: 2, tol: 0.5, max_frozen: 2)";
        let cfg = tiny_run_config(&dir, name, "", &policy(lib, options));
        let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out).1);
        runs.push(dir.join(format!("runs/{name}-001")));
    }
    let summary = |r: &Path| json(&r.join("summary.json"));
    let (a, b) = (summary(&runs[0]), summary(&runs[1]));
    assert_eq!(a["freeze_step"], b["freeze_step"]);
    assert_eq!(a["observe_cost"], b["observe_cost"]);
    let events = |r: &Path| fs::read_to_string(r.join("events.jsonl")).unwrap();
    assert_eq!(
        events(&runs[0]),
        events(&runs[1]),
        "the same decisions and scalars"
    );
    assert!(
        events(&runs[0]).contains("\"scalar\""),
        "it observed and logged"
    );
    let model = |r: &Path| fs::read(r.join("model.safetensors")).unwrap();
    assert!(
        model(&runs[0]) == model(&runs[1]),
        "the final weights differ"
    );
}

#[test]
fn plugins_lists_each_plugins_contract() {
    let dir = fixture("autofreeze_v1");
    let out = Command::new(simfreeze_bin())
        .arg("plugins")
        .env("SIMFREEZE_PLUGIN_PATH", dir.parent().unwrap())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
            .to_string()
    };
    assert!(line("autofreeze (policy 0.1.0, ABI 0.1.0, contract 1)").contains("contract 1"));
    assert!(line("atsf").contains("ABI 0.1.1, contract 2"), "{stdout}");
    assert!(line("observe_all").contains("contract 2"), "{stdout}");
}

#[test]
fn a_run_observing_everything_resumes_byte_identically() {
    let lib = fixture("observe_all");
    for (dtype, every) in [(2, 2), (1, 3)] {
        let d = tempfile::tempdir().unwrap();
        let options = format!("(every: {every}, tol: 10.0, dtype: {dtype})");
        let cfg = tiny_run_config(
            d.path(),
            "o",
            "checkpoint_every: 5",
            &policy(&lib, &options),
        );
        let cfg = cfg.to_str().unwrap();
        let full = simfreeze(&["run", "--config", cfg]);
        assert!(full.status.success(), "{}", text(&full).1);
        let stopped = simfreeze(&["run", "--config", cfg, "--stop-after", "5"]);
        assert_eq!(stopped.status.code(), Some(130), "{}", text(&stopped).1);
        let (a, b) = (d.path().join("runs/o-001"), d.path().join("runs/o-002"));
        // The checkpoint (after step 4) holds the reference and, when the
        // last read was before step 4, the gradient sums.
        let ck = json(&b.join("checkpoint.json"));
        let names = tch::Tensor::read_safetensors(b.join(ck["weights"].as_str().unwrap())).unwrap();
        let kinds: &[&str] = match every {
            3 => &["observer.reference/", "grad_sum/"],
            _ => &["observer.reference/"],
        };
        for kind in kinds {
            assert!(names.iter().any(|(n, _)| n.starts_with(kind)), "no {kind}");
        }
        let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
        assert!(resumed.status.success(), "{}", text(&resumed).1);
        let events = |r: &Path| fs::read_to_string(r.join("events.jsonl")).unwrap();
        assert_eq!(events(&a), events(&b));
        for scalar in ["sp_loss", "sp_probe", "cka", "acc_l2", "weights", "tokens"] {
            assert!(events(&a).contains(scalar), "no {scalar}:\n{}", events(&a));
        }
        assert!(events(&a).contains("\"freeze\""), "nothing froze");
        let model = |r: &Path| fs::read(r.join("model.safetensors")).unwrap();
        assert!(model(&a) == model(&b), "the resumed model differs");
    }
}

#[test]
fn check_exercises_the_on_demand_observations() {
    let lib = fixture("observe_all");
    let out = simfreeze(&[
        "check",
        "--policy",
        lib.to_str().unwrap(),
        "--policy-config",
        "(every: 1)",
        "--cases",
        "16",
    ]);
    let (stdout, stderr) = text(&out);
    // The fixture reads every observation, NaN included, without failing.
    assert!(out.status.success(), "{stdout}{stderr}");
}

#[test]
fn the_reference_is_reported_at_every_step_not_only_at_observed_ones() {
    // The fixture asks for the reference once (when the host reports none)
    // and for observations every 4th step; a host that reported the
    // reference only at observed steps would have it taken again and again.
    let lib = fixture("observe_all");
    let d = tempfile::tempdir().unwrap();
    let options = "(every: 4, ask: 56)";
    let cfg = tiny_run_config(d.path(), "r", "", &policy(&lib, options));
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let events = fs::read_to_string(d.path().join("runs/r-001/events.jsonl")).unwrap();
    let steps: Vec<(u64, f64)> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["name"] == "reference_step")
        .map(|e| (e["step"].as_u64().unwrap(), e["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(steps.len(), 16, "{events}");
    assert_eq!(steps[0], (0, -1.0));
    assert!(steps[1..].iter().all(|(_, v)| *v == 0.0), "{steps:?}");
}
