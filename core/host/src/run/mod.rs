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
mod epoch;
pub mod faults;
mod feed;
mod finish;
mod group;
pub mod log;
mod open;
pub mod progress;
pub mod provenance;
pub mod records;
pub mod tensorboard;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
use crate::engine::launch::{launch, Placement};
use crate::engine::{reads, Batch, Comm, Engine, Fnv, StepError, StepOut, StepPlan};
use crate::error::{torch_guard, RunStopped, Status, Stop, TorchError, UsageError};
use crate::model::VitConfig;
use crate::observe::observer::{self, Observer};
use crate::observe::{observe_with, StepAt};
use crate::plan::{device_name, Plan};
use checkpoint::CheckpointMeta;
use dir::{RunDir, CONFIG_FILE, MODEL_FILE, POLICY_FILE, SUMMARY_FILE};
pub use faults::{FAULT_STEP_VAR, KILL_VAR};
use feed::{fetch, Data};
use group::shared_dir;
use log::{LogFileSet, LogLengths, RunLog};
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
    let at = Placement::join(plan.device, &plan.config.train.dist())?;
    let dir = match at.group.as_deref() {
        Some(g) if g.rank != 0 => shared_dir(g, None)?,
        _ => {
            let dir = RunDir::create(&plan.config.output, &plan.config.name)?;
            dir.write_config(&plan.config)?;
            dir.write_json(POLICY_FILE, &PolicyIdentity::of(plan.policy.as_ref())?)?;
            if let Some(g) = at.group.as_deref() {
                shared_dir(g, Some(&dir))?;
            }
            dir
        }
    };
    train_in(plan, dir, None, control, at)
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
    let at = Placement::join(plan.device, &plan.config.train.dist())?;
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
    train_in(plan, dir, Some(meta), control, at)
}

fn train_in(
    plan: Plan,
    dir: RunDir,
    start: Option<CheckpointMeta>,
    control: &RunControl,
    at: Placement,
) -> Result<Summary> {
    let identity = PolicyIdentity::of(plan.policy.as_ref())?;
    let device = device_name(at.device);
    let layers = plan.model.depth as u32;
    let run_dir = dir.clone();
    let writes = at.rank_world().0 == 0;
    let mut trainer = match Trainer::open(plan, dir, start, at) {
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
}

/// Mixed into the seed for the fixed batch's shuffle.
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

    /// A policy that declares the fixed batch and never freezes.
    struct WantsProbe;

    impl simfreeze_abi::sdk::Policy for WantsProbe {
        fn needs(&self) -> Needs {
            Needs::FIXED_BATCH | Needs::BLOCK_TOKENS
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
            e.contains("Needs::FIXED_BATCH") && e.contains("augment"),
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
