//! Checkpoint and resume, interruption, fault containment and bad input:
//! a run survives its user's and its plugins' mistakes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use simfreeze_tests::{fixture, simfreeze, simfreeze_bin, text};

/// A tiny synthetic run: 2 epochs of 8 steps.
/// The shared tiny run with weight decay; `extra_train` adds train fields
/// (`", checkpoint_every: 3"`).
fn config(dir: &Path, extra_train: &str, policy: &str) -> PathBuf {
    let train = format!("sgd: (lr: 0.05, weight_decay: 0.01){extra_train}");
    simfreeze_tests::tiny_run_config(dir, "r", &train, policy)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// metrics.csv without the wall-clock column.
fn metrics_without_time(run: &Path) -> Vec<String> {
    fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

const ATSF: &str =
    r#"policy: (plugin: "atsf", options: "(record_steps: 2, compare_steps: 2, max_frozen: 3)"),"#;

#[test]
fn resumed_run_ends_with_exactly_the_metrics_of_an_uninterrupted_one() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), ", checkpoint_every: 3", ATSF);
    let cfg = cfg.to_str().unwrap();

    let full = simfreeze(&["run", "--config", cfg]);
    assert!(full.status.success(), "{}", text(&full).1);
    let a = d.path().join("runs/r-001");

    // Stop mid-epoch (step 5 of 16), then resume to the end.
    let stopped = simfreeze(&["run", "--config", cfg, "--stop-after", "5"]);
    assert_eq!(stopped.status.code(), Some(130), "{}", text(&stopped).1);
    let b = d.path().join("runs/r-002");
    assert!(text(&stopped)
        .1
        .contains(&format!("simfreeze run --resume {}", b.display())));
    assert_eq!(json(&b.join("summary.json"))["status"], "interrupted");
    assert_eq!(json(&b.join("checkpoint.json"))["step"], 5);

    let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);

    assert_eq!(metrics_without_time(&a), metrics_without_time(&b));
    let (sa, sb) = (json(&a.join("summary.json")), json(&b.join("summary.json")));
    for key in [
        "status",
        "final_top1",
        "best_top1",
        "steps",
        "compute_cost",
        "freeze_step",
        "probe_steps",
    ] {
        assert_eq!(sa[key], sb[key], "{key}");
    }
    assert_eq!(
        fs::read_to_string(a.join("events.jsonl")).unwrap(),
        fs::read_to_string(b.join("events.jsonl")).unwrap()
    );
    // Only the latest checkpoint's tensors are kept, next to the final
    // model.
    let tensors: Vec<_> = fs::read_dir(&b)
        .unwrap()
        .filter(|e| {
            let name = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            name.starts_with("checkpoint-") && name.ends_with(".safetensors")
        })
        .collect();
    assert_eq!(tensors.len(), 1);
    assert!(b.join("model.safetensors").is_file());
}

/// The fine-tuning recipe of DINOv2-style backbones: AdamW, layer-wise lr
/// decay, clipping and label smoothing on a LayerScale model, with a
/// policy that freezes. A run stopped mid-epoch and resumed ends with a
/// byte-identical model, the same metrics and the same events.
#[test]
fn resumed_adamw_run_is_byte_identical_to_an_uninterrupted_one() {
    let d = tempfile::tempdir().unwrap();
    let train = "optimizer: AdamW, adamw: (lr: 0.003, weight_decay: 0.05, warmup_steps: 2), \
                 layer_decay: 0.75, clip_grad_norm: 1.0, label_smoothing: 0.1, checkpoint_every: 3";
    let cfg = simfreeze_tests::tiny_run_config(d.path(), "r", train, ATSF);
    let text_cfg = fs::read_to_string(&cfg)
        .unwrap()
        .replace("mlp_ratio: 2.0)", "mlp_ratio: 2.0, init_values: 0.1)");
    fs::write(&cfg, text_cfg).unwrap();
    let cfg = cfg.to_str().unwrap();

    let full = simfreeze(&["run", "--config", cfg]);
    assert!(full.status.success(), "{}", text(&full).1);
    let a = d.path().join("runs/r-001");
    let stopped = simfreeze(&["run", "--config", cfg, "--stop-after", "5"]);
    assert_eq!(stopped.status.code(), Some(130), "{}", text(&stopped).1);
    let b = d.path().join("runs/r-002");
    // The checkpoint holds the Adam moments and step counts.
    let ck = json(&b.join("checkpoint.json"));
    let tensors = b.join(ck["weights"].as_str().unwrap());
    let names = tch::Tensor::read_safetensors(&tensors).unwrap();
    for kind in ["adamw.exp_avg/", "adamw.exp_avg_sq/", "adamw.step/"] {
        assert!(
            names.iter().any(|(n, _)| n.starts_with(kind)),
            "no {kind} in {}",
            tensors.display()
        );
    }
    let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);

    assert_eq!(metrics_without_time(&a), metrics_without_time(&b));
    assert_eq!(
        fs::read_to_string(a.join("events.jsonl")).unwrap(),
        fs::read_to_string(b.join("events.jsonl")).unwrap()
    );
    let (ma, mb) = (
        fs::read(a.join("model.safetensors")).unwrap(),
        fs::read(b.join("model.safetensors")).unwrap(),
    );
    assert!(
        ma == mb,
        "the resumed model differs from the uninterrupted one"
    );
    let freezes = fs::read_to_string(a.join("events.jsonl")).unwrap();
    assert!(
        freezes.contains("\"freeze\""),
        "the policy froze nothing:\n{freezes}"
    );
}

