//! Weight import and the model families against the reference
//! implementations: random-weight models made by timm and Hugging Face
//! transformers (tests/parity/reference.py), loaded into our ViT, give the
//! same logits for the same input within 1e-4, on the trainable and on the
//! frozen path. Covers timm safetensors at two shapes, a position embedding
//! resampled to another resolution as timm does, Google's `.npz` layout
//! (checked against timm's own loader by the script), a Hugging Face ViT
//! with separate q/k/v and LayerNorm epsilon 1e-12 from its `config.json`;
//! and timm's DeiT-III, DINOv2 (with registers, resampled from another
//! resolution, and with a dynamic image size), CLIP (GELU and QuickGELU),
//! MAE-style average pooling, a ViT without class token or qkv bias, each
//! through our preset of the same name, plus Hugging Face's `Dinov2Model`
//! (its pooled output against our head's input feature).

use std::process::Command;

use simfreeze::config::ModelSection;
use simfreeze::model::weights::{load_into, norm_eps_beside, Checkpoint, Format, HeadInit};
use simfreeze::model::{Group, PrefixModel, Vit, VitConfig};
use simfreeze_tests::{text, venv_python};
use tch::{nn::VarStore, Device, Tensor};

/// Runs `tests/parity/<script> DIR` with the environment's Python and
/// returns DIR.
fn reference(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(venv_python())
        .args(["-W", "ignore"])
        .arg(
            simfreeze_tests::repo_root()
                .join("tests/parity")
                .join(script),
        )
        .arg(dir.path())
        .output()
        .expect("run python");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    dir
}

/// Runs `script` like [`reference`] and reads what it wrote: `cases.json`
/// and the tensors of `tensors.safetensors` by name.
fn reference_cases(
    script: &str,
) -> (
    tempfile::TempDir,
    Vec<serde_json::Value>,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = reference(script);
    let cases =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap())
            .unwrap();
    let refs = Tensor::read_safetensors(dir.path().join("tensors.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    (dir, cases, refs)
}

#[test]
fn imported_weights_reproduce_timm_and_hugging_face_logits() {
    let (dir, cases, refs) = reference_cases("reference.py");
    let mut formats = Vec::new();
    assert_eq!(cases.len(), 15);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let file = dir.path().join(case["file"].as_str().unwrap());
        let cfg: VitConfig = if let Some(section) = case.get("model") {
            // A preset with overrides, resolved as a run config's `model`
            // section with `weights` set is.
            let mut section: ModelSection = serde_json::from_value(section.clone()).unwrap();
            section.weights = Some(file.clone());
            section.resolve(0).unwrap_or_else(|e| panic!("{name}: {e}"))
        } else {
            let mut cfg: VitConfig = serde_json::from_value(case["shape"].clone()).unwrap();
            if name == "hf" {
                // What `model.weights` does: the epsilon comes from config.json.
                cfg.norm_eps = norm_eps_beside(&file).unwrap().expect("config.json has it");
                assert_eq!(cfg.norm_eps, 1e-12);
            }
            cfg
        };
        let vs = VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &cfg);
        let report = load_into(&vs, &cfg, Checkpoint::read(&file).unwrap(), HeadInit::Auto)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        formats.push(report.format);
        match name {
            "timm_a_resized" => assert_eq!(report.pos_embed_resized_from, Some(4)),
            "reg4_at_42" => assert_eq!(report.pos_embed_resized_from, Some(5)),
            "hf_dinov2" => assert!(!report.head_loaded),
            _ => assert!(report.head_loaded, "{name}: {report}"),
        }
        let x = &refs[&format!("{name}.input")];
        let (got, frozen) = tch::no_grad(|| {
            let (all, none) = (
                model.forward_frozen(x, 0),
                model.forward_frozen(x, cfg.depth as usize),
            );
            if name == "hf_dinov2" {
                (all.cls, none.cls)
            } else {
                (all.logits, none.logits)
            }
        });
        let want = refs
            .get(&format!("{name}.logits"))
            .or_else(|| refs.get(&format!("{name}.features")))
            .unwrap();
        let diff = (&got - want).abs().max().double_value(&[]);
        eprintln!("{name:<16} {:?} max |difference| {diff:.1e}", report.format);
        assert!(diff <= 1e-4, "{name}: logits differ by {diff:e}");
        // And the frozen path gives the same output.
        assert!((&frozen - &got).abs().max().double_value(&[]) <= 1e-6);
    }
    for f in [Format::Timm, Format::Npz, Format::HuggingFace] {
        assert!(formats.contains(&f), "{f:?} not covered");
    }
}

