//! The policy SDK: the plain-Rust side of the ABI.
//!
//! A researcher implements [`Policy`] + [`PolicyPlugin`] (or [`Metric`] +
//! [`MetricPlugin`]) with ordinary std types and exports the type with
//! [`crate::export_policy!`] / [`crate::export_metric!`]. The adapters here
//! translate to the stable types of [`crate::ffi`] and back.
//!
//! Invariant: no panic leaves a plugin. Every entry point the export macros
//! generate runs the researcher's code inside `catch_unwind` and returns a
//! panic as a [`PluginError`] of kind [`ErrorKind::Panic`] (plugins must build
//! with `panic = "unwind"`, the default).

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RStr, RString, RVec},
};

use crate::ffi::{
    self, ContractV2Root, ErrorKind, FfiMetric, FfiMetric_TO, FfiPolicy, FfiPolicyV2,
    FfiPolicyV2_TO, FfiPolicy_TO, HostRef, MetricBox, OptionInfo, PluginError, PluginInfo,
    PluginKind, PluginModule, PluginModuleRef, PolicyBox, PolicyModuleV2, PolicyModuleV2Ref,
    PolicyV2Box, ReferenceRequest,
};

pub use crate::ffi::Needs;

/// Everything a policy or metric plugin needs, in one import:
/// `use simfreeze_abi::sdk::prelude::*;`.
pub mod prelude {
    pub use super::{
        sp_loss, AccGradNorms, Blocks, Decision, HostServices, Info, Matrix, Metric, MetricHandle,
        MetricPlugin, Needs, OptionDoc, PluginModules, Policy, PolicyError, PolicyPlugin,
        ReferenceDtype, Step,
    };
    pub use crate::{export_metric, export_policy};
}

/// An error from policy or metric code.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyError {
    /// Broad category, shown to the user.
    pub kind: ErrorKind,
    /// What went wrong.
    pub message: String,
}

impl PolicyError {
    /// Bad options (unknown field, wrong type, out-of-range value).
    pub fn options(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Options, message)
    }
    /// Saved state that cannot be restored.
    pub fn state(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::State, message)
    }
    /// An observation or input the policy cannot use.
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    /// Anything else.
    pub fn other(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Other, message)
    }
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        PolicyError {
            kind,
            message: message.to_string(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

impl From<PolicyError> for PluginError {
    fn from(e: PolicyError) -> Self {
        PluginError {
            kind: e.kind,
            message: e.message.into(),
        }
    }
}

impl From<PluginError> for PolicyError {
    fn from(e: PluginError) -> Self {
        PolicyError {
            kind: e.kind,
            message: e.message.into(),
        }
    }
}

/// A row-major matrix view: `rows` × `cols` values in `data`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> Matrix<'a> {
    /// A view of `data` as `rows` × `cols`; `None` if the length disagrees.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Option<Self> {
        (rows.checked_mul(cols)? == data.len()).then_some(Matrix { data, rows, cols })
    }
    /// Number of rows (samples).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns (feature width).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Row `i` (panics when out of range, like slice indexing).
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// All rows in order.
    pub fn iter_rows(&self) -> impl Iterator<Item = &'a [f32]> + 'a {
        let cols = self.cols.max(1);
        self.data.chunks(cols).take(self.rows)
    }
    /// The underlying row-major data.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }
}

/// The name of the learning rate in an observation's `extra` values.
pub const LR_EXTRA: &str = "lr";

/// What a policy sees after each training step, with std types.
///
/// `frontier` and `probe` describe the step just taken; the returned
/// [`Decision`] applies from the next step on. What costs the host work to
/// provide (features, labels, gradient norms) is only there when the
/// policy's [`Policy::needs`] asks for it; reading it without asking is an
/// error that names the missing [`Needs`] bit, never an empty slice.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Index of the step just taken, from 0.
    pub step: u64,
    /// Its epoch, from 0.
    pub epoch: u64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in the run.
    pub total_steps: u64,
    /// Number of encoder blocks L.
    pub layers: usize,
    /// Blocks `[0, frontier)` were frozen for good during the step.
    pub frontier: usize,
    /// The frontier block, when it was frozen temporarily (probed) during
    /// the step.
    pub probe: Option<usize>,
    /// Mean cross-entropy of the batch (natural log; may be NaN or infinite
    /// on a step the host refused, which never reaches a policy in a run,
    /// but can in tests and `simfreeze check`).
    pub loss: f32,
    /// Samples in the batch B (the rows of the features, the labels).
    pub batch: usize,
    /// The step's base learning rate (before any per-block factor), when the
    /// host reports it (`simfreeze` does in runs, not in `simulate`).
    pub lr: Option<f64>,
    features: Option<Matrix<'a>>,
    labels: &'a [i64],
    num_classes: usize,
    grad_norms: &'a [f32],
    /// Named values from newer hosts (the host's learning rate among them,
    /// also in [`Step::lr`]).
    pub extra: &'a [ffi::NamedValues<'a>],
    needs: Needs,
    more: ffi::ObservationV2<'a>,
}

/// The observation v2 of a contract-1 host (or a test): nothing provided.
const NO_MORE: ffi::ObservationV2<'static> = ffi::ObservationV2::EMPTY;

/// Per-block reductions of one set of samples (the batch or the probe
/// batch) through one model (the model or the reference snapshot), as the
/// host handed them: [`Blocks::tokens`] and [`Blocks::gram`] per block.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a> {
    first: usize,
    blocks: usize,
    rows: usize,
    dim: usize,
    tokens: &'a [f32],
    grams: &'a [f32],
}

