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

use crate::cli::UsageError;
use crate::config::{DataSource, RunConfig};
use crate::data::{fashion_mnist, Dataset};
use crate::driver::{PolicyDriver, StepInput, Timeline};
use crate::model::{Vit, VitConfig};
use crate::optim::Sgd;
use crate::plugin::{PolicyHandle, SearchPath};
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

/// Loads the train and evaluation sets of `cfg`.
pub fn load_data(cfg: &RunConfig) -> Result<(Dataset, Dataset)> {
    let d = &cfg.data;
    let (train, eval) = match &d.source {
        DataSource::FashionMnist { root } => (
            fashion_mnist(root, true, d.mean, d.std)?,
            fashion_mnist(root, false, d.mean, d.std)?,
        ),
        DataSource::Synthetic {
            train,
            eval,
            classes,
        } => {
            let m = cfg.model.resolve(*classes)?;
            (
                Dataset::synthetic(*train, *classes, m.channels, m.image_size, cfg.train.seed),
                Dataset::synthetic(
                    *eval,
                    *classes,
                    m.channels,
                    m.image_size,
                    cfg.train.seed + 1,
                ),
            )
        }
    };
    let (mut train, mut eval) = match &d.classes {
        Some(c) => (train.subset(c)?, eval.subset(c)?),
        None => (train, eval),
    };
    if let Some(n) = d.train_limit {
        train = train.take(n);
    }
    if let Some(n) = d.eval_limit {
        eval = eval.take(n);
    }
    Ok((train, eval))
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
}

impl StepPlan<'_> {
    /// A plain step: everything at `lr`, `frozen` blocks frozen.
    pub fn simple(lr: f64, frozen: usize) -> StepPlan<'static> {
        StepPlan {
            lr,
            frozen,
            lr_factors: &[],
            grad_norms: false,
        }
    }
}

/// What one step produced.
pub struct StepOut {
    /// Mean batch loss (a scalar tensor, not yet synchronised).
    pub loss: Tensor,
    /// Final class-token features `[B, D]`.
    pub cls: Tensor,
    /// Per-block gradient norms, if asked for.
    pub grad_norms: Vec<f32>,
}

/// One optimizer step. Shared by `run` and `bench`.
pub fn train_step(
    model: &Vit,
    opt: &mut Sgd,
    x: &Tensor,
    y: &Tensor,
    plan: &StepPlan<'_>,
) -> StepOut {
    let out = model.forward_frozen(x, plan.frozen);
    let loss = out.logits.cross_entropy_for_logits(y);
    let grads = opt.backward(&loss, plan.frozen);
    let grad_norms = if plan.grad_norms {
        opt.grad_norms(&grads, model.depth())
    } else {
        Vec::new()
    };
    opt.step(&grads, plan.lr, plan.lr_factors);
    StepOut {
        loss,
        cls: out.cls,
        grad_norms,
    }
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
    /// Top-1 (%) after the last epoch.
    pub final_top1: f64,
    /// Best top-1 (%) over epochs.
    pub best_top1: f64,
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
        let (train, eval) = load_data(&config)?;
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
        })
    }
}

