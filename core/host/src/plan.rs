//! A resolved run: the RON configuration turned into everything the
//! trainer needs, checked before any training starts. The device is
//! parsed, threads are set, the data is loaded (class subsets and limits
//! applied, image files decoded), the model shape is resolved against the
//! data, initial weights are read and checked against it, and the policy
//! is loaded from the one search path the caller built.
//!
//! Invariant: a bad configuration, a missing file or a plugin that cannot
//! be built fails here, before a run directory exists.

use anyhow::Result;
use simfreeze_runtime::loader::{PolicyHandle, SearchPath};
use tch::{Device, Kind, Tensor};

use crate::config::{DataSource, RunConfig};
use crate::data::{augment, fashion_mnist, images, Dataset};
use crate::error::UsageError;
use crate::model::weights::Checkpoint;
use crate::model::VitConfig;

/// Parses `auto`, `cpu`, `cuda` or `cuda:N` and checks it against this
/// machine: `auto` is `cuda:0` when libtorch sees a GPU, else the CPU; a
/// CUDA device that is not there is a usage error saying what there is.
pub fn parse_device(s: &str) -> Result<Device, UsageError> {
    device_on(s, tch::Cuda::device_count())
}

/// [`parse_device`] on a machine with `cuda_devices` GPUs.
fn device_on(s: &str, cuda_devices: i64) -> Result<Device, UsageError> {
    let index = match s {
        "auto" if cuda_devices > 0 => return Ok(Device::Cuda(0)),
        "auto" | "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                UsageError(format!(
                    "train.device is {s:?}: use \"auto\", \"cpu\" or \"cuda:N\""
                ))
            })?,
    };
    if cuda_devices == 0 {
        return Err(UsageError(format!(
            "train.device is {s:?}, but libtorch sees no CUDA device on this machine (no GPU, \
             no NVIDIA driver, or a libtorch without CUDA); use \"cpu\", or \"auto\" to take a \
             GPU when there is one"
        )));
    }
    if index as i64 >= cuda_devices {
        let plural = if cuda_devices == 1 { "" } else { "s" };
        return Err(UsageError(format!(
            "train.device is {s:?}, but this machine has {cuda_devices} CUDA device{plural} \
             (cuda:0 to cuda:{})",
            cuda_devices - 1
        )));
    }
    Ok(Device::Cuda(index))
}

/// A plugin given as a path (it contains `/` or ends in `.so`) made
/// absolute, so that the run's `config.ron` finds it again from any working
/// directory; a name (`atsf`), looked up on the search path, stays a name.
pub fn absolute_plugin(spec: &str) -> String {
    let is_path = spec.contains('/') || spec.ends_with(".so");
    match is_path {
        true => std::fs::canonicalize(spec)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| spec.to_string()),
        false => spec.to_string(),
    }
}

/// How runs name a device: `cpu`, `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Loaded data: evaluation set, training set if asked for, and the
/// augmenting loader when `data.augment` is on (the training set's
/// `images` is then empty: batches come from the loader).
pub struct Loaded {
    /// Training set (labels always; images unless augmented).
    pub train: Option<Dataset>,
    /// Evaluation set.
    pub eval: Dataset,
    /// Random augmentation of the training split.
    pub augment: Option<augment::Augmenter>,
}

/// Loads the train and evaluation sets of `cfg`.
pub fn load_data(cfg: &RunConfig) -> Result<(Dataset, Dataset)> {
    let l = load_splits(cfg, true)?;
    Ok((l.train.expect("asked for"), l.eval))
}

/// Loads the evaluation set of `cfg`, and the training set when
/// `with_train` (class subset and limits applied to both).
pub fn load_splits(cfg: &RunConfig, with_train: bool) -> Result<Loaded> {
    let d = &cfg.data;
    // The input shape comes from the model (class count does not matter).
    let shape = cfg.model.resolve(1)?;
    let (c, size) = (shape.channels, shape.image_size);
    let norm = cfg.model.normalisation();
    let mean = d.mean.per_channel(c, "mean", norm)?;
    let std = d.std.per_channel(c, "std", norm)?;
    let files = |(train, eval): (images::Split, images::Split)| -> Result<Loaded> {
        let resize = d.resize.unwrap_or((size as f64 / 0.875).floor() as i64);
        if resize < size {
            return Err(UsageError(format!(
                "data.resize {resize} is smaller than model.image_size {size}"
            ))
            .into());
        }
        // Subsets and limits before decoding: nothing unused is read.
        let classes = d.classes.as_deref();
        let train = train.select(classes, d.train_limit)?;
        let eval = eval.select(classes, d.eval_limit)?;
        let n_train = if with_train { train.items.len() } else { 0 };
        eprintln!(
            "decoding {n_train} training and {} evaluation images to {size}x{size}{}",
            eval.items.len(),
            if d.augment && with_train {
                " (training split augmented)"
            } else {
                ""
            }
        );
        let (train, augment) = match (with_train, d.augment) {
            (false, _) => (None, None),
            (true, false) => (
                Some(images::load(&train, c, size, resize, &mean, &std)?),
                None,
            ),
            (true, true) => {
                let aug = augment::Augmenter::new(&train, c, size, resize, &mean, &std)?;
                let labels: Vec<i64> = train.items.iter().map(|i| i.1).collect();
                let ds = Dataset {
                    images: Tensor::zeros([0, c, size, size], (Kind::Float, Device::Cpu)),
                    labels: Tensor::from_slice(&labels),
                    classes: train.classes,
                    bytes: None,
                };
                (Some(ds), Some(aug))
            }
        };
        let eval = images::load(&eval, c, size, resize, &mean, &std)?;
        Ok(Loaded {
            train,
            eval,
            augment,
        })
    };
    let (train, eval) = match &d.source {
        DataSource::FashionMnist { root } => {
            if c != 1 {
                return Err(
                    UsageError(format!("Fashion-MNIST has 1 channel, the model {c}")).into(),
                );
            }
            let train = match with_train {
                true => Some(fashion_mnist(root, true, mean[0], std[0])?),
                false => None,
            };
            (train, fashion_mnist(root, false, mean[0], std[0])?)
        }
        DataSource::ImageFolder { root, train, eval } => {
            return files(images::image_folder(root, train, eval)?)
        }
        DataSource::Cub { root } | DataSource::Nabirds { root } => {
            return files(images::cub_like(root)?)
        }
        DataSource::StanfordDogs { root } => return files(images::stanford_dogs(root)?),
        DataSource::Synthetic {
            train,
            eval,
            classes,
        } => (
            Some(Dataset::synthetic(
                *train,
                *classes,
                c,
                size,
                cfg.train.seed,
            )),
            Dataset::synthetic(*eval, *classes, c, size, cfg.train.seed + 1),
        ),
    };
    if d.augment {
        return Err(UsageError(
            "data.augment needs an image-file source (ImageFolder, Cub, Nabirds, StanfordDogs)"
                .into(),
        )
        .into());
    }
    let (mut train, mut eval) = match &d.classes {
        Some(c) => (train.map(|t| t.subset(c)).transpose()?, eval.subset(c)?),
        None => (train, eval),
    };
    if let Some(n) = d.train_limit {
        train = train.map(|t| t.take(n));
    }
    if let Some(n) = d.eval_limit {
        eval = eval.take(n);
    }
    Ok(Loaded {
        train,
        eval,
        augment: None,
    })
}

