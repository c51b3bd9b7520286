//! One conformance suite over every shipped policy (the runtime's
//! `conformance` module, which `simfreeze check` runs on any plugin), run
//! twice: statically (the strategy type behind the same SDK adapter the
//! export macro uses) and through the real `.so`; and `simfreeze check`
//! itself, which must pass every shipped policy and fail each way a policy
//! can break the contract.

use simfreeze_abi::sdk::policy_module;
use simfreeze_runtime::loader::Plugin;
use simfreeze_runtime::testkit::PolicyTest;
use simfreeze_tests::{fixture, plugin, simfreeze, text};

/// Every shipped policy plugin, by name.
const POLICIES: &[&str] = &[
    "atsf",
    "slf",
    "ulf",
    "scf",
    "ucf",
    "autofreeze",
    "template",
    "egeria",
    "pipetransformer",
    "layerfreezing",
    "smartfrz",
];

/// Options that make each policy act within a few dozen steps.
fn options(name: &str) -> &'static str {
    match name {
        "atsf" => "(record_steps: 3, compare_steps: 2)",
        "autofreeze" => "(interval: 4)",
        "template" => "(every: 3)",
        "egeria" => "(every: 2, window: 3, threshold: 0.5)",
        "pipetransformer" => "(branch: Gradient)",
        "smartfrz" => "(every: Some(2))",
        _ => "",
    }
}

fn static_test(name: &str) -> PolicyTest {
    let module = match name {
        "atsf" => policy_module::<simfreeze_atsf::Atsf>(),
        "slf" => policy_module::<simfreeze_freezeout::Slf>(),
        "ulf" => policy_module::<simfreeze_freezeout::Ulf>(),
        "scf" => policy_module::<simfreeze_freezeout::Scf>(),
        "ucf" => policy_module::<simfreeze_freezeout::Ucf>(),
        "autofreeze" => policy_module::<simfreeze_autofreeze::AutoFreeze>(),
        "template" => template::plugin_module(),
        "egeria" => policy_module::<simfreeze_field::Egeria>(),
        "pipetransformer" => policy_module::<simfreeze_field::PipeTransformer>(),
        "layerfreezing" => policy_module::<simfreeze_field::LayerFreezing>(),
        "smartfrz" => policy_module::<simfreeze_field::SmartFrz>(),
        other => panic!("no static build of {other}"),
    };
    PolicyTest::new(module).unwrap().with_options(options(name))
}

fn dynamic_test(name: &str) -> PolicyTest {
    let p = Plugin::load(&plugin(name)).unwrap();
    assert_eq!(p.meta.name, name);
    PolicyTest::from_plugin(p).with_options(options(name))
}

#[test]
fn every_shipped_policy_conforms_statically_and_through_its_so() {
    for name in POLICIES {
        static_test(name)
            .conformance(24)
            .unwrap_or_else(|e| panic!("{name} (static): {e}"));
        dynamic_test(name)
            .conformance(24)
            .unwrap_or_else(|e| panic!("{name} (.so): {e}"));
    }
}

#[test]
fn the_other_forms_of_the_field_rules_conform() {
    // The options POLICIES does not run: AutoFreeze's accumulated form,
    // PipeTransformer's schedule, Egeria with a float32 reference.
    type Module = fn() -> simfreeze_abi::sdk::PluginModules;
    let cases: [(Module, &str); 3] = [
        (
            policy_module::<simfreeze_autofreeze::AutoFreeze>,
            "(interval: 3, gradient: Accumulated)",
        ),
        (
            policy_module::<simfreeze_field::PipeTransformer>,
            "(alpha: 0.3)",
        ),
        (
            policy_module::<simfreeze_field::Egeria>,
            "(every: 2, window: 2, dtype: F32)",
        ),
    ];
    for (module, options) in cases {
        PolicyTest::new(module())
            .unwrap()
            .with_options(options)
            .conformance(24)
            .unwrap_or_else(|e| panic!("{options}: {e}"));
    }
}

#[test]
fn every_shipped_policy_is_covered() {
    // A new plugins/<policy> must join POLICIES.
    let mut shipped: Vec<String> = std::fs::read_dir(simfreeze_tests::repo_root().join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["cosine", "pearson", "cka", "rbf"].contains(&n.as_str()))
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = POLICIES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(shipped, listed);
}

#[test]
fn simfreeze_check_passes_every_shipped_policy() {
    for name in POLICIES {
        let out = simfreeze(&[
            "check",
            "--policy",
            name,
            "--policy-config",
            options(name),
            "--cases",
            "24",
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{name}: {stdout}{stderr}");
        assert_eq!(stdout.matches("      ok  ").count(), 2, "{stdout}");
    }
}

#[test]
fn simfreeze_check_fails_each_broken_policy_with_its_smallest_case() {
    let lib = fixture("misbehaving");
    for (mode, property, says) in [
        ("unfreeze", "the contract holds", "frontier went down"),
        (
            "probe_elsewhere",
            "the contract holds",
            "only the frontier block",
        ),
        (
            "forget_state",
            "a restored policy continues identically",
            "diverged",
        ),
        ("panic_on_batch_one", "the contract holds", "a batch of one"),
    ] {
        let opts = format!("(mode: {mode}, at: 3)");
        // RUST_BACKTRACE set, as it often is: the plugin's panic must still
        // be one line.
        let out = std::process::Command::new(simfreeze_tests::simfreeze_bin())
            .args(["check", "--policy", lib.to_str().unwrap()])
            .args(["--policy-config", &opts, "--cases", "32"])
            .env_remove("SIMFREEZE_PLUGIN_PATH")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(4), "{mode}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("  FAILED  {property}")),
            "{mode}: {stdout}"
        );
        assert!(
            stderr.contains(says) && stderr.contains("smallest failing run"),
            "{mode}: {stderr}"
        );
        // The plugin's panic is reported in one line, without frames.
        assert!(!stderr.contains("stack backtrace"), "{mode}: {stderr}");
        // In words, not as Rust structs, with the test kit call that
        // replays the case.
        assert!(
            !stderr.contains("HostileRun") && !stderr.contains("FreezeState {"),
            "{mode}: {stderr}"
        );
        let replay = match property {
            "the contract holds" => "test.simulate(&world).unwrap();",
            _ => "test.check_resume(&world, ",
        };
        assert!(
            stderr.contains("let world = SimConfig { layers: ") && stderr.contains(replay),
            "{mode}: {stderr}"
        );
        assert!(
            stdout.contains(&format!(".with_options({opts:?});")),
            "{mode}: {stdout}"
        );
        if mode == "forget_state" {
            // Which side is the restored policy, and why it diverged.
            assert!(
                stderr.contains("the restored one (restored from an empty state: its save_state returned no bytes)")
                    && stderr.contains("the original decided"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn simfreeze_check_refuses_bad_options_like_a_run() {
    let out = simfreeze(&[
        "check",
        "--policy",
        "template",
        "--policy-config",
        "(evry: 3)",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("every"), "{stderr}");
}
