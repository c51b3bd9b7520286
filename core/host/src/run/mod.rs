//! A training run: the loop, and the run directory it writes.
//!
//! [`run`] starts a [`Plan`] in a fresh directory, [`resume`] continues one
//! from its checkpoint. The loop reads top to bottom: for every step, fetch
//! the batch (from the activation cache when the committed prefix is
//! cached), let the [`Engine`] step it under the freeze state the policy
//! driver reports, hand the step to the policy, checkpoint when due; each
//! epoch ends with an evaluation, a row of `metrics.csv` and a checkpoint.
//! How a run stops early is a typed [`Stop`]; files are written through the
//! typed writers of [`dir`] and [`records`], TensorBoard's through
//! [`tensorboard`].
//!
//! Invariant: the model trains exactly under the freeze state the driver
//! reports for the step (`frozen_prefix()`, probe included), and a resumed
//! run ends with exactly the files an uninterrupted one would have.

pub mod checkpoint;
pub mod dir;
mod feed;
pub mod progress;
pub mod provenance;
pub mod records;
pub mod tensorboard;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use simfreeze_abi::Needs;
use simfreeze_runtime::driver::{DriverError, PolicyDriver, StepOutcome};
use simfreeze_runtime::loader::SearchPath;
use simfreeze_runtime::more::MoreData;
use tch::{Device, Tensor};

use crate::config::RunConfig;
use crate::data::prefetch::Prefetch;
use crate::data::Dataset;
use crate::engine::cache::PrefixCache;
use crate::engine::dist::{DistEnv, ProcessGroup};
use crate::engine::observer::{self, Observer};
use crate::engine::{
    observe_with, reads, Batch, Comm, Engine, Fnv, ParallelEngine, SingleEngine, StepAt, StepError,
    StepOut, StepPlan,
};
use crate::error::{torch_guard, RunStopped, Status, Stop, TorchError, UsageError};
use crate::model::VitConfig;
use crate::plan::{device_name, Plan};
use checkpoint::CheckpointMeta;
use dir::{
    LogFileSet, LogLengths, RunDir, RunLog, CONFIG_FILE, MODEL_FILE, POLICY_FILE, SUMMARY_FILE,
};
use feed::{fetch, Data};
pub use feed::{FAULT_STEP_VAR, KILL_VAR};
use progress::Progress;
use records::{Event, MetricsRow, PolicyIdentity, Provenance, Summary, Totals};

/// Outside control of a run.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop (checkpointed, resumable) once this many steps are done in total.
    pub stop_after: Option<u64>,
    /// Set by a signal handler: finish the step, checkpoint, stop.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl RunControl {
    fn should_stop(&self, step: u64) -> bool {
        self.stop_after.is_some_and(|n| step >= n)
            || self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
    }
}

/// Starts the plan in a fresh run directory. Under a launcher (torchrun:
/// `WORLD_SIZE` and friends set) every rank joins the data-parallel group
/// first; rank 0 creates the directory and writes every file.
pub fn run(plan: Plan, control: &RunControl) -> Result<Summary> {
    let group = join_group(&plan.config, plan.device)?;
    let dir = match group.as_deref() {
        Some(g) if g.rank != 0 => shared_dir(g, None)?,
        _ => {
            let dir = RunDir::create(&plan.config.output, &plan.config.name)?;
            dir.write_config(&plan.config)?;
            dir.write_json(POLICY_FILE, &PolicyIdentity::of(plan.policy.as_ref())?)?;
            if let Some(g) = group.as_deref() {
                shared_dir(g, Some(&dir))?;
            }
            dir
        }
    };
    train_in(plan, dir, None, control, group)
}

/// Joins the data-parallel group the launcher's variables describe, if
/// any (see [`crate::engine::dist`]), over the backend for `device`.
fn join_group(config: &RunConfig, device: Device) -> Result<Option<Arc<ProcessGroup>>> {
    let Some(env) = DistEnv::from_env()? else {
        return Ok(None);
    };
    let device = env.claim_device(device)?;
    let timeout = Duration::from_secs(config.train.dist_timeout_s.max(1));
    let backend = config.train.dist_backend.resolve(device)?;
    Ok(Some(Arc::new(ProcessGroup::join(&env, timeout, backend)?)))
}

/// The frozen-prefix activation cache for `samples` training samples on
/// `device`, when the run asks for one (`train.cache_frozen`).
fn activation_cache(
    config: &RunConfig,
    model: &VitConfig,
    samples: i64,
    device: Device,
) -> Result<Option<PrefixCache>> {
    if !config.train.cache_frozen {
        return Ok(None);
    }
    let cache = torch_guard(
        || "allocating the activation cache".into(),
        || {
            PrefixCache::new(
                samples,
                (model.tokens(), model.dim),
                config.train.precision,
                config.train.cache_max_mib,
                config.data.random_transform(),
                device,
            )
        },
    )??;
    Ok(Some(cache))
}