#[test]
fn sigint_finishes_the_step_checkpoints_and_says_how_to_resume() {
    let d = tempfile::tempdir().unwrap();
    // Long enough to still be running when the signal comes.
    let cfg = config(d.path(), "", "");
    let child = Command::new(simfreeze_bin())
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.epochs=2000",
        ])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = d.path().join("runs/r-001");
    let started = run.join("events.jsonl");
    simfreeze_tests::interrupt_once_exists(&child, &started, Duration::from_millis(300));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // The hint names the binary as it was started (not on PATH after setup).
    let hint = format!("resume with: {} run --resume", simfreeze_bin().display());
    assert!(stderr.contains(&hint), "{stderr}");
    let ck = json(&run.join("checkpoint.json"));
    assert!(ck["step"].as_u64().unwrap() > 0);
    assert_eq!(json(&run.join("summary.json"))["status"], "interrupted");
}

#[test]
fn policy_panic_stops_cleanly_keeping_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let lib = fixture("misbehaving");
    let policy = format!(
        r#"policy: (plugin: {:?}, options: "(mode: panic_decide, at: 11)"),"#,
        lib.to_str().unwrap()
    );
    let cfg = config(d.path(), ", checkpoint_every: 4", &policy);
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("panicked at step 11"), "{err}");
    assert!(err.contains("resume with"), "{err}");
    let run = d.path().join("runs/r-001");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    assert!(summary["reason"]
        .as_str()
        .unwrap()
        .contains("deliberate panic"));
    // The epoch-end checkpoint at step 8 survives the fault.
    assert_eq!(json(&run.join("checkpoint.json"))["step"], 8);
}

#[test]
fn contract_violation_stops_the_run_with_exit_4() {
    let d = tempfile::tempdir().unwrap();
    let lib = fixture("misbehaving");
    let policy = format!(
        r#"policy: (plugin: {:?}, options: "(mode: unfreeze, at: 3)"),"#,
        lib.to_str().unwrap()
    );
    let cfg = config(d.path(), "", &policy);
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let summary = json(&d.path().join("runs/r-001/summary.json"));
    assert!(summary["reason"]
        .as_str()
        .unwrap()
        .contains("freezing contract"));
}

#[test]
fn diverging_loss_is_reported_at_its_step() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "", "");
    let out = simfreeze(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.sgd.lr=1e30",
    ]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("training loss is") && err.contains("at step"),
        "{err}"
    );
    assert_eq!(
        json(&d.path().join("runs/r-001/summary.json"))["status"],
        "failed"
    );
}

#[test]
fn unwritable_output_directory_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let blocker = d.path().join("runs");
    fs::write(&blocker, "a file where the output directory should be").unwrap();
    let cfg = config(d.path(), "", "");
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("cannot create the output directory") && err.contains("runs"),
        "{err}"
    );
}

