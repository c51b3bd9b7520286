//! Helpers for the workspace-level integration tests: where the built
//! binary and plugins are, building the failure fixtures and out-of-tree
//! plugins, and running the CLI.
//!
//! The tests use the artifacts of the same cargo profile they were built
//! with (`target/release` under `cargo test --release`) and bring them up to
//! date once per run with a nested `cargo build --workspace`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `target/<profile>` of the running test binary.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary directory");
    deps.parent().expect("profile directory").to_owned()
}

/// Brings the binary and the workspace's plugins up to date for this
/// profile, once per test process (`cargo test` builds neither a
/// dependency's binary nor the cdylibs, so a stale one would be tested).
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--manifest-path"])
            .arg(repo_root().join("Cargo.toml"));
        if profile_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo");
        assert!(
            out.status.success(),
            "building the workspace failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The `simfreeze` binary of this profile.
pub fn simfreeze_bin() -> PathBuf {
    ensure_built();
    let bin = profile_dir().join("simfreeze");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace with the same profile first \
         (`cargo build --release --workspace`, or scripts/test.sh)",
        bin.display()
    );
    bin
}

/// A plugin library built by this workspace, e.g. `plugin("template")`.
pub fn plugin(name: &str) -> PathBuf {
    ensure_built();
    let p = profile_dir().join(format!("lib{name}.so"));
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first",
        p.display()
    );
    p
}

/// Runs `simfreeze` with `args`, with the plugin search path limited to this
/// profile's output directory.
pub fn simfreeze(args: &[&str]) -> Output {
    Command::new(simfreeze_bin())
        .args(args)
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run simfreeze")
}

/// Target directory for crates built outside the workspace (fixtures, the
/// out-of-tree template), shared so their dependencies compile once.
pub fn external_target() -> PathBuf {
    repo_root().join("target").join("external")
}

/// Builds a crate (or workspace) at `manifest` in release mode into
/// [`external_target`]; panics with cargo's output on failure.
pub fn cargo_build(manifest: &Path) {
    cargo_release("build", manifest);
}

/// Runs the tests of the crate at `manifest` in release mode, built into
/// [`external_target`]; panics with cargo's output on failure.
pub fn cargo_test(manifest: &Path) {
    cargo_release("test", manifest);
}

fn cargo_release(command: &str, manifest: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([command, "--release", "--quiet", "--manifest-path"])
        .arg(manifest)
        .env("CARGO_TARGET_DIR", external_target())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {command} {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fixture plugins (tests/fixtures, and the frozen contract-2 plugin
/// of tests/fixtures/contract2, a workspace of its own), built once per
/// test process.
pub fn fixture(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo_build(&repo_root().join("tests/fixtures/Cargo.toml"));
        cargo_build(&repo_root().join("tests/fixtures/contract2/Cargo.toml"));
    });
    external_target()
        .join("release")
        .join(format!("libfixture_{name}.so"))
}

/// stdout and stderr of a finished command, as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `c.ron` in `dir`: a tiny ViT (8x8 inputs, 3 blocks) on synthetic
/// data, 2 epochs of 8 steps, runs under `dir/runs/<name>-NNN`. `train` adds
/// fields to the train section (e.g. `sgd: (lr: 0.05)`), `extra` top-level
/// fields (e.g. a policy).
pub fn tiny_run_config(dir: &Path, name: &str, train: &str, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"(
    name: {name:?},
    output: {out:?},
    model: (preset: "tiny_fmnist", image_size: 8, patch: 4, dim: 12, depth: 3, heads: 3, mlp_ratio: 2.0),
    data: (source: Synthetic(train: 64, eval: 32, classes: 4)),
    train: (epochs: 2, batch: 8, threads: 1, device: "cpu", {train}),
    {extra}
)"#,
        out = dir.join("runs").to_str().unwrap()
    );
    let path = dir.join("c.ron");
    std::fs::write(&path, cfg).expect("write config");
    path
}

/// The Python of the repository's environment (`.venv`, made by
/// scripts/setup.sh), which has torch 2.11.0, timm and transformers.
pub fn venv_python() -> PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup.sh (it creates the environment with timm)",
        py.display()
    );
    py
}

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeExamples;

/// The contract page's Rust examples (a contract-2 policy), compiled and
/// run as doctests.
#[doc = include_str!("../../docs/contract.md")]
#[cfg(doctest)]
pub struct ContractExamples;

/// The template README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../../plugins/template/README.md")]
#[cfg(doctest)]
pub struct TemplateReadmeExamples;

/// Sends SIGINT to `child` once `path` exists and `after` has passed (the
/// run it watches has started and taken some steps).
pub fn interrupt_once_exists(child: &std::process::Child, path: &Path, after: std::time::Duration) {
    let started = std::time::Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(after);
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -INT {pid}");
}
