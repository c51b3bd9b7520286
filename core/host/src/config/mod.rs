//! Run configuration: the raw RON file (`deny_unknown_fields`, errors with
//! file:line:column), `--set key=value` overrides, and validation.
//!
//! Precedence: defaults < RON file < `--policy`/`--policy-config` <
//! `--set` overrides.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::dist::Backend;
use crate::engine::optim::{AdamWConfig, OptimizerKind, Recipe, SgdConfig};
use crate::error::UsageError;
use crate::model::precision::Precision;
use crate::model::weights::HeadInit;
use crate::model::{Normalisation, VitConfig};

mod model;
mod overrides;

pub use model::ModelSection;
use overrides::comparison_key;
pub use overrides::{apply_overrides, parse_ron};

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DataSource {
    /// Fashion-MNIST IDX files under `root`.
    FashionMnist {
        /// Directory of the `*-ubyte.gz` files.
        root: PathBuf,
    },
    /// `root/<train>/<class>/*.jpg|png` and `root/<eval>/<class>/...`.
    ImageFolder {
        /// The directory holding the split directories.
        root: PathBuf,
        /// Training split directory.
        #[serde(default = "default_train_dir")]
        train: String,
        /// Evaluation split directory.
        #[serde(default = "default_eval_dir")]
        eval: String,
    },
    /// CUB-200-2011 (`CUB_200_2011/` with `images.txt`, ...).
    Cub {
        /// The `CUB_200_2011` directory.
        root: PathBuf,
    },
    /// NABirds (`images.txt`, `image_class_labels.txt`, ...).
    Nabirds {
        /// The NABirds directory.
        root: PathBuf,
    },
    /// Stanford Dogs (`train_list.mat`, `test_list.mat`, `Images/`).
    StanfordDogs {
        /// The directory holding the lists and `Images/`.
        root: PathBuf,
    },
    /// Deterministic synthetic images (tests, benchmarks).
    Synthetic {
        /// Training samples.
        train: i64,
        /// Evaluation samples.
        eval: i64,
        /// Classes.
        classes: i64,
    },
}

/// The data section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// The source.
    pub source: DataSource,
    /// Keep only these classes, relabelled 0..k in this order.
    pub classes: Option<Vec<i64>>,
    /// Use at most this many training samples.
    pub train_limit: Option<i64>,
    /// Use at most this many evaluation samples.
    pub eval_limit: Option<i64>,
    /// Normalisation mean: one value, or one per channel (ImageNet:
    /// `[0.485, 0.456, 0.406]`; augreg ImageNet-21k weights: `0.5`).
    pub mean: Stat,
    /// Normalisation standard deviation (ImageNet: `[0.229, 0.224, 0.225]`;
    /// augreg: `0.5`).
    pub std: Stat,
    /// Image files: the shorter side is resized to this before the centre
    /// crop to `model.image_size` (default: image_size / 0.875, timm's
    /// evaluation crop).
    pub resize: Option<i64>,
    /// Random resized crop and horizontal flip on the training split of an
    /// image-file source, drawn anew every epoch (evaluation keeps the
    /// centre crop).
    pub augment: bool,
}

fn default_train_dir() -> String {
    "train".into()
}

fn default_eval_dir() -> String {
    "val".into()
}

/// A normalisation statistic: one value for every channel, one each, or
/// a name: `"preset"` (what the model preset's weights expect, as
/// `simfreeze models` lists), `"imagenet"` (mean `[0.485, 0.456, 0.406]`,
/// std `[0.229, 0.224, 0.225]`), `"inception"` (0.5 and 0.5, what the
/// augreg ImageNet-21k ViT weights expect), `"clip"` (OpenAI CLIP's) or
/// `"fashion_mnist"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stat {
    /// The same for every channel.
    One(f64),
    /// One per channel.
    PerChannel(Vec<f64>),
    /// A preset by name.
    Named(String),
}

