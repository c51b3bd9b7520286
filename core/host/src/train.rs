//! The training loop. It reads top to bottom: load data, build the model and
//! optimizer, then for every step run the forward with the frozen prefix
//! outside autograd, step the optimizer on the trainable blocks only, and
//! hand the step's observation to the policy through the [`PolicyDriver`].
//! Each epoch ends with an evaluation and a row of `metrics.csv`.
//!
//! Invariant: the model trains exactly under the freeze state the driver
//! reports for the step (`frozen_prefix()`, probe included), and the
//! optimizer never touches the frozen blocks.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use crate::cache::PrefixCache;
use crate::checkpoint::{self, CheckpointMeta};
use crate::cli::UsageError;
use crate::config::{DataSource, RunConfig};
use crate::data::{fashion_mnist, Dataset};
use crate::driver::{PolicyDriver, StepInput, Timeline};
use crate::images;
use crate::model::{Vit, VitConfig};
use crate::optim::Sgd;
use crate::plugin::{PolicyHandle, SearchPath};
use crate::weights::{self, Checkpoint};
use simfreeze_abi::Needs;

/// Parses `auto`, `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, UsageError> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| UsageError(format!("device `{s}`: use auto, cpu or cuda:N"))),
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
    pub augment: Option<images::Augmenter>,
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
    let mean = d.mean.per_channel(c, "mean")?;
    let std = d.std.per_channel(c, "std")?;
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
                let aug = images::Augmenter::new(&train, c, size, resize, &mean, &std)?;
                let labels: Vec<i64> = train.items.iter().map(|i| i.1).collect();
                let ds = Dataset {
                    images: Tensor::zeros([0, c, size, size], (Kind::Float, Device::Cpu)),
                    labels: Tensor::from_slice(&labels),
                    classes: train.classes,
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

/// How to take one step.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan<'a> {
    /// Learning rate.
    pub lr: f64,
    /// Blocks `[0, frozen)` are frozen (probe included).
    pub frozen: usize,
    /// Per-block learning-rate factors (empty: all 1).
    pub lr_factors: &'a [f32],
    /// Compute per-block gradient norms (one extra host sync).
    pub grad_norms: bool,
    /// Copy the class-token features to host memory for the policy.
    pub features: bool,
}

impl StepPlan<'_> {
    /// A plain step: everything at `lr`, `frozen` blocks frozen.
    pub fn simple(lr: f64, frozen: usize) -> StepPlan<'static> {
        StepPlan {
            lr,
            frozen,
            lr_factors: &[],
            grad_norms: false,
            features: false,
        }
    }
}

/// What one step produced.
pub struct StepOut {
    /// Mean batch loss.
    pub loss: f64,
    /// Final class-token features `[B, D]`.
    pub cls: Tensor,
    /// The same in host memory, float32, if the plan asked for them.
    pub cls_host: Option<Tensor>,
    /// Per-block gradient norms, if asked for.
    pub grad_norms: Vec<f32>,
}

/// What a step starts from.
pub enum Batch<'a> {
    /// Input images `[B, C, H, W]`.
    Images(&'a Tensor),
    /// The output of blocks `[0, after)` (from the activation cache).
    Boundary {
        /// `[B, N+1, D]`.
        h: Tensor,
        /// Blocks already applied.
        after: usize,
    },
}

/// One optimizer step. Shared by `run` and `bench`. A NaN or infinite loss
/// is returned as `Err(loss)` before anything is updated, so a diverged
/// step never reaches the weights.
pub fn train_step(
    model: &Vit,
    opt: &mut Sgd,
    batch: Batch<'_>,
    y: &Tensor,
    plan: &StepPlan<'_>,
) -> Result<StepOut, f64> {
    let out = match batch {
        Batch::Images(x) => model.forward_frozen(x, plan.frozen),
        Batch::Boundary { h, after } => model.forward_from(h, after, plan.frozen),
    };
    let loss_t = out.logits.cross_entropy_for_logits(y);
    // The feature copy is queued right behind the forward, before the loss
    // is read: reading the loss (needed anyway, to refuse a NaN step before
    // any update) waits for it too, and the backward is not held up by a
    // second synchronisation after it. Non-blocking device-to-host copies
    // land in pinned memory; on the CPU this is the tensor itself.
    let cls_host = plan.features.then(|| {
        out.cls
            .detach()
            .to_kind(Kind::Float)
            .to_device_(Device::Cpu, Kind::Float, true, false)
    });
    let loss = loss_t.double_value(&[]);
    if !loss.is_finite() {
        return Err(loss);
    }
    let grads = opt.backward(&loss_t, plan.frozen);
    let grad_norms = if plan.grad_norms {
        opt.grad_norms(&grads, model.depth())
    } else {
        Vec::new()
    };
    opt.step(&grads, plan.lr, plan.lr_factors);
    Ok(StepOut {
        loss,
        cls: out.cls,
        cls_host,
        grad_norms,
    })
}

