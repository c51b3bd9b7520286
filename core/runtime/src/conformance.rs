//! The conformance suite every policy is held to: the one the shipped
//! policies pass in CI, run by `simfreeze check` on any plugin and by
//! [`crate::testkit::PolicyTest::conformance`] in a plugin's `cargo test`.
//!
//! Two properties, over run shapes proptest draws (1 to 12 blocks, 1 to 60
//! steps, batches of 1 to 4, features 1 to 5 wide, 1 to 4 classes) with
//! hostile observations (NaN and infinite features, losses and gradient
//! norms; labels of classes never seen and out of range):
//!
//! - **the contract holds**: every decision passes the host's freeze
//!   contract (the frontier never decreases, only the frontier block is
//!   probed, learning-rate factors are valid) and the policy neither errs
//!   nor panics;
//! - **a restored policy continues identically**: saved after a random
//!   number of steps and restored into a fresh instance, it makes the same
//!   decisions and logs the same scalars as the original from there on.
//!
//! A failure is shrunk to the smallest run shape that still fails, and
//! reported with it.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

use simfreeze_abi::ffi::{Needs, ReferenceRequest};

use crate::driver::{PolicyDriver, StepInput};
use crate::loader::PolicyHandle;
use crate::more::{spoil, synthetic_blocks, MoreData};
use crate::rng::Rng;

/// The shape of one hostile run.
#[derive(Debug, Clone, PartialEq)]
pub struct HostileRun {
    /// Encoder blocks.
    pub layers: u32,
    /// Steps.
    pub steps: u64,
    /// Batch size.
    pub batch: usize,
    /// Feature width.
    pub dim: usize,
    /// Classes.
    pub classes: usize,
    /// Seed of the observations.
    pub seed: u64,
    /// Step after which the state is saved and restored.
    pub cut: u64,
}

fn any_run() -> impl Strategy<Value = HostileRun> {
    (
        1u32..=12,
        1u64..60,
        1usize..=4,
        1usize..=5,
        1usize..=4,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(layers, steps, batch, dim, classes, seed, cut)| HostileRun {
                layers,
                steps,
                batch,
                dim,
                classes,
                seed,
                cut: cut % steps,
            },
        )
}

impl HostileRun {
    /// The synthetic world of the same shape, as a test kit
    /// [`SimConfig`](crate::simulate::SimConfig) literal with its fields
    /// written out (`steps_per_epoch` is the suite's 10).
    pub fn world_literal(&self) -> String {
        format!(
            "SimConfig {{ layers: {}, steps: {}, steps_per_epoch: 10, classes: {}, dim: {}, \
             batch: {}, seed: {}, ..SimConfig::default() }}",
            self.layers, self.steps, self.classes, self.dim, self.batch, self.seed
        )
    }
}

/// `n` and the noun, singular for one.
fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

impl std::fmt::Display for HostileRun {
    /// The run's shape in words (the save point is the resume property's
    /// business; [`ConformanceFailure`] adds it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {} (0 to {}), batches of {}, features {} wide, {} (labels from -1 to {}), \
             observation seed {}",
            count(self.layers, "block", "blocks"),
            count(self.steps, "step", "steps"),
            self.steps.saturating_sub(1),
            self.batch,
            self.dim,
            count(self.classes as u64, "class", "classes"),
            self.classes,
            self.seed
        )
    }
}

/// A freeze state in words: what is frozen, the probe, learning-rate
/// factors other than 1 and the on-demand observations asked for.
pub(crate) fn state_in_words(s: &crate::contract::FreezeState) -> String {
    let mut out = match s.frontier {
        0 => "nothing frozen".to_string(),
        1 => "block 0 frozen".to_string(),
        k => format!("blocks 0 to {} frozen", k - 1),
    };
    out.push_str(&format!(" (frontier {} of {})", s.frontier, s.layers));
    if let Some(p) = s.probe {
        out.push_str(&format!(", block {p} probed"));
    }
    if s.lr_factors.iter().any(|&f| f != 1.0) {
        out.push_str(&format!(", learning-rate factors {:?}", s.lr_factors));
    }
    if s.observe != 0 {
        let names = s.observe().names().join(" | ");
        out.push_str(&format!(", asking for {names}"));
    }
    out
}

/// A property that failed, with the smallest run shape found.
#[derive(Clone)]
pub struct ConformanceFailure {
    /// Which property.
    pub property: &'static str,
    /// What went wrong.
    pub reason: String,
    /// The smallest run shape that fails (none when the search aborted).
    pub run: Option<HostileRun>,
}

