//! The types that cross the plugin boundary. Everything here is `#[repr(C)]`
//! and derives `StableAbi`, so the host checks the layout of a plugin's types
//! against its own when it loads the plugin.
//!
//! Invariant: a type an older plugin was checked against never changes.
//! abi_stable accepts a plugin whose prefix types (the root module
//! [`PluginModule`], the host services [`Host`], a trait object's vtable)
//! have more fields than the host's, never fewer, so a field or method
//! appended there would make a newer host refuse every older plugin. The
//! contract grows instead by:
//! - [`Needs`] bits, new capabilities being new bits;
//! - [`Observation::extra`] and [`Decision::extra`], named values a later
//!   host or policy may understand without a layout change;
//! - a module per contract version behind its own symbol: contract 2 is
//!   [`PolicyModuleV2`] ([`CONTRACT_2_SYMBOL`]), whose layout the host
//!   checks when the plugin exports it, falling back to the contract-1
//!   root module otherwise.
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

    // Contract 2 (ABI 0.1.1): the on-demand observations. Declaring one of
    // these in `needs()` lets the policy *ask* for it; the host computes it
    // only at the steps the policy asks for it in its decision
    // ([`DecisionV2::observe`]), except [`Needs::ACC_GRAD_NORMS`], whose
    // accumulation runs every step once declared.

    /// Per block, the token of the batch's output of that block the head
    /// would pool (the class token, or the mean of the patch tokens for a
    /// model without one), `L × B × D`: [`ObservationV2::batch`]`.tokens`.
    pub const BLOCK_TOKENS: Needs = Needs(1 << 3);
    /// Per block, the `B × B` similarity matrix of the batch's flattened
    /// block outputs (Gram matrix, rows L2-normalised: what the SP loss
    /// compares), `L × B × B`: [`ObservationV2::batch`]`.grams`.
    pub const BLOCK_GRAMS: Needs = Needs(1 << 4);
    /// The same per-block reductions from the reference snapshot the policy
    /// asked the host to take ([`DecisionV2::reference`]), on the same
    /// samples: [`ObservationV2::batch_reference`] and
    /// [`ObservationV2::probe_reference`].
    pub const REFERENCE: Needs = Needs(1 << 5);
    /// The per-block reductions (tokens and/or grams, as asked) of the
    /// fixed batch: one batch of training samples, the same at every step
    /// of the run: [`ObservationV2::probe`]. ("Fixed batch" because a
    /// *probe* is the one-step freeze of the frontier block.)
    pub const FIXED_BATCH: Needs = Needs(1 << 6);
    /// [`Needs::FIXED_BATCH`] under its first name (the same bit).
    pub const PROBE_BATCH: Needs = Needs::FIXED_BATCH;
    /// Per block, the values of its weights at fixed indices:
    /// [`ObservationV2::sampled_weights`].
    pub const SAMPLED_WEIGHTS: Needs = Needs(1 << 7);
    /// Per block, the L1 and L2 norms of the gradient accumulated (summed)
    /// since the policy last read them: [`ObservationV2::acc_grad_l1`],
    /// [`ObservationV2::acc_grad_l2`].
    pub const ACC_GRAD_NORMS: Needs = Needs(1 << 8);
    /// The bits a policy asks for step by step in
    /// [`DecisionV2::observe`] (all but the contract-1 bits).
    pub const ON_DEMAND: Needs = Needs(0b1_1111_1000);
    /// Every bit this ABI version defines.
    pub const ALL: Needs = Needs(0b1_1111_1111);

    /// Whether every capability in `other` is requested.
    pub const fn contains(self, other: Needs) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets together.
    pub const fn union(self, other: Needs) -> Needs {
        Needs(self.0 | other.0)
    }

    /// The bits of both sets.
    pub const fn intersection(self, other: Needs) -> Needs {
        Needs(self.0 & other.0)
    }

    /// The bits of `self` that are not in `other`.
    pub const fn difference(self, other: Needs) -> Needs {
        Needs(self.0 & !other.0)
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names of the bits set, as in `Needs::NAME` (unknown bits as
    /// `bit N`).
    pub fn names(self) -> Vec<String> {
        const NAMES: [&str; 9] = [
            "CLS_FEATURES",
            "LABELS",
            "GRAD_NORMS",
            "BLOCK_TOKENS",
            "BLOCK_GRAMS",
            "REFERENCE",
            "FIXED_BATCH",
            "SAMPLED_WEIGHTS",
            "ACC_GRAD_NORMS",
        ];
        (0..64)
            .filter(|i| self.0 & (1u64 << i) != 0)
            .map(|i| match NAMES.get(i) {
                Some(n) => n.to_string(),
                None => format!("bit {i}"),
            })
            .collect()
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

/// Per-block reductions of one set of samples through one model (contract
/// 2): blocks `first .. first + blocks`, `rows` samples, width `dim`. Each
/// buffer is empty unless its [`Needs`] bit was asked for at this step.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct BlockObservations<'a> {
    /// First block observed.
    pub first: u32,
    /// Blocks observed (0: nothing this step).
    pub blocks: u32,
    /// Samples B.
    pub rows: u32,
    /// Token width D.
    pub dim: u32,
    /// `blocks × rows × dim`, row-major: the pooled token of each block's
    /// output ([`Needs::BLOCK_TOKENS`]).
    pub tokens: RSlice<'a, f32>,
    /// `blocks × rows × rows`, row-major: each block's row-normalised Gram
    /// matrix of the flattened outputs ([`Needs::BLOCK_GRAMS`]).
    pub grams: RSlice<'a, f32>,
}

impl BlockObservations<'_> {
    /// Nothing observed.
    pub const EMPTY: BlockObservations<'static> = BlockObservations {
        first: 0,
        blocks: 0,
        rows: 0,
        dim: 0,
        tokens: RSlice::from_slice(&[]),
        grams: RSlice::from_slice(&[]),
    };
}

