//! The types that cross the plugin boundary. Everything here is `#[repr(C)]`
//! and derives `StableAbi`, so the host checks the layout of a plugin's types
//! against its own when it loads the plugin.
//!
//! Invariant: this module only grows through its extension points, because a
//! host accepts plugins built against the same or a newer compatible ABI and
//! nothing else:
//! - the root module [`PluginModule`] and the host services [`Host`] are prefix
//!   types: new fields go after the last one, and older peers see them as
//!   missing;
//! - the policy and metric trait objects may gain methods after their last
//!   prefix method;
//! - [`Needs`] is a bit set, new capabilities are new bits;
//! - [`Observation::extra`] and [`Decision::extra`] carry named values that a
//!   later host or policy may understand without a layout change.
//!
//! Researchers rarely touch these types: they implement the plain-Rust traits
//! in [`crate::sdk`] and export them with [`crate::export_policy!`] or
//! [`crate::export_metric!`].

// `sabi_trait` expands to impls inside a generated const; the lint is about
// that generated code, not ours.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// What a plugin provides.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// A freezing policy: decides, step by step, which blocks are frozen.
    Policy = 0,
    /// A similarity metric between two aligned matrices of features.
    Metric = 1,
}

impl PluginKind {
    /// The lower-case word used in listings and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Policy => "policy",
            PluginKind::Metric => "metric",
        }
    }
}

/// One option a plugin accepts in its RON options string.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct OptionInfo {
    /// Field name in the RON struct, e.g. `every`.
    pub name: RString,
    /// Default value as RON text, e.g. `100`.
    pub default: RString,
    /// One line for `simfreeze plugins`.
    pub doc: RString,
}

/// Identity and documentation of a plugin, returned by [`PluginModule::info`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct PluginInfo {
    /// Short name used to pick the plugin (`atsf`, `cosine`, ...).
    pub name: RString,
    /// Policy or metric.
    pub kind: PluginKind,
    /// The plugin's own version (its crate version).
    pub version: RString,
    /// The simfreeze ABI version the plugin was compiled against.
    pub abi_version: RString,
    /// One paragraph for `simfreeze plugins`.
    pub description: RString,
    /// Every option with its default.
    pub options: RVec<OptionInfo>,
}

/// Why a plugin call failed.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The options string was malformed or named an unknown option.
    Options = 0,
    /// Saved state could not be restored.
    State = 1,
    /// The observation or the request was unusable.
    Invalid = 2,
    /// The plugin panicked; the SDK caught the panic at the boundary.
    Panic = 3,
    /// Anything else.
    Other = 4,
    /// The plugin was asked for something it does not provide (e.g. a metric
    /// from a policy plugin).
    Unsupported = 5,
}

/// An error returned across the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct PluginError {
    /// What went wrong, broadly.
    pub kind: ErrorKind,
    /// What went wrong, for a human.
    pub message: RString,
}

/// Capabilities a policy asks the host for. The host computes (and pays for)
/// only what is asked: copying class-token features to host memory costs a
/// device sync, per-block gradient norms cost a reduction per block.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs(pub u64);

impl Needs {
    /// Nothing beyond the step counters and the loss.
    pub const NONE: Needs = Needs(0);
    /// The batch's features as the classifier head sees them, B×D: the
    /// class token after the final norm, or, for a model that pools (MAE
    /// style `global_pool: "avg"`, no class token), the mean of the patch
    /// tokens after `fc_norm`.
    pub const CLS_FEATURES: Needs = Needs(1);
    /// The batch's labels and the number of classes.
    pub const LABELS: Needs = Needs(1 << 1);
    /// One gradient L2 norm per block for this step (0 for frozen blocks).
    pub const GRAD_NORMS: Needs = Needs(1 << 2);
    /// Every bit this ABI version defines.
    pub const ALL: Needs = Needs(0b111);

    /// Whether every capability in `other` is requested.
    pub const fn contains(self, other: Needs) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets together.
    pub const fn union(self, other: Needs) -> Needs {
        Needs(self.0 | other.0)
    }
}

impl std::ops::BitOr for Needs {
    type Output = Needs;
    fn bitor(self, rhs: Needs) -> Needs {
        self.union(rhs)
    }
}

/// A named list of numbers: the extension slot of observations.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct NamedValues<'a> {
    /// What the values are.
    pub name: RStr<'a>,
    /// The values.
    pub values: RSlice<'a, f64>,
}