/// Rank 0's run directory on every rank: rank 0 publishes `dir` in the
/// group's store, the others read it after a barrier.
fn shared_dir(g: &ProcessGroup, dir: Option<&RunDir>) -> Result<RunDir> {
    if let Some(d) = dir {
        g.store_set("run_dir", d.path.to_string_lossy().as_bytes())?;
    }
    g.barrier()?;
    match dir {
        Some(d) => Ok(d.clone()),
        None => {
            let path = g
                .store_get("run_dir")?
                .ok_or_else(|| anyhow::anyhow!("rank 0 did not publish its run directory"))?;
            Ok(RunDir::existing(Path::new(
                &String::from_utf8_lossy(&path).into_owned(),
            )))
        }
    }
}

/// Continues the run in `path` from its checkpoint, with the configuration
/// it was started with; its policy is loaded from `search`, or from
/// `policy` (a moved library; recorded in the run's `config.ron`).
pub fn resume(
    path: &Path,
    search: &SearchPath,
    policy: Option<&str>,
    control: &RunControl,
) -> Result<Summary> {
    let dir = RunDir::existing(path);
    let mut config = RunConfig::load(&dir.file(CONFIG_FILE))?;
    let writes = DistEnv::from_env()?.map_or(true, |e| e.rank == 0);
    if let Some(spec) = policy {
        let Some(p) = config.policy.as_mut() else {
            return Err(UsageError(format!(
                "{} was run without a policy; --policy cannot add one on resume",
                path.display()
            ))
            .into());
        };
        p.plugin = crate::plan::absolute_plugin(spec);
        if writes {
            dir.write_config(&config)?;
        }
    }
    let meta = checkpoint::load_meta(path)?.ok_or_else(|| {
        UsageError(format!(
            "{} has no checkpoint.json: it never reached a checkpoint, nothing to resume",
            path.display()
        ))
    })?;
    let world = DistEnv::from_env()?.map_or(1, |e| e.world);
    if meta.world_size != world {
        return Err(UsageError(format!(
            "{} was checkpointed by {} rank(s), this resume has {world}: resume with the same \
             number (torchrun --nproc-per-node ...); the per-rank batch and the data shares \
             depend on it",
            path.display(),
            meta.world_size
        ))
        .into());
    }
    let plan = Plan::resolve(config, search)?;
    let group = join_group(&plan.config, plan.device)?;
    let saved: PolicyIdentity = dir.read_json(POLICY_FILE)?;
    let now = PolicyIdentity::of(plan.policy.as_ref())?;
    if saved.sha256 != now.sha256 && writes {
        eprintln!(
            "warning: the policy library changed since the run started (sha256 {} now {}); \
             resuming with the new one",
            saved.sha256.as_deref().unwrap_or("none"),
            now.sha256.as_deref().unwrap_or("none")
        );
    }
    train_in(plan, dir, Some(meta), control, group)
}

fn train_in(
    plan: Plan,
    dir: RunDir,
    start: Option<CheckpointMeta>,
    control: &RunControl,
    group: Option<Arc<ProcessGroup>>,
) -> Result<Summary> {
    let identity = PolicyIdentity::of(plan.policy.as_ref())?;
    let device = device_name(plan.device);
    let layers = plan.model.depth as u32;
    let run_dir = dir.clone();
    let writes = group.as_deref().map_or(true, |g| g.rank == 0);
    let mut trainer = match Trainer::open(plan, dir, start, group) {
        Ok(t) => t,
        Err(e) if writes => return Err(failed_to_start(e, &run_dir, identity, device, layers)),
        Err(e) => return Err(e),
    };
    let stop = trainer.train(control)?;
    trainer.finish(stop, identity)
}

/// A libtorch error before the first step (building the model, allocating
/// the cache) still ends with a failed `summary.json`.
fn failed_to_start(
    e: anyhow::Error,
    dir: &RunDir,
    identity: PolicyIdentity,
    device: String,
    layers: u32,
) -> anyhow::Error {
    let Some(torch) = e.downcast_ref::<TorchError>() else {
        return e;
    };
    let reason = torch.to_string();
    let timeline = simfreeze_runtime::driver::Timeline {
        layers,
        freeze_step: vec![None; layers as usize],
        ..Default::default()
    };
    let ended = (Status::Failed, Some(reason.clone()));
    let at = (dir.path.clone(), device);
    let summary = Summary::new(ended, &Totals::default(), &timeline, identity, at);
    if let Err(w) = dir.write_json(SUMMARY_FILE, &summary) {
        return w;
    }
    RunStopped {
        status: Status::Failed,
        reason,
        dir: dir.path.clone(),
        resume: "\n(no checkpoint was written yet; start again)".into(),
        exit_code: 7,
    }
    .into()
}

/// A run in progress: everything the loop reads and updates.
struct Trainer {
    config: RunConfig,
    engine: Box<dyn Engine>,
    driver: PolicyDriver,
    data: Data,
    dir: RunDir,
    log: RunLog,
    progress: Progress,
    totals: Totals,
    /// Loss sum of the current epoch so far.
    epoch_loss: f64,
    /// Training seconds of the current epoch before a resume.
    carried_seconds: f64,
    steps_per_epoch: u64,
    total: u64,
    /// This process writes the run directory (rank 0, or one process).
    writes: bool,
    /// Communication of the current epoch so far.
    epoch_comm: Comm,
    /// Bytes per step of the last all-reduce event.
    last_allreduce: Option<u64>,
    /// The on-demand observations (contract 2), when the policy declared
    /// any.
    observer: Option<Observer>,
    /// Writes checkpoints in the background.
    writer: checkpoint::Writer,
    /// The starting checkpoint, machine, libtorch and code of the run.
    provenance: Provenance,
}