/// What a contract-2 host adds to the [`Observation`] of a step: the
/// on-demand observations the policy asked for at the previous step (empty
/// buffers for the rest). Handed to [`FfiPolicyV2::decide`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ObservationV2<'a> {
    /// The observations this step carries: what the policy asked for in its
    /// last decision, within what its `needs()` declared.
    pub provided: Needs,
    /// The step's batch (the global batch under data parallelism) through
    /// the model as the step ran it (the weights before its update).
    pub batch: BlockObservations<'a>,
    /// The same samples through the reference snapshot.
    pub batch_reference: BlockObservations<'a>,
    /// The fixed batch ([`Needs::FIXED_BATCH`]) through the model (weights
    /// before the update). The field keeps its first name, `probe`: the
    /// layout is the ABI's.
    pub probe: BlockObservations<'a>,
    /// The fixed batch through the reference snapshot.
    pub probe_reference: BlockObservations<'a>,
    /// The step after which the reference snapshot was taken (its weights
    /// are those the next step started from); none before the first one.
    pub reference_step: ROption<u64>,
    /// Weights sampled per block, `layers × samples_per_block`, at indices
    /// fixed for the run (weights before the update).
    pub sampled_weights: RSlice<'a, f32>,
    /// Samples per block in [`ObservationV2::sampled_weights`].
    pub samples_per_block: u32,
    /// Per block, the L1 norm of the sum of its gradients since the last
    /// read (0 for a block frozen at the read).
    pub acc_grad_l1: RSlice<'a, f64>,
    /// Per block, the L2 norm of the same sum.
    pub acc_grad_l2: RSlice<'a, f64>,
    /// Steps whose gradients that sum holds.
    pub acc_grad_steps: u64,
    /// Extension slot: named values later hosts may add.
    pub extra: RSlice<'a, NamedValues<'a>>,
}

impl ObservationV2<'_> {
    /// Nothing provided (a contract-1 host, or a step without requests).
    pub const EMPTY: ObservationV2<'static> = ObservationV2 {
        provided: Needs::NONE,
        batch: BlockObservations::EMPTY,
        batch_reference: BlockObservations::EMPTY,
        probe: BlockObservations::EMPTY,
        probe_reference: BlockObservations::EMPTY,
        reference_step: ROption::RNone,
        sampled_weights: RSlice::from_slice(&[]),
        samples_per_block: 0,
        acc_grad_l1: RSlice::from_slice(&[]),
        acc_grad_l2: RSlice::from_slice(&[]),
        acc_grad_steps: 0,
        extra: RSlice::from_slice(&[]),
    };
}

