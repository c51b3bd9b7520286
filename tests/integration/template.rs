//! The template plugin as a researcher uses it: copied out of this
//! repository, built as its own crate, and driven by `simfreeze simulate`.
//! Also linked statically, through the same root module the `.so` exports.

use std::fs;

use simfreeze_runtime::loader::Plugin;
use simfreeze_tests::{cargo_build, cargo_test, external_target, repo_root, simfreeze, text};

#[test]
fn template_builds_outside_the_repository_and_simulates() {
    let src = repo_root().join("plugins/template");
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my_policy");
    fs::create_dir_all(crate_dir.join("src")).unwrap();
    fs::copy(src.join("src/lib.rs"), crate_dir.join("src/lib.rs")).unwrap();
    // What the README tells a researcher to change: the paths to
    // simfreeze-abi and simfreeze-runtime, and the library name.
    let abi = repo_root().join("core/abi");
    let runtime = repo_root().join("core/runtime");
    let manifest = fs::read_to_string(src.join("Cargo.toml"))
        .unwrap()
        .replace(
            "path = \"../../core/abi\"",
            &format!("path = {:?}", abi.to_str().unwrap()),
        )
        .replace(
            "path = \"../../core/runtime\"",
            &format!("path = {:?}", runtime.to_str().unwrap()),
        )
        .replace("name = \"template\"", "name = \"my_policy\"")
        .replace(
            "name = \"simfreeze-plugin-template\"",
            "name = \"my-policy\"",
        );
    assert!(manifest.contains("my_policy") && manifest.contains(abi.to_str().unwrap()));
    assert!(manifest.contains(runtime.to_str().unwrap()));
    fs::write(crate_dir.join("Cargo.toml"), manifest).unwrap();
    // Same dependency versions as this workspace, so nothing new is fetched.
    fs::copy(repo_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    cargo_build(&crate_dir.join("Cargo.toml"));
    // Its own `cargo test` (the in-process test kit) passes there too, and
    // nothing in that build links libtorch.
    cargo_test(&crate_dir.join("Cargo.toml"));
    let torch_built = fs::read_dir(external_target().join("release/build"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("torch-sys"));
    assert!(!torch_built, "a plugin's tests must not build torch-sys");

    let lib = external_target().join("release/libmy_policy.so");
    let out = simfreeze(&[
        "simulate",
        "--policy",
        lib.to_str().unwrap(),
        "--layers",
        "12",
        "--steps",
        "1000",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["freeze_step"][0], 100);
}

#[test]
fn template_links_statically_through_its_root_module() {
    let p = Plugin::from_module(template::plugin_module(), "static:template".into()).unwrap();
    assert_eq!(p.meta.name, "template");
    let mut policy = p.new_policy("(every: 2)").unwrap();
    let report = simfreeze_runtime::simulate::simulate(
        policy_from(&mut policy),
        &simfreeze_runtime::simulate::SimConfig {
            layers: 3,
            steps: 10,
            steps_per_epoch: 5,
            classes: 2,
            dim: 4,
            batch: 2,
            seed: 0,
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(report.freeze_step, [Some(2), Some(4), Some(6)]);
}

fn policy_from(
    p: &mut simfreeze_runtime::loader::PolicyHandle,
) -> simfreeze_runtime::loader::PolicyHandle {
    // Round-trip the state through save/load into a fresh instance, which is
    // what resuming from a checkpoint does.
    let state = p.save_state(0).unwrap();
    let plugin = Plugin::from_module(template::plugin_module(), "static:template".into()).unwrap();
    let mut fresh = plugin.new_policy("(every: 2)").unwrap();
    fresh.load_state(0, &state).unwrap();
    fresh
}