impl std::fmt::Display for ConformanceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.property, self.reason)?;
        let Some(r) = &self.run else {
            return Ok(());
        };
        write!(f, "\n  smallest failing run: {r}")?;
        let resume = self.property == PROPERTIES[1];
        if resume {
            write!(
                f,
                "; the policy ran {} and saved its state, a fresh policy was restored from it, \
                 and both (the original and the restored one) ran steps {} to {} on the same \
                 observations",
                count(r.cut, "step", "steps"),
                r.cut,
                r.steps.saturating_sub(1)
            )?;
        }
        // How to replay it with `simfreeze_runtime::testkit::PolicyTest`.
        let call = match resume {
            true => format!("check_resume(&world, {})", r.cut),
            false => "simulate(&world)".to_string(),
        };
        write!(
            f,
            "\n  to replay it in the plugin's `cargo test` (simfreeze_runtime::testkit::PolicyTest, \
             `test` built with the same options): `test.conformance(cases)` finds this very case \
             again (the search is deterministic); the same shape with the synthetic world's \
             ordinary observations instead of hostile ones is\n      \
             let world = {};\n      test.{call}.unwrap();",
            r.world_literal()
        )
    }
}

/// As [`Display`](std::fmt::Display): a failed `conformance(..).unwrap()`
/// in a plugin's test reads as prose, not as a struct.
impl std::fmt::Debug for ConformanceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for ConformanceFailure {}

/// The names of the properties, in the order they run.
pub const PROPERTIES: [&str; 2] = [
    "the contract holds on hostile observations",
    "a restored policy continues identically",
];

/// Runs both properties on `cases` run shapes each (deterministic: the
/// same policy gives the same verdict every time). `make` builds a fresh
/// policy with the options under test.
pub fn check(
    make: &dyn Fn() -> Result<PolicyHandle, String>,
    cases: u32,
) -> Result<(), ConformanceFailure> {
    type Property<'a> = &'a dyn Fn(&HostileRun) -> Result<(), String>;
    let contract: Property = &|r| contract_holds(make, r);
    let resume: Property = &|r| continues_identically(make, r);
    for (property, test) in PROPERTIES.into_iter().zip([contract, resume]) {
        let config = Config {
            cases,
            failure_persistence: None,
            // Each case is at most 60 policy calls: shrink to the end.
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let outcome = runner.run(&any_run(), |r| test(&r).map_err(TestCaseError::fail));
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(reason, run)) => {
                return Err(ConformanceFailure {
                    property,
                    reason: reason.message().to_string(),
                    run: Some(run),
                })
            }
            Err(TestError::Abort(reason)) => {
                return Err(ConformanceFailure {
                    property,
                    reason: format!("the search aborted: {}", reason.message()),
                    run: None,
                })
            }
        }
    }
    Ok(())
}

/// One step's observations, hostile values included.
struct Data {
    features: Vec<f32>,
    labels: Vec<i64>,
    norms: Vec<f32>,
    loss: f32,
    more: MoreData,
}

fn weird(rng: &mut Rng) -> f32 {
    match rng.below(20) {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => 0.0,
        _ => rng.normal() as f32,
    }
}

/// The on-demand observations `asked` for, with hostile values (NaN,
/// infinities and zeros in every buffer), and the reference the policy had
/// the host take (as a host reports it at every step). No draw at all when
/// nothing is asked, so a contract-1 policy sees the same runs as before.
fn hostile_more(r: &HostileRun, rng: &mut Rng, asked: Needs, reference: Option<u64>) -> MoreData {
    let mut more = MoreData {
        provided: asked,
        reference_step: reference,
        ..MoreData::default()
    };
    if asked.is_empty() {
        return more;
    }
    let l = r.layers as usize;
    let shape = (r.batch, r.dim);
    let reductions = asked.intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS);
    let base: Vec<f32> = (0..r.batch * r.dim).map(|_| weird(rng)).collect();
    let blocks = |rng: &mut Rng| {
        let mut b = synthetic_blocks(reductions, l, &base, shape, 1.0, rng);
        spoil(&mut b.tokens, 10, rng);
        spoil(&mut b.grams, 10, rng);
        b
    };
    if !reductions.is_empty() {
        more.batch = blocks(rng);
        if asked.contains(Needs::FIXED_BATCH) {
            more.probe = blocks(rng);
        }
        if asked.contains(Needs::REFERENCE) && reference.is_some() {
            more.batch_reference = blocks(rng);
            if asked.contains(Needs::FIXED_BATCH) {
                more.probe_reference = blocks(rng);
            }
        }
    }
    if asked.contains(Needs::SAMPLED_WEIGHTS) {
        more.samples_per_block = 1 + rng.below(4);
        more.sampled_weights = (0..l * more.samples_per_block)
            .map(|_| weird(rng))
            .collect();
    }
    if asked.contains(Needs::ACC_GRAD_NORMS) {
        more.acc_grad_l2 = (0..l).map(|_| f64::from(weird(rng)).abs()).collect();
        more.acc_grad_l1 = (0..l).map(|_| f64::from(weird(rng)).abs()).collect();
        more.acc_grad_steps = rng.below(5) as u64;
    }
    more
}