impl<'a> Blocks<'a> {
    fn from_ffi(b: &ffi::BlockObservations<'a>) -> Result<Self, PolicyError> {
        let (first, blocks) = (b.first as usize, b.blocks as usize);
        let (rows, dim) = (b.rows as usize, b.dim as usize);
        let ok = |len: usize, per: usize| len == 0 || Some(len) == blocks.checked_mul(per);
        if !ok(b.tokens.len(), rows * dim) || !ok(b.grams.len(), rows * rows) {
            return Err(PolicyError::invalid(format!(
                "block observations of {blocks} blocks x {rows} rows x {dim} with {} token and \
                 {} gram values",
                b.tokens.len(),
                b.grams.len()
            )));
        }
        Ok(Blocks {
            first,
            blocks,
            rows,
            dim,
            tokens: b.tokens.as_slice(),
            grams: b.grams.as_slice(),
        })
    }

    /// The blocks observed, `first..first + count`.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.blocks
    }

    /// Samples observed (B).
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn index(&self, block: usize) -> Result<usize, PolicyError> {
        if self.range().contains(&block) {
            Ok(block - self.first)
        } else {
            Err(PolicyError::invalid(format!(
                "block {block} was not observed (blocks {:?} were)",
                self.range()
            )))
        }
    }

    /// Block `block`'s pooled output token per sample, `B × D` (the class
    /// token, or the mean of the patch tokens for a model without one;
    /// before the final norm). Needs [`Needs::BLOCK_TOKENS`] asked for.
    pub fn tokens(&self, block: usize) -> Result<Matrix<'a>, PolicyError> {
        let i = self.index(block)?;
        if self.tokens.is_empty() {
            return Err(not_asked("block tokens", "BLOCK_TOKENS"));
        }
        let n = self.rows * self.dim;
        Matrix::new(&self.tokens[i * n..(i + 1) * n], self.rows, self.dim)
            .ok_or_else(|| PolicyError::invalid("token buffer of the wrong size"))
    }

    /// Block `block`'s `B × B` similarity matrix: `G = A Aᵀ` of the
    /// flattened outputs `A` (`B × T·D`), each row divided by its L2 norm
    /// (Tung & Mori's SP loss compares two of these). Needs
    /// [`Needs::BLOCK_GRAMS`] asked for.
    pub fn gram(&self, block: usize) -> Result<Matrix<'a>, PolicyError> {
        let i = self.index(block)?;
        if self.grams.is_empty() {
            return Err(not_asked("block Gram matrices", "BLOCK_GRAMS"));
        }
        let n = self.rows * self.rows;
        Matrix::new(&self.grams[i * n..(i + 1) * n], self.rows, self.rows)
            .ok_or_else(|| PolicyError::invalid("gram buffer of the wrong size"))
    }
}

/// Per-block norms of the gradient accumulated since the last read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccGradNorms<'a> {
    /// L1 norm of each block's summed gradient.
    pub l1: &'a [f64],
    /// L2 norm of each block's summed gradient.
    pub l2: &'a [f64],
    /// Steps the sum covers.
    pub steps: u64,
}

/// SP loss (Tung & Mori 2019) of two row-normalised `B × B` similarity
/// matrices ([`Blocks::gram`]): `‖a − b‖²_F / B²`.
pub fn sp_loss(a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
    if a.rows() != b.rows() || a.cols() != b.cols() || a.rows() != a.cols() {
        return Err(PolicyError::invalid(format!(
            "SP loss of a {}x{} and a {}x{} matrix (two B x B matrices expected)",
            a.rows(),
            a.cols(),
            b.rows(),
            b.cols()
        )));
    }
    let sum: f64 = a
        .as_slice()
        .iter()
        .zip(b.as_slice())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let n = a.rows().max(1) as f64;
    Ok(sum / (n * n))
}

/// The error for reading what [`Policy::needs`] did not ask for.
fn not_asked(what: &str, bit: &str) -> PolicyError {
    PolicyError::invalid(format!(
        "the policy read {what} without asking for them: add Needs::{bit} to its `fn needs` \
         (the host computes them only when asked)"
    ))
}

impl<'a> Step<'a> {
    /// Converts the stable observation for a policy that asked for `needs`;
    /// fails if the feature buffer does not match `batch × feature_dim`.
    pub fn from_ffi(obs: &'a ffi::Observation<'a>, needs: Needs) -> Result<Self, PolicyError> {
        let features = if obs.features.is_empty() {
            None
        } else {
            Some(
                Matrix::new(
                    obs.features.as_slice(),
                    obs.batch as usize,
                    obs.feature_dim as usize,
                )
                .ok_or_else(|| {
                    PolicyError::invalid(format!(
                        "feature buffer has {} values, expected batch {} x dim {}",
                        obs.features.len(),
                        obs.batch,
                        obs.feature_dim
                    ))
                })?,
            )
        };
        let extra = obs.extra.as_slice();
        let lr = extra
            .iter()
            .find(|v| v.name.as_str() == LR_EXTRA)
            .and_then(|v| v.values.as_slice().first().copied());
        Ok(Step {
            step: obs.step,
            epoch: obs.epoch,
            steps_per_epoch: obs.steps_per_epoch,
            total_steps: obs.total_steps,
            layers: obs.layers as usize,
            frontier: obs.frontier as usize,
            probe: obs.probe.into_option().map(|p| p as usize),
            loss: obs.loss,
            batch: obs.batch as usize,
            lr,
            features,
            labels: obs.labels.as_slice(),
            num_classes: obs.num_classes as usize,
            grad_norms: obs.grad_norms.as_slice(),
            extra,
            needs,
            more: NO_MORE,
        })
    }

    /// Converts the observation of a contract-2 host: the contract-1 part
    /// and the on-demand observations.
    pub fn from_ffi_v2(
        obs: &'a ffi::Observation<'a>,
        more: &'a ffi::ObservationV2<'a>,
        needs: Needs,
    ) -> Result<Self, PolicyError> {
        let mut step = Self::from_ffi(obs, needs)?;
        step.more = *more;
        Ok(step)
    }

    /// Whether this step carries the on-demand observations `what` (the
    /// policy asked for them in its previous decision).
    pub fn has(&self, what: Needs) -> bool {
        self.more.provided.contains(what)
    }