/// What the host should do with the reference snapshot (contract 2).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferenceRequest {
    /// Keep the snapshot as it is (or have none).
    #[default]
    Keep = 0,
    /// Take (or replace) the snapshot from the weights after this step,
    /// kept in float32.
    TakeF32 = 1,
    /// The same, kept and run in bfloat16.
    TakeBf16 = 2,
    /// The same, weight matrices quantized to int8 (per output row,
    /// symmetric).
    TakeInt8 = 3,
}

/// A contract-2 decision: the contract-1 [`Decision`] plus what the policy
/// wants the host to observe at the next step.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct DecisionV2 {
    /// Frontier, probe, learning-rate factors, scalars.
    pub decision: Decision,
    /// On-demand observations to compute at the next step (bits of
    /// [`Needs::ON_DEMAND`] declared in `needs()`).
    pub observe: Needs,
    /// Take or refresh the reference snapshot.
    pub reference: ReferenceRequest,
    /// Extension slot: named values later hosts may understand.
    pub extra: RVec<OwnedNamedValues>,
}

impl DecisionV2 {
    /// A contract-1 decision that asks for nothing more.
    pub fn from_v1(decision: Decision) -> Self {
        DecisionV2 {
            decision,
            observe: Needs::NONE,
            reference: ReferenceRequest::Keep,
            extra: RVec::new(),
        }
    }
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

/// A contract-2 freezing policy instance, as the host sees it: the same
/// calls as [`FfiPolicy`], with the on-demand observations and requests.
///
/// Why a second trait and module instead of a method appended to
/// [`FfiPolicy`]: abi_stable accepts a library whose prefix types have
/// *more* fields than the loader's, never fewer, so a host whose vtable
/// gained a method would refuse every plugin built before it. Each contract
/// version is therefore a module of its own, found through its own symbol
/// ([`CONTRACT_2_SYMBOL`]); a host uses the newest one a plugin exports,
/// and a plugin keeps exporting the older ones for older hosts.
#[sabi_trait]
pub trait FfiPolicyV2: Send {
    /// Capabilities this instance needs from the host (contract-1 bits and
    /// the on-demand bits it may ask for).
    fn needs(&self) -> Needs;

    /// Called after every training step.
    fn decide(
        &mut self,
        obs: &Observation<'_>,
        more: &ObservationV2<'_>,
    ) -> RResult<DecisionV2, PluginError>;

    /// Serialises the policy's state (for checkpoints).
    fn save_state(&self) -> RResult<RVec<u8>, PluginError>;

    /// Restores state written by `save_state`.
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), PluginError>;
}

/// A boxed contract-2 policy, owned by the host.
pub type PolicyV2Box = FfiPolicyV2_TO<'static, RBox<()>>;

/// The contract-2 module of a policy plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PolicyModuleV2Ref)))]
#[sabi(missing_field(panic))]
pub struct PolicyModuleV2 {
    /// Constructs a contract-2 policy from RON options.
    #[sabi(last_prefix_field)]
    pub new_policy:
        extern "C" fn(options: RStr<'_>, host: HostRef) -> RResult<PolicyV2Box, PluginError>,
}

/// The symbol a contract-2 policy plugin exports: an `extern "C" fn() ->`
/// [`ContractV2Root`].
pub const CONTRACT_2_SYMBOL: &[u8] = b"simfreeze_contract_2\0";

/// What the contract-2 symbol returns: the module and its layout, which
/// the host checks against its own before using the module.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ContractV2Root {
    /// `<PolicyModuleV2Ref as StableAbi>::LAYOUT` of the plugin's build.
    pub layout: &'static abi_stable::type_layout::TypeLayout,
    /// The module.
    pub module: PolicyModuleV2Ref,
}

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
