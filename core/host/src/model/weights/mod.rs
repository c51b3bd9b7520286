//! Pretrained weights: timm safetensors (also what `simfreeze run` writes
//! as `model.safetensors`; DeiT-III, DINOv2, CLIP and MAE weights in timm's
//! layout included), Hugging Face `ViTModel` / `ViTForImageClassification`
//! and `Dinov2Model` safetensors, and Google's `.npz` ViT checkpoints,
//! mapped onto our timm-named [`Vit`](crate::model::Vit).
//!
//! The format is recognised from the file: `.npz` is Google's layout;
//! safetensors with `embeddings.patch_embeddings` keys is Hugging Face's
//! (separate q/k/v, concatenated here; its `config.json` beside the file
//! gives the LayerNorm epsilon), any other safetensors is timm's. The
//! classifier head is loaded or replaced as [`HeadInit`] says; a position
//! embedding for another grid is resampled bicubically with antialiasing,
//! as timm does when it loads a checkpoint at another resolution.
//! Every other mismatch (width, depth, patch size, an unknown tensor) is an
//! error that names the file and what differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::model::VitConfig;

mod hf;
mod npz;

pub use crate::error::WeightsError;

fn err(path: &Path, message: impl Into<String>) -> WeightsError {
    WeightsError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The classifier head of a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadInit {
    /// Load it when its class count matches the model's, else start a new one.
    #[default]
    Auto,
    /// Always start a new head (fine-tuning on another task with the same
    /// number of classes).
    New,
    /// Load it; a class-count mismatch is an error.
    Load,
}

/// The layouts we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// timm names (`blocks.N.attn.qkv.weight`, ...).
    Timm,
    /// Hugging Face `transformers` ViT or Dinov2 names.
    HuggingFace,
    /// Google's JAX/Flax `.npz`.
    Npz,
}

/// A checkpoint mapped to timm names, not yet checked against a model.
pub struct Checkpoint {
    /// The file.
    pub path: PathBuf,
    /// Its layout.
    pub format: Format,
    /// Tensors under timm names.
    pub tensors: BTreeMap<String, Tensor>,
    /// Tensors the file has that a classifier ViT does not use (HF pooler,
    /// npz pre-logits).
    pub ignored: Vec<String>,
    /// LayerNorm epsilon the checkpoint was trained with, when it says.
    pub norm_eps: Option<f64>,
}

impl Checkpoint {
    /// Reads `path` and maps its tensors to timm names.
    pub fn read(path: &Path) -> Result<Checkpoint, WeightsError> {
        if !path.is_file() {
            return Err(err(path, "weights file not found"));
        }
        let is_npz = path.extension().is_some_and(|e| e == "npz");
        let raw = if is_npz {
            Tensor::read_npz(path)
        } else {
            Tensor::read_safetensors(path)
        }
        .map_err(|e| {
            err(
                path,
                format!(
                    "cannot read as {}: {e}",
                    if is_npz { "npz" } else { "safetensors" }
                ),
            )
        })?;
        let raw: BTreeMap<String, Tensor> = raw.into_iter().collect();
        if is_npz {
            return npz::from_npz(path, raw);
        }
        if raw
            .keys()
            .any(|k| k.contains("embeddings.patch_embeddings"))
        {
            let norm_eps = norm_eps_beside(path)?;
            let (tensors, ignored) = hf::from_hf(path, raw)?;
            return Ok(Checkpoint {
                path: path.to_owned(),
                format: Format::HuggingFace,
                tensors,
                ignored,
                norm_eps,
            });
        }
        Ok(Checkpoint {
            path: path.to_owned(),
            format: Format::Timm,
            tensors: raw,
            ignored: Vec::new(),
            norm_eps: None,
        })
    }

    /// Depth and width the checkpoint's tensors imply, for messages and for
    /// checking a model configuration before building it.
    pub fn shape(&self) -> (i64, i64) {
        let depth = self
            .tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix("blocks.")?
                    .split('.')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .max()
            .map_or(0, |d| d + 1);
        let dim = ["cls_token", "pos_embed"]
            .iter()
            .find_map(|k| self.tensors.get(*k))
            .map_or(0, |t| *t.size().last().unwrap_or(&0));
        (depth, dim)
    }

