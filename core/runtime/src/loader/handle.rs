//! A constructed policy of either contract (`PolicyHandle`), its calls
//! guarded: an error or a panic in the plugin comes back as a
//! `PolicyCallError` naming the policy, its library and the step.

use super::*;

/// A constructed policy, owned by the host.
pub struct PolicyHandle {
    /// The plugin's description.
    pub meta: PluginMeta,
    /// The library it came from.
    pub path: PathBuf,
    /// The RON options it was built with.
    pub options: String,
    pub(super) needs: Needs,
    pub(super) inner: Inner,
}

/// A policy of either contract.
pub(super) enum Inner {
    V1(PolicyBox),
    V2(PolicyV2Box),
}

impl PolicyHandle {
    /// What the host must compute for this policy each step.
    pub fn needs(&self) -> Needs {
        self.needs
    }

    /// Asks the policy for its decision after `obs.step`.
    pub fn decide(&mut self, obs: &ffi::Observation<'_>) -> Result<ffi::Decision, PolicyCallError> {
        self.decide_v2(obs, &ffi::ObservationV2::EMPTY)
            .map(|d| d.decision)
    }

    /// Asks the policy for its contract-2 decision after `obs.step`, with
    /// the on-demand observations. A plugin built against ABI 0.1.0 has no
    /// such method: its `decide` answers, through the trait's default.
    pub fn decide_v2(
        &mut self,
        obs: &ffi::Observation<'_>,
        more: &ffi::ObservationV2<'_>,
    ) -> Result<ffi::DecisionV2, PolicyCallError> {
        let step = obs.step;
        let result = call_guarded(|| match &mut self.inner {
            Inner::V1(p) => match p.decide(obs) {
                RResult::ROk(d) => RResult::ROk(ffi::DecisionV2::from_v1(d)),
                RResult::RErr(e) => RResult::RErr(e),
            },
            Inner::V2(p) => p.decide(obs, more),
        });
        self.finish(step, result)
    }

    /// The plugin contract the policy speaks ([`PluginMeta::contract`]).
    pub fn contract(&self) -> u32 {
        self.meta.contract
    }

    /// The policy's serialized state.
    pub fn save_state(&self, step: u64) -> Result<Vec<u8>, PolicyCallError> {
        let result = call_guarded(|| match &self.inner {
            Inner::V1(p) => p.save_state(),
            Inner::V2(p) => p.save_state(),
        });
        self.finish(step, result).map(|v| v.into_vec())
    }

    /// Restores state from `save_state`.
    pub fn load_state(&mut self, step: u64, state: &[u8]) -> Result<(), PolicyCallError> {
        let state = RSlice::from_slice(state);
        let result = call_guarded(|| match &mut self.inner {
            Inner::V1(p) => p.load_state(state),
            Inner::V2(p) => p.load_state(state),
        });
        self.finish(step, result)
    }

    fn finish<T>(
        &self,
        step: u64,
        result: Result<RResult<T, PluginError>, String>,
    ) -> Result<T, PolicyCallError> {
        let panicked = |message| PolicyCallError::Panicked {
            policy: self.meta.name.clone(),
            path: self.path.clone(),
            step,
            message,
        };
        match result {
            Err(message) => Err(panicked(message)),
            Ok(RResult::ROk(v)) => Ok(v),
            Ok(RResult::RErr(e)) if e.kind == ErrorKind::Panic => Err(panicked(e.message.into())),
            Ok(RResult::RErr(e)) => Err(PolicyCallError::Failed {
                policy: self.meta.name.clone(),
                path: self.path.clone(),
                step,
                message: e.message.into(),
            }),
        }
    }
}

/// Runs a call into plugin code; the SDK already catches panics inside the
/// plugin, this is the host's own safety net for hand-written plugins.
pub(super) fn call_guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into())
    })
}