/// How an epoch ended.
enum EpochEnd {
    /// Every step ran.
    Done {
        /// The epoch.
        epoch: u64,
        /// Its training seconds.
        seconds: f64,
        /// The learning rate of its last step.
        lr: f64,
    },
    /// The run stops here.
    Stopped(Stop),
}

impl Trainer {
    /// Builds the engine, imports weights or restores the checkpoint, and
    /// opens the run's files.
    fn open(
        plan: Plan,
        dir: RunDir,
        start: Option<CheckpointMeta>,
        group: Option<Arc<ProcessGroup>>,
    ) -> Result<Trainer> {
        let Plan {
            config,
            model,
            device,
            train,
            eval,
            policy,
            weights,
            augment,
        } = plan;
        tch::manual_seed(config.train.seed as i64);
        let (precision, recipe) = (config.train.precision, config.train.recipe());
        // Each rank of a data-parallel run on GPUs takes its own.
        let device = match (&group, device) {
            (Some(g), Device::Cuda(_)) => Device::Cuda(g.local_rank),
            (_, d) => d,
        };
        let (rank, world) = group.as_deref().map_or((0, 1), |g| (g.rank, g.world));
        let writes = rank == 0;
        let single = SingleEngine::new(&model, precision, recipe, device)?;
        let (bucket, overlap) = (config.train.bucket_mib, config.train.overlap_allreduce);
        let mut engine: Box<dyn Engine> = match &group {
            Some(g) => Box::new(ParallelEngine::new(single, g.clone(), bucket, overlap)?),
            None => Box::new(single),
        };
        if let (Some(ck), None) = (weights, &start) {
            let from = ck.path.display().to_string();
            let report = engine.import_weights(ck, config.model.head)?;
            eprintln!("weights: {from}: {report}");
        }
        let provenance = Provenance::collect(
            config.model.weights.as_deref(),
            device_name(device),
            tch::get_num_threads().into(),
        );
        let mut driver = PolicyDriver::new(policy, engine.model().depth() as u32);
        if config.train.record_observations {
            driver.record_observations();
        }
        if start.is_none() && config.train.frozen_from_start > 0 {
            driver.freeze_from_start(config.train.frozen_from_start);
        }
        let declared = driver.needs();
        let probe = probe_batch(&config, &train, world, &driver)?;
        let observer = Observer::new(
            declared,
            &model,
            engine.model(),
            || engine.state_tensors(),
            device,
            probe,
            config.train.seed,
        );
        // Each step takes `train.batch` images on every rank.
        let global_batch = config.train.batch * world as i64;
        let steps_per_epoch = (train.len() / global_batch) as u64;
        let total = steps_per_epoch * config.train.epochs;
        let lengths = start.as_ref().map(|m| LogLengths {
            metrics: m.metrics_len,
            events: m.events_len,
            tensorboard: m.tensorboard_len,
            observations: m.observations_len,
        });
        let log = match writes {
            true => RunLog::open(&dir, lengths, LogFileSet::of(&config.train))?,
            false => RunLog::muted(),
        };
        let mut data = Data::new((train, eval), augment, None, rank);
        if config.train.data_on_device {
            let free = crate::memory::free_mib(device);
            let moved = data.keep_on_device(device, free, !config.train.cache_frozen);
            if writes && !moved.is_empty() {
                eprintln!(
                    "data: {} kept on {}",
                    moved.join(" and "),
                    device_name(device)
                );
            }
        }
        data.cache = activation_cache(&config, &model, data.train.len(), device)?;
        data.drop_unused_bytes(device);
        let mut trainer = Trainer {
            data,
            config,
            engine,
            driver,
            dir,
            log,
            progress: match writes {
                true => Progress::new(total, steps_per_epoch, start.as_ref().map_or(0, |m| m.step)),
                false => Progress::quiet(total, steps_per_epoch),
            },
            totals: Totals {
                world_size: world,
                global_batch,
                ..Totals::default()
            },
            epoch_loss: 0.0,
            carried_seconds: 0.0,
            steps_per_epoch,
            total,
            writes,
            epoch_comm: Comm::default(),
            last_allreduce: None,
            observer,
            writer: checkpoint::Writer::default(),
            provenance,
        };
        match start {
            Some(meta) => trainer.restore(meta)?,
            None => trainer.progress.println(&format!(
                "run {}: {} train / {} eval images, {} steps, policy {}, device {}{}",
                trainer.dir.path.display(),
                trainer.data.train.len(),
                trainer.data.eval.len(),
                total,
                trainer
                    .driver
                    .policy()
                    .map_or("none", |p| p.meta.name.as_str()),
                device_name(device),
                match world {
                    1 => String::new(),
                    w => format!(
                        ", {w} ranks of batch {} (global batch {global_batch})",
                        trainer.config.train.batch
                    ),
                }
            )),
        }
        Ok(trainer)
    }

    /// Every remaining epoch; `Some` when the run stopped early.
    fn train(&mut self, control: &RunControl) -> Result<Option<Stop>> {
        while self.totals.step < self.total {
            let stop = match self.epoch(control)? {
                EpochEnd::Done { epoch, seconds, lr } => self.end_epoch(epoch, seconds, lr)?,
                EpochEnd::Stopped(stop) => Some(stop),
            };
            if stop.is_some() {
                return Ok(stop);
            }
        }
        Ok(None)
    }