    /// Checks the model configuration against the checkpoint: the same
    /// depth, width, channels and patch size.
    pub fn check(&self, cfg: &VitConfig) -> Result<(), WeightsError> {
        let (depth, dim) = self.shape();
        if (depth, dim) != (cfg.depth, cfg.dim) {
            return Err(err(
                &self.path,
                format!(
                    "the weights have {depth} blocks of width {dim}, the model {} of width {}; \
                     pick the matching model.preset (e.g. vit_base_patch16_224 for ViT-B/16)",
                    cfg.depth, cfg.dim
                ),
            ));
        }
        if let Some(p) = self.tensors.get("patch_embed.proj.weight") {
            let want = [cfg.dim, cfg.channels, cfg.patch, cfg.patch];
            if p.size() != want {
                return Err(err(
                    &self.path,
                    format!(
                        "patch_embed.proj.weight is {:?}, the model needs {want:?} \
                         (channels {}, patch {})",
                        p.size(),
                        cfg.channels,
                        cfg.patch
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What [`load_into`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The layout read.
    pub format: Format,
    /// Whether the checkpoint's head was loaded (else a new one is used).
    pub head_loaded: bool,
    /// Position-embedding grid resampled from, when it was.
    pub pos_embed_resized_from: Option<i64>,
    /// Tensors of the file not used.
    pub ignored: Vec<String>,
    /// `fc_norm` starts fresh: a token-pooled checkpoint (with a final
    /// `norm`) was loaded into an average-pooled model, whose final norm
    /// is dropped, as MAE and BEiT fine-tuning do.
    pub fc_norm_new: bool,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} weights, head {}",
            self.format,
            if self.head_loaded { "loaded" } else { "new" }
        )?;
        if self.fc_norm_new {
            write!(f, ", fc_norm new (the checkpoint's final norm dropped)")?;
        }
        if let Some(g) = self.pos_embed_resized_from {
            write!(f, ", position embedding resampled from a {g}x{g} grid")?;
        }
        if !self.ignored.is_empty() {
            write!(f, ", ignored {}", self.ignored.join(", "))?;
        }
        Ok(())
    }
}

/// Copies the checkpoint into the model's variables.
pub fn load_into(
    vs: &VarStore,
    cfg: &VitConfig,
    mut ck: Checkpoint,
    head: HeadInit,
) -> Result<LoadReport, WeightsError> {
    ck.check(cfg)?;
    let path = ck.path.clone();
    let mut vars = vs.variables();
    let ck_classes = ck.tensors.get("head.bias").map(|t| t.size()[0]);
    let head_loaded = match (head, ck_classes) {
        (HeadInit::New, _) => false,
        (HeadInit::Auto, Some(c)) => c == cfg.classes,
        (HeadInit::Auto, None) => false,
        (HeadInit::Load, Some(c)) if c == cfg.classes => true,
        (HeadInit::Load, found) => {
            return Err(err(
                &path,
                format!(
                    "model.head is Load but the checkpoint's head has {} classes, the model {}",
                    found.map_or("no".to_string(), |c| c.to_string()),
                    cfg.classes
                ),
            ))
        }
    };
    if !head_loaded {
        ck.tensors.remove("head.weight");
        ck.tensors.remove("head.bias");
        vars.remove("head.weight");
        vars.remove("head.bias");
    }
    // MAE / BEiT fine-tuning: a pretrained, token-pooled checkpoint (`norm`)
    // into an average-pooled model (`fc_norm`): the final norm is dropped
    // and `fc_norm` starts fresh, as their fine-tuning recipes do.
    let fc_norm_new = cfg.use_fc_norm()
        && !ck.tensors.contains_key("fc_norm.weight")
        && ck.tensors.contains_key("norm.weight");
    if fc_norm_new {
        for wb in ["weight", "bias"] {
            if ck.tensors.remove(&format!("norm.{wb}")).is_some() {
                ck.ignored.push(format!("norm.{wb}"));
            }
            vars.remove(&format!("fc_norm.{wb}"));
        }
    }
    let mut resized = None;
    if let Some(pe) = ck.tensors.get("pos_embed") {
        if pe.dim() != 3 || pe.size()[0] != 1 {
            return Err(err(
                &path,
                format!("pos_embed is {:?}, expected [1, tokens, width]", pe.size()),
            ));
        }
        let want = cfg.pos_embed_len();
        let have = pe.size()[1];
        if have != want {
            // The prefix tokens (class, registers) have entries of their
            // own unless the position embedding skips them.
            let prefix = if cfg.no_embed_class {
                0
            } else {
                cfg.prefix_tokens()
            };
            let grid = ((have - prefix).max(0) as f64).sqrt().round() as i64;
            if grid * grid + prefix != have {
                return Err(err(
                    &path,
                    format!(
                        "pos_embed has {have} tokens, not a square grid plus {prefix} prefix \
                         tokens (the model's class_token, reg_tokens and no_embed_class \
                         must match the checkpoint's)"
                    ),
                ));
            }
            // As timm: bicubic with antialiasing for its own checkpoints,
            // bilinear without for Google's .npz (`_load_weights`).
            let g = cfg.grid();
            let new =
                resample_pos_embed(pe, prefix, (grid, grid), (g, g), ck.format != Format::Npz);
            ck.tensors.insert("pos_embed".into(), new);
            resized = Some(grid);
        }
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (name, t) in &ck.tensors {
            let Some(v) = vars.get_mut(name) else {
                return Err(err(
                    &path,
                    format!(
                        "tensor `{name}` has no place in the model{}",
                        option_hint(name, true)
                    ),
                ));
            };
            if v.size() != t.size() {
                return Err(err(
                    &path,
                    format!("{name} is {:?}, the model's {:?}", t.size(), v.size()),
                ));
            }
            v.copy_(t);
        }
        Ok(())
    })?;
    let mut missing: Vec<&String> = vars
        .keys()
        .filter(|k| !ck.tensors.contains_key(*k))
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
        return Err(err(
            &path,
            format!(
                "no tensor for {} of the model's parameters: {}{}{}",
                missing.len(),
                shown.join(", "),
                if missing.len() > 5 { ", ..." } else { "" },
                option_hint(first, false)
            ),
        ));
    }
    Ok(LoadReport {
        format: ck.format,
        head_loaded,
        pos_embed_resized_from: resized,
        ignored: ck.ignored,
        fc_norm_new,
    })
}

/// What a tensor the checkpoint has (`extra`) or lacks says about the
/// model options to pick, for the error message.
fn option_hint(name: &str, extra: bool) -> &'static str {
    match (name, extra) {
        (n, true) if n.contains(".ls1.") || n.contains(".ls2.") => {
            ": the checkpoint has LayerScale; pick a preset with it (deit3_base_patch16_224, \
             vit_base_patch14_dinov2, ...: `simfreeze models`) or set model.init_values"
        }
        (n, false) if n.contains(".ls1.") || n.contains(".ls2.") => {
            ": the model has LayerScale (model.init_values) and the checkpoint has none; \
             pick the checkpoint's preset (`simfreeze models`)"
        }
        ("reg_token", true) => {
            ": the checkpoint has register tokens; use vit_base_patch14_reg4_dinov2 or set \
             model.reg_tokens and model.no_embed_class"
        }
        ("reg_token", false) => {
            ": the model has register tokens (model.reg_tokens), the checkpoint none"
        }
        (n, true) if n.starts_with("norm_pre.") => {
            ": the checkpoint normalises before the blocks (CLIP); set model.pre_norm: true \
             or use a CLIP preset"
        }
        (n, true) if n.starts_with("fc_norm.") => {
            ": the checkpoint pools with fc_norm (MAE / BEiT fine-tuning); set \
             model.global_pool: \"avg\" (vit_base_patch16_224.mae)"
        }
        (n, true) if n.starts_with("norm.") => {
            ": the checkpoint normalises the tokens before pooling; set model.fc_norm: false \
             or global_pool: \"token\""
        }
        ("cls_token", true) => ": the checkpoint has a class token; set model.class_token: true",
        (n, true) if n.ends_with("qkv.bias") => {
            ": the checkpoint has qkv biases; set model.qkv_bias: true"
        }
        ("patch_embed.proj.bias", true) => {
            ": the checkpoint's patch embedding has a bias, so it has no norm_pre; set \
             model.pre_norm: false"
        }
        (_, true) => " (another architecture? `simfreeze models` lists the presets)",
        _ => " (pick the checkpoint's preset: `simfreeze models`)",
    }
}

/// timm's `resample_abs_pos_embed`: the first `prefix` entries kept, the
/// `old` grid of the rest resampled to `new` (`bicubic`: bicubic with
/// antialiasing, else bilinear without), `[1, prefix + h*w, D] -> [1,
/// prefix + h'*w', D]`.
pub fn resample_pos_embed(
    pe: &Tensor,
    prefix: i64,
    old: (i64, i64),
    new: (i64, i64),
    bicubic: bool,
) -> Tensor {
    let (_, tokens, d) = pe.size3().expect("[1, N, D]");
    let kind = pe.kind();
    let grid = pe
        .narrow(1, prefix, tokens - prefix)
        .to_kind(Kind::Float)
        .reshape([1, old.0, old.1, d])
        .permute([0, 3, 1, 2]);
    let size = [new.0, new.1];
    let grid = if bicubic {
        grid.internal_upsample_bicubic2d_aa(size, false, None, None)
    } else {
        grid.upsample_bilinear2d(size, false, None, None)
    };
    let grid = grid
        .permute([0, 2, 3, 1])
        .reshape([1, new.0 * new.1, d])
        .to_kind(kind);
    Tensor::cat(&[pe.narrow(1, 0, prefix), grid], 1)
}

fn take(
    path: &Path,
    raw: &mut BTreeMap<String, Tensor>,
    key: &str,
) -> Result<Tensor, WeightsError> {
    raw.remove(key)
        .ok_or_else(|| err(path, format!("no tensor `{key}`")))
}

/// The LayerNorm epsilon recorded beside a weights file: `model.json`
/// (written by simfreeze next to every `model.safetensors`) or a Hugging
/// Face `config.json` (`layer_norm_eps`), if there is one and it says.
pub fn norm_eps_beside(path: &Path) -> Result<Option<f64>, WeightsError> {
    for (file, key) in [
        ("model.json", "norm_eps"),
        ("config.json", "layer_norm_eps"),
    ] {
        let side = path.with_file_name(file);
        let Ok(text) = std::fs::read_to_string(&side) else {
            continue;
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(&side, format!("not valid JSON: {e}")))?;
        if let Some(eps) = v.get(key).and_then(|e| e.as_f64()) {
            return Ok(Some(eps));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_config, PrefixModel, Vit};
    use tch::Device;

    fn model(classes: i64, seed: i64) -> (VarStore, Vit) {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &test_config(classes));
        (vs, m)
    }

    fn logits(m: &Vit, x: &Tensor) -> Tensor {
        tch::no_grad(|| m.forward_frozen(x, 0).logits)
    }

    #[test]
    fn timm_round_trip_and_head_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        let (vs, m) = model(5, 1);
        vs.save(&file).unwrap();
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));

        let (vs2, m2) = model(5, 2);
        let r = load_into(
            &vs2,
            &m2.cfg,
            Checkpoint::read(&file).unwrap(),
            HeadInit::Auto,
        )
        .unwrap();
        assert!(r.head_loaded);
        assert_eq!(logits(&m, &x), logits(&m2, &x));

        // Another class count: the head stays as initialised, the rest loads.
        let (vs3, m3) = model(3, 3);
        let head_before = vs3.variables()["head.weight"].copy();
        let r = load_into(
            &vs3,
            &m3.cfg,
            Checkpoint::read(&file).unwrap(),
            HeadInit::Auto,
        )
        .unwrap();
        assert!(!r.head_loaded);
        assert_eq!(vs3.variables()["head.weight"], head_before);
        assert_eq!(
            vs3.variables()["blocks.1.mlp.fc1.weight"],
            vs.variables()["blocks.1.mlp.fc1.weight"]
        );
        let e = load_into(
            &vs3,
            &m3.cfg,
            Checkpoint::read(&file).unwrap(),
            HeadInit::Load,
        )
        .unwrap_err();
        assert!(e.to_string().contains("5 classes"), "{e}");

        // New: same class count, head not loaded.
        let (vs4, m4) = model(5, 4);
        let r = load_into(
            &vs4,
            &m4.cfg,
            Checkpoint::read(&file).unwrap(),
            HeadInit::New,
        )
        .unwrap();
        assert!(!r.head_loaded);
        assert_ne!(
            vs4.variables()["head.weight"],
            vs.variables()["head.weight"]
        );
    }

    #[test]
    fn mismatches_name_the_file_and_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        let (vs, _) = model(5, 1);
        vs.save(&file).unwrap();
        let mut cfg = test_config(5);
        cfg.depth = 4;
        let vs2 = VarStore::new(Device::Cpu);
        let _ = Vit::new(&vs2.root(), &cfg);
        let e =
            load_into(&vs2, &cfg, Checkpoint::read(&file).unwrap(), HeadInit::Auto).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("m.safetensors") && msg.contains("3 blocks"),
            "{msg}"
        );

        let e = Checkpoint::read(&dir.path().join("absent.safetensors"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("absent.safetensors"));
        std::fs::write(dir.path().join("junk.safetensors"), b"not safetensors").unwrap();
        let e = Checkpoint::read(&dir.path().join("junk.safetensors"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("junk.safetensors"), "{e}");
    }

    #[test]
    fn a_token_pooled_checkpoint_loads_into_an_mae_style_model_with_a_fresh_fc_norm() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pre.safetensors");
        let (vs, _) = model(5, 1);
        vs.save(&file).unwrap();
        let mae = VitConfig {
            global_pool: "avg".into(),
            ..test_config(5)
        };
        let vs2 = VarStore::new(Device::Cpu);
        let _ = Vit::new(&vs2.root(), &mae);
        let before = vs2.variables()["fc_norm.weight"].copy();
        let report =
            load_into(&vs2, &mae, Checkpoint::read(&file).unwrap(), HeadInit::Auto).unwrap();
        assert!(report.fc_norm_new, "{report}");
        assert!(report.ignored.contains(&"norm.weight".to_string()));
        assert!(report.to_string().contains("fc_norm new"), "{report}");
        assert!(vs2.variables()["fc_norm.weight"].equal(&before));
        let a = &vs.variables()["blocks.0.attn.qkv.weight"];
        assert!(vs2.variables()["blocks.0.attn.qkv.weight"].equal(a));
    }

    #[test]
    fn a_checkpoint_of_another_family_names_the_option_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ls.safetensors");
        let with_ls = VitConfig {
            init_values: Some(1e-5),
            ..test_config(5)
        };
        let vs = VarStore::new(Device::Cpu);
        let _ = Vit::new(&vs.root(), &with_ls);
        vs.save(&file).unwrap();
        let plain = test_config(5);
        let vs2 = VarStore::new(Device::Cpu);
        let _ = Vit::new(&vs2.root(), &plain);
        let e = load_into(
            &vs2,
            &plain,
            Checkpoint::read(&file).unwrap(),
            HeadInit::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ls1.gamma") && e.contains("init_values"), "{e}");
        // The other way round: the model wants LayerScale the file lacks.
        let file2 = dir.path().join("plain.safetensors");
        vs2.save(&file2).unwrap();
        let vs3 = VarStore::new(Device::Cpu);
        let _ = Vit::new(&vs3.root(), &with_ls);
        let e = load_into(
            &vs3,
            &with_ls,
            Checkpoint::read(&file2).unwrap(),
            HeadInit::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("blocks.0.ls1.gamma") && e.contains("LayerScale"),
            "{e}"
        );
    }

    #[test]
    fn position_embedding_resamples_to_another_grid() {
        let pe = Tensor::randn([1, 1 + 4 * 4, 6], (Kind::Float, Device::Cpu));
        let up = resample_pos_embed(&pe, 1, (4, 4), (8, 8), true);
        assert_eq!(up.size(), [1, 65, 6]);
        assert_eq!(up.narrow(1, 0, 1), pe.narrow(1, 0, 1));
        let same = resample_pos_embed(&pe, 1, (4, 4), (4, 4), true);
        assert!(same.allclose(&pe, 1e-5, 1e-5, false));
        assert_eq!(
            resample_pos_embed(&pe, 1, (4, 4), (6, 6), false).size(),
            [1, 37, 6]
        );
    }
}