    /// Checks `bit` was declared in `needs()` and asked for at the previous
    /// step.
    fn provided(&self, what: &str, bit: &str, flag: Needs) -> Result<(), PolicyError> {
        if !self.needs.contains(flag) {
            return Err(not_asked(what, bit));
        }
        if !self.more.provided.contains(flag) {
            return Err(PolicyError::invalid(format!(
                "the policy read {what} at step {} without asking for them at the step before: \
                 return a decision with `.observe_next(Needs::{bit})` first (check \
                 `step.has(Needs::{bit})` before reading)",
                self.step
            )));
        }
        Ok(())
    }

    /// Checks a reduction was declared and asked for (and `extra`, the
    /// reference or the probe batch, when given), then reads `b`.
    fn blocks_of(
        &self,
        b: &ffi::BlockObservations<'a>,
        what: &str,
        extra: Option<(&str, Needs)>,
    ) -> Result<Blocks<'a>, PolicyError> {
        let reductions = Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS;
        if self.needs.intersection(reductions).is_empty() {
            return Err(not_asked(what, "BLOCK_TOKENS (or Needs::BLOCK_GRAMS)"));
        }
        if let Some((bit, flag)) = extra {
            self.provided(what, bit, flag)?;
        }
        if self.more.provided.intersection(reductions).is_empty() {
            let bit = if self.needs.contains(Needs::BLOCK_TOKENS) {
                "BLOCK_TOKENS"
            } else {
                "BLOCK_GRAMS"
            };
            self.provided(what, bit, self.needs.intersection(reductions))?;
        }
        Blocks::from_ffi(b)
    }

    /// The step's batch through the model, per block (the global batch
    /// under data parallelism; the weights the step trained with). Needs
    /// [`Needs::BLOCK_TOKENS`] or [`Needs::BLOCK_GRAMS`], asked for at the
    /// previous step.
    pub fn batch_blocks(&self) -> Result<Blocks<'a>, PolicyError> {
        let b = self.more.batch;
        self.blocks_of(&b, "the batch's block observations", None)
    }

    /// The same samples through the reference snapshot. Also needs
    /// [`Needs::REFERENCE`]; `Ok(None)` before the first snapshot.
    pub fn batch_reference_blocks(&self) -> Result<Option<Blocks<'a>>, PolicyError> {
        let b = self.more.batch_reference;
        let what = "the reference's block observations";
        let blocks = self.blocks_of(&b, what, Some(("REFERENCE", Needs::REFERENCE)))?;
        Ok(self.reference_step().map(|_| blocks))
    }

    /// The fixed probe batch through the model, per block. Needs
    /// [`Needs::PROBE_BATCH`] and a reduction bit, asked for.
    pub fn probe_blocks(&self) -> Result<Blocks<'a>, PolicyError> {
        let b = self.more.probe;
        self.blocks_of(
            &b,
            "the probe batch",
            Some(("PROBE_BATCH", Needs::PROBE_BATCH)),
        )
    }

    /// The probe batch through the reference snapshot (`Ok(None)` before
    /// the first snapshot). Needs [`Needs::PROBE_BATCH`] and
    /// [`Needs::REFERENCE`].
    pub fn probe_reference_blocks(&self) -> Result<Option<Blocks<'a>>, PolicyError> {
        let b = self.more.probe_reference;
        let what = "the probe batch through the reference";
        self.provided(what, "REFERENCE", Needs::REFERENCE)?;
        let blocks = self.blocks_of(&b, what, Some(("PROBE_BATCH", Needs::PROBE_BATCH)))?;
        Ok(self.reference_step().map(|_| blocks))
    }

    /// The step after which the reference snapshot was taken, if there is
    /// one.
    pub fn reference_step(&self) -> Option<u64> {
        self.more.reference_step.into_option()
    }

    /// Each block's weights at fixed indices, `L × S` (the same indices
    /// every time in a run). Needs [`Needs::SAMPLED_WEIGHTS`], asked for.
    pub fn sampled_weights(&self) -> Result<Matrix<'a>, PolicyError> {
        self.provided("sampled weights", "SAMPLED_WEIGHTS", Needs::SAMPLED_WEIGHTS)?;
        let w = self.more.sampled_weights.as_slice();
        let per = self.more.samples_per_block as usize;
        Matrix::new(w, w.len().checked_div(per).unwrap_or(0), per)
            .filter(|m| m.rows() == self.layers || w.is_empty())
            .ok_or_else(|| {
                PolicyError::invalid(format!(
                    "{} sampled weights for {} blocks of {per}",
                    w.len(),
                    self.layers
                ))
            })
    }

    /// The L1 and L2 norms of each block's gradient summed since the last
    /// step they were asked for (the host starts the sums again at every
    /// step that asked, read or not). Needs [`Needs::ACC_GRAD_NORMS`],
    /// asked for.
    pub fn acc_grad_norms(&self) -> Result<AccGradNorms<'a>, PolicyError> {
        self.provided(
            "accumulated gradient norms",
            "ACC_GRAD_NORMS",
            Needs::ACC_GRAD_NORMS,
        )?;
        let (l1, l2) = (
            self.more.acc_grad_l1.as_slice(),
            self.more.acc_grad_l2.as_slice(),
        );
        if l1.len() != self.layers || l2.len() != self.layers {
            return Err(PolicyError::invalid(format!(
                "{} and {} accumulated gradient norms for {} blocks",
                l1.len(),
                l2.len(),
                self.layers
            )));
        }
        Ok(AccGradNorms {
            l1,
            l2,
            steps: self.more.acc_grad_steps,
        })
    }

    /// A step for tests: step `step` of a model with `layers` blocks, the
    /// rest defaulted (see [`StepBuilder`]).
    pub fn builder(step: u64, layers: usize) -> StepBuilder<'a> {
        StepBuilder(Step {
            step,
            epoch: 0,
            steps_per_epoch: 100,
            total_steps: 1000,
            layers,
            frontier: 0,
            probe: None,
            loss: 1.0,
            batch: 1,
            lr: None,
            features: None,
            labels: &[],
            num_classes: 0,
            grad_norms: &[],
            extra: &[],
            needs: Needs::NONE,
            more: NO_MORE,
        })
    }

    /// The features the head saw, B×D: the class token after the final
    /// norm, or for a model that pools (`global_pool: "avg"`, with or
    /// without class token) the mean of the patch tokens after `fc_norm`;
    /// `None` when the host had none for this step. Needs
    /// [`Needs::CLS_FEATURES`].
    pub fn features(&self) -> Result<Option<Matrix<'a>>, PolicyError> {
        match self.needs.contains(Needs::CLS_FEATURES) {
            true => Ok(self.features),
            false => Err(not_asked("the features", "CLS_FEATURES")),
        }
    }

    /// The batch labels, one per sample, in `0..num_classes`. Needs
    /// [`Needs::LABELS`].
    pub fn labels(&self) -> Result<&'a [i64], PolicyError> {
        match self.needs.contains(Needs::LABELS) {
            true => Ok(self.labels),
            false => Err(not_asked("the labels", "LABELS")),
        }
    }

    /// The number of classes of the task. Needs [`Needs::LABELS`].
    pub fn num_classes(&self) -> Result<usize, PolicyError> {
        match self.needs.contains(Needs::LABELS) {
            true => Ok(self.num_classes),
            false => Err(not_asked("the number of classes", "LABELS")),
        }
    }

    /// The L2 norm of each block's gradient in this step, one per block:
    /// exactly 0 for blocks frozen during the step (committed or probed),
    /// since they have no gradient; the embedding counts with block 0, the
    /// final norm and head with none. Needs [`Needs::GRAD_NORMS`].
    pub fn grad_norms(&self) -> Result<&'a [f32], PolicyError> {
        match self.needs.contains(Needs::GRAD_NORMS) {
            true => Ok(self.grad_norms),
            false => Err(not_asked("gradient norms", "GRAD_NORMS")),
        }
    }

    /// A decision that keeps the current frontier and releases any probe.
    pub fn keep(&self) -> Decision {
        Decision::frontier(self.frontier)
    }
}

