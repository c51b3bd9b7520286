//! Data-parallel training: every rank runs the [`SingleEngine`] step on its
//! share of the global batch, and the ranks meet in three collectives per
//! step (the Gloo process group of [`dist`](crate::engine::dist)):
//!
//! 1. before the backward, the loss, the stop votes, a digest of the
//!    freeze state each rank runs under and the labels: every rank sees the
//!    same global loss (so a non-finite loss stops all of them at the same
//!    step), the same stop decision and the global batch's labels, and a
//!    rank whose policy decided otherwise stops the group;
//! 2. during it, the gradients of the trainable parameters only, flattened
//!    into buckets of `train.bucket_mib` and averaged (NCCL on the GPU, or
//!    Gloo through host memory); with `train.overlap_allreduce` (the
//!    default) a bucket's all-reduce starts as soon as the backward has
//!    computed its gradients, as PyTorch's DDP does, so communication hides
//!    behind the rest of the backward; without it, after the whole backward.
//!    Frozen blocks have no gradient and are not communicated at all;
//! 3. when the policy asks for them, the features of the global batch,
//!    gathered in rank order (the batch a one-process run with the global
//!    batch would have seen).
//!
//! Invariant: every rank holds the same weights and optimizer state after
//! every step (the averaged gradients are bit-identical on every rank, and
//! so is the update); `weight_digests` checks it at the end of a run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::engine::dist::{CommError, ProcessGroup};
use crate::engine::single::{evaluate_counts, forward, loss_of, to_host};
use crate::engine::{
    reads, weights_digest, Batch, Comm, Engine, SingleEngine, StepError, StepOut, StepPlan,
};
use crate::error::{torch_guard, TorchError};
use crate::model::weights::{Checkpoint, HeadInit};
use crate::model::PrefixModel;

/// One rank of a data-parallel run.
pub struct ParallelEngine {
    inner: SingleEngine,
    group: Arc<ProcessGroup>,
    /// Largest gradient bucket, in elements.
    bucket: i64,
    /// All-reduce buckets during the backward (else after it).
    overlap: bool,
    /// Steps taken by this process (the heartbeat that names a lost rank).
    steps: u64,
}

impl ParallelEngine {
    /// Wraps `inner` and makes every rank start from rank 0's weights;
    /// gradients go in buckets of `bucket_mib`, all-reduced during the
    /// backward with `overlap`.
    pub fn new(
        inner: SingleEngine,
        group: Arc<ProcessGroup>,
        bucket_mib: u64,
        overlap: bool,
    ) -> Result<Self, CommError> {
        let engine = ParallelEngine {
            inner,
            group,
            bucket: (bucket_mib.max(1) * (1 << 20) / 4) as i64,
            overlap,
            steps: 0,
        };
        engine.sync_weights()?;
        Ok(engine)
    }

    /// Rank 0's parameters on every rank (also after a weight import).
    fn sync_weights(&self) -> Result<(), CommError> {
        let mut vars: Vec<(String, Tensor)> = self.inner.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let host: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.detach().to_device(self.group.device).contiguous())
            .collect();
        self.group
            .broadcast_from_zero(&host)
            .map_err(|e| explain(&self.group, self.steps, e))?;
        tch::no_grad(|| {
            for ((_, v), h) in vars.iter().zip(&host) {
                v.shallow_clone().copy_(h);
            }
        });
        Ok(())
    }
}