impl Stat {
    /// The values for `channels` channels (`what`: `mean` or `std`);
    /// `preset` is what `"preset"` stands for.
    pub fn per_channel(
        &self,
        channels: i64,
        what: &str,
        preset: Option<Normalisation>,
    ) -> Result<Vec<f64>, UsageError> {
        match self {
            Stat::Named(name) => {
                let norm = match name.as_str() {
                    "preset" => preset,
                    other => Normalisation::named(other),
                };
                let Some(norm) = norm else {
                    let names: Vec<String> = Normalisation::ALL
                        .iter()
                        .map(|n| format!("\"{}\"", n.name))
                        .collect();
                    return Err(UsageError(format!(
                        "data.{what} `{name}`: names are \"preset\", {}",
                        names.join(", ")
                    )));
                };
                let v = if what == "mean" { norm.mean } else { norm.std };
                let v = if v.len() == 1 {
                    vec![v[0]; channels as usize]
                } else {
                    v.to_vec()
                };
                Stat::PerChannel(v).per_channel(channels, what, None)
            }
            Stat::One(v) => Ok(vec![*v; channels as usize]),
            Stat::PerChannel(v) if v.len() == channels as usize => Ok(v.clone()),
            Stat::PerChannel(v) => Err(UsageError(format!(
                "data.{what} has {} values, the model has {channels} channels",
                v.len()
            ))),
        }
    }
}

impl DataSection {
    /// Whether the training transform draws random numbers (`augment`),
    /// which makes the activation cache refuse to start.
    pub fn random_transform(&self) -> bool {
        self.augment
    }
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            source: DataSource::FashionMnist {
                root: "/usr/share/datasets/fashion-mnist".into(),
            },
            classes: None,
            train_limit: None,
            eval_limit: None,
            mean: Stat::One(0.2860),
            std: Stat::One(0.3530),
            resize: None,
            augment: false,
        }
    }
}

/// The training section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Epochs.
    pub epochs: u64,
    /// Batch size (the paper: 16).
    pub batch: i64,
    /// The update rule: `Sgd` (the paper's, default) or `AdamW`.
    pub optimizer: OptimizerKind,
    /// SGD's settings (used when `optimizer` is `Sgd`).
    pub sgd: SgdConfig,
    /// AdamW's settings (used when `optimizer` is `AdamW`).
    pub adamw: AdamWConfig,
    /// Layer-wise learning-rate decay, timm's convention (1: none; BEiT /
    /// MAE / DINOv2 fine-tuning use 0.65 to 0.75): block `i` of L gets
    /// `layer_decay^(L - i)`, the embedding `^(L + 1)`, the head 1; it
    /// multiplies the policies' per-block factors.
    pub layer_decay: f64,
    /// Clip the global gradient norm of the trainable parameters to this
    /// (0: no clipping).
    pub clip_grad_norm: f64,
    /// Label smoothing of the training loss (0: none; evaluation loss is
    /// never smoothed).
    pub label_smoothing: f64,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// CPU threads (0: libtorch's default).
    pub threads: i32,
    /// Evaluate only at the end of the last this many epochs (0, the
    /// default: after every epoch). A comparison reads the last epoch's
    /// top-1, and the convergence check the one before it, so `2` gives
    /// every number a comparison uses without paying for the others;
    /// `metrics.csv` leaves the other epochs' evaluation cells empty.
    pub eval_last: u64,
    /// Checkpoint every this many steps (0: only at epoch ends, which
    /// always checkpoint).
    pub checkpoint_every: u64,
    /// Cache the committed frozen prefix's output per sample and reuse it
    /// in later epochs (needs a deterministic training transform).
    pub cache_frozen: bool,
    /// Largest activation cache allowed, in MiB of the training device's
    /// memory (the cache lives there, in bfloat16 under `Bf16`, else in
    /// float32); 0 (the default): half of the device's free memory when
    /// the cache is made.
    pub cache_max_mib: u64,
    /// On a GPU, keep a training and evaluation set held in memory on the
    /// device when it fits in a quarter of the free memory (training set
    /// first; with `cache_frozen` only the evaluation set): a step then
    /// selects its rows there instead of uploading them. The same numbers
    /// either way; the CPU ignores it.
    pub data_on_device: bool,
    /// `F32`, or `Bf16` for bfloat16 autocast of the forward passes
    /// (GPUs with bf16; parameters and optimizer stay float32).
    pub precision: Precision,
    /// Write TensorBoard event files into the run directory
    /// (`tensorboard --logdir <output>`).
    pub tensorboard: bool,
    /// Blocks frozen from the first step on (0: none; the model's depth or
    /// more: every block, so only the final norm and the head train, which
    /// is linear probing of the features: `compare`'s head-only row).
    pub frozen_from_start: u32,
    /// Data-parallel runs (under torchrun): how long a collective or the
    /// rendezvous waits for the other ranks before the run fails (a rank
    /// that died or hangs).
    pub dist_timeout_s: u64,
    /// Data-parallel runs: the largest bucket of gradients all-reduced in
    /// one call, in MiB.
    pub bucket_mib: u64,
    /// Data-parallel runs: `Auto` (NCCL on GPUs when this build has it,
    /// else Gloo), `Gloo` or `Nccl`.
    pub dist_backend: Backend,
    /// Data-parallel runs: start each gradient bucket's all-reduce during
    /// the backward, as soon as its gradients are computed (PyTorch DDP's
    /// overlap); `false` all-reduces after the whole backward. The same
    /// numbers either way.
    pub overlap_allreduce: bool,
    /// Write every step's observation, as the policy received it, and the
    /// freeze state its decision set to `observations.jsonl` in the run
    /// directory (one JSON line per step; replay it through a policy to
    /// check or debug one: docs/python.md).
    pub record_observations: bool,
    /// Record as `record_observations` does (which it implies), and also
    /// the values of the on-demand observations (contract 2: block tokens
    /// and Gram matrices of the batch, the fixed batch and the reference,
    /// sampled weights, accumulated gradient norms) at the steps that
    /// carried them, so that a replay of Egeria or SmartFRZ is exact. Off
    /// by default: a Gram matrix per block per observed step makes the
    /// file large.
    pub record_on_demand: bool,
}

