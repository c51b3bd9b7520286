//! The plumbing between a researcher's [`Policy`] / [`Metric`] and the
//! stable types of [`crate::ffi`]: the panic guard every entry point runs
//! in, the adapters, the boxes, the modules and the export macros. Plugin
//! authors never call these by hand (the export macros and the test kit
//! do), so they are hidden from the SDK's documentation.

use super::*;

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