/// `e` with the rank most likely lost: the one whose heartbeat (steps
/// taken, in the store) is behind `steps`.
fn explain(g: &ProcessGroup, steps: u64, e: CommError) -> CommError {
    let seen: Vec<(usize, Option<u64>)> = (0..g.world)
        .filter(|&r| r != g.rank)
        .map(|r| {
            let v = g
                .store_get(&format!("heartbeat/{r}"))
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok());
            (r, v)
        })
        .collect();
    let behind: Vec<String> = seen
        .iter()
        .filter(|(_, s)| s.map_or(true, |s| s < steps))
        .map(|(r, s)| match s {
            Some(s) => format!("rank {r} (last seen at its step {s})"),
            None => format!("rank {r}"),
        })
        .collect();
    let who = match behind.as_slice() {
        [] => {
            let others: Vec<String> = seen.iter().map(|(r, _)| r.to_string()).collect();
            format!("one of ranks {}", others.join(", "))
        }
        list => list.join(", "),
    };
    CommError {
        message: format!(
            "rank {} of {}: lost {who} during step {steps}: {} (a rank exited, was killed, or \
             hung past train.dist_timeout_s, {} s)",
            g.rank,
            g.world,
            e.message.trim(),
            g.timeout.as_secs()
        ),
    }
}

/// One data-parallel step (see the module documentation).
fn parallel_step(
    inner: &mut SingleEngine,
    g: &ProcessGroup,
    (bucket, overlap, steps): (i64, bool, u64),
    batch: Batch,
    y: &Tensor,
    plan: &StepPlan<'_>,
) -> Result<StepOut, StepError> {
    let (rank, world) = (g.rank, g.world);
    let SingleEngine { model, opt, .. } = inner;
    let lost = |e: CommError| StepError::Comm(explain(g, steps, e));
    let mut comm = Comm::default();
    let out = forward(model, batch, plan.frozen);
    let loss_t = loss_of(&out.logits, y, opt.recipe().label_smoothing);
    let cls_host = plan.features.then(|| to_host(&out.cls));
    // 1. Loss, stop votes and freeze-state digests (62 bits, so the sum
    // of one digest and zeros never overflows).
    let control =
        Tensor::from_slice(&[reads::scalar(&loss_t), f64::from(u8::from(plan.stop_vote))])
            .to_device(g.device);
    let digests = Tensor::zeros([world as i64], (Kind::Int64, g.device));
    let _ = digests.get(rank as i64).fill_((plan.decision >> 2) as i64);
    // The global batch's labels, in rank order: every policy observes the
    // global batch (its size, and its labels when it asks for them).
    let labels = Tensor::zeros([world as i64, y.size()[0]], (Kind::Int64, g.device));
    labels.get(rank as i64).copy_(y);
    let t = Instant::now();
    g.allreduce_sum(&[&control, &digests, &labels])
        .map_err(lost)?;
    comm.seconds += t.elapsed().as_secs_f64();
    let control = reads::f64s(&control);
    let loss = control[0] / world as f64;
    let stop = control[1] > 0.0;
    let all = reads::i64s(&digests);
    if all.iter().any(|d| *d != all[0]) {
        return Err(StepError::Comm(CommError {
            message: format!(
                "rank {rank}: the ranks run under different freeze states (decision digests \
                 {all:x?}); a policy must decide the same from the same observations"
            ),
        }));
    }
    if !loss.is_finite() {
        return Err(StepError::Diverged(loss));
    }
    // 2. The trainable parameters' gradients, averaged over the ranks: the
    // host's wait for them is the communication the backward did not hide.
    let mut exposed = 0.0;
    let mut grads = opt
        .backward_with(plan.frozen, |params| {
            let (grads, o) = g.backward_mean(&loss_t, params, bucket, overlap)?;
            exposed = o.exposed_seconds;
            Ok(grads)
        })
        .map_err(lost)?;
    comm.seconds += exposed;
    let params: u64 = grads.tensors().iter().map(|t| t.numel() as u64).sum();
    comm.params = params;
    comm.bytes = params * 4;
    // The averaged gradients: every rank sums the same.
    let norms = opt.update(&mut grads, plan, model.depth(), None);
    let grad_norms = norms.as_ref().map_or_else(Vec::new, reads::f32s);
    // 3. The global batch's features, in rank order, when asked for.
    let cls_host = match cls_host {
        Some(local) => {
            let t = Instant::now();
            let f = g.gather(&local).map_err(lost)?;
            comm.seconds += t.elapsed().as_secs_f64();
            Some(f.flatten(0, 1))
        }
        None => None,
    };
    let labels_host = Some(labels.flatten(0, 1).to_device(Device::Cpu));
    // On a GPU the host did not wait for the buckets (the stream did): the
    // stream's wait, timed by events, replaces the host's near-zero figure
    // (the copy above has brought the stream past them).
    if let Some(on_device) = g.exposed_on_device().map_err(lost)? {
        comm.seconds += on_device - exposed;
    }
    Ok(StepOut {
        loss,
        cls: out.cls,
        cls_host,
        grad_norms,
        labels_host,
        stop,
        comm: Some(comm),
    })
}

