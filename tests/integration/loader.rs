//! Loading real plugin libraries: each failure gives a short error naming the
//! plugin's path, the documented exit code, and never a panic across the FFI
//! boundary.

use simfreeze_runtime::loader::{LoadError, Plugin, SearchPath};
use simfreeze_tests::{fixture, plugin, simfreeze, text};

const FFI_ABORT: &str = "panic across the ffi boundary";

/// Runs `simulate` on `lib` with `options`; returns (exit code, stderr).
fn simulate_with(lib: &std::path::Path, options: &str) -> (i32, String) {
    let out = simfreeze(&[
        "simulate",
        "--policy",
        lib.to_str().unwrap(),
        "--policy-config",
        options,
        "--layers",
        "4",
        "--steps",
        "20",
    ]);
    let (_, stderr) = text(&out);
    assert!(!stderr.to_lowercase().contains(FFI_ABORT), "{stderr}");
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
    (out.status.code().expect("exit code"), stderr)
}

fn assert_short_and_names(stderr: &str, lib: &std::path::Path) {
    assert!(
        stderr.contains(lib.to_str().unwrap()),
        "path not named: {stderr}"
    );
    assert!(stderr.lines().count() <= 3, "too long: {stderr}");
}

#[test]
fn non_plugin_library_is_not_a_plugin() {
    let lib = fixture("not_a_plugin");
    assert!(matches!(
        Plugin::load(&lib),
        Err(LoadError::NotAPlugin { .. })
    ));
    let (code, err) = simulate_with(&lib, "");
    assert_eq!(code, 3);
    assert!(err.contains("not a simfreeze plugin"), "{err}");
    assert_short_and_names(&err, &lib);
}

#[test]
fn plugin_for_another_abi_version_is_an_abi_mismatch() {
    let lib = fixture("other_abi");
    match Plugin::load(&lib) {
        Err(LoadError::AbiMismatch { plugin, host, .. }) => {
            assert_eq!(plugin, "0.0.1");
            assert_eq!(host, simfreeze_abi::ABI_VERSION);
        }
        other => panic!("expected AbiMismatch, got {other:?}"),
    }
    let (code, err) = simulate_with(&lib, "");
    assert_eq!(code, 3);
    assert!(
        err.contains("ABI 0.0.1") && err.contains("Rebuild"),
        "{err}"
    );
    assert_short_and_names(&err, &lib);
}

#[test]
fn plugin_with_foreign_types_is_a_layout_mismatch() {
    let lib = fixture("bad_layout");
    assert!(matches!(
        Plugin::load(&lib),
        Err(LoadError::AbiLayout { .. })
    ));
    let (code, err) = simulate_with(&lib, "");
    assert_eq!(code, 3);
    assert!(err.contains("types differ"), "{err}");
    assert_short_and_names(&err, &lib);
}

#[test]
fn constructor_error_is_reported_with_its_message() {
    let lib = fixture("misbehaving");
    let p = Plugin::load(&lib).unwrap();
    assert!(matches!(
        p.new_policy("(mode: error_new)"),
        Err(LoadError::Constructor { .. })
    ));
    let (code, err) = simulate_with(&lib, "(mode: error_new)");
    assert_eq!(code, 3);
    assert!(err.contains("this constructor always fails"), "{err}");
    assert_short_and_names(&err, &lib);
}

#[test]
fn constructor_panic_is_caught() {
    let lib = fixture("misbehaving");
    let p = Plugin::load(&lib).unwrap();
    assert!(matches!(
        p.new_policy("(mode: panic_new)"),
        Err(LoadError::Panic { .. })
    ));
    let (code, err) = simulate_with(&lib, "(mode: panic_new)");
    assert_eq!(code, 3);
    assert!(
        err.contains("panicked") && err.contains("deliberate panic"),
        "{err}"
    );
    assert_short_and_names(&err, &lib);
}

#[test]
fn panic_mid_run_stops_with_the_step() {
    let lib = fixture("misbehaving");
    let (code, err) = simulate_with(&lib, "(mode: panic_decide, at: 7)");
    assert_eq!(code, 4);
    assert!(err.contains("panicked at step 7"), "{err}");
    assert!(
        err.contains("misbehaving/src/lib.rs"),
        "location missing: {err}"
    );
    assert_short_and_names(&err, &lib);
}

#[test]
fn policy_error_mid_run_stops_with_the_step() {
    let lib = fixture("misbehaving");
    let (code, err) = simulate_with(&lib, "(mode: error_decide, at: 3)");
    assert_eq!(code, 4);
    assert!(err.contains("failed at step 3"), "{err}");
}

#[test]
fn contract_violation_names_policy_step_and_decision() {
    let lib = fixture("misbehaving");
    let (code, err) = simulate_with(&lib, "(mode: unfreeze, at: 4)");
    assert_eq!(code, 4);
    assert!(err.contains("`misbehaving`"), "{err}");
    assert!(err.contains("step 4"), "{err}");
    assert!(err.contains("frontier=0"), "{err}");
}

#[test]
fn unknown_option_lists_the_valid_ones() {
    let lib = plugin("template");
    let (code, err) = simulate_with(&lib, "(evry: 3)");
    assert_eq!(code, 3);
    assert!(
        err.contains("evry") && err.contains("every") && err.contains("keep_trainable"),
        "{err}"
    );
}

#[test]
fn missing_plugin_lists_where_it_looked() {
    let out = simfreeze(&["simulate", "--policy", "no_such_policy"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(3));
    assert!(err.contains("libno_such_policy.so"), "{err}");
    let out = simfreeze(&["simulate", "--policy", "/nonexistent/libx.so"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).1.contains("/nonexistent/libx.so"));
}

#[test]
fn several_plugins_load_side_by_side() {
    // `load_from_file` would hand back the first library for every path;
    // our loader must keep them apart.
    let a = Plugin::load(&plugin("template")).unwrap();
    let b = Plugin::load(&fixture("misbehaving")).unwrap();
    assert_eq!(a.meta.name, "template");
    assert_eq!(b.meta.name, "misbehaving");
    assert_eq!(
        Plugin::load(&plugin("template")).unwrap().meta.name,
        "template"
    );
}

#[test]
fn search_path_env_var_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("misbehaving"), dir.path().join("libtemplate.so")).unwrap();
    let sp = SearchPath {
        dirs: vec![
            dir.path().to_owned(),
            plugin("template").parent().unwrap().to_owned(),
        ],
    };
    assert_eq!(sp.load("template").unwrap().meta.name, "misbehaving");
}

#[test]
fn plugins_command_lists_the_template_with_options() {
    let out = simfreeze(&["plugins", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v["plugins"].as_array().unwrap();
    let t = list
        .iter()
        .find(|p| p["name"] == "template")
        .expect("template listed");
    assert_eq!(t["kind"], "policy");
    assert_eq!(t["abi_version"], simfreeze_abi::ABI_VERSION);
    let names: Vec<_> = t["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].clone())
        .collect();
    assert_eq!(names, ["every", "keep_trainable"]);
    let out = simfreeze(&["plugins"]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("option every = 100"), "{stdout}");
}
