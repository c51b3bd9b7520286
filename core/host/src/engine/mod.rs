//! The training engine seam: [`Engine`] takes one optimizer step of a batch
//! under a freeze state, evaluates, and saves and restores its tensors. The
//! run loop (`crate::run`) and `bench` see only this trait, so a
//! data-parallel engine plugs in beside [`single::SingleEngine`] without
//! touching the loop.
//!
//! - [`single`]: one process, one device (today's step);
//! - [`optim`]: per-block SGD with our own momentum state and the cosine
//!   schedule (libtorch's fused SGD kernel through a small C++ shim);
//! - [`cache`]: the frozen-prefix activation cache;
//! - [`reads`]: every host read of a device value, counted.
//!
//! Invariant every engine keeps: a step trains exactly under the freeze
//! state it is given (blocks `[0, frozen)` frozen, probe included), the
//! optimizer never touches a frozen block, and a step whose loss is not
//! finite updates nothing.

pub mod cache;
pub mod dist;
pub mod launch;
pub mod optim;
pub mod parallel;
pub mod reads;
pub mod single;

use std::path::Path;

use anyhow::Result;
use tch::{Device, Tensor};

use crate::data::Dataset;
use crate::error::TorchError;
use crate::model::weights::{Checkpoint, HeadInit};
use crate::model::PrefixModel;

pub use parallel::ParallelEngine;
pub use single::SingleEngine;

/// How to take one step.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan<'a> {
    /// Learning rate.
    pub lr: f64,
    /// Blocks `[0, frozen)` are frozen (probe included).
    pub frozen: usize,
    /// Per-block learning-rate factors (empty: all 1).
    pub lr_factors: &'a [f32],
    /// Compute per-block gradient norms (one extra host read, after the
    /// update is queued).
    pub grad_norms: bool,
    /// Copy the features the head sees to host memory for the policy.
    pub features: bool,
    /// Add the step's gradients to the sums the policy reads as
    /// accumulated gradient norms (`Needs::ACC_GRAD_NORMS`).
    pub accumulate: bool,
    /// This process asks to stop after the step (a signal or
    /// `--stop-after`); a data-parallel engine agrees on it with the other
    /// ranks in the step's first collective.
    pub stop_vote: bool,
    /// A digest of the freeze state the step runs under (the policy's last
    /// decision); a data-parallel engine checks every rank runs the same.
    pub decision: u64,
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
            accumulate: false,
            stop_vote: false,
            decision: 0,
        }
    }
}

/// Communication of one data-parallel step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Comm {
    /// Bytes of gradients all-reduced (the trainable parameters only).
    pub bytes: u64,
    /// Trainable parameters communicated.
    pub params: u64,
    /// Seconds spent in collectives (gradients, loss, features).
    pub seconds: f64,
}

/// What one step produced.
pub struct StepOut {
    /// Mean batch loss.
    pub loss: f64,
    /// The features the head saw, `[B, D]`.
    pub cls: Tensor,
    /// The same in host memory, float32, if the plan asked for them.
    pub cls_host: Option<Tensor>,
    /// Per-block gradient norms, if asked for.
    pub grad_norms: Vec<f32>,
    /// The labels of the features in `cls_host` when they are not the
    /// step's own batch (a data-parallel step's global batch).
    pub labels_host: Option<Tensor>,
    /// Whether the run stops after this step (every rank agreed).
    pub stop: bool,
    /// What a data-parallel step communicated.
    pub comm: Option<Comm>,
}

/// What a step starts from.
pub enum Batch {
    /// Input images `[B, C, H, W]`.
    Images(Tensor),
    /// The output of blocks `[0, after)` (from the activation cache).
    Boundary {
        /// `[B, T, D]`.
        h: Tensor,
        /// Blocks already applied.
        after: usize,
    },
}

/// Why a step did not update the model.
#[derive(Debug)]
pub enum StepError {
    /// The loss was NaN or infinite; nothing was updated.
    Diverged(f64),
    /// libtorch refused an operation of the step.
    Torch(TorchError),
    /// A collective failed (a rank exited or hung) or the ranks disagree;
    /// the group cannot continue.
    Comm(dist::CommError),
}

/// Trains a [`PrefixModel`] with an optimizer on some device(s). Every
/// method that runs libtorch returns its errors (CUDA out of memory, ...)
/// as [`TorchError`]s instead of panicking.
pub trait Engine {
    /// The model (for the activation cache and the policy's shapes).
    fn model(&self) -> &dyn PrefixModel;

    /// Where batches go.
    fn device(&self) -> Device;

    /// Loads pretrained weights into the model; returns what was loaded.
    fn import_weights(&mut self, ck: Checkpoint, head: HeadInit) -> Result<String>;

    /// The learning rate of `step` of `total`.
    fn lr_at(&self, step: u64, total: u64) -> f64;

    /// One optimizer step. A NaN or infinite loss is refused before
    /// anything is updated.
    fn step(&mut self, batch: Batch, y: &Tensor, plan: &StepPlan<'_>)
        -> Result<StepOut, StepError>;

    /// Top-1 accuracy (%) and mean loss on `data`.
    fn evaluate(&self, data: &Dataset) -> Result<(f64, f64), TorchError>;

    /// Every tensor a checkpoint must hold (weights, optimizer state),
    /// under stable names.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores [`Engine::state_tensors`] read from `path`.
    fn load_state_tensors(&mut self, path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()>;

    /// Writes the final weights (timm names) and the model's shape beside
    /// them.
    fn save_model(&self, path: &Path) -> Result<()>;

    /// This process's rank and the number of ranks (1 for one process).
    fn shard(&self) -> (usize, usize) {
        (0, 1)
    }

    /// A digest of the weights on every rank, in rank order (all equal
    /// when the ranks stayed in step; empty in one process, where there is
    /// nothing to compare).
    fn weight_digests(&self) -> Result<Vec<u64>, dist::CommError> {
        Ok(Vec::new())
    }

    /// Waits for every rank (nothing to wait for in one process).
    fn barrier(&self) -> Result<(), dist::CommError> {
        Ok(())
    }

    /// Every rank's rows of `local` in rank order, `[world * B, ...]`, in
    /// host memory (the global batch a data-parallel policy observes; in
    /// one process, `local` itself).
    fn gather_rows(&self, local: &Tensor) -> Result<Tensor, dist::CommError> {
        Ok(local.shallow_clone())
    }

    /// Per block, the L1 and L2 norms of the gradients summed since the
    /// last read, and the steps summed (blocks `[0, frozen)` read 0).
    fn read_grad_sums(&mut self, frozen: usize) -> (Vec<f64>, Vec<f64>, u64);
}

/// FNV-1a over the parameters' names and bytes, in name order, cut to 62
/// bits (so a sum of one digest and zeros, how ranks gather them, never
/// overflows).
pub fn weights_digest(mut tensors: Vec<(String, Tensor)>) -> u64 {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Fnv::default();
    for (name, t) in &tensors {
        h.write(name.as_bytes());
        let t = t
            .to_device(Device::Cpu)
            .contiguous()
            .to_kind(tch::Kind::Float);
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap_or_default();
        for x in v {
            h.write(&x.to_bits().to_le_bytes());
        }
    }
    h.0 >> 2
}

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Mixes in `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
