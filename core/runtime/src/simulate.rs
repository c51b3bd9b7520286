//! `simfreeze simulate`: drives a policy through the real [`PolicyDriver`]
//! and [`crate::contract::FreezeController`] with synthetic observations,
//! without any libtorch work. It is the harness for policy authors (see
//! [`crate::testkit`]) and the driver of the conformance suite.
//!
//! The synthetic world imitates what the paper reports for fine-tuning a
//! pretrained ViT: class-token features drift toward their class means and
//! settle, so similarity to the class mean rises and flattens, earlier blocks
//! settling first. Each block `i` carries a residual `r_i` that decays with
//! time constant `tau * (1 + i / L)` while the block trains and stays put
//! while it is frozen (probed or committed). A sample of class `c` has
//! features `mu_c + sigma * s * e` with `e ~ N(0, I / D)`,
//! `sigma = sigma_min + sum_i r_i` and a per-sample difficulty
//! `s ~ LogNormal(0, 0.5)`; gradient norms are proportional to the
//! residuals (0 for frozen blocks); the loss falls with `sigma`.
//! Everything is a deterministic function of the seed.
//!
//! The on-demand observations of contract 2 come from a second generator
//! (so asking for them leaves the world above unchanged): block `i`'s
//! tokens are the features scaled by `1 + i / L` plus noise of
//! `0.1 sigma_i` (`sigma_i` from block `i`'s own residual); the reference's
//! are the same at the residuals of the step it was taken; the fixed batch
//! is one sample of each class in turn, drawn once; 8 weights per block
//! random-walk with steps proportional to its gradient norm; the
//! accumulated L2 norm is the sum of the per-step norms (perfectly aligned
//! gradients) and the L1 norm 16 times it.

use serde::Serialize;

use simfreeze_abi::ffi::{Needs, ReferenceRequest};

use crate::driver::{DriverError, PolicyDriver, StepInput, StepOutcome, Timeline};
use crate::loader::PolicyHandle;
use crate::more::{synthetic_blocks, MoreData};
pub use crate::rng::Rng;

/// Shape of a simulated run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Encoder blocks L.
    pub layers: u32,
    /// Steps T.
    pub steps: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// Classes.
    pub classes: usize,
    /// Feature width D.
    pub dim: usize,
    /// Batch size.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for SimConfig {
    /// The defaults of `simfreeze simulate`: 12 blocks, 1000 steps of 100
    /// per epoch, 10 classes, 64-wide features, batch 16, seed 0.
    fn default() -> Self {
        SimConfig {
            layers: 12,
            steps: 1000,
            steps_per_epoch: 100,
            classes: 10,
            dim: 64,
            batch: 16,
            seed: 0,
        }
    }
}