/// Builds a [`Step`] for a policy's unit tests; giving features, labels or
/// gradient norms also marks them as asked for.
///
/// ```
/// use simfreeze_abi::sdk::Step;
/// let norms = [0.5, 0.25];
/// let step = Step::builder(7, 2).frontier(1).grad_norms(&norms).build();
/// assert_eq!(step.grad_norms().unwrap(), &norms);
/// assert!(step.labels().is_err()); // not given, so not asked for
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StepBuilder<'a>(Step<'a>);

impl<'a> StepBuilder<'a> {
    /// Epoch, steps per epoch and steps in the run.
    pub fn schedule(mut self, epoch: u64, steps_per_epoch: u64, total_steps: u64) -> Self {
        (self.0.epoch, self.0.steps_per_epoch, self.0.total_steps) =
            (epoch, steps_per_epoch, total_steps);
        self
    }
    /// Frozen blocks `[0, frontier)` during the step.
    pub fn frontier(mut self, frontier: usize) -> Self {
        self.0.frontier = frontier;
        self
    }
    /// The probed block during the step.
    pub fn probe(mut self, probe: Option<usize>) -> Self {
        self.0.probe = probe;
        self
    }
    /// The batch loss.
    pub fn loss(mut self, loss: f32) -> Self {
        self.0.loss = loss;
        self
    }
    /// The learning rate.
    pub fn lr(mut self, lr: f64) -> Self {
        self.0.lr = Some(lr);
        self
    }
    /// Features B×D (sets the batch size to B).
    pub fn features(mut self, features: Matrix<'a>) -> Self {
        self.0.batch = features.rows();
        self.0.features = Some(features);
        self.0.needs = self.0.needs | Needs::CLS_FEATURES;
        self
    }
    /// Labels (sets the batch size) and the number of classes.
    pub fn labels(mut self, labels: &'a [i64], num_classes: usize) -> Self {
        self.0.batch = labels.len();
        (self.0.labels, self.0.num_classes) = (labels, num_classes);
        self.0.needs = self.0.needs | Needs::LABELS;
        self
    }
    /// Gradient norms, one per block.
    pub fn grad_norms(mut self, norms: &'a [f32]) -> Self {
        self.0.grad_norms = norms;
        self.0.needs = self.0.needs | Needs::GRAD_NORMS;
        self
    }
    /// Declares `needs` as the policy's (e.g. to test the accessors'
    /// errors); the builder's other setters add their own bits.
    pub fn needs(mut self, needs: Needs) -> Self {
        self.0.needs = self.0.needs | needs;
        self
    }
    /// The on-demand observations of a contract-2 host (what `provided`
    /// says is marked as asked for, and declared).
    pub fn more(mut self, more: ffi::ObservationV2<'a>) -> Self {
        self.0.needs = self.0.needs | more.provided;
        self.0.more = more;
        self
    }
    /// The step.
    pub fn build(self) -> Step<'a> {
        self.0
    }
}

/// How the host keeps the reference snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceDtype {
    /// float32, as the model.
    F32,
    /// bfloat16, run in bfloat16.
    Bf16,
    /// Weight matrices as int8 per output row (symmetric), the rest bf16.
    Int8,
}

/// What a policy wants from the next step on, with std types.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Blocks `[0, frontier)` frozen for good (never decreases).
    pub frontier: usize,
    /// Temporarily freeze the new frontier block (only that block may be
    /// probed).
    pub probe: Option<usize>,
    /// Per-block learning-rate factors (one per block, finite, >= 0), or
    /// `None` for all 1.
    pub lr_factors: Option<Vec<f32>>,
    /// Scalars to log at this step.
    pub scalars: Vec<(String, f64)>,
    /// On-demand observations to compute at the next step (contract 2):
    /// bits of [`Needs::ON_DEMAND`] that `needs()` declared.
    pub observe: Needs,
    /// Take or refresh the reference snapshot from the weights after this
    /// step (contract 2).
    pub take_reference: Option<ReferenceDtype>,
}