    /// The steps of one epoch (the rest of it, after a resume).
    fn epoch(&mut self, control: &RunControl) -> Result<EpochEnd> {
        let (spe, batch) = (self.steps_per_epoch, self.config.train.batch);
        let epoch = self.totals.step / spe;
        let started = Instant::now();
        let order_vec = self.data.train.order(self.config.train.seed, epoch);
        // Data-parallel: each step's global batch (the one-process order's
        // next `batch * world` samples) is split into one contiguous share
        // per rank, in rank order.
        let (rank, world) = self.engine.shard();
        let order_vec = local_share(order_vec, spe, batch as usize, rank, world);
        let prefetch = self.data.prefetch(
            &order_vec,
            (batch as usize, (self.totals.step % spe) as usize),
            (self.config.train.seed, epoch),
            self.engine.device(),
        );
        let order = Tensor::from_slice(&order_vec);
        let needs = self.driver.needs();
        let mut lr = 0.0;
        while self.totals.step < self.total && self.totals.step / spe == epoch {
            let step = self.totals.step;
            // The main thread's time outside the engine's step: this
            // iteration's, less the step's.
            let iteration = Instant::now();
            self.data.kill_if_due(step);
            let idx = order.narrow(0, (step % spe) as i64 * batch, batch);
            let state = self.driver.state().clone();
            let asked = state.observe();
            // A step whose batch the policy observes block by block starts
            // from the images, not from the activation cache.
            let cached = match Observer::needs_images(asked) {
                true => 0,
                false => state.frontier as usize,
            };
            let fetched = fetch(
                &mut self.data,
                &*self.engine,
                prefetch.as_ref(),
                &idx,
                (step, cached),
            );
            let (input, y_host, y) = match fetched? {
                Ok(fetched) => fetched,
                Err(error) => return Ok(EpochEnd::Stopped(self.torch_stop(error))),
            };
            let more = match &self.observer {
                Some(o) => {
                    let engine = &*self.engine;
                    torch_guard(
                        || format!("observing step {step} for the policy"),
                        || o.before_step(engine, &input, asked),
                    )??
                }
                None => MoreData::default(),
            };
            if let Some(o) = &self.observer {
                // Every rank observes the global batch.
                let (batch, frozen) = (self.totals.global_batch as f64, state.frozen_prefix());
                let units = o.step_cost(asked, batch, frozen as usize) * world as f64;
                self.driver.charge_observation(units);
            }
            lr = self.engine.lr_at(step, self.total);
            let plan = StepPlan {
                lr,
                frozen: state.frozen_prefix() as usize,
                lr_factors: &state.lr_factors,
                grad_norms: needs.contains(Needs::GRAD_NORMS),
                features: needs.contains(Needs::CLS_FEATURES),
                accumulate: self.observer.as_ref().is_some_and(Observer::accumulates),
                stop_vote: control.should_stop(step + 1),
                decision: state_digest(&state),
            };
            let next = (step + 1 < self.total && (step + 1) / spe == epoch)
                .then_some(prefetch.as_ref())
                .flatten();
            let (stepped, step_seconds) = self.timed_step(input, &y, &plan, next);
            let out = match stepped {
                Ok(out) => out,
                Err(e) => return Ok(EpochEnd::Stopped(self.step_stop(e, step, epoch))),
            };
            self.epoch_loss += out.loss;
            if let Some(c) = out.comm {
                self.record_comm(step, c)?;
            }
            let at = StepAt {
                step,
                epoch,
                steps_per_epoch: spe,
                total_steps: self.total,
                num_classes: self.data.train.classes as usize,
                lr,
            };
            let frontier = state.frontier as usize;
            let outcome = match self.decide(&out, &y_host, at, more, frontier)? {
                Ok(o) => o,
                Err(e) => return policy_failure(e),
            };
            self.log_step((step, lr), &state, &out, &outcome)?;
            self.totals.step += 1;
            let frontier = self.driver.state().frontier;
            self.progress
                .tick(step + 1, out.loss, batch * world as i64, frontier);
            // Data-parallel ranks stop where they all agreed to (the votes
            // travel with the step's first collective).
            let asked = match world {
                1 => control.should_stop(step + 1),
                _ => out.stop,
            };
            let stopping = asked && step + 1 < self.total;
            let every = self.config.train.checkpoint_every;
            let due = every > 0 && (step + 1) % every == 0 && (step + 1) % spe != 0;
            if stopping || due {
                let seconds = self.carried_seconds + started.elapsed().as_secs_f64();
                self.checkpoint(self.epoch_loss, seconds)?;
            }
            self.totals.host.steps += 1;
            self.totals.host.outside_seconds +=
                (iteration.elapsed().as_secs_f64() - step_seconds).max(0.0);
            if stopping {
                // The other ranks wait for rank 0's checkpoint: none exits
                // (and has torchrun stop the group) before it is written.
                self.writer.wait()?;
                if let Err(e) = self.engine.barrier() {
                    return Ok(EpochEnd::Stopped(Stop::Peer(e)));
                }
                let (step, total) = (step + 1, self.total);
                return Ok(EpochEnd::Stopped(Stop::Interrupted { step, total }));
            }
        }
        let seconds = self.carried_seconds + started.elapsed().as_secs_f64();
        Ok(EpochEnd::Done { epoch, seconds, lr })
    }

