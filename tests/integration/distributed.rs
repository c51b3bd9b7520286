//! Data-parallel training under torchrun (Gloo on the CPU, 127.0.0.1), from
//! the project's Python environment: two ranks train exactly as one process
//! with the global batch, frozen blocks leave the all-reduce, and a lost
//! rank fails the run with its name while the last checkpoint resumes on
//! two ranks.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use simfreeze_tests::{simfreeze, simfreeze_bin, text, venv_python};
use tch::Tensor;

/// `torchrun --standalone --nproc-per-node N --no-python simfreeze ARGS`.
fn torchrun(n: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let torchrun = venv_python().with_file_name("torchrun");
    let mut cmd = Command::new(torchrun);
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        &n.to_string(),
        "--no-python",
    ])
    .arg(simfreeze_bin())
    .args(args)
    .env("SIMFREEZE_PLUGIN_PATH", simfreeze_bin().parent().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run torchrun")
}

/// The shared tiny run: 64 images, 2 epochs, batch 4 per rank, the
/// template policy freezing one more block every 3 steps.
fn config(dir: &Path) -> PathBuf {
    let path = simfreeze_tests::tiny_run_config(
        dir,
        "d",
        "sgd: (lr: 0.05, momentum: 0.9, weight_decay: 0.01), checkpoint_every: 2, \
         dist_timeout_s: 30",
        r#"policy: (plugin: "template", options: "(every: 3)"),"#,
    );
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("batch: 8", "batch: 4")).unwrap();
    path
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn events(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == kind)
        .collect()
}