/// `simfreeze eval` with timm weights on an ImageFolder and on the Stanford
/// Dogs layout (MATLAB lists written by scipy) reports timm's own top-1.
#[test]
fn eval_reports_timms_top1_on_image_folder_and_stanford_dogs() {
    let dir = reference("imagefolder.py");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    for source in [
        format!("ImageFolder(root: {:?})", dir.path().join("folder")),
        format!("StanfordDogs(root: {:?})", dir.path().join("dogs")),
    ] {
        let cfg = dir.path().join("eval.ron");
        std::fs::write(
            &cfg,
            format!(
                "(model: (preset: \"vit_tiny_patch16_224\", image_size: 32, patch: 8, dim: 48, depth: 2, heads: 3),
                  data: (source: {source}, mean: 0.5, std: 0.5, resize: 32),
                  train: (device: \"cpu\", threads: 1))"
            ),
        )
        .unwrap();
        let weights = dir.path().join("model.safetensors");
        let out = simfreeze_tests::simfreeze(&[
            "eval",
            "--config",
            cfg.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--json",
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{source}: {stderr}");
        let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["n"], expected["n"], "{source}");
        let (g, e) = (
            got["top1"].as_f64().unwrap(),
            expected["top1"].as_f64().unwrap(),
        );
        assert!((g - e).abs() < 1e-9, "{source}: top-1 {g} vs timm {e}");
    }

    // A corrupt image is an error naming it (exit code 5).
    let bad = dir.path().join("folder/val/c1/img01.png");
    std::fs::write(&bad, b"\x89PNG broken").unwrap();
    let cfg = dir.path().join("eval.ron");
    std::fs::write(
        &cfg,
        format!(
            "(model: (preset: \"vit_tiny_patch16_224\", image_size: 32, patch: 8, dim: 48, depth: 2, heads: 3),
              data: (source: ImageFolder(root: {:?}), mean: 0.5, std: 0.5, resize: 32),
              train: (device: \"cpu\", threads: 1))",
            dir.path().join("folder")
        ),
    )
    .unwrap();
    let weights = dir.path().join("model.safetensors");
    let out = simfreeze_tests::simfreeze(&[
        "eval",
        "--config",
        cfg.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("img01.png"), "{stderr}");
}

/// AdamW with layer-wise decay against timm and PyTorch: our learning-rate
/// scales and weight-decay exemptions are those of timm's
/// `param_groups_layer_decay` for two ViTs, and our fused update equals
/// `torch.optim.AdamW(fused=True)` within 1e-6 over 5 steps with a
/// learning rate per step, per-block factors and blocks frozen mid-way
/// (whose weights and state then stay untouched, as PyTorch leaves a
/// parameter without gradient).
#[test]
fn adamw_with_layer_decay_matches_timm_groups_and_torch_fused_adamw() {
    use simfreeze::engine::optim::{AdamWConfig, Optimizer, Recipe};
    use std::collections::HashMap;

    let dir = reference("adamw.py");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adamw.json")).unwrap())
            .unwrap();
    let tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("adamw.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let recipe = Recipe {
        layer_decay: spec["layer_decay"].as_f64().unwrap(),
        ..Recipe::adamw(AdamWConfig {
            weight_decay: spec["weight_decay"].as_f64().unwrap(),
            ..Default::default()
        })
    };
    let mut run = None;
    for which in ["a", "b"] {
        let section: ModelSection = serde_json::from_value(serde_json::json!({
            "preset": "vit_tiny_patch16_224"
        }))
        .unwrap();
        let mut cfg = section.resolve(5).unwrap();
        let shape = spec["shapes"][which].as_object().unwrap();
        let mut tree = serde_json::to_value(&cfg).unwrap();
        for (k, v) in shape {
            tree[k] = v.clone();
        }
        cfg = serde_json::from_value(tree).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &cfg);
        let opt = Optimizer::new(&vs, &model, recipe.clone());
        let timm = spec["settings"][which].as_object().unwrap();
        let ours = opt.param_settings();
        assert_eq!(ours.len(), timm.len(), "{which}: parameter count");
        for (name, scale, decays) in &ours {
            let t = &timm[name.as_str()];
            let (t_scale, t_wd) = (t[0].as_f64().unwrap(), t[1].as_f64().unwrap());
            assert!(
                (scale - t_scale).abs() < 1e-12,
                "{which} {name}: {scale} vs timm {t_scale}"
            );
            assert_eq!(*decays, t_wd > 0.0, "{which} {name}: weight decay");
        }
        if which == "a" {
            run = Some((vs, model, opt));
        }
    }

    let (vs, model, mut opt) = run.unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, v) in &vars {
            v.shallow_clone().copy_(&tensors[&format!("init.{name}")]);
        }
    });
    let lrs = spec["lrs"].as_array().unwrap();
    for (s, lr) in lrs.iter().enumerate() {
        let frozen = spec["frozen"][s].as_u64().unwrap() as usize;
        let factors: Vec<f32> = spec["factors"][s]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap() as f32)
            .collect();
        let named: HashMap<String, Tensor> = vars
            .keys()
            .filter_map(|n| {
                let g = tensors.get(&format!("grad.{s}.{n}"))?;
                Some((n.clone(), g.shallow_clone()))
            })
            .collect();
        let before: HashMap<&String, Tensor> = vars.iter().map(|(n, v)| (n, v.copy())).collect();
        let grads = opt.grads_from(&named, frozen).unwrap();
        opt.step(&grads, lr.as_f64().unwrap(), &factors);
        let mut worst = 0f64;
        for (name, v) in &vars {
            let want = &tensors[&format!("after.{s}.{name}")];
            let diff = (v - want).abs().max().double_value(&[]);
            worst = worst.max(diff);
            assert!(
                diff <= 1e-6,
                "step {s} {name}: differs from torch by {diff:e}"
            );
            if let Group::Block(b) = model.group_of(name) {
                if b < frozen {
                    assert!(v.equal(&before[name]), "step {s}: frozen {name} moved");
                }
            }
        }
        eprintln!("AdamW step {s} (frozen {frozen}): max |difference| {worst:.1e}");
    }
}

