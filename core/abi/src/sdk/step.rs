//! [`Step`]: what a policy sees after each training step, with std types,
//! and [`StepBuilder`] for its unit tests.

use super::{AccGradNorms, Blocks, Decision, Matrix, PolicyError};
use crate::ffi::{self, Needs};

/// The name of the learning rate in an observation's `extra` values.
pub const LR_EXTRA: &str = "lr";

/// What a policy sees after each training step, with std types.
///
/// `frontier` and `probe` describe the step just taken; the returned
/// [`Decision`] applies from the next step on. What costs the host work to
/// provide (features, labels, gradient norms) is only there when the
/// policy's [`Policy::needs`](super::Policy::needs) asks for it; reading it without asking is an
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

/// The error for reading what [`Policy::needs`] did not ask for.
pub(crate) fn not_asked(what: &str, bit: &str) -> PolicyError {
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
    /// reference or the fixed batch, when given), then reads `b`.
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

    /// The fixed batch (one batch of training samples, the same at every
    /// step of the run) through the model, per block. Needs
    /// [`Needs::FIXED_BATCH`] and a reduction bit, asked for.
    pub fn fixed_blocks(&self) -> Result<Blocks<'a>, PolicyError> {
        let b = self.more.probe;
        self.blocks_of(
            &b,
            "the fixed batch",
            Some(("FIXED_BATCH", Needs::FIXED_BATCH)),
        )
    }

    /// The fixed batch through the reference snapshot (`Ok(None)` before
    /// the first snapshot). Needs [`Needs::FIXED_BATCH`] and
    /// [`Needs::REFERENCE`].
    pub fn fixed_reference_blocks(&self) -> Result<Option<Blocks<'a>>, PolicyError> {
        let b = self.more.probe_reference;
        let what = "the fixed batch through the reference";
        self.provided(what, "REFERENCE", Needs::REFERENCE)?;
        let blocks = self.blocks_of(&b, what, Some(("FIXED_BATCH", Needs::FIXED_BATCH)))?;
        Ok(self.reference_step().map(|_| blocks))
    }

    /// [`Step::fixed_blocks`] under its first name.
    pub fn probe_blocks(&self) -> Result<Blocks<'a>, PolicyError> {
        self.fixed_blocks()
    }

    /// [`Step::fixed_reference_blocks`] under its first name.
    pub fn probe_reference_blocks(&self) -> Result<Option<Blocks<'a>>, PolicyError> {
        self.fixed_reference_blocks()
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
