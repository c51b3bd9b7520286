//! `simfreeze run` end to end on a tiny synthetic task: the run directory's
//! files, the policy loop, and the errors for bad configurations.

use std::fs;
use std::path::Path;

use simfreeze_tests::{simfreeze, text};

/// A tiny model on synthetic 8x8 images; trains in about a second.
fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    simfreeze_tests::tiny_run_config(dir, "t", "sgd: (lr: 0.05)", extra)
}

#[test]
fn run_writes_a_complete_run_directory() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        r#"policy: (plugin: "template", options: "(every: 5)"),"#,
    );
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let run = d.path().join("runs/t-001");
    assert_eq!(summary["run_dir"], run.to_str().unwrap());
    for f in [
        "config.ron",
        "policy.json",
        "metrics.csv",
        "events.jsonl",
        "summary.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // 2 epochs x 64/8 steps; template freezes one block every 5 steps.
    assert_eq!(summary["steps"], 16);
    assert_eq!(summary["freeze_step"], serde_json::json!([5, 10, 15]));
    assert!(summary["compute_speedup"].as_f64().unwrap() > 1.0);
    let policy: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("policy.json")).unwrap()).unwrap();
    assert_eq!(policy["name"], "template");
    assert_eq!(policy["sha256"].as_str().unwrap().len(), 64);
    let metrics = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let lines: Vec<_> = metrics.lines().collect();
    assert_eq!(lines.len(), 3, "{metrics}");
    assert!(lines[0].starts_with("epoch,train_loss,eval_loss,eval_top1,lr,frozen_blocks"));
    assert!(lines[2].split(',').nth(5) == Some("3"), "{metrics}");
    let events = fs::read_to_string(run.join("events.jsonl")).unwrap();
    let freezes: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["event"] == "freeze")
        .collect();
    assert_eq!(freezes.len(), 3);
    // The first step run frozen, as in the summary; decided after step 4.
    assert_eq!(freezes[0]["step"], 5);
    assert_eq!(freezes[0]["decided_at"], 4);

    // A second run never overwrites the first.
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap(), "--policy", "none"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(d.path().join("runs/t-002/summary.json").is_file());
    let s: serde_json::Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!(s["compute_speedup"], 1.0);
}

#[test]
fn events_summary_and_metrics_name_the_same_steps() {
    // The template with `every: 4` decides a freeze after steps 3, 7 and
    // 11: blocks run frozen from steps 4, 8 and 12. The decision after
    // step 7, epoch 0's last, must not show in epoch 0's row.
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        r#"policy: (plugin: "template", options: "(every: 4)"),"#,
    );
    let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["freeze_step"], serde_json::json!([4, 8, 12]));
    let run = d.path().join("runs/t-001");
    let events: Vec<serde_json::Value> = fs::read_to_string(run.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every freeze event names the first step that ran with its blocks
    // frozen, which is what the summary says per block.
    let mut from_events = Vec::new();
    for e in events.iter().filter(|e| e["event"] == "freeze") {
        let step = e["step"].as_u64().unwrap();
        assert_eq!(e["decided_at"].as_u64().unwrap() + 1, step, "{e}");
        for _ in e["blocks"].as_array().unwrap() {
            from_events.push(serde_json::json!(step));
        }
    }
    assert_eq!(
        serde_json::Value::Array(from_events),
        summary["freeze_step"]
    );
    // The template's `frozen` scalar is measured at the decision's step.
    let frozen: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "scalar" && e["name"] == "frozen")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(frozen, [3, 7, 11]);
    // Lines come in step order.
    let steps: Vec<u64> = events.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    // metrics.csv: the blocks frozen while each epoch's last step (7, 15)
    // ran, counted from the summary's freeze steps.
    let metrics = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<u64> = metrics
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse().unwrap())
        .collect();
    let frozen_during = |step: u64| {
        summary["freeze_step"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f.as_u64().is_some_and(|f| f <= step))
            .count() as u64
    };
    assert_eq!(rows, [frozen_during(7), frozen_during(15)]);
    assert_eq!(rows, [1, 3], "{metrics}");
}

#[test]
fn set_overrides_the_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "");
    let out = simfreeze(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.epochs=1",
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
    let s: serde_json::Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!(s["steps"], 8);
}

#[test]
fn malformed_config_is_exit_2_with_position() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.ron");
    fs::write(&p, "(\n  train: (epochs: 2,,),\n)").unwrap();
    let out = simfreeze(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out).1;
    assert!(err.contains("bad.ron:2:"), "{err}");
}