#[test]
fn resume_without_checkpoint_or_directory_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let out = simfreeze(&["run", "--resume", d.path().join("nope").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
    assert!(text(&out).1.contains("config.ron"));
}

#[test]
fn corrupt_and_truncated_dataset_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fmnist");
    fs::create_dir_all(&root).unwrap();
    for f in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        fs::write(root.join(f), b"not gzip").unwrap();
    }
    let cfg = d.path().join("c.ron");
    fs::write(
        &cfg,
        format!(
            "(data: (source: FashionMnist(root: {:?})))",
            root.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("train-images-idx3-ubyte.gz") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn wrong_type_and_unknown_key_are_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.ron");
    fs::write(&p, "(train: (epochs: \"two\"))").unwrap();
    let out = simfreeze(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("c.ron:1:"), "{}", text(&out).1);
    fs::write(&p, "(trian: ())").unwrap();
    let out = simfreeze(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("trian"));
}

#[test]
fn cuda_on_a_machine_without_it_is_a_usage_error_in_one_paragraph() {
    if tch::Cuda::device_count() > 0 {
        return; // this machine has a GPU: cuda:0 is valid here
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "", "");
    for device in ["cuda:0", "cuda"] {
        let set = format!("train.device={device:?}");
        let out = simfreeze(&["run", "--config", cfg.to_str().unwrap(), "--set", &set]);
        let err = text(&out).1;
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("train.device") && err.contains("no CUDA device"),
            "{err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("frame #"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one paragraph: {err}");
    }
    // Nothing was created: the device is checked before the run directory.
    assert!(!d.path().join("runs").exists());
}

#[test]
fn a_libtorch_error_mid_run_fails_it_keeps_the_checkpoint_and_resume_finishes() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), ", checkpoint_every: 3", ATSF);
    let cfg = cfg.to_str().unwrap();
    let full = simfreeze(&["run", "--config", cfg]);
    assert!(full.status.success(), "{}", text(&full).1);
    let a = d.path().join("runs/r-001");

    // Step 10 (in epoch 1, after the checkpoint of step 9) hits an
    // operation libtorch refuses.
    let out = Command::new(simfreeze_bin())
        .args(["run", "--config", cfg])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .env("RUST_BACKTRACE", "0")
        .env("SIMFREEZE_FAULT_AT_STEP", "10")
        .output()
        .unwrap();
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("libtorch failed fetching the batch of step 10")
            && err.contains("cannot be multiplied"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("frame #"),
        "{err}"
    );
    let b = d.path().join("runs/r-002");
    assert!(
        err.contains(&format!("simfreeze run --resume {}", b.display())),
        "{err}"
    );
    let summary = json(&b.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    assert_eq!(summary["device"], "cpu");
    assert!(summary["reason"]
        .as_str()
        .unwrap()
        .contains("libtorch failed"));
    assert_eq!(json(&b.join("checkpoint.json"))["step"], 9);

    let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    assert_eq!(json(&b.join("summary.json"))["status"], "completed");
    assert_eq!(metrics_without_time(&a), metrics_without_time(&b));
}

#[test]
fn config_holes_are_refused_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "", "");
    let cfg = cfg.to_str().unwrap();
    for (set, expected) in [
        ("train.sgd.lr=-0.1", "train.sgd.lr is -0.1"),
        ("train.sgd.momentum=1.0", "train.sgd.momentum is 1"),
        ("train.sgd.momentum=-0.5", "train.sgd.momentum is -0.5"),
        (
            "train.sgd.weight_decay=-0.01",
            "train.sgd.weight_decay is -0.01",
        ),
        (r#"name="../../escape""#, r#"name is "../../escape""#),
        (r#"name="""#, r#"name is """#),
        (r#"name="..""#, r#"name is "..""#),
        (
            "data.classes=Some([1, 1, 2])",
            "data.classes lists class 1 twice",
        ),
        ("train.layer_decay=1.5", "train.layer_decay is 1.5"),
        ("train.layer_decay=0.0", "train.layer_decay is 0"),
        ("train.clip_grad_norm=-1.0", "train.clip_grad_norm is -1"),
        ("train.label_smoothing=1.0", "train.label_smoothing is 1"),
        (r#"model.global_pool="max""#, "model.global_pool"),
        ("model.class_token=false", "needs the class token"),
    ] {
        let out = simfreeze(&["run", "--config", cfg, "--set", set]);
        let err = text(&out).1;
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(expected), "{set}: {err}");
    }
    // AdamW's own settings, checked when it is the optimizer.
    for (set, expected) in [
        ("train.adamw.lr=-1.0", "train.adamw.lr is -1"),
        ("train.adamw.beta2=1.0", "train.adamw.beta2 is 1"),
        ("train.adamw.eps=0.0", "train.adamw.eps is 0"),
        (
            "train.adamw.weight_decay=-0.1",
            "train.adamw.weight_decay is -0.1",
        ),
    ] {
        let out = simfreeze(&[
            "run",
            "--config",
            cfg,
            "--set",
            "train.optimizer=AdamW",
            "--set",
            set,
        ]);
        let err = text(&out).1;
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(expected), "{set}: {err}");
    }
    assert!(!d.path().join("runs").exists(), "nothing ran");
    assert!(!d.path().join("escape").exists());
}

#[test]
fn reading_gradient_norms_without_asking_names_the_missing_needs_bit() {
    let d = tempfile::tempdir().unwrap();
    let lib = fixture("misbehaving");
    let policy = format!(
        r#"policy: (plugin: {:?}, options: "(mode: undeclared_grad_norms)"),"#,
        lib.to_str().unwrap()
    );
    let cfg = config(d.path(), "", &policy);
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let err = text(&out).1;
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("Needs::GRAD_NORMS") && err.contains("at step 0"),
        "{err}"
    );
}