impl SimConfig {
    /// Checks the numbers a user typed.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--layers", self.layers as u64),
            ("--steps", self.steps),
            ("--steps-per-epoch", self.steps_per_epoch),
            ("--classes", self.classes as u64),
            ("--dim", self.dim as u64),
            ("--batch", self.batch as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Result of `simfreeze simulate`, in the JSON shape of the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Policy name.
    pub policy: String,
    /// Policy version.
    pub version: String,
    /// Blocks.
    pub layers: u32,
    /// Steps.
    pub steps: u64,
    /// Per block: first step run committed frozen, or null.
    pub freeze_step: Vec<Option<u64>>,
    /// Steps that ran with a probe.
    pub probe_steps: u64,
    /// Policy scalars over steps.
    pub scalars: std::collections::BTreeMap<String, Vec<(u64, f64)>>,
    /// Compute-model speedup (not part of the JSON).
    #[serde(skip)]
    pub compute_speedup: f64,
}

/// The synthetic training process.
pub struct SyntheticWorld {
    cfg: SimConfig,
    rng: Rng,
    means: Vec<f32>,
    residual: Vec<f64>,
    initial: Vec<f64>,
    decay: Vec<f64>,
    features: Vec<f32>,
    labels: Vec<i64>,
    grad_norms: Vec<f32>,
    more: MoreWorld,
}

/// The synthetic world's contract-2 state: its own generator, the
/// reference, the fixed batch, the sampled weights and the gradient sums.
struct MoreWorld {
    rng: Rng,
    reference: Option<(u64, Vec<f64>)>,
    probe: Vec<f32>,
    weights: Vec<f32>,
    acc: Vec<f64>,
    acc_steps: u64,
}

/// Weights sampled per block in the synthetic world.
const SAMPLES: usize = 8;

const SIGMA_MIN: f64 = 0.25;
const SIGMA_START: f64 = 2.0;

impl SyntheticWorld {
    /// A world for `cfg`.
    pub fn new(cfg: &SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let d = cfg.dim;
        let mut means = vec![0f32; cfg.classes * d];
        for c in 0..cfg.classes {
            let row = &mut means[c * d..(c + 1) * d];
            for v in row.iter_mut() {
                *v = rng.normal() as f32;
            }
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        let l = cfg.layers as usize;
        // Block i's residual has time constant tau * (1 + i / L): block 0
        // settles (5 tau) by about a third of the run, the last block by
        // about two thirds, as a fine-tune that converges before its end.
        let tau = (cfg.steps as f64 / 16.0).max(1.0);
        let decay = (0..l)
            .map(|i| (-1.0 / (tau * (1.0 + i as f64 / l as f64))).exp())
            .collect();
        let initial = vec![(SIGMA_START - SIGMA_MIN) / l as f64; l];
        let mut more_rng = Rng::new(cfg.seed ^ 0x5eed_0b5e_7a1e_u64);
        let probe = (0..cfg.batch)
            .flat_map(|b| {
                let c = b % cfg.classes;
                means[c * d..(c + 1) * d].to_vec()
            })
            .map(|m| m + (0.2 * more_rng.normal()) as f32 / (d as f32).sqrt())
            .collect();
        let weights = (0..l * SAMPLES)
            .map(|_| (0.02 * more_rng.normal()) as f32)
            .collect();
        let more = MoreWorld {
            rng: more_rng,
            reference: None,
            probe,
            weights,
            acc: vec![0.0; l],
            acc_steps: 0,
        };
        SyntheticWorld {
            cfg: cfg.clone(),
            rng,
            means,
            residual: initial.clone(),
            initial,
            decay,
            features: vec![0.0; cfg.batch * d],
            labels: vec![0; cfg.batch],
            grad_norms: vec![0.0; l],
            more,
        }
    }

    /// Current feature noise.
    pub fn sigma(&self) -> f64 {
        SIGMA_MIN + self.residual.iter().sum::<f64>()
    }

    /// Runs one step with blocks `[0, frozen)` frozen; returns the loss.
    pub fn step(&mut self, frozen: usize) -> f32 {
        let d = self.cfg.dim;
        for i in 0..self.residual.len() {
            if i >= frozen {
                self.residual[i] *= self.decay[i];
                let g = 0.05 + self.residual[i] / self.initial[i];
                self.grad_norms[i] = (g * (1.0 + 0.05 * self.rng.normal())).max(0.0) as f32;
            } else {
                self.grad_norms[i] = 0.0;
            }
        }
        let sigma = self.sigma();
        for b in 0..self.cfg.batch {
            let c = self.rng.below(self.cfg.classes);
            self.labels[b] = c as i64;
            // Samples differ in difficulty (log-normal noise scale), which
            // gives similarity estimates the batch-to-batch scatter of real
            // training.
            let scale = sigma * (0.5 * self.rng.normal()).exp() / (d as f64).sqrt();
            for j in 0..d {
                let noise = scale * self.rng.normal();
                self.features[b * d + j] = self.means[c * d + j] + noise as f32;
            }
        }
        let m = &mut self.more;
        for (i, g) in self.grad_norms.iter().enumerate() {
            m.acc[i] += f64::from(*g);
            for w in &mut m.weights[i * SAMPLES..(i + 1) * SAMPLES] {
                *w += (0.01 * f64::from(*g) * m.rng.normal()) as f32;
            }
        }
        m.acc_steps += 1;
        let base = (self.cfg.classes.max(2) as f64).ln();
        (base * sigma / SIGMA_START * (1.0 + 0.05 * self.rng.normal())).max(0.0) as f32
    }

    /// The on-demand observations `asked` of the last step (contract 2);
    /// reading the accumulated gradient norms resets their sums.
    pub fn more(&mut self, asked: Needs) -> MoreData {
        let l = self.cfg.layers as usize;
        let (rows, dim) = (self.cfg.batch, self.cfg.dim);
        let mut out = MoreData {
            provided: asked,
            reference_step: self.more.reference.as_ref().map(|r| r.0),
            ..MoreData::default()
        };
        let reductions = asked.intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS);
        if !reductions.is_empty() {
            let noise = 0.1 * self.sigma() / (dim as f64).sqrt();
            let rng = &mut self.more.rng;
            out.batch = synthetic_blocks(reductions, l, &self.features, (rows, dim), noise, rng);
            let probe = &self.more.probe;
            if asked.contains(Needs::FIXED_BATCH) {
                out.probe = synthetic_blocks(reductions, l, probe, (rows, dim), noise, rng);
            }
            if let Some((_, residual)) = &self.more.reference {
                if asked.contains(Needs::REFERENCE) {
                    let sigma = SIGMA_MIN + residual.iter().sum::<f64>();
                    let noise = 0.1 * sigma / (dim as f64).sqrt();
                    let f = &self.features;
                    out.batch_reference =
                        synthetic_blocks(reductions, l, f, (rows, dim), noise, rng);
                    if asked.contains(Needs::FIXED_BATCH) {
                        out.probe_reference =
                            synthetic_blocks(reductions, l, probe, (rows, dim), noise, rng);
                    }
                }
            }
        }
        if asked.contains(Needs::SAMPLED_WEIGHTS) {
            out.sampled_weights = self.more.weights.clone();
            out.samples_per_block = SAMPLES;
        }
        if asked.contains(Needs::ACC_GRAD_NORMS) {
            out.acc_grad_l2 = self.more.acc.clone();
            out.acc_grad_l1 = self.more.acc.iter().map(|v| 16.0 * v).collect();
            out.acc_grad_steps = self.more.acc_steps;
            self.more.acc.fill(0.0);
            self.more.acc_steps = 0;
        }
        out
    }