    /// A step's event, its recorded observation and its TensorBoard
    /// scalars.
    fn log_step(
        &mut self,
        (step, lr): (u64, f64),
        state: &simfreeze_runtime::contract::FreezeState,
        out: &StepOut,
        outcome: &StepOutcome,
    ) -> Result<()> {
        self.log.events(&Event::of_step(step, outcome))?;
        if let Some(record) = self.driver.take_record() {
            self.log.observation(&record)?;
        }
        let mut scalars = tensorboard::step_scalars(out.loss, lr, state, &outcome.scalars);
        if let Some(c) = out.comm {
            scalars.push(("comm/allreduce_bytes".into(), c.bytes as f64));
            scalars.push(("comm/seconds".into(), c.seconds));
        }
        self.log.scalars(step, &scalars)
    }

    /// The engine's step, with the next batch's upload (from `next`, the
    /// epoch's batch thread when the next step is in this epoch) queued for
    /// the step's first host read, so that it goes up behind the step's
    /// work (on a GPU on a side stream); the seconds of the step, less the
    /// upload's time on this thread, which counts outside the step.
    fn timed_step(
        &mut self,
        input: Batch,
        y: &Tensor,
        plan: &StepPlan<'_>,
        next: Option<&Prefetch>,
    ) -> (Result<StepOut, StepError>, f64) {
        if let Some(p) = next {
            reads::before_next_read(p.upload_ahead());
        }
        let (in_step, reads_before) = (Instant::now(), reads::count());
        let stepped = self.engine.step(input, y, plan);
        reads::cancel_before_read();
        let ahead = next.map_or(0.0, Prefetch::take_ahead_seconds);
        self.totals.host.reads += reads::count() - reads_before;
        (stepped, (in_step.elapsed().as_secs_f64() - ahead).max(0.0))
    }

    /// How a failed step stops the run.
    fn step_stop(&self, e: StepError, step: u64, epoch: u64) -> Stop {
        match e {
            StepError::Diverged(loss) => Stop::Diverged { step, epoch, loss },
            StepError::Torch(e) => self.torch_stop(TorchError {
                during: format!("at step {step}"),
                ..e
            }),
            StepError::Comm(e) => Stop::Peer(e),
        }
    }