fn data(r: &HostileRun, rng: &mut Rng, asked: Needs, reference: Option<u64>) -> Data {
    Data {
        more: hostile_more(r, rng, asked, reference),
        features: (0..r.batch * r.dim).map(|_| weird(rng)).collect(),
        // Classes never seen (>= classes) and invalid (-1) included.
        labels: (0..r.batch)
            .map(|_| rng.below(r.classes + 2) as i64 - 1)
            .collect(),
        norms: (0..r.layers).map(|_| weird(rng).abs()).collect(),
        loss: weird(rng),
    }
}

fn input<'a>(r: &HostileRun, step: u64, d: &'a Data) -> StepInput<'a> {
    StepInput {
        step,
        epoch: step / 10,
        steps_per_epoch: 10,
        total_steps: r.steps,
        loss: d.loss,
        batch: r.batch,
        features: &d.features,
        feature_dim: r.dim,
        labels: &d.labels,
        num_classes: r.classes,
        grad_norms: &d.norms,
        lr: Some(0.01),
        more: d.more.view(),
    }
}

fn contract_holds(
    make: &dyn Fn() -> Result<PolicyHandle, String>,
    r: &HostileRun,
) -> Result<(), String> {
    let mut driver = PolicyDriver::new(Some(make()?), r.layers);
    let mut rng = Rng::new(r.seed);
    let mut reference = None;
    for step in 0..r.steps {
        let d = data(r, &mut rng, driver.state().observe(), reference);
        let o = driver
            .after_step(&input(r, step, &d))
            .map_err(|e| e.to_string())?;
        if o.reference() != ReferenceRequest::Keep {
            reference = Some(step);
        }
    }
    Ok(())
}

fn continues_identically(
    make: &dyn Fn() -> Result<PolicyHandle, String>,
    r: &HostileRun,
) -> Result<(), String> {
    let mut a = PolicyDriver::new(Some(make()?), r.layers);
    let mut rng = Rng::new(r.seed);
    let mut reference = None;
    for step in 0..r.cut {
        let d = data(r, &mut rng, a.state().observe(), reference);
        let o = a
            .after_step(&input(r, step, &d))
            .map_err(|e| e.to_string())?;
        if o.reference() != ReferenceRequest::Keep {
            reference = Some(step);
        }
    }
    let saved = match a.policy() {
        Some(p) => p
            .save_state(r.cut)
            .map_err(|e| format!("saving the state after {} steps: {e}", r.cut))?,
        None => Vec::new(),
    };
    // Named in every message below: an empty state is the usual cause.
    let from = match saved.len() {
        0 => "an empty state: its save_state returned no bytes".to_string(),
        n => format!("the {n} bytes its save_state returned"),
    };
    let mut restored = make()?;
    restored
        .load_state(r.cut, &saved)
        .map_err(|e| format!("a fresh policy refused {from} after {} steps: {e}", r.cut))?;
    let mut b = PolicyDriver::new(Some(restored), r.layers);
    b.restore_state(a.state().clone());
    for step in r.cut..r.steps {
        let d = data(r, &mut rng, a.state().observe(), reference);
        let oa = a
            .after_step(&input(r, step, &d))
            .map_err(|e| e.to_string())?;
        if oa.reference() != ReferenceRequest::Keep {
            reference = Some(step);
        }
        let ob = b
            .after_step(&input(r, step, &d))
            .map_err(|e| format!("the restored policy (restored from {from}): {e}"))?;
        if a.state() != b.state() {
            return Err(format!(
                "the policies diverged at step {step}: the restored one (restored from {from}) \
                 decided {}; the original decided {}",
                state_in_words(b.state()),
                state_in_words(a.state())
            ));
        }
        // NaN scalars compare unequal; compare their bit patterns.
        let bits = |s: &[(String, f64)]| -> Vec<(String, u64)> {
            s.iter().map(|(n, v)| (n.clone(), v.to_bits())).collect()
        };
        if bits(&oa.scalars) != bits(&ob.scalars) {
            return Err(format!(
                "the policies logged other scalars at step {step}: the restored one (restored \
                 from {from}) {:?}; the original {:?}",
                ob.scalars, oa.scalars
            ));
        }
    }
    Ok(())
}