    /// Takes the reference snapshot after `step` (as the trainer does when
    /// a decision asks for it).
    pub fn take_reference(&mut self, step: u64) {
        self.more.reference = Some((step, self.residual.clone()));
    }

    /// One whole step with `driver`: the world steps under the driver's
    /// freeze state, the policy observes what it asked for and decides,
    /// and a reference it asks for is taken.
    pub fn drive(
        &mut self,
        driver: &mut PolicyDriver,
        step: u64,
    ) -> Result<StepOutcome, DriverError> {
        let asked = driver.state().observe();
        let loss = self.step(driver.state().frozen_prefix() as usize);
        let more = self.more(asked);
        let mut input = self.input(step, loss);
        input.more = more.view();
        let outcome = driver.after_step(&input)?;
        if outcome.reference() != ReferenceRequest::Keep {
            self.take_reference(step);
        }
        Ok(outcome)
    }

    /// The last step's data.
    pub fn input(&self, step: u64, loss: f32) -> StepInput<'_> {
        StepInput {
            step,
            epoch: step / self.cfg.steps_per_epoch,
            steps_per_epoch: self.cfg.steps_per_epoch,
            total_steps: self.cfg.steps,
            loss,
            batch: self.cfg.batch,
            features: &self.features,
            feature_dim: self.cfg.dim,
            labels: &self.labels,
            num_classes: self.cfg.classes,
            grad_norms: &self.grad_norms,
            lr: None,
            more: simfreeze_abi::ffi::ObservationV2::EMPTY,
        }
    }
}

/// Runs `policy` for `cfg.steps` synthetic steps. `on_step` sees the
/// timeline after each step (progress output).
pub fn simulate(
    policy: PolicyHandle,
    cfg: &SimConfig,
    mut on_step: impl FnMut(&Timeline),
) -> Result<SimReport, DriverError> {
    let name = policy.meta.name.clone();
    let version = policy.meta.version.clone();
    let mut driver = PolicyDriver::new(Some(policy), cfg.layers);
    let mut world = SyntheticWorld::new(cfg);
    for step in 0..cfg.steps {
        world.drive(&mut driver, step)?;
        on_step(driver.timeline());
    }
    let t = driver.timeline();
    Ok(SimReport {
        policy: name,
        version,
        layers: cfg.layers,
        steps: cfg.steps,
        freeze_step: t.freeze_step.clone(),
        probe_steps: t.probe_steps,
        scalars: t.scalars.clone(),
        compute_speedup: t.compute_speedup(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig {
            layers: 4,
            steps: 400,
            steps_per_epoch: 100,
            classes: 5,
            dim: 32,
            batch: 16,
            seed: 7,
        }
    }

    #[test]
    fn noise_falls_while_training_and_holds_while_frozen() {
        let mut w = SyntheticWorld::new(&cfg());
        let s0 = w.sigma();
        for _ in 0..100 {
            w.step(0);
        }
        let s1 = w.sigma();
        assert!(s1 < s0);
        for _ in 0..100 {
            w.step(4);
        }
        assert_eq!(w.sigma(), s1);
        assert!(w.grad_norms.iter().all(|g| *g == 0.0));
    }

    #[test]
    fn same_seed_same_world() {
        let mut a = SyntheticWorld::new(&cfg());
        let mut b = SyntheticWorld::new(&cfg());
        for _ in 0..10 {
            assert_eq!(a.step(1), b.step(1));
        }
        assert_eq!(a.features, b.features);
        assert_eq!(a.labels, b.labels);
    }

    #[test]
    fn similarity_to_class_mean_rises_then_flattens() {
        // Mean cosine between features and their class mean, early vs late.
        let mut w = SyntheticWorld::new(&cfg());
        let d = w.cfg.dim;
        let cos_at = |w: &mut SyntheticWorld| {
            w.step(0);
            let mut total = 0.0;
            for b in 0..w.cfg.batch {
                let c = w.labels[b] as usize;
                let x = &w.features[b * d..(b + 1) * d];
                let m = &w.means[c * d..(c + 1) * d];
                let dot: f32 = x.iter().zip(m).map(|(a, b)| a * b).sum();
                let nx: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
                total += dot / nx;
            }
            total / w.cfg.batch as f32
        };
        let early = cos_at(&mut w);
        for _ in 0..150 {
            w.step(0);
        }
        let mid = cos_at(&mut w);
        for _ in 0..200 {
            w.step(0);
        }
        let late = cos_at(&mut w);
        assert!(mid > early + 0.2, "early {early} mid {mid}");
        assert!((late - mid).abs() < (mid - early), "mid {mid} late {late}");
    }
}
