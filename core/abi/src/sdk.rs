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

mod observations;
mod plumbing;
mod step;
pub use observations::{sp_loss, AccGradNorms, Blocks};
#[doc(hidden)]
pub use plumbing::{
    contract_v2_root, guard, metric_box, policy_box, policy_module_v2, policy_v2_box,
};
pub use plumbing::{metric_module, policy_module, PluginModules};
pub(crate) use step::not_asked;
pub use step::{Step, StepBuilder, LR_EXTRA};

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
        assert!(asked.fixed_blocks().is_err());
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