/// Everything a run needs, resolved and checked.
pub struct Plan {
    /// The configuration after overrides.
    pub config: RunConfig,
    /// The model shape.
    pub model: VitConfig,
    /// Where to compute.
    pub device: Device,
    /// Training data.
    pub train: Dataset,
    /// Evaluation data.
    pub eval: Dataset,
    /// The policy, if any.
    pub policy: Option<PolicyHandle>,
    /// Initial weights (`model.weights`), read and checked against the model.
    pub weights: Option<Checkpoint>,
    /// Random augmentation of the training split (`data.augment`).
    pub augment: Option<augment::Augmenter>,
}

impl Plan {
    /// Loads data and plugin, validates everything before any training;
    /// the policy plugin (and any metric it loads) comes from `search`.
    pub fn resolve(mut config: RunConfig, search: &SearchPath) -> Result<Plan> {
        config.validate()?;
        if let Some(p) = config.policy.as_mut() {
            p.plugin = absolute_plugin(&p.plugin);
        }
        let device = parse_device(&config.train.device)?;
        if config.train.threads > 0 {
            tch::set_num_threads(config.train.threads);
        }
        if config.train.batch < 1 || config.train.epochs < 1 {
            return Err(
                UsageError("train.batch and train.epochs must be at least 1".into()).into(),
            );
        }
        let Loaded {
            train,
            eval,
            augment,
        } = load_splits(&config, true)?;
        let train = train.expect("asked for");
        let model = config.model.resolve(train.classes)?;
        let shape = train.images.size();
        if shape[1..] != [model.channels, model.image_size, model.image_size] {
            return Err(UsageError(format!(
                "data images are {:?} but the model expects [{}, {}, {}]",
                &shape[1..],
                model.channels,
                model.image_size,
                model.image_size
            ))
            .into());
        }
        if train.len() < config.train.batch {
            return Err(UsageError(format!(
                "{} training samples are fewer than one batch of {}",
                train.len(),
                config.train.batch
            ))
            .into());
        }
        let weights = match &config.model.weights {
            Some(path) => {
                let ck = Checkpoint::read(path)?;
                ck.check(&model)?;
                Some(ck)
            }
            None => None,
        };
        let policy = match &config.policy {
            None => None,
            Some(p) => Some(search.load(&p.plugin)?.new_policy(&p.options)?),
        };
        Ok(Plan {
            config,
            model,
            device,
            train,
            eval,
            policy,
            weights,
            augment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_are_checked_against_the_machine() {
        assert_eq!(device_on("cpu", 2).unwrap(), Device::Cpu);
        assert_eq!(device_on("auto", 0).unwrap(), Device::Cpu);
        assert_eq!(device_on("auto", 1).unwrap(), Device::Cuda(0));
        assert_eq!(device_on("cuda", 1).unwrap(), Device::Cuda(0));
        assert_eq!(device_on("cuda:1", 2).unwrap(), Device::Cuda(1));
        let e = device_on("gpu", 1).unwrap_err().0;
        assert!(e.contains("cuda:N"), "{e}");
        let e = device_on("cuda:0", 0).unwrap_err().0;
        assert!(e.contains("no CUDA device") && e.contains("\"cpu\""), "{e}");
        let e = device_on("cuda:3", 1).unwrap_err().0;
        assert!(e.contains("has 1 CUDA device (cuda:0 to cuda:0)"), "{e}");
        assert_eq!(device_name(Device::Cuda(2)), "cuda:2");
        assert_eq!(device_name(Device::Cpu), "cpu");
    }
}
