//! `simfreeze bench`: training steps per frozen prefix on random inputs,
//! through the same [`Engine`] step and the same policy loop
//! ([`observe`]) as a run, so what it times is what a run does.

use simfreeze_runtime::more::MoreData;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use simfreeze_abi::Needs;
use simfreeze_runtime::driver::PolicyDriver;
use simfreeze_runtime::loader::PolicyHandle;
use tch::{Device, Kind, Tensor};

use crate::engine::dist::Backend;
use crate::engine::launch::{launch, DistSettings, Placement};
use crate::engine::optim::Recipe;
use crate::engine::{reads, Batch, StepError, StepPlan};
use crate::memory;
use crate::model::precision::Precision;
use crate::model::VitConfig;
use crate::observe::observer::Observer;
use crate::observe::{observe_with, StepAt};

/// Result of `simfreeze bench` for one frozen prefix.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// Frozen blocks.
    pub frozen: usize,
    /// Training throughput (policy loop included when a policy is given),
    /// in the best round.
    pub images_per_sec: f64,
    /// The same in the median round (the mean of the middle two of an
    /// even number): what a steady stretch of steps runs at, to set beside
    /// a run's epoch.
    pub median_images_per_sec: f64,
    /// Peak resident memory while this prefix ran (MiB; Linux only).
    pub peak_rss_mib: Option<f64>,
    /// Share of step time spent in the policy loop (feature and label copy,
    /// policy call, decision check), when a policy is given.
    pub policy_overhead: Option<f64>,
    /// Data-parallel (under torchrun): share of step time spent in
    /// collectives, in the best round.
    pub comm_share: Option<f64>,
    /// Data-parallel: bytes of gradients all-reduced per step.
    pub allreduce_bytes: Option<u64>,
    /// Seconds per step the main thread spent outside the engine's step
    /// (the batch, the policy loop), in the best round.
    pub host_seconds_per_step: f64,
    /// Host reads per step inside the engine's step (`engine::reads`).
    pub host_reads_per_step: f64,
}

/// What one stretch of steps measured.
#[derive(Default)]
struct Timed {
    /// Seconds in the policy loop.
    in_policy: f64,
    /// Seconds in collectives.
    in_comm: f64,
    /// Bytes all-reduced per step.
    bytes: u64,
    /// Seconds outside the engine's step.
    outside: f64,
    /// Host reads inside the engine's step.
    reads: u64,
}

/// What a bench measured, and where (under torchrun, every rank measures;
/// rank 0 reports).
pub struct BenchRun {
    /// This process's rank.
    pub rank: usize,
    /// Ranks (1 in one process); `images_per_sec` counts all of them.
    pub world: usize,
    /// One result per frozen prefix.
    pub results: Vec<BenchResult>,
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
    pub precision: Precision,
    /// Data-parallel: collective timeout (`train.dist_timeout_s`).
    pub dist_timeout_s: u64,
    /// Data-parallel: gradient bucket size (`train.bucket_mib`).
    pub bucket_mib: u64,
    /// Data-parallel: the backend (`train.dist_backend`).
    pub dist_backend: Backend,
    /// Data-parallel: all-reduce during the backward
    /// (`train.overlap_allreduce`).
    pub overlap_allreduce: bool,
}

impl BenchSpec<'_> {
    /// The data-parallel settings the engine is assembled with.
    fn dist(&self) -> DistSettings {
        DistSettings {
            timeout_s: self.dist_timeout_s,
            backend: self.dist_backend,
            bucket_mib: self.bucket_mib,
            overlap: self.overlap_allreduce,
        }
    }
}