impl Decision {
    /// Freeze blocks `[0, frontier)`, no probe.
    pub fn frontier(frontier: usize) -> Self {
        Decision {
            frontier,
            ..Decision::default()
        }
    }
    /// Also probe the frontier block.
    pub fn with_probe(mut self) -> Self {
        self.probe = Some(self.frontier);
        self
    }
    /// Also set per-block learning-rate factors.
    pub fn with_lr_factors(mut self, factors: Vec<f32>) -> Self {
        self.lr_factors = Some(factors);
        self
    }
    /// Also log a named scalar.
    pub fn with_scalar(mut self, name: impl Into<String>, value: f64) -> Self {
        self.scalars.push((name.into(), value));
        self
    }
    /// Also ask for the on-demand observations `what` at the next step.
    pub fn observe_next(mut self, what: Needs) -> Self {
        self.observe = self.observe | what;
        self
    }
    /// Also take (or refresh) the reference snapshot from the weights after
    /// this step, kept as `dtype`.
    pub fn take_reference(mut self, dtype: ReferenceDtype) -> Self {
        self.take_reference = Some(dtype);
        self
    }

    /// The stable form of contract 2.
    pub fn into_ffi_v2(mut self) -> ffi::DecisionV2 {
        let observe = std::mem::take(&mut self.observe);
        let reference = match self.take_reference.take() {
            None => ReferenceRequest::Keep,
            Some(ReferenceDtype::F32) => ReferenceRequest::TakeF32,
            Some(ReferenceDtype::Bf16) => ReferenceRequest::TakeBf16,
            Some(ReferenceDtype::Int8) => ReferenceRequest::TakeInt8,
        };
        ffi::DecisionV2 {
            decision: self.into_ffi(),
            observe,
            reference,
            extra: RVec::new(),
        }
    }

    /// The stable form of contract 1 (what an ABI 0.1.0 host reads; the
    /// observation requests are dropped).
    pub fn into_ffi(self) -> ffi::Decision {
        ffi::Decision {
            frontier: clamp_u32(self.frontier),
            probe: self.probe.map(clamp_u32).into(),
            lr_factors: self.lr_factors.unwrap_or_default().into(),
            scalars: self
                .scalars
                .into_iter()
                .map(|(name, value)| ffi::Scalar {
                    name: name.into(),
                    value,
                })
                .collect(),
            extra: RVec::new(),
        }
    }
}

fn clamp_u32(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Static documentation of one option.
#[derive(Debug, Clone, Copy)]
pub struct OptionDoc {
    /// Field name.
    pub name: &'static str,
    /// Default as RON text.
    pub default: &'static str,
    /// One line.
    pub doc: &'static str,
}

/// Static identity of a plugin.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    /// Short name used to select the plugin.
    pub name: &'static str,
    /// The plugin's version; use `env!("CARGO_PKG_VERSION")`.
    pub version: &'static str,
    /// One paragraph.
    pub description: &'static str,
    /// Every option with its default.
    pub options: &'static [OptionDoc],
}

impl Info {
    fn to_ffi(self, kind: PluginKind) -> PluginInfo {
        PluginInfo {
            name: self.name.into(),
            kind,
            version: self.version.into(),
            abi_version: crate::ABI_VERSION.into(),
            description: self.description.into(),
            options: self
                .options
                .iter()
                .map(|o| OptionInfo {
                    name: o.name.into(),
                    default: o.default.into(),
                    doc: o.doc.into(),
                })
                .collect(),
        }
    }
}

/// A freezing policy: the logic, with std types.
pub trait Policy: Send + 'static {
    /// What the host must compute for this policy each step (default: only
    /// counters and loss).
    fn needs(&self) -> Needs {
        Needs::NONE
    }
    /// Called after every training step; the result applies from the next.
    fn decide(&mut self, step: &Step<'_>) -> Result<Decision, PolicyError>;
    /// Everything needed to continue exactly where the policy is now.
    fn save_state(&self) -> Result<Vec<u8>, PolicyError>;
    /// Restores what `save_state` wrote.
    fn load_state(&mut self, state: &[u8]) -> Result<(), PolicyError>;
}

/// A policy that can be exported as a plugin.
pub trait PolicyPlugin: Policy + Sized {
    /// Name, version, description and options.
    fn info() -> Info;
    /// Builds the policy from its RON options string (may be empty, meaning
    /// all defaults). Reject unknown options and list the valid ones.
    fn new(options: &str, host: &HostServices) -> Result<Self, PolicyError>;
}

/// A similarity metric: the logic, with std types.
pub trait Metric: Send + Sync + 'static {
    /// Similarity of two matrices of the same shape (higher = more similar).
    fn similarity(&self, a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError>;
}

/// A metric that can be exported as a plugin.
pub trait MetricPlugin: Metric + Sized {
    /// Name, version, description and options.
    fn info() -> Info;
    /// Builds the metric from its RON options string.
    fn new(options: &str) -> Result<Self, PolicyError>;
}

/// A metric a policy uses: loaded through the host, or native in tests.
pub enum MetricHandle {
    /// A metric plugin loaded by the host.
    Plugin(MetricBox),
    /// A metric linked into the same binary.
    Native(Box<dyn Metric>),
}