#[test]
fn missing_dataset_is_exit_5_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.ron");
    fs::write(
        &p,
        format!(
            "(data: (source: FashionMnist(root: {:?})))",
            d.path().join("nowhere")
        ),
    )
    .unwrap();
    let out = simfreeze(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(text(&out).1.contains("train-images-idx3-ubyte.gz"));
}

/// `simfreeze bench --json` on the tiny test config with `args` added;
/// asserts success and returns the parsed report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "");
    let mut all = vec!["bench", "--config", cfg.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = simfreeze(&all);
    assert!(out.status.success(), "{}", text(&out).1);
    serde_json::from_str(&text(&out).0).unwrap()
}

#[test]
fn bench_reports_every_frozen_prefix() {
    let v = bench_json(&["--steps", "2", "--warmup", "1"]);
    let ks: Vec<_> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["frozen"].as_u64().unwrap())
        .collect();
    assert_eq!(ks, [0, 1, 2, 3]);
    assert_eq!(v["batch"], 8);
    assert!(v["results"][0]["images_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_reports_each_frozen_prefixs_own_peak_memory() {
    // Wide enough that the activations autograd keeps for a trainable
    // block are tens of MiB at batch 256; a frozen prefix keeps none.
    let v = bench_json(&[
        "--set",
        "model.image_size=32",
        "--set",
        "model.dim=96",
        "--set",
        "model.depth=4",
        "--batch",
        "256",
        "--frozen",
        "0,4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
    ]);
    let peak = |i: usize| v["results"][i]["peak_rss_mib"].as_f64().unwrap();
    let (trainable, frozen) = (peak(0), peak(1));
    assert!(frozen > 50.0, "libtorch alone is more than {frozen} MiB?");
    // K = 0 ran first and its freed memory stays in the process; unless
    // bench hands it back before measuring K = 4, both read the same peak.
    assert!(
        trainable - frozen > 20.0,
        "K=0 peak {trainable} MiB, K=4 peak {frozen} MiB"
    );
}

#[test]
fn activation_cache_trains_like_recomputing_the_prefix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        r#"policy: (plugin: "template", options: "(every: 5)"),"#,
    );
    let cfg = cfg.to_str().unwrap();
    let plain = simfreeze(&["run", "--config", cfg]);
    assert!(plain.status.success(), "{}", text(&plain).1);
    let cached = simfreeze(&["run", "--config", cfg, "--set", "train.cache_frozen=true"]);
    let (_, err) = text(&cached);
    assert!(cached.status.success(), "{err}");
    assert!(err.contains("cache hits"), "{err}");
    let loss = |run: &str| -> Vec<f64> {
        fs::read_to_string(d.path().join("runs").join(run).join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    // Cached activations come from the same frozen weights; only the batch
    // composition of the prefix matmuls differs, so losses agree closely.
    for (a, b) in loss("t-001").iter().zip(loss("t-002")) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
}

/// A pooled model without class token, with registers and LayerScale
/// (MAE / DINOv2-style options): ATSF observes the pooled features and
/// freezes, and the activation cache (whose boundaries now hold the
/// registers) trains like recomputing the prefix.
#[test]
fn atsf_freezes_a_pooled_model_with_registers_and_the_cache_agrees() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        r#"policy: (plugin: "atsf", options: "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"),"#,
    );
    let text_cfg = fs::read_to_string(&cfg).unwrap().replace(
        "mlp_ratio: 2.0)",
        r#"mlp_ratio: 2.0, class_token: false, global_pool: "avg", reg_tokens: 2, init_values: 0.1)"#,
    );
    fs::write(&cfg, text_cfg).unwrap();
    let cfg = cfg.to_str().unwrap();
    let plain = simfreeze(&["run", "--config", cfg]);
    assert!(plain.status.success(), "{}", text(&plain).1);
    let summary: serde_json::Value = serde_json::from_str(&text(&plain).0).unwrap();
    let freezes = summary["freeze_step"].as_array().unwrap();
    assert!(
        freezes.iter().any(|s| s.is_u64()),
        "ATSF froze nothing on pooled features: {summary}"
    );
    let cached = simfreeze(&["run", "--config", cfg, "--set", "train.cache_frozen=true"]);
    let (_, err) = text(&cached);
    assert!(cached.status.success(), "{err}");
    let rows = |run: &str| -> Vec<String> {
        fs::read_to_string(d.path().join("runs").join(run).join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    let (a, b) = (rows("t-001"), rows("t-002"));
    assert_eq!(a.len(), b.len());
    for (ra, rb) in a.iter().zip(&b).skip(1) {
        let (la, lb): (f64, f64) = (
            ra.split(',').nth(1).unwrap().parse().unwrap(),
            rb.split(',').nth(1).unwrap().parse().unwrap(),
        );
        assert!((la - lb).abs() < 1e-4 * la.abs().max(1.0), "{ra} vs {rb}");
    }
}

#[test]
fn activation_cache_over_its_cap_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "");
    let out = simfreeze(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.cache_frozen=true",
        "--set",
        "train.cache_max_mib=1",
        // 64 samples x 577 tokens x 12 float32 values: 1.7 MiB.
        "--set",
        "model.image_size=96",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
    assert!(
        text(&out).1.contains("needs 2 MiB") && text(&out).1.contains("cache_max_mib = 1"),
        "{}",
        text(&out).1
    );
}