/// The on-demand observations against an independent computation
/// (tests/parity/observations.py): per-block tokens against timm's block
/// outputs read with forward hooks, the row-normalised Gram matrices, the
/// SP loss and linear CKA against float64 numpy, for a class-token model
/// and an average-pooling one with registers.
#[test]
fn block_observations_match_timm_hooks_and_numpy() {
    use simfreeze::observe::observer::reduce;
    use simfreeze_abi::sdk::{sp_loss, Matrix};
    use simfreeze_abi::Needs;

    let (dir, cases, refs) = reference_cases("observations.py");
    assert_eq!(cases.len(), 2);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let cfg: VitConfig = serde_json::from_value(case["shape"].clone()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &cfg);
        let file = dir.path().join(case["file"].as_str().unwrap());
        load_into(&vs, &cfg, Checkpoint::read(&file).unwrap(), HeadInit::Auto).unwrap();
        let x = &refs[&format!("{name}.input")];
        let got = reduce(&model, x, Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS).unwrap();
        let (b, d, l) = (5usize, cfg.dim as usize, cfg.depth as usize);
        assert_eq!((got.blocks, got.rows, got.dim), (l, b, d));
        let want = |what: &str| -> Vec<f32> {
            Vec::try_from(refs[&format!("{name}.{what}")].flatten(0, -1)).unwrap()
        };
        let max_diff = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // Tolerances: float32 forward against timm's float32 forward (the
        // same arithmetic, other kernels), Gram entries in [-1, 1].
        let tokens = max_diff(&got.tokens, &want("tokens"));
        let grams = max_diff(&got.grams, &want("grams"));
        println!("{name}: tokens max |diff| {tokens:.2e}, grams {grams:.2e}");
        assert!(tokens < 1e-5, "{name}: tokens differ by {tokens}");
        assert!(grams < 1e-5, "{name}: grams differ by {grams}");

        let gram = |i: usize| Matrix::new(&got.grams[i * b * b..(i + 1) * b * b], b, b).unwrap();
        let sp = sp_loss(gram(0), gram(1)).unwrap();
        let sp_ref = case["sp_loss_0_1"].as_f64().unwrap();
        println!("{name}: SP loss {sp:.6e}, numpy {sp_ref:.6e}");
        assert!(
            (sp - sp_ref).abs() <= 1e-3 * sp_ref,
            "{name}: SP loss {sp} vs {sp_ref}"
        );
        let tok = |i: usize| Matrix::new(&got.tokens[i * b * d..(i + 1) * b * d], b, d).unwrap();
        let cka = simfreeze_metrics::cka(tok(0), tok(2)).unwrap();
        let cka_ref = case["cka_0_2"].as_f64().unwrap();
        println!("{name}: CKA {cka:.8}, numpy {cka_ref:.8}");
        assert!(
            (cka - cka_ref).abs() < 1e-5,
            "{name}: CKA {cka} vs {cka_ref}"
        );
    }
}