impl MetricHandle {
    /// Similarity of two matrices of the same shape.
    pub fn similarity(&self, a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
        if a.rows() != b.rows() || a.cols() != b.cols() {
            return Err(PolicyError::invalid(format!(
                "similarity of a {}x{} and a {}x{} matrix",
                a.rows(),
                a.cols(),
                b.rows(),
                b.cols()
            )));
        }
        match self {
            MetricHandle::Native(m) => m.similarity(a, b),
            MetricHandle::Plugin(m) => m
                .similarity(
                    a.as_slice().into(),
                    b.as_slice().into(),
                    clamp_u32(a.rows()),
                    clamp_u32(a.cols()),
                )
                .into_result()
                .map_err(PolicyError::from),
        }
    }
}

type NativeLoader = dyn Fn(&str, &str) -> Result<MetricHandle, PolicyError> + Send + Sync;

/// What the host offers a policy while it is constructed.
pub struct HostServices {
    inner: HostInner,
}

enum HostInner {
    Ffi(HostRef),
    Native(Box<NativeLoader>),
}

impl HostServices {
    /// Services backed by the real host.
    pub fn from_ffi(host: HostRef) -> Self {
        HostServices {
            inner: HostInner::Ffi(host),
        }
    }
    /// Services for tests and static use: `load` resolves metric names.
    pub fn native(
        load: impl Fn(&str, &str) -> Result<MetricHandle, PolicyError> + Send + Sync + 'static,
    ) -> Self {
        HostServices {
            inner: HostInner::Native(Box::new(load)),
        }
    }
    /// Services that offer no metrics (for policies that need none).
    pub fn none() -> Self {
        Self::native(|name, _| {
            Err(PolicyError::other(format!(
                "no metric loader available to load `{name}`"
            )))
        })
    }
    /// Loads a metric by name or path with RON options.
    pub fn metric(&self, name: &str, options: &str) -> Result<MetricHandle, PolicyError> {
        match &self.inner {
            HostInner::Native(load) => load(name, options),
            HostInner::Ffi(host) => {
                // `load_metric` is in the prefix every host has, so it is
                // always present.
                let load = host.load_metric();
                load(name.into(), options.into())
                    .into_result()
                    .map(MetricHandle::Plugin)
                    .map_err(PolicyError::from)
            }
        }
    }
}

thread_local! {
    /// Depth of `guard` calls on this thread, and where the last panic inside
    /// one happened.
    static GUARD: std::cell::RefCell<(u32, Option<String>)> = const { std::cell::RefCell::new((0, None)) };
}

/// Installs (once per copy of std, i.e. once per plugin library) a panic hook
/// that, inside [`guard`], records the panic's location for the error message
/// instead of printing a backtrace (the host reports the panic with it in one
/// paragraph); outside it, or with `SIMFREEZE_BACKTRACE=1`, the previous hook
/// runs as usual. (`RUST_BACKTRACE`, often set for other reasons, does not
/// bring the frames back: they would bury the host's message.)
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let guarded = GUARD.with(|g| {
                let mut g = g.borrow_mut();
                if g.0 > 0 {
                    g.1 = info
                        .location()
                        .map(|l| format!("{}:{}", l.file(), l.line()));
                }
                g.0 > 0
            });
            let verbose = std::env::var_os("SIMFREEZE_BACKTRACE").is_some_and(|v| v == "1");
            if !guarded || verbose {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into a [`PluginError`] of kind
/// [`ErrorKind::Panic`] whose message says where it happened.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PolicyError>) -> RResult<T, PluginError> {
    install_hook();
    GUARD.with(|g| g.borrow_mut().0 += 1);
    let result = catch_unwind(AssertUnwindSafe(f));
    let location = GUARD.with(|g| {
        let mut g = g.borrow_mut();
        g.0 -= 1;
        g.1.take()
    });
    match result {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => {
            let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
            RResult::RErr(PluginError {
                kind: ErrorKind::Panic,
                message: format!("panicked in {what}{at}: {}", panic_message(&payload)).into(),
            })
        }
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

struct PolicyAdapter<P>(P);

impl<P: Policy> FfiPolicy for PolicyAdapter<P> {
    fn needs(&self) -> Needs {
        // A panic here cannot be reported as an error; fall back to asking
        // for everything, which is always safe for the host to provide.
        catch_unwind(AssertUnwindSafe(|| self.0.needs())).unwrap_or(Needs::ALL)
    }

    fn decide(&mut self, obs: &ffi::Observation<'_>) -> RResult<ffi::Decision, PluginError> {
        let policy = &mut self.0;
        guard("decide", || {
            let step = Step::from_ffi(obs, policy.needs())?;
            policy.decide(&step).map(Decision::into_ffi)
        })
    }

    fn save_state(&self) -> RResult<RVec<u8>, PluginError> {
        guard("save_state", || self.0.save_state().map(RVec::from))
    }

    fn load_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), PluginError> {
        let policy = &mut self.0;
        guard("load_state", || policy.load_state(state.as_slice()))
    }
}

impl<P: Policy> FfiPolicyV2 for PolicyAdapter<P> {
    fn needs(&self) -> Needs {
        FfiPolicy::needs(self)
    }

    fn decide(
        &mut self,
        obs: &ffi::Observation<'_>,
        more: &ffi::ObservationV2<'_>,
    ) -> RResult<ffi::DecisionV2, PluginError> {
        let policy = &mut self.0;
        guard("decide", || {
            let step = Step::from_ffi_v2(obs, more, policy.needs())?;
            policy.decide(&step).map(Decision::into_ffi_v2)
        })
    }

    fn save_state(&self) -> RResult<RVec<u8>, PluginError> {
        FfiPolicy::save_state(self)
    }

    fn load_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), PluginError> {
        FfiPolicy::load_state(self, state)
    }
}

struct MetricAdapter<M>(M);

impl<M: Metric> FfiMetric for MetricAdapter<M> {
    fn similarity(
        &self,
        a: RSlice<'_, f32>,
        b: RSlice<'_, f32>,
        rows: u32,
        cols: u32,
    ) -> RResult<f64, PluginError> {
        guard("similarity", || {
            let shape_err = || PolicyError::invalid("matrix length does not match rows x cols");
            let a =
                Matrix::new(a.as_slice(), rows as usize, cols as usize).ok_or_else(shape_err)?;
            let b =
                Matrix::new(b.as_slice(), rows as usize, cols as usize).ok_or_else(shape_err)?;
            self.0.similarity(a, b)
        })
    }
}