impl TrainSection {
    /// The data-parallel settings an engine is assembled with.
    pub fn dist(&self) -> crate::engine::launch::DistSettings {
        crate::engine::launch::DistSettings {
            timeout_s: self.dist_timeout_s,
            backend: self.dist_backend,
            bucket_mib: self.bucket_mib,
            overlap: self.overlap_allreduce,
        }
    }

    /// What decides each update: the optimizer and its settings, the
    /// layer-wise decay, clipping and label smoothing.
    pub fn recipe(&self) -> Recipe {
        Recipe {
            kind: self.optimizer,
            sgd: self.sgd.clone(),
            adamw: self.adamw.clone(),
            layer_decay: self.layer_decay,
            clip_grad_norm: self.clip_grad_norm,
            label_smoothing: self.label_smoothing,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1,
            batch: 16,
            optimizer: OptimizerKind::Sgd,
            sgd: SgdConfig::default(),
            adamw: AdamWConfig::default(),
            layer_decay: 1.0,
            clip_grad_norm: 0.0,
            label_smoothing: 0.0,
            seed: 0,
            device: "auto".into(),
            threads: 0,
            eval_last: 0,
            checkpoint_every: 500,
            cache_frozen: false,
            cache_max_mib: 0,
            data_on_device: true,
            precision: Precision::F32,
            tensorboard: true,
            frozen_from_start: 0,
            dist_timeout_s: 300,
            bucket_mib: 25,
            dist_backend: Backend::Auto,
            overlap_allreduce: true,
            record_observations: false,
            record_on_demand: false,
        }
    }
}

/// The policy section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Name or path of the plugin.
    pub plugin: String,
    /// RON options.
    #[serde(default)]
    pub options: String,
}

/// A whole run configuration, as in the RON file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run name (the run directory is `<output>/<name>-<n>`): one path
    /// component, not empty.
    #[serde(default = "default_run_name")]
    pub name: String,
    /// Directory that holds run directories.
    pub output: PathBuf,
    /// Model.
    pub model: ModelSection,
    /// Data.
    pub data: DataSection,
    /// Training.
    pub train: TrainSection,
    /// Freezing policy; none means full fine-tuning.
    pub policy: Option<PolicySection>,
}

impl RunConfig {
    /// Reads and parses `path`; errors give file:line:column.
    pub fn load(path: &Path) -> Result<RunConfig, UsageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsageError(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string()).map_err(|e| match comparison_key(&text) {
            Some(key) => {
                let (exe, p) = (crate::error::command_name(), path.display());
                UsageError(format!(
                    "{p} is a `simfreeze compare` configuration (it has `{key}`), not a run's: \
                         run the comparison with\n  {exe} compare --config {p}\nor one of its \
                         fine-tunes, e.g. the baseline on seed 0, with\n  {exe} compare \
                         --config {p} --only baseline --seed 0\n(`--only` takes any label of \
                         its table)"
                ))
            }
            None => e,
        })
    }

    /// Parses RON text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RunConfig, UsageError> {
        let mut c: RunConfig = parse_ron(text, origin)?;
        if c.output.as_os_str().is_empty() {
            c.output = "runs".into();
        }
        Ok(c)
    }

    /// Checks what the types cannot: the name is one path component, the
    /// classes have no duplicates, the optimizer's values are in range.
    pub fn validate(&self) -> Result<(), UsageError> {
        check_name("name", &self.name)?;
        check_classes("data.classes", self.data.classes.as_deref())?;
        self.train.recipe().validate("train").map_err(UsageError)?;
        if self.train.dist_timeout_s == 0 || self.train.bucket_mib == 0 {
            return Err(UsageError(format!(
                "train.dist_timeout_s is {} and train.bucket_mib {}: both must be at least 1",
                self.train.dist_timeout_s, self.train.bucket_mib
            )));
        }
        Ok(())
    }

    /// Applies `key=value` overrides (`train.epochs=3`,
    /// `train.sgd.lr=0.01`, `data.train_limit=500`); values are RON.
    pub fn with_overrides(self, sets: &[String]) -> Result<RunConfig, UsageError> {
        apply_overrides(self, sets)
    }
}