/// Per-step `train/loss` from the run's TensorBoard file.
fn losses(run: &Path) -> Vec<f64> {
    let out = Command::new(venv_python())
        .arg(simfreeze_tests::repo_root().join("tests/tensorboard/read_scalars.py"))
        .arg(run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// The block a parameter belongs to for freezing (`None`: the head).
fn block_of(name: &str) -> Option<usize> {
    if let Some(rest) = name.strip_prefix("blocks.") {
        return rest.split('.').next()?.parse().ok();
    }
    ["cls_token", "pos_embed", "patch_embed"]
        .iter()
        .any(|s| name.starts_with(s))
        .then_some(0)
}

#[test]
fn two_ranks_train_exactly_like_one_process_with_the_global_batch() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let cfg = cfg.to_str().unwrap();
    let two = torchrun(2, &["run", "--config", cfg], &[]);
    let (stdout, stderr) = text(&two);
    assert!(two.status.success(), "{stderr}");
    let a = d.path().join("runs/d-001");
    let one = simfreeze(&["run", "--config", cfg, "--set", "train.batch=8"]);
    assert!(one.status.success(), "{}", text(&one).1);
    let b = d.path().join("runs/d-002");

    // Rank 0 alone prints the summary and writes the run directory.
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["world_size"], 2);
    assert_eq!(summary["global_batch"], 8);
    assert!(!d.path().join("runs/d-003").exists());

    // (a) Every rank ends with bit-identical weights.
    let digests = summary["weight_digests"].as_array().unwrap();
    assert_eq!(digests.len(), 2);
    assert_eq!(digests[0], digests[1]);

    // (b) Each step's loss is the one-process loss with the global batch.
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 16);
    for (s, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
            "step {s}: {x} vs {y}"
        );
    }

    // (e) The same freeze steps as the one-process run.
    assert_eq!(events(&a, "freeze"), events(&b, "freeze"));
    assert_eq!(
        json(&a.join("summary.json"))["freeze_step"],
        json(&b.join("summary.json"))["freeze_step"]
    );

    // (d) The all-reduce shrinks as the frontier advances, to exactly the
    // trainable parameters' bytes.
    let model = tensors(&a.join("model.safetensors"));
    let trainable = |frozen: usize| -> u64 {
        model
            .iter()
            .filter(|(n, _)| block_of(n).is_none_or(|b| b >= frozen))
            .map(|(_, t)| t.numel() as u64)
            .sum()
    };
    let reduces = events(&a, "allreduce");
    let freezes = events(&a, "freeze");
    assert_eq!(reduces.len(), 1 + freezes.len(), "{reduces:?}");
    for (k, e) in reduces.iter().enumerate() {
        assert_eq!(e["params"].as_u64().unwrap(), trainable(k), "{e}");
        assert_eq!(e["bytes"].as_u64().unwrap(), 4 * trainable(k), "{e}");
        if k > 0 {
            // From the first step run with one more block frozen, the step
            // its freeze event names.
            assert_eq!(
                e["step"].as_u64().unwrap(),
                freezes[k - 1]["step"].as_u64().unwrap()
            );
            assert!(e["bytes"].as_u64() < reduces[k - 1]["bytes"].as_u64());
        }
    }
    let metrics = fs::read_to_string(a.join("metrics.csv")).unwrap();
    let bytes: u64 = metrics
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(6).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(summary["allreduce_bytes"].as_u64().unwrap(), bytes);

    // (c) Stopped where block 0 freezes and resumed on two ranks: the
    // block's parameters end bit-identical to their values at freeze time,
    // and the run ends exactly as the uninterrupted one.
    let stopped = torchrun(2, &["run", "--config", cfg, "--stop-after", "3"], &[]);
    assert_eq!(
        stopped.status.code().map(|c| c != 0),
        Some(true),
        "{}",
        text(&stopped).1
    );
    let c = d.path().join("runs/d-003");
    assert_eq!(json(&c.join("summary.json"))["status"], "interrupted");
    let meta = json(&c.join("checkpoint.json"));
    assert_eq!(meta["step"], 3);
    assert_eq!(meta["world_size"], 2);
    let at_freeze = tensors(&c.join(meta["weights"].as_str().unwrap()));
    let resumed = torchrun(2, &["run", "--resume", c.to_str().unwrap()], &[]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    let end = tensors(&c.join("model.safetensors"));
    let mut checked = 0;
    for (name, t) in &end {
        if block_of(name) == Some(0) {
            assert!(
                t.equal(&at_freeze[name]),
                "{name} moved after block 0 froze"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked}");
    assert_eq!(
        fs::read(a.join("model.safetensors")).unwrap(),
        fs::read(c.join("model.safetensors")).unwrap(),
        "the resumed two-rank run differs from the uninterrupted one"
    );
}

#[test]
fn a_killed_rank_fails_the_run_naming_it_and_two_ranks_resume_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let cfg = cfg.to_str().unwrap();
    let started = Instant::now();
    let out = torchrun(
        2,
        &["run", "--config", cfg],
        &[("SIMFREEZE_KILL_RANK_AT_STEP", "1:5")],
    );
    let took = started.elapsed();
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    // A bound, not a timing: it separates failing from waiting for the
    // default 300 s timeout, with room for a loaded machine (this once
    // took 62 s under a build).
    assert!(
        took < Duration::from_secs(150),
        "took {took:?}; the run's timeout is 30 s, the default 300 s"
    );
    assert!(stderr.contains("lost rank 1"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let run = d.path().join("runs/d-001");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    assert!(summary["reason"].as_str().unwrap().contains("lost rank 1"));
    assert_eq!(json(&run.join("checkpoint.json"))["step"], 4);

    // Another world size is refused, naming both.
    let one = simfreeze(&["run", "--resume", run.to_str().unwrap()]);
    assert_eq!(one.status.code(), Some(2), "{}", text(&one).1);
    assert!(text(&one)
        .1
        .contains("checkpointed by 2 rank(s), this resume has 1"));

    let resumed = torchrun(2, &["run", "--resume", run.to_str().unwrap()], &[]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["steps"], 16);
}

/// The gradient all-reduce overlapped with the backward (the default)
/// and after it average the same gradients: two runs that freeze as they
/// go end bit-identical, step by step, and communicate the same bytes.
#[test]
fn overlapping_the_allreduce_with_the_backward_changes_no_number() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let cfg = cfg.to_str().unwrap();
    for overlap in ["true", "false"] {
        let set = format!("train.overlap_allreduce={overlap}");
        let out = torchrun(2, &["run", "--config", cfg, "--set", &set], &[]);
        assert!(out.status.success(), "{}", text(&out).1);
    }
    let (a, b) = (d.path().join("runs/d-001"), d.path().join("runs/d-002"));
    let (sa, sb) = (json(&a.join("summary.json")), json(&b.join("summary.json")));
    assert!(sa["freeze_step"][0].is_u64(), "nothing froze: {sa}");
    assert_eq!(sa["freeze_step"], sb["freeze_step"]);
    assert_eq!(sa["allreduce_bytes"], sb["allreduce_bytes"]);
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(
        fs::read(a.join("model.safetensors")).unwrap(),
        fs::read(b.join("model.safetensors")).unwrap(),
        "the overlapped all-reduce changed the weights"
    );
}

/// ATSF asks for features and labels: every rank observes the global
/// batch (gathered in rank order), so two ranks freeze at the steps one
/// process with the global batch does.
#[test]
fn atsf_on_two_ranks_observes_the_global_batch_and_freezes_alike() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let text_cfg = fs::read_to_string(&cfg).unwrap().replace(
        r#"(plugin: "template", options: "(every: 3)")"#,
        r#"(plugin: "atsf", options: "(record_steps: 2, compare_steps: 2, tolerance: 0.01)")"#,
    );
    fs::write(&cfg, text_cfg.replace("train: 64", "train: 128")).unwrap();
    let cfg = cfg.to_str().unwrap();
    let two = torchrun(2, &["run", "--config", cfg], &[]);
    assert!(two.status.success(), "{}", text(&two).1);
    let one = simfreeze(&["run", "--config", cfg, "--set", "train.batch=8"]);
    assert!(one.status.success(), "{}", text(&one).1);
    let (a, b) = (d.path().join("runs/d-001"), d.path().join("runs/d-002"));
    let (sa, sb) = (json(&a.join("summary.json")), json(&b.join("summary.json")));
    assert!(sa["freeze_step"][0].is_u64(), "ATSF froze nothing: {sa}");
    assert_eq!(sa["freeze_step"], sb["freeze_step"]);
    assert_eq!(sa["probe_steps"], sb["probe_steps"]);
    assert_eq!(events(&a, "freeze"), events(&b, "freeze"));
}

/// Without torchrun (rank 0 serves the store): a rank that stays alive but
/// never answers makes the other fail after `train.dist_timeout_s`, naming
/// it, instead of waiting forever.
#[test]
fn a_hung_rank_fails_the_other_within_the_timeout() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let text_cfg = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text_cfg.replace("dist_timeout_s: 30", "dist_timeout_s: 3"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let spawn = |rank: &str| {
        Command::new(simfreeze_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .envs([
                ("RANK", rank),
                ("LOCAL_RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("SIMFREEZE_KILL_RANK_AT_STEP", "1:5:hang"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let zero = spawn("0");
    let mut one = spawn("1");
    let out = zero.wait_with_output().unwrap();
    let took = started.elapsed();
    one.kill().unwrap();
    let _ = one.wait();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("lost rank 1"), "{stderr}");
    // A bound, not a timing: without the 3 s timeout rank 0 would wait
    // for the default 300 s (or for ever); the room is for a loaded
    // machine.
    assert!(
        took < Duration::from_secs(150),
        "took {took:?} with a 3 s timeout"
    );
    let summary = json(&d.path().join("runs/d-001/summary.json"));
    assert_eq!(summary["status"], "failed");
}

/// Ctrl-C on a torchrun (SIGINT to its whole process group, then torchrun's
/// own SIGTERM to the workers): every rank stops after the same step, rank
/// 0 checkpoints it, and two ranks resume to the end.
#[test]
fn sigint_through_torchrun_stops_every_rank_with_a_checkpoint() {
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let text_cfg = fs::read_to_string(&cfg).unwrap();
    // Long enough to be interrupted: 4096 images, 512 steps an epoch.
    fs::write(&cfg, text_cfg.replace("train: 64", "train: 4096")).unwrap();
    let launcher = venv_python().with_file_name("torchrun");
    let child = Command::new(launcher)
        .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(simfreeze_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("SIMFREEZE_PLUGIN_PATH", simfreeze_bin().parent().unwrap())
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = d.path().join("runs/d-001");
    let waited = Instant::now();
    while !run.join("events.jsonl").is_file() {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signals the process group the child leads (as a terminal's
    // Ctrl-C does).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "interrupted", "{stderr}");
    let meta = json(&run.join("checkpoint.json"));
    let step = meta["step"].as_u64().unwrap();
    assert!(step > 0 && step < 1024, "{step}");
    assert_eq!(summary["steps"].as_u64().unwrap(), step);
    assert!(
        stderr.contains("resume with: torchrun --nproc-per-node 2"),
        "{stderr}"
    );
    let resumed = torchrun(2, &["run", "--resume", run.to_str().unwrap()], &[]);
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    assert_eq!(json(&run.join("summary.json"))["status"], "completed");
}

/// Every rank observes the global batch: a policy reading every on-demand
/// observation (tests/fixtures/observe_all) on two ranks of batch 4 logs
/// the same values and freezes at the same steps as one process of batch
/// 8, within the reduction-order differences of the weights.
#[test]
fn two_ranks_observe_what_one_process_with_the_global_batch_observes() {
    let d = tempfile::tempdir().unwrap();
    let lib = simfreeze_tests::fixture("observe_all");
    let policy = format!(
        "policy: (plugin: {:?}, options: \"(every: 2, tol: 10.0, dtype: 1)\"),",
        lib.to_str().unwrap()
    );
    let cfg = simfreeze_tests::tiny_run_config(d.path(), "o", "dist_timeout_s: 30", &policy);
    let text_cfg = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, text_cfg.replace("batch: 8", "batch: 4")).unwrap();
    let cfg = cfg.to_str().unwrap();
    let two = torchrun(2, &["run", "--config", cfg], &[]);
    assert!(two.status.success(), "{}", text(&two).1);
    let one = simfreeze(&["run", "--config", cfg, "--set", "train.batch=8"]);
    assert!(one.status.success(), "{}", text(&one).1);
    let (a, b) = (d.path().join("runs/o-001"), d.path().join("runs/o-002"));
    let freezes = |r: &Path| -> Vec<serde_json::Value> {
        events(r, "freeze")
            .iter()
            .map(|e| e["step"].clone())
            .collect()
    };
    assert_eq!(freezes(&a), freezes(&b));
    assert!(!freezes(&a).is_empty(), "nothing froze");
    let scalars = |r: &Path| -> Vec<(u64, String, f64)> {
        events(r, "scalar")
            .iter()
            .map(|e| {
                let v = e["value"].as_f64().unwrap_or(f64::NAN);
                (
                    e["step"].as_u64().unwrap(),
                    e["name"].as_str().unwrap().to_string(),
                    v,
                )
            })
            .collect()
    };
    let (sa, sb) = (scalars(&a), scalars(&b));
    assert_eq!(sa.len(), sb.len());
    let mut names = std::collections::BTreeSet::new();
    for ((step, name, x), (step_b, name_b, y)) in sa.iter().zip(&sb) {
        assert_eq!((step, name), (step_b, name_b));
        names.insert(name.clone());
        // Tolerance: the ranks' weights differ from one process's by the
        // order of the gradient sums (~1e-7 relative per step); the SP
        // loss is a small difference of near-equal matrices.
        let tol = if name.starts_with("sp") { 1e-2 } else { 1e-4 };
        assert!(
            (x - y).abs() <= tol * x.abs().max(y.abs()).max(1e-6),
            "{name} at step {step}: {x} on two ranks, {y} in one process"
        );
    }
    for n in [
        "sp_loss", "sp_probe", "cka", "acc_l2", "acc_l1", "weights", "tokens",
    ] {
        assert!(names.contains(n), "no {n} in {names:?}");
    }
}