/// Wraps a policy as a stable trait object (what the export macro returns to
/// the host; also usable directly in tests).
pub fn policy_box<P: Policy>(policy: P) -> PolicyBox {
    FfiPolicy_TO::from_value(PolicyAdapter(policy), TD_Opaque)
}

/// Wraps a policy as a contract-2 trait object.
pub fn policy_v2_box<P: Policy>(policy: P) -> PolicyV2Box {
    FfiPolicyV2_TO::from_value(PolicyAdapter(policy), TD_Opaque)
}

/// Wraps a metric as a stable trait object.
pub fn metric_box<M: Metric>(metric: M) -> MetricBox {
    FfiMetric_TO::from_value(MetricAdapter(metric), TD_Opaque)
}

extern "C" fn policy_info<P: PolicyPlugin>() -> RResult<PluginInfo, PluginError> {
    guard("info", || Ok(P::info().to_ffi(PluginKind::Policy)))
}

extern "C" fn metric_info<M: MetricPlugin>() -> RResult<PluginInfo, PluginError> {
    guard("info", || Ok(M::info().to_ffi(PluginKind::Metric)))
}

extern "C" fn new_policy<P: PolicyPlugin>(
    options: RStr<'_>,
    host: HostRef,
) -> RResult<PolicyBox, PluginError> {
    guard("new", || {
        let host = HostServices::from_ffi(host);
        P::new(options.as_str(), &host).map(policy_box)
    })
}

extern "C" fn new_policy_v2<P: PolicyPlugin>(
    options: RStr<'_>,
    host: HostRef,
) -> RResult<PolicyV2Box, PluginError> {
    guard("new", || {
        let host = HostServices::from_ffi(host);
        P::new(options.as_str(), &host).map(policy_v2_box)
    })
}

extern "C" fn new_metric<M: MetricPlugin>(options: RStr<'_>) -> RResult<MetricBox, PluginError> {
    guard("new", || M::new(options.as_str()).map(metric_box))
}

extern "C" fn no_policy(_: RStr<'_>, _: HostRef) -> RResult<PolicyBox, PluginError> {
    RResult::RErr(PluginError {
        kind: ErrorKind::Unsupported,
        message: RString::from("this plugin is a metric, not a policy"),
    })
}

extern "C" fn no_metric(_: RStr<'_>) -> RResult<MetricBox, PluginError> {
    RResult::RErr(PluginError {
        kind: ErrorKind::Unsupported,
        message: RString::from("this plugin is a policy, not a metric"),
    })
}

/// A plugin's modules, for static (in-process) use: the contract-1 root
/// module every plugin exports and, for a policy, its contract-2 module.
#[derive(Clone, Copy)]
pub struct PluginModules {
    /// The abi_stable root module (contract 1).
    pub v1: PluginModuleRef,
    /// The contract-2 policy module, if the plugin has one.
    pub v2: Option<PolicyModuleV2Ref>,
}

impl From<PluginModuleRef> for PluginModules {
    fn from(v1: PluginModuleRef) -> Self {
        PluginModules { v1, v2: None }
    }
}

/// The modules of a policy plugin (used by [`crate::export_policy!`]).
pub fn policy_module<P: PolicyPlugin>() -> PluginModules {
    let v1 = PluginModule {
        info: policy_info::<P>,
        new_policy: new_policy::<P>,
        new_metric: no_metric,
    }
    .leak_into_prefix();
    PluginModules {
        v1,
        v2: Some(policy_module_v2::<P>()),
    }
}

/// The contract-2 module of a policy plugin.
pub fn policy_module_v2<P: PolicyPlugin>() -> PolicyModuleV2Ref {
    PolicyModuleV2 {
        new_policy: new_policy_v2::<P>,
    }
    .leak_into_prefix()
}

/// What the contract-2 symbol of a policy plugin returns (used by
/// [`crate::export_policy!`]).
pub fn contract_v2_root<P: PolicyPlugin>() -> ContractV2Root {
    use abi_stable::StableAbi;
    ContractV2Root {
        layout: <PolicyModuleV2Ref as StableAbi>::LAYOUT,
        module: policy_module_v2::<P>(),
    }
}

/// The modules of a metric plugin (used by [`crate::export_metric!`]).
pub fn metric_module<M: MetricPlugin>() -> PluginModules {
    PluginModule {
        info: metric_info::<M>,
        new_policy: no_policy,
        new_metric: new_metric::<M>,
    }
    .leak_into_prefix()
    .into()
}

/// Exports a [`PolicyPlugin`] type as this library's simfreeze plugin.
///
/// Put it once in the plugin crate's `lib.rs`; the crate needs
/// `crate-type = ["cdylib", "rlib"]` and `abi_stable` as a dependency (the
/// generated symbol refers to it by name). Also defines
/// `pub fn plugin_module()` for tests that link the plugin statically.
///
/// It exports two symbols: the abi_stable root module (contract 1, which
/// every simfreeze host reads) and `simfreeze_contract_2` (the on-demand
/// observations, read by hosts from ABI 0.1.1 on). Link at most one policy
/// plugin crate into one binary (the symbol names are fixed).
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        /// This plugin's modules, for static (non-dlopen) use in tests.
        pub fn plugin_module() -> $crate::sdk::PluginModules {
            $crate::sdk::policy_module::<$policy>()
        }

        /// The symbol the simfreeze host looks up when it loads this library.
        #[::abi_stable::export_root_module]
        pub fn simfreeze_plugin_root() -> $crate::ffi::PluginModuleRef {
            plugin_module().v1
        }

        /// The contract-2 module, looked up by hosts that speak contract 2.
        #[no_mangle]
        pub extern "C" fn simfreeze_contract_2() -> $crate::ffi::ContractV2Root {
            $crate::sdk::contract_v2_root::<$policy>()
        }
    };
}