    /// Hands the step to the policy: completes the on-demand observations
    /// (the accumulated gradient norms include the step), lets the policy
    /// decide, and takes the reference snapshot it asked for. The inner
    /// error is the policy's.
    fn decide(
        &mut self,
        out: &StepOut,
        y_host: &Tensor,
        at: StepAt,
        mut more: MoreData,
        frontier: usize,
    ) -> Result<Result<StepOutcome>> {
        if let Some(o) = &self.observer {
            o.after_step(&mut *self.engine, &mut more, frontier);
        }
        let dim = self.engine.model().feature_dim();
        let outcome = match observe_with(&mut self.driver, out, y_host, dim, at, &more) {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(o) = &mut self.observer {
            let (engine, kind, step) = (&*self.engine, outcome.reference(), at.step);
            torch_guard(
                || format!("taking the reference snapshot after step {step}"),
                || o.take_reference(engine, kind, step),
            )??;
            let units = o.cost.snapshot(kind, self.totals.global_batch as f64);
            self.driver
                .charge_observation(units * self.totals.world_size.max(1) as f64);
        }
        Ok(Ok(outcome))
    }

    /// Evaluates, writes the epoch's metrics row and checkpoints; `Some`
    /// when libtorch failed in the evaluation.
    fn end_epoch(&mut self, epoch: u64, seconds: f64, lr: f64) -> Result<Option<Stop>> {
        let (top1, eval_loss) = match self.engine.evaluate(&self.data.eval) {
            Ok(r) => r,
            Err(error) => return Ok(Some(self.torch_stop(error))),
        };
        self.carried_seconds = 0.0;
        self.totals.train_seconds += seconds;
        self.totals.last_top1 = Some(top1);
        self.totals.best_top1 = Some(self.totals.best_top1.map_or(top1, |b| b.max(top1)));
        let train_loss = self.epoch_loss / self.steps_per_epoch.max(1) as f64;
        self.epoch_loss = 0.0;
        // The epoch's last step names the row (records.rs: a record names
        // the step it is true of): the blocks frozen while it ran, not the
        // decision taken after it, and its TensorBoard step.
        let last = self.totals.step.saturating_sub(1);
        let frontier = MetricsRow::frozen_during(&self.driver.timeline().freeze_step, last);
        self.log.metrics(&MetricsRow {
            epoch,
            train_loss,
            eval_loss,
            eval_top1: top1,
            lr,
            frozen_blocks: frontier,
            allreduce_bytes: self.epoch_comm.bytes,
            comm_seconds: self.epoch_comm.seconds,
            epoch_seconds: seconds,
        })?;
        self.epoch_comm = Comm::default();
        let images = (self.steps_per_epoch * self.totals.global_batch as u64) as f64;
        let mut scalars = vec![
            ("eval/top1".to_string(), top1),
            ("eval/loss".to_string(), eval_loss),
            ("train/epoch_loss".to_string(), train_loss),
            (
                "perf/images_per_sec".to_string(),
                images / seconds.max(1e-9),
            ),
        ];
        if let Some(c) = &self.data.cache {
            scalars.push(("cache/hit_rate".to_string(), c.hit_rate()));
            scalars.push(("cache/advanced_rows".to_string(), c.advanced as f64));
        }
        self.log.scalars(last, &scalars)?;
        let cached = self.data.cache.as_ref().map_or(String::new(), |c| {
            format!(
                ", cache hits {:.0}% ({} stale rows advanced)",
                100.0 * c.hit_rate(),
                c.advanced
            )
        });
        let layers = self.driver.state().layers;
        let host = self.totals.host;
        let host_ms = 1e3 * host.outside_seconds / host.steps.max(1) as f64;
        self.progress.println(&format!(
            "epoch {epoch}: train loss {train_loss:.4}, eval loss {eval_loss:.4}, top-1 {top1:.2}%, frozen {frontier}/{layers}, {seconds:.1}s ({:.1} img/s, host {host_ms:.2} ms/step outside the step){cached}",
            images / seconds.max(1e-9)
        ));
        self.checkpoint(0.0, 0.0)?;
        Ok(None)
    }

    /// A libtorch failure as a stop, with what to try when the device ran
    /// out of memory.
    fn torch_stop(&self, error: TorchError) -> Stop {
        let c = &self.config;
        let hint = if error.is_out_of_memory() {
            format!(
                "\nThe model is {} (depth {}, width {}) at batch {} in {:?} on {}. Try a smaller \
                 train.batch or train.precision: Bf16{}.",
                c.model.preset,
                self.driver.state().layers,
                self.engine.model().feature_dim(),
                c.train.batch,
                c.train.precision,
                device_name(self.engine.device()),
                if c.train.cache_frozen {
                    ", or train.cache_frozen: false (the cache lives in device memory)"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        };
        Stop::Torch { error, hint }
    }

    /// Writes a checkpoint of everything needed to continue after the
    /// current step; `epoch_loss` and `epoch_seconds` are the current
    /// epoch's so far.
    fn checkpoint(&mut self, epoch_loss: f64, epoch_seconds: f64) -> Result<()> {
        if !self.writes {
            // Rank 0 writes it; every rank holds the same state.
            return Ok(());
        }
        let lengths = self.log.flush()?;
        let step = self.totals.step;
        let policy_state = match self.driver.policy() {
            Some(p) => p.save_state(step)?,
            None => Vec::new(),
        };
        let meta = CheckpointMeta {
            format: 0,
            step,
            epoch_loss_sum: epoch_loss,
            epoch_seconds,
            train_seconds: self.totals.train_seconds,
            best_top1: self.totals.best_top1,
            last_top1: self.totals.last_top1,
            freeze: self.driver.state().clone(),
            timeline: self.driver.timeline().clone(),
            policy_state: checkpoint::to_hex(&policy_state),
            weights: String::new(),
            metrics_len: lengths.metrics,
            events_len: lengths.events,
            tensorboard_len: lengths.tensorboard,
            observations_len: lengths.observations,
            world_size: self.totals.world_size,
            allreduce_bytes: self.totals.allreduce_bytes,
            comm_seconds: self.totals.comm_seconds,
            epoch_allreduce_bytes: self.epoch_comm.bytes,
            epoch_comm_seconds: self.epoch_comm.seconds,
            last_allreduce_bytes: self.last_allreduce,
            observer: None,
        };
        let mut meta = meta;
        let mut tensors = self.engine.state_tensors();
        if let Some(o) = &self.observer {
            let (m, t) = o.state();
            meta.observer = Some(m);
            tensors.extend(t);
        }
        self.writer.submit(&self.dir.path, meta, tensors)
    }

    /// Continues from a checkpoint: tensors, policy state, freeze state,
    /// timeline and the run's accumulators.
    fn restore(&mut self, m: CheckpointMeta) -> Result<()> {
        let (path, tensors) = checkpoint::read_tensors(&self.dir.path, &m)?;
        let (observed, tensors): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(n, _)| n.starts_with(observer::CHECKPOINT_PREFIX));
        self.engine.load_state_tensors(&path, tensors)?;
        if let (Some(o), Some(meta)) = (&mut self.observer, &m.observer) {
            o.restore(meta, observed)?;
        }
        let state = checkpoint::from_hex(&m.policy_state)?;
        if let Some(p) = self.driver.policy_mut() {
            p.load_state(m.step, &state)?;
        }
        self.driver.restore_state(m.freeze);
        self.driver.restore_timeline(m.timeline);
        self.totals = Totals {
            step: m.step,
            last_top1: m.last_top1,
            best_top1: m.best_top1,
            train_seconds: m.train_seconds,
            allreduce_bytes: m.allreduce_bytes,
            comm_seconds: m.comm_seconds,
            ..self.totals.clone()
        };
        self.epoch_comm = Comm {
            bytes: m.epoch_allreduce_bytes,
            seconds: m.epoch_comm_seconds,
            params: 0,
        };
        self.last_allreduce = m.last_allreduce_bytes;
        self.epoch_loss = m.epoch_loss_sum;
        self.carried_seconds = m.epoch_seconds;
        self.progress.println(&format!(
            "resuming {} at step {}/{}",
            self.dir.path.display(),
            m.step,
            self.total
        ));
        Ok(())
    }

    /// Writes the final files: the model when every epoch ran, the summary
    /// always; a stopped run becomes a [`RunStopped`] error.
    fn finish(mut self, stop: Option<Stop>, identity: PolicyIdentity) -> Result<Summary> {
        self.progress.finish_line();
        self.writer.wait()?;
        self.log.flush()?;
        let world = self.totals.world_size;
        let (stop, digests) = match stop {
            // The ranks' final weights must agree: a digest of each (none
            // in one process).
            None => match self.engine.weight_digests() {
                Ok(d) => (None, d),
                Err(e) => (Some(Stop::Peer(e)), Vec::new()),
            },
            stop => (stop, Vec::new()),
        };
        let Some(stop) = stop else {
            if self.writes {
                self.engine.save_model(&self.dir.file(MODEL_FILE))?;
            }
            if digests.iter().any(|d| *d != digests[0]) {
                eprintln!(
                    "warning: the ranks' final weights differ (digests {digests:x?}); the run \
                     lost its invariant, please report it"
                );
            }
            let ended = (Status::Completed, None);
            let mut summary = self.summary_of(ended, identity);
            summary.weight_digests = digests.iter().map(|d| format!("{d:016x}")).collect();
            return self.write_summary(summary);
        };
        let reason = stop.reason();
        let summary = self.summary_of((stop.status(), Some(reason.clone())), identity);
        self.write_summary(summary)?;
        if matches!(
            stop,
            Stop::Interrupted { .. } | Stop::Diverged { .. } | Stop::Policy(_)
        ) {
            // Stops every rank reaches at the same step: no rank exits (and
            // has torchrun stop rank 0 while its checkpoint writer may still
            // be busy) before rank 0 waited for it and wrote the summary. A
            // failed group cannot meet.
            let _ = self.engine.barrier();
        }
        if !self.writes {
            // Rank 0 writes (or is writing) the checkpoint and says how to
            // resume; this rank may look before it is there.
            return Err(RunStopped {
                status: stop.status(),
                reason,
                resume: "\n(rank 0 reports the checkpoint and how to resume)".into(),
                dir: self.dir.path.clone(),
                exit_code: stop.exit_code(),
            }
            .into());
        }
        let has_checkpoint = checkpoint::load_meta(&self.dir.path)?.is_some();
        let launcher = match world {
            1 => String::new(),
            n => format!("torchrun --nproc-per-node {n} --no-python "),
        };
        Err(RunStopped {
            status: stop.status(),
            reason,
            resume: if has_checkpoint {
                format!(
                    "\nresume with: {launcher}{} run --resume {}",
                    crate::error::command_name(),
                    self.dir.path.display()
                )
            } else {
                "\n(no checkpoint was written yet; start again)".into()
            },
            dir: self.dir.path.clone(),
            exit_code: stop.exit_code(),
        }
        .into())
    }

    fn summary_of(&self, ended: (Status, Option<String>), identity: PolicyIdentity) -> Summary {
        let t = self.driver.timeline();
        let at = (self.dir.path.clone(), device_name(self.engine.device()));
        Summary {
            provenance: Some(self.provenance.clone()),
            ..Summary::new(ended, &self.totals, t, identity, at)
        }
    }

    /// Writes `summary.json` (rank 0 only) and returns the summary.
    fn write_summary(&self, summary: Summary) -> Result<Summary> {
        if self.writes {
            self.dir.write_json(SUMMARY_FILE, &summary)?;
        }
        Ok(summary)
    }

    /// Adds a data-parallel step's communication to the totals; logs an
    /// `allreduce` event when its size changed (the first step, and after
    /// each freeze).
    fn record_comm(&mut self, step: u64, c: Comm) -> Result<()> {
        self.epoch_comm.bytes += c.bytes;
        self.epoch_comm.seconds += c.seconds;
        self.totals.allreduce_bytes += c.bytes;
        self.totals.comm_seconds += c.seconds;
        if self.last_allreduce != Some(c.bytes) {
            self.last_allreduce = Some(c.bytes);
            self.log.events(&[Event {
                step,
                kind: records::EventKind::Allreduce {
                    bytes: c.bytes,
                    params: c.params,
                },
            }])?;
        }
        Ok(())
    }
}

/// This rank's samples of an epoch's `order`: of every step's global
/// batch (`batch * world` consecutive samples), the `rank`-th contiguous
/// share of `batch`; the order itself in one process.
fn local_share(order: Vec<i64>, steps: u64, batch: usize, rank: usize, world: usize) -> Vec<i64> {
    if world == 1 {
        return order;
    }
    (0..steps as usize)
        .flat_map(|s| {
            let from = s * batch * world + rank * batch;
            order[from..from + batch].iter().copied()
        })
        .collect()
}

/// A digest of the freeze state a step runs under (frontier, probe,
/// learning-rate factors): the ranks of a data-parallel run compare it.
fn state_digest(s: &simfreeze_runtime::contract::FreezeState) -> u64 {
    let mut h = Fnv::default();
    h.write(&s.frontier.to_le_bytes());
    h.write(&s.probe.map_or(u32::MAX, |p| p).to_le_bytes());
    for f in &s.lr_factors {
        h.write(&f.to_bits().to_le_bytes());
    }
    h.write(&s.observe.to_le_bytes());
    h.0
}

/// A policy failure ends the run as a typed stop; any other error (I/O)
/// propagates.
fn policy_failure(e: anyhow::Error) -> Result<EpochEnd> {
    match e.downcast::<DriverError>() {
        Ok(d) => Ok(EpochEnd::Stopped(Stop::Policy(d))),
        Err(e) => Err(e),
    }
}

/// The probe batch of a policy that declares it: the first global batch's
/// worth of samples of a fixed shuffle of the training set, the same on
/// every rank. A training set not held in memory (an augmented image
/// folder reads its files per batch) has none: such a policy is refused.
fn probe_batch(
    config: &RunConfig,
    train: &Dataset,
    world: usize,
    driver: &PolicyDriver,
) -> Result<Option<Tensor>> {
    if !driver.needs().contains(Needs::PROBE_BATCH) {
        return Ok(None);
    }
    if train.images.numel() == 0 {
        return Err(UsageError(format!(
            "policy `{}` asks for the probe batch (Needs::PROBE_BATCH), which needs a training \
             set held in memory; an augmented image folder reads its files per batch (turn the \
             augmentation off, or use a policy without it)",
            driver.policy().map_or("?", |p| p.meta.name.as_str())
        ))
        .into());
    }
    let n = (config.train.batch * world as i64).min(train.len()).max(0) as usize;
    let order = train.order(config.train.seed ^ PROBE_SEED, 0);
    Ok(Some(
        train
            .images
            .index_select(0, &Tensor::from_slice(&order[..n])),
    ))
}

/// Mixed into the seed for the probe batch's shuffle.
const PROBE_SEED: u64 = 0x9e0b_e5a3;

#[cfg(test)]
mod augment_tests {
    use super::*;
    use std::fs;
    use std::path::Path;

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
        let plan = Plan::resolve(config(d.path(), ""), &SearchPath::from_env()).unwrap();
        assert!(plan.augment.is_some());
        assert_eq!(plan.train.len(), 16);
        let s = run(plan, &RunControl::default()).unwrap();
        assert_eq!(s.status, Status::Completed);
        assert_eq!(s.steps, 8);
        assert!(s.final_top1.is_some());
        let e = match Plan::resolve(
            config(d.path(), ", cache_frozen: true"),
            &SearchPath::from_env(),
        ) {
            Ok(plan) => run(plan, &RunControl::default()).unwrap_err(),
            Err(e) => e,
        };
        assert!(format!("{e:#}").contains("random"), "{e:#}");
    }

    /// A policy that declares the probe batch and never freezes.
    struct WantsProbe;

    impl simfreeze_abi::sdk::Policy for WantsProbe {
        fn needs(&self) -> Needs {
            Needs::PROBE_BATCH | Needs::BLOCK_TOKENS
        }
        fn decide(
            &mut self,
            s: &simfreeze_abi::sdk::Step<'_>,
        ) -> Result<simfreeze_abi::sdk::Decision, simfreeze_abi::sdk::PolicyError> {
            Ok(s.keep())
        }
        fn save_state(&self) -> Result<Vec<u8>, simfreeze_abi::sdk::PolicyError> {
            Ok(Vec::new())
        }
        fn load_state(&mut self, _: &[u8]) -> Result<(), simfreeze_abi::sdk::PolicyError> {
            Ok(())
        }
    }

    impl simfreeze_abi::sdk::PolicyPlugin for WantsProbe {
        fn info() -> simfreeze_abi::sdk::Info {
            simfreeze_abi::sdk::Info {
                name: "wants_probe",
                version: "0",
                description: "",
                options: &[],
            }
        }
        fn new(
            _: &str,
            _: &simfreeze_abi::sdk::HostServices,
        ) -> Result<Self, simfreeze_abi::sdk::PolicyError> {
            Ok(WantsProbe)
        }
    }

    #[test]
    fn a_probe_batch_on_files_read_per_batch_is_refused_before_training() {
        let d = tempfile::tempdir().unwrap();
        folder(d.path());
        let mut plan = Plan::resolve(config(d.path(), ""), &SearchPath::from_env()).unwrap();
        let module = simfreeze_abi::sdk::policy_module::<WantsProbe>();
        // The run records the library it loaded: any existing file stands in.
        let path = std::env::current_exe().unwrap();
        let plugin = simfreeze_runtime::loader::Plugin::from_module(module, path).unwrap();
        plan.policy = Some(plugin.new_policy("").unwrap());
        let e = format!("{:#}", run(plan, &RunControl::default()).unwrap_err());
        assert!(
            e.contains("Needs::PROBE_BATCH") && e.contains("augment"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;
    use tch::Kind;

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
        let search = SearchPath::from_env();
        let bf16 = run(
            Plan::resolve(cfg("Bf16"), &search).unwrap(),
            &RunControl::default(),
        )
        .unwrap();
        let f32 = run(
            Plan::resolve(cfg("F32"), &search).unwrap(),
            &RunControl::default(),
        )
        .unwrap();
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