fn default_run_name() -> String {
    "run".into()
}

/// A run or experiment name becomes a directory under `output`: it must
/// be one non-empty path component, so nothing is written elsewhere.
pub fn check_name(key: &str, name: &str) -> Result<(), UsageError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(UsageError(format!(
            "{key} is {name:?}: give a non-empty name without `/` and other than `.` or `..` \
             (it names a directory under `output`)"
        )));
    }
    Ok(())
}

/// A class list names each class once (the order is the new labels).
pub fn check_classes(key: &str, classes: Option<&[i64]>) -> Result<(), UsageError> {
    let Some(classes) = classes else {
        return Ok(());
    };
    for (i, c) in classes.iter().enumerate() {
        if classes[..i].contains(c) {
            return Err(UsageError(format!(
                "{key} lists class {c} twice: give each class once"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_ron_points_at_line_and_column() {
        let e =
            RunConfig::parse("(\n  name: \"x\",\n  train: (epochs: ),\n)", "c.ron").unwrap_err();
        assert!(e.0.starts_with("c.ron:3:"), "{}", e.0);
    }

    #[test]
    fn unknown_key_is_refused_with_the_valid_ones() {
        let e = RunConfig::parse("(trian: ())", "c.ron").unwrap_err();
        assert!(e.0.contains("trian") && e.0.contains("train"), "{}", e.0);
    }

    #[test]
    fn wrong_type_is_refused() {
        let e = RunConfig::parse("(train: (epochs: \"two\"))", "c.ron").unwrap_err();
        assert!(e.0.contains("c.ron:1:"), "{}", e.0);
    }

    #[test]
    fn overrides_apply_and_check() {
        let c = RunConfig::parse("(train: (epochs: 2))", "c").unwrap();
        let c = c
            .with_overrides(&["train.epochs=5".into(), "train.sgd.lr=0.1".into()])
            .unwrap();
        assert_eq!(c.train.epochs, 5);
        assert_eq!(c.train.sgd.lr, 0.1);
        let e = c
            .clone()
            .with_overrides(&["train.epoks=1".into()])
            .unwrap_err();
        assert!(e.0.contains("unknown key"), "{}", e.0);
    }

    #[test]
    fn overrides_take_enum_variants() {
        let c = RunConfig::parse("()", "c").unwrap();
        let c = c
            .with_overrides(&[
                "train.precision=Bf16".into(),
                r#"data.source=Cub(root: "/data/CUB_200_2011")"#.into(),
                r#"model.weights="w.safetensors""#.into(),
                "data.mean=[0.5, 0.4, 0.3]".into(),
                "model.head=New".into(),
                "data.train_limit=Some(7)".into(),
            ])
            .unwrap();
        assert_eq!(c.train.precision, Precision::Bf16);
        assert_eq!(
            c.data.source,
            DataSource::Cub {
                root: "/data/CUB_200_2011".into()
            }
        );
        assert_eq!(c.model.weights, Some(PathBuf::from("w.safetensors")));
        assert_eq!(c.data.mean, Stat::PerChannel(vec![0.5, 0.4, 0.3]));
        assert_eq!(c.model.head, HeadInit::New);
        assert_eq!(c.data.train_limit, Some(7));
        let c = c.with_overrides(&["data.train_limit=None".into()]).unwrap();
        assert_eq!(c.data.train_limit, None);
        assert!(RunConfig::default()
            .with_overrides(&["train.precision=Half".into()])
            .is_err());
    }

    #[test]
    fn normalisation_presets() {
        let c = RunConfig::parse(r#"(data: (mean: "imagenet", std: "imagenet"))"#, "c").unwrap();
        assert_eq!(
            c.data.mean.per_channel(3, "mean", None).unwrap(),
            [0.485, 0.456, 0.406]
        );
        assert_eq!(
            c.data.std.per_channel(3, "std", None).unwrap(),
            [0.229, 0.224, 0.225]
        );
        assert!(
            c.data.mean.per_channel(1, "mean", None).is_err(),
            "3 values, 1 channel"
        );
        let c = RunConfig::parse(r#"(data: (mean: "inception"))"#, "c").unwrap();
        assert_eq!(c.data.mean.per_channel(3, "mean", None).unwrap(), [0.5; 3]);
        let c = RunConfig::parse(r#"(data: (mean: "imagenet21k"))"#, "c").unwrap();
        assert!(c
            .data
            .mean
            .per_channel(3, "mean", None)
            .unwrap_err()
            .0
            .contains("\"clip\""));
        // "preset": what the model preset's weights expect.
        let c = RunConfig::parse(
            r#"(model: (preset: "vit_base_patch16_clip_224"), data: (mean: "preset", std: "clip"))"#,
            "c",
        )
        .unwrap();
        let norm = c.model.normalisation();
        assert_eq!(norm, Some(Normalisation::CLIP));
        let mean = c.data.mean.per_channel(3, "mean", norm).unwrap();
        assert_eq!(mean, Normalisation::CLIP.mean);
        assert_eq!(
            c.data.std.per_channel(3, "std", None).unwrap(),
            Normalisation::CLIP.std
        );
        assert!(c.data.mean.per_channel(3, "mean", None).is_err());
    }

    #[test]
    fn every_model_override_reaches_the_model() {
        let text = r#"(model: (preset: "vit_base_patch14_dinov2", image_size: 224, patch: 16,
            dim: 48, depth: 2, heads: 4, mlp_ratio: 2.0, classes: 3, norm_eps: 1e-5,
            qkv_bias: false, init_values: 0.1, class_token: false, reg_tokens: 2,
            no_embed_class: true, global_pool: "avg", fc_norm: false, pre_norm: true,
            act_layer: "quick_gelu", dynamic_img_size: true))"#;
        let c = RunConfig::parse(text, "c")
            .unwrap()
            .model
            .resolve(10)
            .unwrap();
        let want = VitConfig {
            image_size: 224,
            channels: 3,
            patch: 16,
            dim: 48,
            depth: 2,
            heads: 4,
            mlp_ratio: 2.0,
            classes: 3,
            norm_eps: 1e-5,
            qkv_bias: false,
            init_values: Some(0.1),
            class_token: false,
            reg_tokens: 2,
            no_embed_class: true,
            global_pool: "avg".into(),
            fc_norm: Some(false),
            pre_norm: true,
            act_layer: "quick_gelu".into(),
            dynamic_img_size: true,
        };
        assert_eq!(c, want);
        // A field set in the section but unknown to the model would be
        // silently dropped: every section field is a model field.
        let section = serde_json::to_value(ModelSection::default()).unwrap();
        let model = serde_json::to_value(VitConfig::tiny_fmnist()).unwrap();
        for key in section.as_object().unwrap().keys() {
            if !["preset", "weights", "head"].contains(&key.as_str()) {
                assert!(
                    model.get(key).is_some(),
                    "model.{key} is not a VitConfig field"
                );
            }
        }
        assert_eq!(
            section.as_object().unwrap().len(),
            model.as_object().unwrap().len() + 3
        );
        // Bad values are refused with the field's name.
        for (set, says) in [
            (r#"(model: (global_pool: "max"))"#, "global_pool"),
            (r#"(model: (act_layer: "relu"))"#, "act_layer"),
            (r#"(model: (class_token: false))"#, "class token"),
            (r#"(model: (reg_tokens: -1))"#, "reg_tokens"),
        ] {
            let e = RunConfig::parse(set, "c")
                .unwrap()
                .model
                .resolve(10)
                .unwrap_err();
            assert!(e.0.contains(says), "{set}: {e}");
        }
    }

    #[test]
    fn defaults_are_the_paper_recipe() {
        let c = RunConfig::parse("()", "c").unwrap();
        assert_eq!(c.train.batch, 16);
        assert_eq!(c.train.sgd.lr, 0.003);
        assert_eq!(c.train.sgd.momentum, 0.9);
        assert_eq!(c.model.resolve(10).unwrap(), VitConfig::tiny_fmnist());
    }
}