/// The PyTorch eager ViT of `scripts/vit_reference.py` (what the GPU check
/// trains as PyTorch's side, on a machine without timm) against timm's
/// `VisionTransformer` on the same weights: logits and every gradient
/// within 1e-5, at a small shape and at the 224-pixel, patch-16 geometry
/// of ViT-B/16.
#[test]
fn the_pytorch_reference_vit_matches_timm() {
    let script = simfreeze_tests::repo_root().join("scripts/vit_reference.py");
    for extra in [
        &[][..],
        &[
            "--image-size",
            "224",
            "--patch",
            "16",
            "--dim",
            "96",
            "--depth",
            "2",
            "--heads",
            "3",
            "--batch",
            "2",
        ][..],
    ] {
        let out = Command::new(venv_python())
            .args(["-W", "ignore"])
            .arg(&script)
            .arg("--check")
            .args(extra)
            .output()
            .expect("run python");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{extra:?}:\n{stdout}\n{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["logits_max_abs_diff"].as_f64().unwrap() <= 1e-5, "{v}");
        assert!(v["parameters"].as_u64().unwrap() > 20, "{v}");
    }
}

/// Contract 2 in PyTorch: the block tokens and Gram matrices the Python
/// package's controller hands a policy (its hooks on the training forward,
/// and its own forward of the fixed batch; tests/parity/blocks.py) equal
/// the trainer's (`observe::observer::reduce`) on the same weights and
/// images within 1e-5, for timm's class-token and average pooling and a
/// Hugging Face ViT.
#[test]
fn the_python_controllers_block_observations_are_the_trainers() {
    use simfreeze::observe::observer::reduce;
    use simfreeze_abi::ffi::Needs;

    let (dir, cases, refs) = reference_cases("blocks.py");
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let file = dir.path().join(case["file"].as_str().unwrap());
        let cfg: VitConfig = match case.get("model") {
            Some(section) => {
                let mut section: ModelSection = serde_json::from_value(section.clone()).unwrap();
                section.weights = Some(file.clone());
                section.resolve(0).unwrap()
            }
            None => serde_json::from_value(case["shape"].clone()).unwrap(),
        };
        let vs = VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &cfg);
        load_into(&vs, &cfg, Checkpoint::read(&file).unwrap(), HeadInit::Auto).unwrap();
        let x = &refs[&format!("{name}.input")];
        let ours =
            tch::no_grad(|| reduce(&model, x, Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS)).unwrap();
        assert_eq!(
            (ours.blocks, ours.rows),
            (cfg.depth as usize, x.size()[0] as usize)
        );
        for set in ["batch", "fixed"] {
            for (what, values) in [("tokens", &ours.tokens), ("grams", &ours.grams)] {
                let theirs = &refs[&format!("{name}.{set}_{what}")];
                let theirs: Vec<f32> = Vec::try_from(theirs.flatten(0, -1)).unwrap();
                assert_eq!(theirs.len(), values.len(), "{name} {set} {what}");
                let diff = theirs
                    .iter()
                    .zip(values.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{name:<5} {set:<5} {what:<6} max |difference| {diff:.1e}");
                assert!(diff <= 1e-5, "{name}: {set} {what} differ by {diff:e}");
            }
        }
    }
}