/// What the host tells a policy after each training step.
///
/// `frontier` and `probe` are the freeze state *during* the step just taken;
/// the decision the policy returns applies from the next step on.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Index of the step just taken, from 0.
    pub step: u64,
    /// Epoch of that step, from 0.
    pub epoch: u64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    /// Number of encoder blocks L.
    pub layers: u32,
    /// Blocks `[0, frontier)` were frozen for good.
    pub frontier: u32,
    /// The frontier block, when it was frozen temporarily.
    pub probe: ROption<u32>,
    /// Mean training loss of the batch.
    pub loss: f32,
    /// Batch size B.
    pub batch: u32,
    /// Feature width D (0 unless [`Needs::CLS_FEATURES`]).
    pub feature_dim: u32,
    /// The features the head sees (class token, or pooled patch tokens),
    /// B×D row-major (empty unless [`Needs::CLS_FEATURES`]).
    pub features: RSlice<'a, f32>,
    /// Labels of the batch, B entries (empty unless [`Needs::LABELS`]).
    pub labels: RSlice<'a, i64>,
    /// Number of classes of the task (0 unless [`Needs::LABELS`]).
    pub num_classes: u32,
    /// Gradient L2 norm per block, L entries (empty unless
    /// [`Needs::GRAD_NORMS`]).
    pub grad_norms: RSlice<'a, f32>,
    /// Extension slot: named values later hosts may add.
    pub extra: RSlice<'a, NamedValues<'a>>,
}

/// A named scalar the host logs (e.g. ATSF's `eta`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Scalar {
    /// Name in logs and plots.
    pub name: RString,
    /// Value.
    pub value: f64,
}

/// A named list of numbers returned by a policy (extension slot).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct OwnedNamedValues {
    /// What the values are.
    pub name: RString,
    /// The values.
    pub values: RVec<f64>,
}

/// What a policy wants from the next step on. The host checks it against the
/// freezing contract before applying it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Decision {
    /// Blocks `[0, frontier)` frozen for good; never smaller than before.
    pub frontier: u32,
    /// Freeze block `frontier` temporarily (it is the only block that may be
    /// probed).
    pub probe: ROption<u32>,
    /// Per-block learning-rate factors: empty (all 1), or one per block,
    /// finite and >= 0.
    pub lr_factors: RVec<f32>,
    /// Scalars to log for this step.
    pub scalars: RVec<Scalar>,
    /// Extension slot: named values later hosts may understand.
    pub extra: RVec<OwnedNamedValues>,
}

/// A freezing policy instance, as the host sees it.
#[sabi_trait]
pub trait FfiPolicy: Send {
    /// Capabilities this instance needs from the host.
    fn needs(&self) -> Needs;

    /// Called after every training step.
    fn decide(&mut self, obs: &Observation<'_>) -> RResult<Decision, PluginError>;

    /// Serialises the policy's state (for checkpoints).
    fn save_state(&self) -> RResult<RVec<u8>, PluginError>;

    /// Restores state written by `save_state`.
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), PluginError>;
}

/// A boxed policy trait object, owned by the host.
pub type PolicyBox = FfiPolicy_TO<'static, RBox<()>>;

/// A similarity metric instance.
#[sabi_trait]
pub trait FfiMetric: Send + Sync {
    /// Similarity of two aligned n×d row-major matrices (same shape): the
    /// higher, the more similar.
    #[sabi(last_prefix_field)]
    fn similarity(
        &self,
        a: RSlice<'_, f32>,
        b: RSlice<'_, f32>,
        rows: u32,
        cols: u32,
    ) -> RResult<f64, PluginError>;
}

/// A boxed metric trait object.
pub type MetricBox = FfiMetric_TO<'static, RBox<()>>;

/// Services the host offers to plugins while they are constructed.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostRef)))]
#[sabi(missing_field(option))]
pub struct Host {
    /// Loads a metric plugin by name or path (resolved like `--policy`) and
    /// constructs it with the given RON options.
    #[sabi(last_prefix_field)]
    pub load_metric:
        extern "C" fn(name: RStr<'_>, options: RStr<'_>) -> RResult<MetricBox, PluginError>,
}

/// The root module every simfreeze plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// Identity, kind and options of the plugin.
    pub info: extern "C" fn() -> RResult<PluginInfo, PluginError>,
    /// Constructs a policy from RON options (policy plugins).
    pub new_policy:
        extern "C" fn(options: RStr<'_>, host: HostRef) -> RResult<PolicyBox, PluginError>,
    /// Constructs a metric from RON options (metric plugins).
    #[sabi(last_prefix_field)]
    pub new_metric: extern "C" fn(options: RStr<'_>) -> RResult<MetricBox, PluginError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "simfreeze_plugin";
    const NAME: &'static str = "simfreeze_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