/// Top-1 accuracy (%) and mean loss on `data`.
pub fn evaluate(model: &Vit, data: &Dataset, device: Device) -> (f64, f64) {
    tch::no_grad(|| {
        let n = data.len();
        let (mut correct, mut loss_sum) = (0i64, 0f64);
        let bs = 256;
        let mut start = 0;
        while start < n {
            let len = bs.min(n - start);
            let x = data.images.narrow(0, start, len).to_device(device);
            let y = data.labels.narrow(0, start, len).to_device(device);
            let logits = model.forward_frozen(&x, model.depth());
            loss_sum += logits
                .logits
                .cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            correct += logits
                .logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            start += len;
        }
        let n = n.max(1) as f64;
        (100.0 * correct as f64 / n, loss_sum / n)
    })
}

/// A run directory: fresh, never overwritten.
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `<output>/<name>-NNN` with the first free NNN.
    pub fn create(output: &Path, name: &str) -> Result<RunDir> {
        fs::create_dir_all(output)
            .with_context(|| format!("cannot create the output directory {}", output.display()))?;
        for n in 1..100_000 {
            let path = output.join(format!("{name}-{n:03}"));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        anyhow::bail!("no free run directory name under {}", output.display())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> Result<()> {
        fs::write(self.file(name), contents)
            .with_context(|| format!("cannot write {}", self.file(name).display()))
    }
}

/// Identity of the policy of a run.
#[derive(Debug, Serialize)]
pub struct PolicyIdentity {
    /// Name (`none` for full fine-tuning).
    pub name: String,
    /// Version.
    pub version: String,
    /// Library path.
    pub path: Option<PathBuf>,
    /// SHA-256 of the library file.
    pub sha256: Option<String>,
    /// RON options.
    pub options: String,
}

impl PolicyIdentity {
    fn of(p: Option<&PolicyHandle>) -> Result<Self> {
        let Some(p) = p else {
            return Ok(PolicyIdentity {
                name: "none".into(),
                version: String::new(),
                path: None,
                sha256: None,
                options: String::new(),
            });
        };
        let bytes = fs::read(&p.path).with_context(|| format!("reading {}", p.path.display()))?;
        let digest = Sha256::digest(&bytes);
        Ok(PolicyIdentity {
            name: p.meta.name.clone(),
            version: p.meta.version.clone(),
            path: Some(p.path.clone()),
            sha256: Some(digest.iter().map(|b| format!("{b:02x}")).collect()),
            options: p.options.clone(),
        })
    }
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// How the run ended.
    pub status: Status,
    /// Why it stopped early, if it did.
    pub reason: Option<String>,
    /// Top-1 (%) after the last completed epoch.
    pub final_top1: Option<f64>,
    /// Best top-1 (%) over completed epochs.
    pub best_top1: Option<f64>,
    /// Training wall seconds, evaluation excluded.
    pub train_seconds: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Compute-model cost (units) and full fine-tuning's.
    pub compute_cost: f64,
    /// Compute-model cost of full fine-tuning.
    pub full_compute_cost: f64,
    /// `full_compute_cost / compute_cost`.
    pub compute_speedup: f64,
    /// Per block: first step run frozen, or null.
    pub freeze_step: Vec<Option<u64>>,
    /// Steps with a probe.
    pub probe_steps: u64,
    /// Policy identity.
    pub policy: PolicyIdentity,
    /// The run directory.
    pub run_dir: PathBuf,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    fn new(
        status: Status,
        reason: Option<String>,
        (last, best): (Option<f64>, Option<f64>),
        train_seconds: f64,
        steps: u64,
        t: &Timeline,
        policy: PolicyIdentity,
        dir: &Path,
    ) -> Self {
        Summary {
            status,
            reason,
            final_top1: last,
            best_top1: best,
            train_seconds,
            steps,
            compute_cost: t.cost,
            full_compute_cost: t.full_cost,
            compute_speedup: t.compute_speedup(),
            freeze_step: t.freeze_step.clone(),
            probe_steps: t.probe_steps,
            policy,
            run_dir: dir.to_owned(),
        }
    }
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
    pub augment: Option<images::Augmenter>,
}

impl Plan {
    /// Loads data and plugin, validates everything before any training.
    pub fn resolve(config: RunConfig) -> Result<Plan> {
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
            Some(p) => Some(
                SearchPath::from_env()
                    .load(&p.plugin)?
                    .new_policy(&p.options)?,
            ),
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

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every epoch ran.
    Completed,
    /// Stopped early on request (signal or `--stop-after`); resumable.
    Interrupted,
    /// Stopped by a fault: a policy failure or a diverged loss.
    Failed,
}

/// Outside control of a run.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop (checkpointed, resumable) once this many steps are done in total.
    pub stop_after: Option<u64>,
    /// Set by a signal handler: finish the step, checkpoint, stop.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RunControl {
    fn should_stop(&self, step: u64) -> bool {
        self.stop_after.is_some_and(|n| step >= n)
            || self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// A run that ended before its last step: the run directory holds a
/// checkpoint (if one was written) and a summary with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{reason}\nrun directory: {dir}{resume}")]
pub struct RunStopped {
    /// Interrupted or failed.
    pub status: Status,
    /// Why.
    pub reason: String,
    /// The run directory.
    pub dir: PathBuf,
    /// How to resume, when a checkpoint exists.
    pub resume: String,
    /// The documented exit code of the underlying fault (130 when
    /// interrupted); the fault's text is already in `reason`.
    pub exit_code: i32,
}

/// Starts the plan in a fresh run directory.
pub fn run(plan: Plan, control: &RunControl) -> Result<Summary> {
    let dir = RunDir::create(&plan.config.output, &plan.config.name)?;
    let pretty = ron::ser::PrettyConfig::default();
    dir.write(
        "config.ron",
        &ron::ser::to_string_pretty(&plan.config, pretty)?,
    )?;
    let identity = PolicyIdentity::of(plan.policy.as_ref())?;
    dir.write("policy.json", &serde_json::to_string_pretty(&identity)?)?;
    train_in(plan, dir, None, control)
}

/// Continues the run in `dir` from its checkpoint, with the configuration
/// it was started with.
pub fn resume(dir: &Path, control: &RunControl) -> Result<Summary> {
    let config = RunConfig::load(&dir.join("config.ron"))?;
    let meta = checkpoint::load_meta(dir)?.ok_or_else(|| {
        UsageError(format!(
            "{} has no checkpoint.json: it never reached a checkpoint, nothing to resume",
            dir.display()
        ))
    })?;
    let plan = Plan::resolve(config)?;
    let saved: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(dir.join("policy.json")).context("reading policy.json")?,
    )?;
    let now = PolicyIdentity::of(plan.policy.as_ref())?;
    if saved["sha256"].as_str() != now.sha256.as_deref() {
        eprintln!(
            "warning: the policy library changed since the run started (sha256 {} now {}); \
             resuming with the new one",
            saved["sha256"],
            now.sha256.as_deref().unwrap_or("none")
        );
    }
    train_in(
        plan,
        RunDir {
            path: dir.to_owned(),
        },
        Some(meta),
        control,
    )
}

fn open_truncated(path: &Path, len: Option<u64>, header: Option<&str>) -> Result<BufWriter<File>> {
    let file = match len {
        Some(len) => {
            let f = OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            f.set_len(len)?;
            f
        }
        None => File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    };
    let mut w = BufWriter::new(file);
    if let (None, Some(h)) = (len, header) {
        writeln!(w, "{h}")?;
    }
    Ok(w)
}

fn train_in(
    plan: Plan,
    dir: RunDir,
    start: Option<CheckpointMeta>,
    control: &RunControl,
) -> Result<Summary> {
    let Plan {
        config,
        model: mcfg,
        device,
        train,
        eval,
        policy,
        weights,
        augment,
    } = plan;
    let augment = augment.map(std::sync::Arc::new);
    let identity = PolicyIdentity::of(policy.as_ref())?;
    tch::manual_seed(config.train.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut model = Vit::new(&vs.root(), &mcfg);
    model.precision = config.train.precision;
    if let (Some(ck), None) = (weights, &start) {
        let from = ck.path.display().to_string();
        let report = weights::load_into(&vs, &mcfg, ck, config.model.head)?;
        eprintln!("weights: {from}: {report}");
    }
    let mut opt = Sgd::new(&vs, config.train.sgd.clone());
    let layers = model.depth() as u32;
    let mut driver = PolicyDriver::new(policy, layers);
    let needs = driver.needs();

    let batch = config.train.batch;
    let steps_per_epoch = (train.len() / batch) as u64;
    let total = steps_per_epoch * config.train.epochs;
    let mut metrics = open_truncated(
        &dir.file("metrics.csv"),
        start.as_ref().map(|m| m.metrics_len),
        Some("epoch,train_loss,eval_loss,eval_top1,lr,frozen_blocks,epoch_seconds"),
    )?;
    let mut events = open_truncated(
        &dir.file("events.jsonl"),
        start.as_ref().map(|m| m.events_len),
        None,
    )?;

    let mut step = 0u64;
    let (mut best, mut last) = (None::<f64>, None::<f64>);
    let (mut train_seconds, mut loss_sum, mut carried_seconds) = (0.0, 0.0, 0.0);
    if let Some(m) = &start {
        checkpoint::restore_tensors(&dir.path, m, &vs, &mut opt)?;
        let state = checkpoint::from_hex(&m.policy_state)?;
        if let Some(p) = driver.policy_mut() {
            p.load_state(m.step, &state)?;
        }
        driver.restore_state(m.freeze.clone());
        driver.restore_timeline(m.timeline.clone());
        step = m.step;
        best = m.best_top1;
        last = m.last_top1;
        train_seconds = m.train_seconds;
        loss_sum = m.epoch_loss_sum;
        carried_seconds = m.epoch_seconds;
        eprintln!("resuming {} at step {step}/{total}", dir.path.display());
    } else {
        eprintln!(
            "run {}: {} train / {} eval images, {} steps, policy {}",
            dir.path.display(),
            train.len(),
            eval.len(),
            total,
            identity.name
        );
    }
    let every = config.train.checkpoint_every;
    let mut cache = if config.train.cache_frozen {
        Some(PrefixCache::new(
            train.len(),
            mcfg.tokens(),
            mcfg.dim,
            config.train.cache_max_mib,
            config.data.random_transform(),
            device,
        )?)
    } else {
        None
    };
    let mut progress = Progress::new(total, step);

    while step < total {
        let epoch = step / steps_per_epoch;
        let started = Instant::now();
        let order_vec = train.order(config.train.seed, epoch);
        // Augmented batches are built ahead on a background thread.
        let prefetch = augment.as_ref().map(|a| {
            images::Prefetch::start(
                a.clone(),
                order_vec.clone(),
                batch as usize,
                (step % steps_per_epoch) as usize,
                (config.train.seed, epoch),
                3,
            )
        });
        let order = Tensor::from_slice(&order_vec);
        let mut lr = 0.0;
        let mut stop: Option<(Status, String, Option<anyhow::Error>)> = None;
        while step < total && step / steps_per_epoch == epoch {
            let b = (step % steps_per_epoch) as i64;
            let idx = order.narrow(0, b * batch, batch);
            let y_host = train.labels.index_select(0, &idx);
            let y = upload(&y_host, device);
            let state = driver.state();
            let committed = state.frontier as usize;
            let x;
            let input = match cache.as_mut() {
                Some(c) if committed > 0 => Batch::Boundary {
                    h: c.boundary(&model, &train.images, &idx, committed),
                    after: committed,
                },
                _ => {
                    x = match &prefetch {
                        Some(p) => upload(&p.next()?, device),
                        None => upload(&train.images.index_select(0, &idx), device),
                    };
                    Batch::Images(&x)
                }
            };
            let frozen = state.frozen_prefix() as usize;
            let factors = state.lr_factors.clone();
            lr = opt.config().lr_at(step, total);
            let plan = StepPlan {
                lr,
                frozen,
                lr_factors: &factors,
                grad_norms: needs.contains(Needs::GRAD_NORMS),
                features: needs.contains(Needs::CLS_FEATURES),
            };
            let StepOut {
                loss,
                cls_host,
                grad_norms,
                ..
            } = match train_step(&model, &mut opt, input, &y, &plan) {
                Ok(out) => out,
                Err(loss) => {
                    stop = Some((
                        Status::Failed,
                        format!(
                            "training loss is {loss} at step {step} (epoch {epoch}); the weights \
                             were not updated by that step. Lower train.sgd.lr or check the data."
                        ),
                        Some(anyhow::Error::new(Diverged)),
                    ));
                    break;
                }
            };
            loss_sum += loss;
            let (features, labels) = host_copies(needs, cls_host.as_ref(), &y_host)?;
            let outcome = driver.after_step(&StepInput {
                step,
                epoch,
                steps_per_epoch,
                total_steps: total,
                loss: loss as f32,
                batch: batch as usize,
                features: &features,
                feature_dim: mcfg.dim as usize,
                labels: &labels,
                num_classes: train.classes as usize,
                grad_norms: &grad_norms,
            });
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    stop = Some((Status::Failed, e.to_string(), Some(e.into())));
                    break;
                }
            };
            write_events(&mut events, step, &outcome)?;
            step += 1;
            progress.tick(step, loss, batch, driver.state().frontier);
            let at_epoch_end = step % steps_per_epoch == 0;
            let stopping = control.should_stop(step) && step < total;
            if stopping || (every > 0 && step % every == 0 && !at_epoch_end) {
                let acc = Accum {
                    loss_sum,
                    epoch_seconds: carried_seconds + started.elapsed().as_secs_f64(),
                    train_seconds,
                    best,
                    last,
                };
                let files = (&mut metrics, &mut events);
                write_checkpoint(&dir.path, &vs, &opt, &driver, files, step, &acc)?;
            }
            if stopping {
                let reason = format!("stopped after step {step} of {total}");
                stop = Some((Status::Interrupted, reason, None));
                break;
            }
        }
        if let Some((status, reason, source)) = stop {
            progress.finish_line();
            metrics.flush()?;
            events.flush()?;
            let has_checkpoint = checkpoint::load_meta(&dir.path)?.is_some();
            let summary = Summary::new(
                status.clone(),
                Some(reason.clone()),
                (last, best),
                train_seconds,
                step,
                driver.timeline(),
                identity,
                &dir.path,
            );
            dir.write("summary.json", &serde_json::to_string_pretty(&summary)?)?;
            return Err(RunStopped {
                status,
                reason,
                resume: if has_checkpoint {
                    format!(
                        "\nresume with: simfreeze run --resume {}",
                        dir.path.display()
                    )
                } else {
                    "\n(no checkpoint was written yet; start again)".into()
                },
                dir: dir.path.clone(),
                exit_code: match &source {
                    None => 130,
                    Some(e) => crate::cli::exit_code(e),
                },
            }
            .into());
        }
        let epoch_seconds = carried_seconds + started.elapsed().as_secs_f64();
        carried_seconds = 0.0;
        train_seconds += epoch_seconds;
        progress.finish_line();
        let (top1, eval_loss) = evaluate(&model, &eval, device);
        last = Some(top1);
        best = Some(best.map_or(top1, |b: f64| b.max(top1)));
        let train_loss = loss_sum / steps_per_epoch.max(1) as f64;
        loss_sum = 0.0;
        writeln!(
            metrics,
            "{epoch},{train_loss:.6},{eval_loss:.6},{top1:.4},{lr:.6e},{},{epoch_seconds:.3}",
            driver.state().frontier
        )?;
        let cached = cache.as_ref().map_or(String::new(), |c| {
            format!(
                ", cache hits {:.0}% ({} stale rows advanced)",
                100.0 * c.hit_rate(),
                c.advanced
            )
        });
        eprintln!(
            "epoch {epoch}: train loss {train_loss:.4}, eval loss {eval_loss:.4}, top-1 {top1:.2}%, frozen {}/{layers}, {epoch_seconds:.1}s{cached}",
            driver.state().frontier
        );
        let acc = Accum {
            loss_sum: 0.0,
            epoch_seconds: 0.0,
            train_seconds,
            best,
            last,
        };
        write_checkpoint(
            &dir.path,
            &vs,
            &opt,
            &driver,
            (&mut metrics, &mut events),
            step,
            &acc,
        )?;
    }
    save_model(&dir.path.join(MODEL_FILE), &vs, &mcfg)?;
    let summary = Summary::new(
        Status::Completed,
        None,
        (last, best),
        train_seconds,
        step,
        driver.timeline(),
        identity,
        &dir.path,
    );
    dir.write("summary.json", &serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// The final weights of a completed run, in its run directory (timm
/// names; `model.weights` and `simfreeze eval --weights` read it).
pub const MODEL_FILE: &str = "model.safetensors";

/// The model's shape as JSON beside [`MODEL_FILE`] (its LayerNorm epsilon
/// is read back when the weights are loaded).
pub const MODEL_INFO_FILE: &str = "model.json";

fn save_model(path: &Path, vs: &nn::VarStore, cfg: &VitConfig) -> Result<()> {
    let info = path.with_file_name(MODEL_INFO_FILE);
    fs::write(&info, serde_json::to_string_pretty(cfg)?)
        .with_context(|| format!("cannot write {}", info.display()))?;
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = path.with_extension("tmp");
    Tensor::write_safetensors(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Copies to host memory what the policy asked for (and nothing else):
/// the class-token features `[B, D]` flattened, and the labels.
fn host_copies(
    needs: Needs,
    cls_host: Option<&Tensor>,
    y_host: &Tensor,
) -> Result<(Vec<f32>, Vec<i64>)> {
    let features = match cls_host {
        Some(c) if needs.contains(Needs::CLS_FEATURES) => Vec::try_from(c.flatten(0, -1))?,
        _ => Vec::new(),
    };
    let labels = if needs.contains(Needs::LABELS) {
        Vec::try_from(y_host)?
    } else {
        Vec::new()
    };
    Ok((features, labels))
}

/// Moves a host batch to `device`: on a GPU through pinned memory with a
/// non-blocking copy, so the upload overlaps work already queued.
fn upload(t: &Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        t.pin_memory(device)
            .to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}

/// Per-run accumulators a checkpoint carries.
struct Accum {
    loss_sum: f64,
    epoch_seconds: f64,
    train_seconds: f64,
    best: Option<f64>,
    last: Option<f64>,
}

fn write_checkpoint(
    dir: &Path,
    vs: &nn::VarStore,
    opt: &Sgd,
    driver: &PolicyDriver,
    (metrics, events): (&mut BufWriter<File>, &mut BufWriter<File>),
    step: u64,
    acc: &Accum,
) -> Result<()> {
    metrics.flush()?;
    events.flush()?;
    let policy_state = match driver.policy() {
        Some(p) => p.save_state(step)?,
        None => Vec::new(),
    };
    let meta = CheckpointMeta {
        format: 0,
        step,
        epoch_loss_sum: acc.loss_sum,
        epoch_seconds: acc.epoch_seconds,
        train_seconds: acc.train_seconds,
        best_top1: acc.best,
        last_top1: acc.last,
        freeze: driver.state().clone(),
        timeline: driver.timeline().clone(),
        policy_state: checkpoint::to_hex(&policy_state),
        weights: String::new(),
        metrics_len: metrics.get_ref().metadata()?.len(),
        events_len: events.get_ref().metadata()?.len(),
    };
    checkpoint::save(dir, meta, vs, opt)
}

/// The training loss became NaN or infinite.
#[derive(Debug, thiserror::Error)]
#[error("training diverged")]
pub struct Diverged;

fn write_events(out: &mut impl Write, step: u64, o: &crate::driver::StepOutcome) -> Result<()> {
    if !o.change.committed.is_empty() {
        let blocks: Vec<u32> = o.change.committed.clone().collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"step": step, "event": "freeze", "blocks": blocks})
        )?;
    }
    if let Some((from, to)) = o.change.probe {
        writeln!(
            out,
            "{}",
            serde_json::json!({"step": step, "event": "probe", "from": from, "to": to})
        )?;
    }
    for (name, value) in &o.scalars {
        writeln!(
            out,
            "{}",
            serde_json::json!({"step": step, "event": "scalar", "name": name, "value": value})
        )?;
    }
    Ok(())
}

/// A one-line progress display on a terminal, a log line every few
/// percent otherwise.
struct Progress {
    total: u64,
    tty: bool,
    started: Instant,
    start: u64,
    last_print: u64,
}

impl Progress {
    fn new(total: u64, start: u64) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            start,
            last_print: start,
        }
    }

    fn tick(&mut self, step: u64, loss: f64, batch: i64, frozen: u32) {
        let every = if self.tty {
            10
        } else {
            (self.total / 20).max(1)
        };
        if step - self.last_print < every && step != self.total {
            return;
        }
        self.last_print = step;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let ips = (step - self.start) as f64 * batch as f64 / secs;
        let line = format!(
            "step {step}/{} loss {loss:.4} {ips:.0} img/s frozen {frozen}",
            self.total
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish_line(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Result of `simfreeze bench` for one frozen prefix.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// Frozen blocks.
    pub frozen: usize,
    /// Training throughput (policy loop included when a policy is given).
    pub images_per_sec: f64,
    /// Peak resident memory while this prefix ran (MiB; Linux only).
    pub peak_rss_mib: Option<f64>,
    /// Share of step time spent in the policy loop (feature and label copy,
    /// policy call, decision check), when a policy is given.
    pub policy_overhead: Option<f64>,
}

/// What `bench` measures.
pub struct BenchSpec<'a> {
    /// Model shape.
    pub model: &'a VitConfig,
    /// Device.
    pub device: Device,
    /// Batch size.
    pub batch: i64,
    /// Frozen prefixes to time.
    pub frozen: &'a [usize],
    /// Timed steps per prefix and round.
    pub steps: u64,
    /// Untimed steps per prefix first.
    pub warmup: u64,
    /// Rounds; each prefix reports its best.
    pub rounds: u32,
    /// Forward precision.
    pub precision: crate::precision::Precision,
}

/// Times training steps per frozen prefix on random inputs of the model's
/// shape: `warmup` untimed steps, then `rounds` rounds of `steps` timed
/// steps, the prefixes interleaved within each round so that a burst of load
/// on a shared machine hits all of them alike; reports each prefix's best
/// round (the least disturbed). With a policy, every step also runs the
/// policy loop exactly as `run` does (its decisions are checked but the
/// prefix stays fixed), and its share of the step time is reported.
pub fn bench(spec: &BenchSpec<'_>, policy: Option<PolicyHandle>) -> Result<Vec<BenchResult>> {
    let mcfg = spec.model;
    let (device, batch) = (spec.device, spec.batch);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = Vit::new(&vs.root(), mcfg);
    model.precision = spec.precision;
    let mut opt = Sgd::new(&vs, Default::default());
    let x = Tensor::randn(
        [batch, mcfg.channels, mcfg.image_size, mcfg.image_size],
        (Kind::Float, device),
    );
    let y = Tensor::randint(mcfg.classes, [batch], (Kind::Int64, device));
    // Labels come from host memory in a real run too.
    let y_host = y.to_device(Device::Cpu);
    let has_policy = policy.is_some();
    let mut driver = PolicyDriver::new(policy, model.depth() as u32);
    let needs = driver.needs();
    let total = spec.steps * u64::from(spec.rounds.max(1)) * spec.frozen.len() as u64
        + spec.warmup * spec.frozen.len() as u64;
    let mut step = 0u64;
    // Returns seconds spent in the policy loop.
    let mut run = |k: usize, n: u64| -> Result<f64> {
        let mut in_policy = 0.0;
        for _ in 0..n {
            // Random data at a tiny lr cannot diverge; an Err would only
            // mean that step updated nothing. The step reads the loss, so
            // it synchronises like a real one.
            let Ok(out) = train_step(
                &model,
                &mut opt,
                Batch::Images(&x),
                &y,
                &StepPlan {
                    features: has_policy && needs.contains(Needs::CLS_FEATURES),
                    ..StepPlan::simple(1e-4, k)
                },
            ) else {
                continue;
            };
            if has_policy {
                let t = Instant::now();
                let (features, labels) = host_copies(needs, out.cls_host.as_ref(), &y_host)?;
                driver.after_step(&StepInput {
                    step,
                    epoch: 0,
                    steps_per_epoch: total.max(1),
                    total_steps: total.max(1),
                    loss: out.loss as f32,
                    batch: batch as usize,
                    features: &features,
                    feature_dim: mcfg.dim as usize,
                    labels: &labels,
                    num_classes: mcfg.classes as usize,
                    grad_norms: &out.grad_norms,
                })?;
                in_policy += t.elapsed().as_secs_f64();
            }
            step += 1;
        }
        Ok(in_policy)
    };
    let n = spec.frozen.len();
    let (mut best, mut overhead, mut peak) = (
        vec![0.0f64; n],
        vec![f64::INFINITY; n],
        vec![None::<f64>; n],
    );
    for &k in spec.frozen {
        run(k, spec.warmup)?;
    }
    for _ in 0..spec.rounds.max(1) {
        for (i, &k) in spec.frozen.iter().enumerate() {
            let t = Instant::now();
            let in_policy = run(k, spec.steps)?;
            let secs = t.elapsed().as_secs_f64();
            best[i] = best[i].max(spec.steps as f64 * batch as f64 / secs);
            overhead[i] = overhead[i].min(in_policy / secs);
        }
    }
    // Memory in a pass of its own, after the timing: the process keeps
    // freed memory (see `memory`), so each K first hands back what the
    // previous one left, then its peak is read over two steps.
    for (i, &k) in spec.frozen.iter().enumerate() {
        crate::memory::release_free_memory();
        crate::memory::reset_peak_rss();
        run(k, 2)?;
        peak[i] = crate::memory::peak_rss_mib();
    }
    Ok((0..n)
        .map(|i| BenchResult {
            frozen: spec.frozen[i],
            images_per_sec: best[i],
            peak_rss_mib: peak[i],
            policy_overhead: has_policy.then_some(overhead[i]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        crate::model::test_config(4)
    }

    fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn frozen_group(name: &str, k: usize) -> bool {
        matches!(crate::model::group_of(name), crate::model::Group::Block(i) if i < k)
    }

    #[test]
    fn frozen_parameters_are_bit_identical_with_momentum_and_weight_decay() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let cfg = crate::optim::SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.05,
            warmup_steps: 0,
        };
        let mut opt = Sgd::new(&vs, cfg);
        let data = Dataset::synthetic(16, 4, 1, 8, 0);
        // Train everything first, so every block has momentum to drift with.
        for _ in 0..3 {
            train_step(
                &model,
                &mut opt,
                Batch::Images(&data.images),
                &data.labels,
                &StepPlan::simple(0.1, 0),
            )
            .unwrap();
        }
        let before = snapshot(&vs);
        for _ in 0..4 {
            train_step(
                &model,
                &mut opt,
                Batch::Images(&data.images),
                &data.labels,
                &StepPlan::simple(0.1, 2),
            )
            .unwrap();
        }
        let after = snapshot(&vs);
        let mut changed = 0;
        for ((name, a), (_, b)) in before.iter().zip(&after) {
            if frozen_group(name, 2) {
                assert!(a.equal(b), "{name} moved while frozen");
            } else if !a.equal(b) {
                changed += 1;
            }
        }
        assert!(changed > 0, "trainable parameters must still move");
        // A released probe trains again.
        train_step(
            &model,
            &mut opt,
            Batch::Images(&data.images),
            &data.labels,
            &StepPlan::simple(0.1, 1),
        )
        .unwrap();
        let released = snapshot(&vs);
        let moved = before
            .iter()
            .zip(&released)
            .any(|((n, a), (_, b))| n.starts_with("blocks.1.") && !a.equal(b));
        assert!(moved, "block 1 must train once it is no longer frozen");
    }

    #[test]
    fn lr_factor_zero_holds_a_block_still() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let mut opt = Sgd::new(&vs, Default::default());
        let data = Dataset::synthetic(8, 4, 1, 8, 1);
        let before = snapshot(&vs);
        let plan = StepPlan {
            lr_factors: &[1.0, 0.0, 1.0],
            ..StepPlan::simple(0.1, 0)
        };
        train_step(
            &model,
            &mut opt,
            Batch::Images(&data.images),
            &data.labels,
            &plan,
        )
        .unwrap();
        let after = snapshot(&vs);
        for ((n, a), (_, b)) in before.iter().zip(&after) {
            if n.starts_with("blocks.1.") {
                assert!(a.equal(b), "{n}");
            }
            if n.starts_with("blocks.2.mlp") {
                assert!(!a.equal(b), "{n}");
            }
        }
    }

    #[test]
    fn grad_norms_are_zero_exactly_for_frozen_blocks() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &tiny());
        let mut opt = Sgd::new(&vs, Default::default());
        let data = Dataset::synthetic(8, 4, 1, 8, 2);
        let plan = StepPlan {
            grad_norms: true,
            ..StepPlan::simple(0.01, 1)
        };
        let norms = train_step(
            &model,
            &mut opt,
            Batch::Images(&data.images),
            &data.labels,
            &plan,
        )
        .unwrap()
        .grad_norms;
        assert_eq!(norms.len(), 3);
        assert_eq!(norms[0], 0.0);
        assert!(norms[1] > 0.0 && norms[2] > 0.0, "{norms:?}");
    }

    #[test]
    fn run_dirs_are_never_reused() {
        let d = tempfile::tempdir().unwrap();
        let a = RunDir::create(d.path(), "x").unwrap();
        let b = RunDir::create(d.path(), "x").unwrap();
        assert_ne!(a.path, b.path);
        assert!(a.path.ends_with("x-001") && b.path.ends_with("x-002"));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("gpu").is_err());
    }
}

