//! One engine assembly, for `run` and `bench` alike: join the data-parallel
//! group the launcher's variables describe (torchrun's `WORLD_SIZE` and
//! friends; none in one process), claim this rank's device (`cuda:LOCAL_RANK`
//! on GPUs, made current before any CUDA work), and build the engine on it:
//! one device's, or the data-parallel engine around it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tch::Device;

use crate::engine::dist::{Backend, DistEnv, ProcessGroup};
use crate::engine::optim::Recipe;
use crate::engine::{Engine, ParallelEngine, SingleEngine};
use crate::model::precision::Precision;
use crate::model::VitConfig;

/// The data-parallel settings (`train.dist_timeout_s`, `train.dist_backend`,
/// `train.bucket_mib`, `train.overlap_allreduce`).
#[derive(Debug, Clone, Copy)]
pub struct DistSettings {
    /// Collective timeout, seconds.
    pub timeout_s: u64,
    /// The c10d backend.
    pub backend: Backend,
    /// Gradient bucket size, MiB.
    pub bucket_mib: u64,
    /// All-reduce the gradients while the backward runs.
    pub overlap: bool,
}

/// Where this process trains: its data-parallel group (none in one
/// process) and the device it claimed.
pub struct Placement {
    /// The group, under a launcher.
    pub group: Option<Arc<ProcessGroup>>,
    /// The device this rank trains on.
    pub device: Device,
}

impl Placement {
    /// Joins the group the launcher's environment describes, if any, over
    /// the backend for `device`, and claims this rank's device; in one
    /// process, `device` itself.
    pub fn join(device: Device, dist: &DistSettings) -> Result<Placement> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(Placement {
                group: None,
                device,
            });
        };
        let device = env.claim_device(device)?;
        let timeout = Duration::from_secs(dist.timeout_s.max(1));
        let backend = dist.backend.resolve(device)?;
        let group = ProcessGroup::join(&env, timeout, backend)?;
        Ok(Placement {
            group: Some(Arc::new(group)),
            device,
        })
    }

    /// `(rank, world size)`: `(0, 1)` in one process.
    pub fn rank_world(&self) -> (usize, usize) {
        self.group.as_deref().map_or((0, 1), |g| (g.rank, g.world))
    }
}

/// The engine for `model` trained in `precision` with `recipe` where `at`
/// says: one device's, or the data-parallel engine around it.
pub fn launch(
    model: &VitConfig,
    precision: Precision,
    recipe: Recipe,
    at: &Placement,
    dist: &DistSettings,
) -> Result<Box<dyn Engine>> {
    let single = SingleEngine::new(model, precision, recipe, at.device)?;
    Ok(match &at.group {
        Some(g) => Box::new(ParallelEngine::new(
            single,
            g.clone(),
            dist.bucket_mib,
            dist.overlap,
        )?),
        None => Box::new(single),
    })
}