impl Engine for ParallelEngine {
    fn model(&self) -> &dyn PrefixModel {
        self.inner.model()
    }

    fn device(&self) -> Device {
        self.inner.device()
    }

    fn import_weights(&mut self, ck: Checkpoint, head: HeadInit) -> Result<String> {
        let report = self.inner.import_weights(ck, head)?;
        // A new head is drawn from each rank's generator: rank 0's wins.
        self.sync_weights()?;
        Ok(report)
    }

    fn lr_at(&self, step: u64, total: u64) -> f64 {
        self.inner.lr_at(step, total)
    }

    fn step(
        &mut self,
        batch: Batch,
        y: &Tensor,
        plan: &StepPlan<'_>,
    ) -> Result<StepOut, StepError> {
        self.steps += 1;
        let g = self.group.clone();
        // The heartbeat that names this rank if it is lost.
        let _ = g.store_set(
            &format!("heartbeat/{}", g.rank),
            self.steps.to_string().as_bytes(),
        );
        let at = (self.bucket, self.overlap, self.steps);
        let inner = &mut self.inner;
        torch_guard(
            || "in a data-parallel training step".into(),
            || parallel_step(inner, &g, at, batch, y, plan),
        )
        .map_err(StepError::Torch)?
    }

    /// Each rank evaluates its contiguous share; the counts are summed, so
    /// every rank gets the same top-1.
    fn evaluate(&self, data: &Dataset) -> Result<(f64, f64), TorchError> {
        let (rank, world) = (self.group.rank as i64, self.group.world as i64);
        let n = data.len();
        let rows = (n * rank / world)..(n * (rank + 1) / world);
        let (correct, loss_sum, _) = torch_guard(
            || "evaluating".into(),
            || evaluate_counts(self.model(), data, rows, self.inner.device),
        )?;
        let sums = Tensor::from_slice(&[correct as f64, loss_sum]).to_device(self.group.device);
        self.group.allreduce_sum(&[&sums]).map_err(|e| TorchError {
            during: "evaluating".into(),
            message: explain(&self.group, self.steps, e).message,
        })?;
        let sums = reads::f64s(&sums);
        let n = n.max(1) as f64;
        Ok((100.0 * sums[0] / n, sums[1] / n))
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.inner.state_tensors()
    }

    fn load_state_tensors(&mut self, path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
        self.inner.load_state_tensors(path, tensors)
    }

    fn gather_rows(&self, local: &Tensor) -> Result<Tensor, CommError> {
        Ok(self.group.gather(local)?.flatten(0, 1))
    }

    fn read_grad_sums(&mut self, frozen: usize) -> (Vec<f64>, Vec<f64>, u64) {
        self.inner.read_grad_sums(frozen)
    }

    fn save_model(&self, path: &Path) -> Result<()> {
        self.inner.save_model(path)
    }

    fn shard(&self) -> (usize, usize) {
        (self.group.rank, self.group.world)
    }

    fn weight_digests(&self) -> Result<Vec<u64>, CommError> {
        let own = weights_digest(self.inner.model_tensors());
        let all = self
            .group
            .gather(&Tensor::from_slice(&[own as i64]).to_device(self.group.device))
            .map_err(|e| explain(&self.group, self.steps, e))?;
        let v: Vec<i64> = Vec::try_from(all.flatten(0, -1)).unwrap_or_default();
        Ok(v.into_iter().map(|d| d as u64).collect())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.group
            .barrier()
            .map_err(|e| explain(&self.group, self.steps, e))
    }
}
