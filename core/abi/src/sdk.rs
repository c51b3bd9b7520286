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
mod step;
pub use observations::{sp_loss, AccGradNorms, Blocks};
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