#[test]
fn a_relative_plugin_path_resumes_from_anywhere_and_a_moved_library_is_named_on_resume() {
    let d = tempfile::tempdir().unwrap();
    let lib_dir = d.path().join("lib");
    fs::create_dir_all(&lib_dir).unwrap();
    fs::copy(
        simfreeze_tests::plugin("template"),
        lib_dir.join("libmine.so"),
    )
    .unwrap();
    let cfg = config(d.path(), ", checkpoint_every: 3", "");
    let run_from = |cwd: &Path, args: &[&str]| {
        Command::new(simfreeze_bin())
            .args(args)
            .current_dir(cwd)
            .env_remove("SIMFREEZE_PLUGIN_PATH")
            .output()
            .unwrap()
    };
    let start = [
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--policy",
        "./lib/libmine.so",
        "--policy-config",
        "(every: 2)",
        "--stop-after",
        "5",
    ];
    let out = run_from(d.path(), &start);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out).1);
    let a = d.path().join("runs/r-001");
    let recorded = fs::read_to_string(a.join("config.ron")).unwrap();
    let abs = fs::canonicalize(lib_dir.join("libmine.so")).unwrap();
    assert!(recorded.contains(abs.to_str().unwrap()), "{recorded}");
    // From another working directory.
    let out = run_from(
        &std::env::temp_dir(),
        &["run", "--resume", a.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out).1);

    // The library moves: resume says where it looked, then takes --policy.
    let out = run_from(d.path(), &start);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out).1);
    let b = d.path().join("runs/r-002");
    let moved = d.path().join("moved");
    fs::rename(&lib_dir, &moved).unwrap();
    let out = run_from(d.path(), &["run", "--resume", b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out).1);
    let new_lib = moved.join("libmine.so");
    let resume = [
        "run",
        "--resume",
        b.to_str().unwrap(),
        "--policy",
        new_lib.to_str().unwrap(),
    ];
    let out = run_from(d.path(), &resume);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(metrics_without_time(&a), metrics_without_time(&b));
}

/// `train.record_observations`: one record per step, cut back to the
/// checkpoint when a failed run resumes (so no step appears twice and the
/// file equals an uninterrupted run's), and replaying the records through
/// a fresh ATSF gives every freeze state the run took.
#[test]
fn recorded_observations_survive_a_resume_and_replay_to_the_runs_decisions() {
    use simfreeze_runtime::driver::{PolicyDriver, StepInput};
    use simfreeze_runtime::loader::Plugin;
    use simfreeze_runtime::observations::ObservationRecord;
    const OPTIONS: &str = "(record_steps: 2, compare_steps: 2, tolerance: 0.5)";

    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        ", checkpoint_every: 4, record_observations: true",
        &format!(r#"policy: (plugin: "atsf", options: "{OPTIONS}"),"#),
    );
    let cfg = cfg.to_str().unwrap();
    let full = simfreeze(&["run", "--config", cfg]);
    assert!(full.status.success(), "{}", text(&full).1);
    let a = d.path().join("runs/r-001/observations.jsonl");

    // Fails fetching step 10: steps 8 and 9 were recorded after the
    // checkpoint of step 8, and are recorded again on resume.
    let out = Command::new(simfreeze_bin())
        .args(["run", "--config", cfg])
        .env_remove("SIMFREEZE_PLUGIN_PATH")
        .env("SIMFREEZE_FAULT_AT_STEP", "10")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out).1);
    let b = d.path().join("runs/r-002");
    assert_eq!(json(&b.join("checkpoint.json"))["step"], 8);
    let before = fs::read_to_string(b.join("observations.jsonl")).unwrap();
    assert_eq!(before.lines().count(), 10);
    let resumed = simfreeze(&["run", "--resume", b.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    let recorded = fs::read_to_string(&a).unwrap();
    assert_eq!(
        fs::read_to_string(b.join("observations.jsonl")).unwrap(),
        recorded
    );

    let records: Vec<ObservationRecord> = recorded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 16);
    assert!(records.iter().all(|r| r.features.len() == r.batch * 12));
    let plugin = Plugin::load(&simfreeze_tests::plugin("atsf")).unwrap();
    let mut driver = PolicyDriver::new(Some(plugin.new_policy(OPTIONS).unwrap()), 3);
    for r in &records {
        driver
            .after_step(&StepInput {
                step: r.step,
                epoch: r.epoch,
                steps_per_epoch: r.steps_per_epoch,
                total_steps: r.total_steps,
                loss: r.loss as f32,
                batch: r.batch,
                features: &r.features,
                feature_dim: r.feature_dim,
                labels: &r.labels,
                num_classes: r.num_classes,
                grad_norms: &r.grad_norms,
                lr: r.lr,
                more: simfreeze_abi::ffi::ObservationV2::EMPTY,
            })
            .unwrap();
        assert_eq!(driver.state(), &r.after, "step {}", r.step);
    }
    assert!(
        records.last().unwrap().after.frontier > 0,
        "ATSF froze nothing"
    );
}