#[cfg(test)]
mod augment_tests {
    use super::*;

    fn folder(dir: &Path) {
        for split in ["train", "val"] {
            for (c, shade) in [("a", 30u8), ("b", 220)] {
                for i in 0..8u32 {
                    let p = dir.join(format!("{split}/{c}/{i}.png"));
                    fs::create_dir_all(p.parent().unwrap()).unwrap();
                    image::RgbImage::from_fn(12 + i, 10, |x, _| {
                        image::Rgb([shade, (x * 9) as u8, 0])
                    })
                    .save(&p)
                    .unwrap();
                }
            }
        }
    }

    fn config(dir: &Path, extra: &str) -> RunConfig {
        RunConfig::parse(
            &format!(
                r#"(output: {:?},
                model: (preset: "tiny_fmnist", image_size: 8, channels: 3, patch: 4, dim: 12, depth: 2, heads: 3),
                data: (source: ImageFolder(root: {:?}), mean: 0.5, std: 0.5, augment: true),
                train: (epochs: 2, batch: 4, device: "cpu", threads: 1, sgd: (lr: 0.05){extra}))"#,
                dir.join("runs"),
                dir
            ),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn augmented_image_folder_trains_and_refuses_the_cache() {
        let d = tempfile::tempdir().unwrap();
        folder(d.path());
        let plan = Plan::resolve(config(d.path(), "")).unwrap();
        assert!(plan.augment.is_some());
        assert_eq!(plan.train.len(), 16);
        let s = run(plan, &RunControl::default()).unwrap();
        assert_eq!(s.status, Status::Completed);
        assert_eq!(s.steps, 8);
        assert!(s.final_top1.is_some());
        let e = match Plan::resolve(config(d.path(), ", cache_frozen: true")) {
            Ok(plan) => run(plan, &RunControl::default()).unwrap_err(),
            Err(e) => e,
        };
        assert!(format!("{e:#}").contains("random"), "{e:#}");
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;

    #[test]
    fn bf16_autocast_run_learns_on_cpu() {
        let d = tempfile::tempdir().unwrap();
        let cfg = |precision: &str| {
            RunConfig::parse(
                &format!(
                    r#"(output: {:?},
                    model: (preset: "tiny_fmnist", image_size: 8, patch: 4, dim: 12, depth: 2, heads: 3),
                    data: (source: Synthetic(train: 64, eval: 32, classes: 2)),
                    train: (epochs: 3, batch: 8, device: "cpu", threads: 1, precision: {precision}, sgd: (lr: 0.05)))"#,
                    d.path().join("runs")
                ),
                "test",
            )
            .unwrap()
        };
        let bf16 = run(Plan::resolve(cfg("Bf16")).unwrap(), &RunControl::default()).unwrap();
        let f32 = run(Plan::resolve(cfg("F32")).unwrap(), &RunControl::default()).unwrap();
        // The synthetic task is easy: both learn it; bf16 is not identical.
        assert!(bf16.final_top1.unwrap() > 90.0, "{:?}", bf16.final_top1);
        assert!(f32.final_top1.unwrap() > 90.0, "{:?}", f32.final_top1);
        let saved = Tensor::read_safetensors(bf16.run_dir.join(MODEL_FILE)).unwrap();
        assert!(
            saved.iter().all(|(_, t)| t.kind() == Kind::Float),
            "weights stay float32"
        );
    }
}