/// Runs the plan in a fresh run directory.
pub fn run(plan: Plan) -> Result<Summary> {
    let Plan {
        config,
        model: mcfg,
        device,
        train,
        eval,
        policy,
    } = plan;
    let dir = RunDir::create(&config.output, &config.name)?;
    let pretty = ron::ser::PrettyConfig::default();
    dir.write("config.ron", &ron::ser::to_string_pretty(&config, pretty)?)?;
    let identity = PolicyIdentity::of(policy.as_ref())?;
    dir.write("policy.json", &serde_json::to_string_pretty(&identity)?)?;

    tch::manual_seed(config.train.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = Vit::new(&vs.root(), &mcfg);
    let mut opt = Sgd::new(&vs, config.train.sgd.clone());
    let layers = model.depth() as u32;
    let mut driver = PolicyDriver::new(policy, layers);
    let needs = driver.needs();

    let batch = config.train.batch;
    let steps_per_epoch = (train.len() / batch) as u64;
    let total = steps_per_epoch * config.train.epochs;
    let mut metrics = BufWriter::new(File::create(dir.file("metrics.csv"))?);
    writeln!(
        metrics,
        "epoch,train_loss,eval_loss,eval_top1,lr,frozen_blocks,epoch_seconds"
    )?;
    let mut events = BufWriter::new(
        OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(dir.file("events.jsonl"))?,
    );
    let mut progress = Progress::new(total);
    eprintln!(
        "run {}: {} train / {} eval images, {} steps, policy {}",
        dir.path.display(),
        train.len(),
        eval.len(),
        total,
        identity.name
    );

    let (mut best, mut last) = (f64::NAN, f64::NAN);
    let mut train_seconds = 0.0;
    let mut step = 0u64;
    for epoch in 0..config.train.epochs {
        let started = Instant::now();
        let order = Tensor::from_slice(&train.order(config.train.seed, epoch));
        let mut loss_sum = 0.0;
        let mut lr = 0.0;
        for b in 0..steps_per_epoch as i64 {
            let idx = order.narrow(0, b * batch, batch);
            let x = train.images.index_select(0, &idx).to_device(device);
            let y = train.labels.index_select(0, &idx).to_device(device);
            let state = driver.state();
            let frozen = state.frozen_prefix() as usize;
            let factors = state.lr_factors.clone();
            lr = opt.config().lr_at(step, total);
            let plan = StepPlan {
                lr,
                frozen,
                lr_factors: &factors,
                grad_norms: needs.contains(Needs::GRAD_NORMS),
            };
            let StepOut {
                loss,
                cls,
                grad_norms,
            } = train_step(&model, &mut opt, &x, &y, &plan);
            let loss = loss.double_value(&[]);
            if !loss.is_finite() {
                anyhow::bail!(
                    "training loss is {loss} at step {step} (epoch {epoch}); lower train.sgd.lr?"
                );
            }
            loss_sum += loss;
            let features: Vec<f32> = if needs.contains(Needs::CLS_FEATURES) {
                Vec::try_from(
                    cls.detach()
                        .to_kind(Kind::Float)
                        .to_device(Device::Cpu)
                        .flatten(0, -1),
                )?
            } else {
                Vec::new()
            };
            let labels: Vec<i64> = if needs.contains(Needs::LABELS) {
                Vec::try_from(&y.to_device(Device::Cpu))?
            } else {
                Vec::new()
            };
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
            })?;
            write_events(&mut events, step, &outcome)?;
            step += 1;
            progress.tick(step, loss, batch, driver.state().frontier);
        }
        let epoch_seconds = started.elapsed().as_secs_f64();
        train_seconds += epoch_seconds;
        progress.finish_line();
        let (top1, eval_loss) = evaluate(&model, &eval, device);
        last = top1;
        best = if best.is_nan() { top1 } else { best.max(top1) };
        let train_loss = loss_sum / steps_per_epoch.max(1) as f64;
        writeln!(
            metrics,
            "{epoch},{train_loss:.6},{eval_loss:.6},{top1:.4},{lr:.6e},{},{epoch_seconds:.3}",
            driver.state().frontier
        )?;
        metrics.flush()?;
        events.flush()?;
        eprintln!(
            "epoch {epoch}: train loss {train_loss:.4}, eval loss {eval_loss:.4}, top-1 {top1:.2}%, frozen {}/{layers}, {epoch_seconds:.1}s",
            driver.state().frontier
        );
    }
    let t: &Timeline = driver.timeline();
    let summary = Summary {
        final_top1: last,
        best_top1: best,
        train_seconds,
        steps: step,
        compute_cost: t.cost,
        full_compute_cost: t.full_cost,
        compute_speedup: t.compute_speedup(),
        freeze_step: t.freeze_step.clone(),
        probe_steps: t.probe_steps,
        policy: identity,
        run_dir: dir.path.clone(),
    };
    dir.write("summary.json", &serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

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
    last_print: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_print: 0,
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
        let ips = step as f64 * batch as f64 / secs;
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
    /// Training throughput.
    pub images_per_sec: f64,
}

/// Times training steps per frozen prefix on random inputs of the model's
/// shape: `warmup` untimed steps, then `rounds` rounds of `steps` timed
/// steps, the prefixes interleaved within each round so that a burst of load
/// on a shared machine hits all of them alike; reports each prefix's best
/// round (the least disturbed).
pub fn bench(
    mcfg: &VitConfig,
    device: Device,
    batch: i64,
    frozen: &[usize],
    steps: u64,
    warmup: u64,
    rounds: u32,
) -> Vec<BenchResult> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let model = Vit::new(&vs.root(), mcfg);
    let mut opt = Sgd::new(&vs, Default::default());
    let x = Tensor::randn(
        [batch, mcfg.channels, mcfg.image_size, mcfg.image_size],
        (Kind::Float, device),
    );
    let y = Tensor::randint(mcfg.classes, [batch], (Kind::Int64, device));
    let mut run = |k: usize, n: u64| {
        for _ in 0..n {
            let out = train_step(&model, &mut opt, &x, &y, &StepPlan::simple(1e-4, k));
            // Synchronise like a real step does when it reads the loss.
            let _ = out.loss.double_value(&[]);
        }
    };
    let mut best = vec![0.0f64; frozen.len()];
    for &k in frozen {
        run(k, warmup);
    }
    for _ in 0..rounds.max(1) {
        for (i, &k) in frozen.iter().enumerate() {
            let t = Instant::now();
            run(k, steps);
            let ips = (steps as f64 * batch as f64) / t.elapsed().as_secs_f64();
            best[i] = best[i].max(ips);
        }
    }
    frozen
        .iter()
        .zip(best)
        .map(|(&frozen, images_per_sec)| BenchResult {
            frozen,
            images_per_sec,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 8,
            channels: 1,
            patch: 4,
            dim: 12,
            depth: 3,
            heads: 3,
            mlp_ratio: 2.0,
            classes: 4,
        }
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
                &data.images,
                &data.labels,
                &StepPlan::simple(0.1, 0),
            );
        }
        let before = snapshot(&vs);
        for _ in 0..4 {
            train_step(
                &model,
                &mut opt,
                &data.images,
                &data.labels,
                &StepPlan::simple(0.1, 2),
            );
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
            &data.images,
            &data.labels,
            &StepPlan::simple(0.1, 1),
        );
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
        train_step(&model, &mut opt, &data.images, &data.labels, &plan);
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
        let norms = train_step(&model, &mut opt, &data.images, &data.labels, &plan).grad_norms;
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