/// Times training steps per frozen prefix on random inputs of the model's
/// shape: `warmup` untimed steps, then `rounds` rounds of `steps` timed
/// steps, the prefixes interleaved within each round so that a burst of load
/// on a shared machine hits all of them alike; reports each prefix's best
/// round (the least disturbed). With a policy, every step also runs the
/// policy loop exactly as `run` does (its decisions are checked but the
/// prefix stays fixed), and its share of the step time is reported.
///
/// Under torchrun every rank runs the same steps through the data-parallel
/// engine (each on `batch` images, `--frozen` blocks kept out of the
/// all-reduce); throughput counts every rank's images, and the share of
/// step time in collectives is reported.
pub fn bench(spec: &BenchSpec<'_>, policy: Option<PolicyHandle>) -> Result<BenchRun> {
    let (mcfg, batch) = (spec.model, spec.batch);
    tch::manual_seed(0);
    let dist = spec.dist();
    let at = Placement::join(spec.device, &dist)?;
    let recipe = Recipe::sgd(Default::default());
    let mut engine = launch(spec.model, spec.precision, recipe, &at, &dist)?;
    let (group, device) = (at.group.clone(), at.device);
    let (rank, world) = at.rank_world();
    let x = Tensor::randn(
        [batch, mcfg.channels, mcfg.image_size, mcfg.image_size],
        (Kind::Float, device),
    );
    let y = Tensor::randint(mcfg.classes, [batch], (Kind::Int64, device));
    // Labels come from host memory in a real run too.
    let y_host = y.to_device(Device::Cpu);
    let has_policy = policy.is_some();
    let mut driver = PolicyDriver::new(policy, engine.model().depth() as u32);
    let needs = driver.needs();
    // The on-demand observations, computed at the steps the policy asks
    // for them as in a run (the fixed batch is the bench's batch).
    let probe = Some(x.shallow_clone());
    let vars = || engine.state_tensors();
    let mut observer = Observer::new(needs, mcfg, engine.model(), vars, device, probe, 0);
    let total = spec.steps * u64::from(spec.rounds.max(1)) * spec.frozen.len() as u64
        + spec.warmup * spec.frozen.len() as u64;
    let mut step = 0u64;
    let mut run = |k: usize, n: u64| -> Result<Timed> {
        let mut m = Timed::default();
        for _ in 0..n {
            let iteration = Instant::now();
            // Random data at a tiny lr cannot diverge; an Err would only
            // mean that step updated nothing. The step reads the loss, so
            // it synchronises like a real one.
            let t = Instant::now();
            let input = Batch::Images(x.shallow_clone());
            let mut more = match &observer {
                Some(o) => o.before_step(&*engine, &input, driver.state().observe())?,
                None => MoreData::default(),
            };
            m.in_policy += t.elapsed().as_secs_f64();
            let plan = StepPlan {
                features: has_policy && needs.contains(Needs::CLS_FEATURES),
                accumulate: observer.as_ref().is_some_and(Observer::accumulates),
                ..StepPlan::simple(1e-4, k)
            };
            let (in_step, reads_before) = (Instant::now(), reads::count());
            let stepped = engine.step(input, &y, &plan);
            let step_seconds = in_step.elapsed().as_secs_f64();
            m.reads += reads::count() - reads_before;
            let out = match stepped {
                Ok(out) => out,
                Err(StepError::Diverged(_)) => continue,
                Err(StepError::Torch(e)) => return Err(e.into()),
                Err(StepError::Comm(e)) => return Err(e.into()),
            };
            if let Some(c) = out.comm {
                m.in_comm += c.seconds;
                m.bytes = c.bytes;
            }
            if has_policy {
                let t = Instant::now();
                let at = StepAt {
                    step,
                    epoch: 0,
                    steps_per_epoch: total.max(1),
                    total_steps: total.max(1),
                    num_classes: mcfg.classes as usize,
                    lr: 1e-4,
                };
                if let Some(o) = &observer {
                    o.after_step(&mut *engine, &mut more, k);
                }
                let outcome = observe_with(&mut driver, &out, &y_host, mcfg.dim, at, &more)?;
                if let Some(o) = &mut observer {
                    o.take_reference(&*engine, outcome.reference(), step)?;
                }
                m.in_policy += t.elapsed().as_secs_f64();
            }
            step += 1;
            m.outside += (iteration.elapsed().as_secs_f64() - step_seconds).max(0.0);
        }
        Ok(m)
    };
    let n = spec.frozen.len();
    let (mut best, mut overhead, mut peak) = (
        vec![0.0f64; n],
        vec![f64::INFINITY; n],
        vec![None::<f64>; n],
    );
    let (mut comm_share, mut comm_bytes) = (vec![0.0f64; n], vec![0u64; n]);
    let (mut host, mut reads_per_step) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut all_ips = vec![Vec::new(); n];
    for &k in spec.frozen {
        run(k, spec.warmup)?;
    }
    for _ in 0..spec.rounds.max(1) {
        for (i, &k) in spec.frozen.iter().enumerate() {
            // On a GPU the timer brackets finished work: the previous K's
            // queued kernels do not count against this one.
            synchronize(device);
            let t = Instant::now();
            let m = run(k, spec.steps)?;
            synchronize(device);
            let secs = t.elapsed().as_secs_f64();
            let ips = spec.steps as f64 * (batch * world as i64) as f64 / secs;
            let per_step = spec.steps.max(1) as f64;
            all_ips[i].push(ips);
            if ips > best[i] {
                best[i] = ips;
                comm_share[i] = m.in_comm / secs;
                host[i] = m.outside / per_step;
            }
            reads_per_step[i] = m.reads as f64 / per_step;
            comm_bytes[i] = m.bytes;
            overhead[i] = overhead[i].min(m.in_policy / secs);
        }
    }
    // Memory in a pass of its own, after the timing: the process keeps
    // freed memory (see `memory`), so each K first hands back what the
    // previous one left, then its peak is read over two steps.
    for (i, &k) in spec.frozen.iter().enumerate() {
        memory::release_free_memory();
        memory::reset_peak_rss();
        run(k, 2)?;
        peak[i] = memory::peak_rss_mib();
    }
    let results = (0..n)
        .map(|i| BenchResult {
            frozen: spec.frozen[i],
            images_per_sec: best[i],
            median_images_per_sec: median(&mut all_ips[i]),
            peak_rss_mib: peak[i],
            policy_overhead: has_policy.then_some(overhead[i]),
            comm_share: group.is_some().then_some(comm_share[i]),
            allreduce_bytes: group.is_some().then_some(comm_bytes[i]),
            host_seconds_per_step: host[i],
            host_reads_per_step: reads_per_step[i],
        })
        .collect();
    Ok(BenchRun {
        rank,
        world,
        results,
    })
}

/// The median of `v` (the mean of the middle two of an even count; 0 when
/// empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Waits for the GPU's queued work (nothing to wait for on the CPU).
fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_odd_even_and_no_rounds() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