/// `simfreeze models` lists every preset with its shape and the
/// normalisation its weights expect, as text and as JSON.
#[test]
fn models_lists_the_presets_with_shapes_and_normalisation() {
    let out = simfreeze(&["models", "--json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let v: serde_json::Value = serde_json::from_str(&text(&out).0).unwrap();
    let presets = v["presets"].as_array().unwrap();
    let find = |name: &str| {
        presets
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    };
    let dino = find("vit_base_patch14_reg4_dinov2");
    assert_eq!(dino["config"]["patch"], 14);
    assert_eq!(dino["config"]["image_size"], 518);
    assert_eq!(dino["config"]["reg_tokens"], 4);
    assert_eq!(dino["tokens"], 37 * 37 + 5);
    assert_eq!(dino["normalisation"]["name"], "imagenet");
    assert_eq!(
        find("vit_base_patch16_clip_224")["normalisation"]["name"],
        "clip"
    );
    assert_eq!(
        find("vit_base_patch16_224.mae")["config"]["global_pool"],
        "avg"
    );
    // timm's count for ViT-B/16 with a 1000-class head: 86,567,656.
    assert_eq!(find("vit_base_patch16_224")["parameters"], 86_567_656);
    for name in [
        "deit3_base_patch16_224",
        "vit_small_patch14_dinov2",
        "tiny_fmnist",
    ] {
        find(name);
    }
    let out = simfreeze(&["models"]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("vit_base_patch14_dinov2") && stdout.contains("imagenet"));
}

/// `train.eval_last`: only the last epochs are evaluated; the others'
/// evaluation cells are empty, and the run's top-1 is the last epoch's,
/// the same number as when every epoch is evaluated (evaluation changes
/// nothing the training does).
#[test]
fn eval_last_evaluates_only_the_last_epochs_and_changes_nothing_else() {
    let metrics = |eval_last: u64| -> (Vec<String>, serde_json::Value) {
        let d = tempfile::tempdir().unwrap();
        let cfg = simfreeze_tests::tiny_run_config(
            d.path(),
            "t",
            &format!("sgd: (lr: 0.05), eval_last: {eval_last}"),
            "",
        );
        let four = fs::read_to_string(&cfg)
            .unwrap()
            .replace("epochs: 2,", "epochs: 4,");
        fs::write(&cfg, four).unwrap();
        let out = simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let text = fs::read_to_string(d.path().join("runs/t-001/metrics.csv")).unwrap();
        let rows = text.lines().skip(1).map(str::to_string).collect();
        (rows, serde_json::from_str(&stdout).unwrap())
    };
    let (every, all) = metrics(0);
    let (last, two) = metrics(2);
    let cells = |row: &str| row.split(',').map(str::to_string).collect::<Vec<_>>();
    for (epoch, (a, b)) in every.iter().zip(&last).enumerate() {
        let (a, b) = (cells(a), cells(b));
        // Training loss and learning rate: the same training.
        assert_eq!((&a[1], &a[4]), (&b[1], &b[4]), "epoch {epoch}");
        if epoch < 2 {
            assert_eq!((b[2].as_str(), b[3].as_str()), ("", ""), "epoch {epoch}");
        } else {
            assert_eq!((&a[2], &a[3]), (&b[2], &b[3]), "epoch {epoch}");
        }
    }
    assert_eq!(all["final_top1"], two["final_top1"]);
}