/// Exports a [`MetricPlugin`] type as this library's simfreeze plugin.
/// See [`export_policy!`](crate::export_policy) for the crate setup.
#[macro_export]
macro_rules! export_metric {
    ($metric:ty) => {
        /// This plugin's modules, for static (non-dlopen) use in tests.
        pub fn plugin_module() -> $crate::sdk::PluginModules {
            $crate::sdk::metric_module::<$metric>()
        }

        /// The symbol the simfreeze host looks up when it loads this library.
        #[::abi_stable::export_root_module]
        pub fn simfreeze_plugin_root() -> $crate::ffi::PluginModuleRef {
            plugin_module().v1
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_what_needs_did_not_ask_for_names_the_bit() {
        let step = Step::builder(0, 2).build();
        let e = step.grad_norms().unwrap_err();
        assert!(e.message.contains("Needs::GRAD_NORMS"), "{}", e.message);
        assert!(step.labels().unwrap_err().message.contains("Needs::LABELS"));
        assert!(step.num_classes().is_err());
        let e = step.features().unwrap_err();
        assert!(e.message.contains("Needs::CLS_FEATURES"), "{}", e.message);
        let norms = [1.0, 0.0];
        let asked = Step::builder(0, 2).grad_norms(&norms).build();
        assert_eq!(asked.grad_norms().unwrap(), &norms);
    }

    #[test]
    fn the_learning_rate_arrives_through_the_extension_slot() {
        let lr = [0.25];
        let extra = [ffi::NamedValues {
            name: RStr::from(LR_EXTRA),
            values: abi_stable::std_types::RSlice::from_slice(&lr),
        }];
        let obs = ffi::Observation {
            step: 3,
            epoch: 0,
            steps_per_epoch: 10,
            total_steps: 10,
            layers: 2,
            frontier: 0,
            probe: abi_stable::std_types::ROption::RNone,
            loss: 1.0,
            batch: 1,
            feature_dim: 0,
            features: abi_stable::std_types::RSlice::from_slice(&[]),
            labels: abi_stable::std_types::RSlice::from_slice(&[]),
            num_classes: 0,
            grad_norms: abi_stable::std_types::RSlice::from_slice(&[]),
            extra: abi_stable::std_types::RSlice::from_slice(&extra),
        };
        let step = Step::from_ffi(&obs, Needs::NONE).unwrap();
        assert_eq!(step.lr, Some(0.25));
        let none = ffi::Observation {
            extra: abi_stable::std_types::RSlice::from_slice(&[]),
            ..obs
        };
        assert_eq!(Step::from_ffi(&none, Needs::NONE).unwrap().lr, None);
    }

    #[test]
    fn on_demand_observations_fail_loudly_unless_declared_and_asked() {
        // Not declared: the error names the bit to add to `fn needs`.
        let step = Step::builder(3, 2).build();
        let e = step.acc_grad_norms().unwrap_err().message;
        assert!(
            e.contains("Needs::ACC_GRAD_NORMS") && e.contains("fn needs"),
            "{e}"
        );
        let e = step.batch_blocks().unwrap_err().message;
        assert!(e.contains("Needs::BLOCK_TOKENS"), "{e}");
        let e = step.sampled_weights().unwrap_err().message;
        assert!(e.contains("Needs::SAMPLED_WEIGHTS"), "{e}");
        // Declared but not asked for at the step before.
        let declared = Step::builder(3, 2)
            .needs(Needs::ACC_GRAD_NORMS | Needs::BLOCK_TOKENS)
            .build();
        let e = declared.acc_grad_norms().unwrap_err().message;
        assert!(e.contains("observe_next(Needs::ACC_GRAD_NORMS)"), "{e}");
        assert!(!declared.has(Needs::BLOCK_TOKENS));
        // Asked for: the views have the documented shapes.
        let (tokens, l1, l2) = ([1.0f32; 2 * 3 * 4], [1.0; 2], [2.0; 2]);
        let mut batch = ffi::BlockObservations::EMPTY;
        (batch.blocks, batch.rows, batch.dim) = (2, 3, 4);
        batch.tokens = RSlice::from_slice(&tokens);
        let more = ffi::ObservationV2 {
            provided: Needs::ACC_GRAD_NORMS | Needs::BLOCK_TOKENS,
            batch,
            acc_grad_l1: RSlice::from_slice(&l1),
            acc_grad_l2: RSlice::from_slice(&l2),
            acc_grad_steps: 5,
            ..ffi::ObservationV2::EMPTY
        };
        let asked = Step::builder(3, 2).more(more).build();
        let acc = asked.acc_grad_norms().unwrap();
        assert_eq!((acc.l2, acc.steps), (&l2[..], 5));
        let blocks = asked.batch_blocks().unwrap();
        assert_eq!(blocks.tokens(1).unwrap().rows(), 3);
        let e = blocks.gram(0).unwrap_err().message;
        assert!(e.contains("Needs::BLOCK_GRAMS"), "{e}");
        assert!(blocks.tokens(2).is_err());
        assert!(asked.probe_blocks().is_err());
    }

    #[test]
    fn sp_loss_is_the_mean_squared_difference_of_the_matrices() {
        let a = [1.0, 0.0, 0.0, 1.0];
        let b = [0.0, 1.0, 1.0, 0.0];
        let (a, b) = (
            Matrix::new(&a, 2, 2).unwrap(),
            Matrix::new(&b, 2, 2).unwrap(),
        );
        assert_eq!(sp_loss(a, a).unwrap(), 0.0);
        assert_eq!(sp_loss(a, b).unwrap(), 1.0);
        let c = [0.0; 6];
        assert!(sp_loss(a, Matrix::new(&c, 2, 3).unwrap()).is_err());
    }
}
