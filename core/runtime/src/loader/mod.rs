//! Plugin loading: finding libraries, checking them, constructing policies
//! and metrics, and calling them without letting a plugin take the host down.
//!
//! Invariants:
//! - any number of plugins load side by side: each library is opened through
//!   `lib_header_from_path(..).init_root_module()` (abi_stable's
//!   `load_from_file` caches one library per interface type and would return
//!   the first plugin for every path);
//! - plugins are never unloaded (their code may still be referenced by boxed
//!   objects and strings);
//! - the search path is built once, by whoever starts the work (the CLI's
//!   plan), and travels with the [`Plugin`]: a policy that loads a metric
//!   in its constructor gets it from the same directories as itself;
//! - every failure becomes a [`LoadError`] or [`PolicyCallError`] that names
//!   the plugin and its path in one short paragraph; abi_stable's layout
//!   reports (hundreds of lines) are reduced to their first line.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use abi_stable::{
    abi_stability::abi_checking::check_layout_compatibility,
    library::{lib_header_from_path, LibraryError, RawLibrary, RootModule},
    prefix_type::PrefixTypeTrait,
    std_types::{RResult, RSlice, RStr},
    StableAbi,
};
use simfreeze_abi::ffi::{
    self, ContractV2Root, ErrorKind, Host, HostRef, MetricBox, Needs, PluginError, PluginKind,
    PluginModuleRef, PolicyBox, PolicyModuleV2Ref, PolicyV2Box, CONTRACT_2_SYMBOL,
};
use simfreeze_abi::sdk::PluginModules;

mod errors;
mod handle;
mod search;

use errors::{map_library_error, plugin_error, summarize_layout_report};
pub use errors::{LoadError, PolicyCallError};
pub use handle::PolicyHandle;
use handle::{call_guarded, Inner};
pub use search::SearchPath;
use search::{host_services, MetricScope};

/// Environment variable with extra plugin directories (`:`-separated),
/// searched before the build's output directory.
pub const PLUGIN_PATH_VAR: &str = "SIMFREEZE_PLUGIN_PATH";

/// The ABI version of this host.
pub const HOST_ABI: &str = simfreeze_abi::ABI_VERSION;

/// A plugin's description, in host types.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PluginMeta {
    /// Name used to pick the plugin.
    pub name: String,
    /// `policy` or `metric`.
    pub kind: &'static str,
    /// The plugin's own version.
    pub version: String,
    /// ABI version it was built against.
    pub abi_version: String,
    /// The plugin contract it speaks: 1 (features, labels, gradient norms)
    /// or 2 (also the on-demand observations: block tokens and Gram
    /// matrices, the reference snapshot, the fixed batch, sampled weights,
    /// accumulated gradient norms), from the modules it exports.
    pub contract: u32,
    /// One paragraph.
    pub description: String,
    /// `(name, default, doc)` of each option.
    pub options: Vec<OptionMeta>,
}

/// One option of a plugin.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OptionMeta {
    /// Field name.
    pub name: String,
    /// Default, as RON.
    pub default: String,
    /// One line.
    pub doc: String,
}

impl From<ffi::PluginInfo> for PluginMeta {
    fn from(i: ffi::PluginInfo) -> Self {
        PluginMeta {
            name: i.name.into(),
            kind: i.kind.as_str(),
            version: i.version.into(),
            // Set from the modules the plugin exports (`Plugin::from_module`).
            contract: 1,
            abi_version: i.abi_version.into(),
            description: i.description.into(),
            options: i
                .options
                .into_iter()
                .map(|o| OptionMeta {
                    name: o.name.into(),
                    default: o.default.into(),
                    doc: o.doc.into(),
                })
                .collect(),
        }
    }
}

/// A loaded plugin library.
#[derive(Clone)]
pub struct Plugin {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Its description.
    pub meta: PluginMeta,
    kind: PluginKind,
    module: PluginModuleRef,
    /// The contract-2 module, when the plugin exports one.
    module_v2: Option<PolicyModuleV2Ref>,
    /// Where the metrics its policies ask for are looked up.
    search: SearchPath,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .finish()
    }
}

impl Plugin {
    /// Opens and checks the library at `path`; metrics its policies load
    /// are looked up on [`SearchPath::from_env`]. Use [`SearchPath::load`]
    /// to pass a search path that was built once.
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        Self::open(path, SearchPath::from_env())
    }

    /// Opens and checks the library at `path`; `search` is where the
    /// metrics its policies load are looked up.
    pub fn open(path: &Path, search: SearchPath) -> Result<Plugin, LoadError> {
        if !path.is_file() {
            return Err(LoadError::NotFound {
                spec: path.display().to_string(),
                candidates: "that file".into(),
                searched: path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            });
        }
        let header = lib_header_from_path(path).map_err(|e| map_library_error(path, e))?;
        let consts = header.root_mod_consts();
        if consts.name().as_str() != PluginModuleRef::NAME {
            return Err(LoadError::NotAPlugin {
                path: path.to_owned(),
                reason: format!(
                    "it exports the abi_stable module `{}`, not `{}`",
                    consts.name(),
                    PluginModuleRef::NAME
                ),
            });
        }
        let plugin_abi = header.version_strings().version.as_str().to_string();
        if !abi_compatible(&plugin_abi, HOST_ABI) {
            return Err(LoadError::AbiMismatch {
                path: path.to_owned(),
                plugin: plugin_abi,
                host: HOST_ABI.to_string(),
            });
        }
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(|e| map_library_error(path, e))?;
        let modules = PluginModules {
            v1: module,
            v2: contract_v2_module(path)?,
        };
        Ok(Self::from_module(modules, path.to_owned())?.with_search_path(search))
    }

    /// Looks up the metrics its policies load on `search` instead.
    pub fn with_search_path(mut self, search: SearchPath) -> Plugin {
        self.search = search;
        self
    }

    /// Wraps a root module linked into this binary (tests, static plugins);
    /// metrics its policies load are looked up on [`SearchPath::from_env`]
    /// unless [`Plugin::with_search_path`] says otherwise.
    pub fn from_module(
        modules: impl Into<PluginModules>,
        path: PathBuf,
    ) -> Result<Plugin, LoadError> {
        let PluginModules {
            v1: module,
            v2: module_v2,
        } = modules.into();
        let unnamed = || {
            path.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into())
        };
        let info = call_guarded(|| (module.info())())
            .map_err(|message| LoadError::Panic {
                name: unnamed(),
                path: path.clone(),
                message,
            })?
            .into_result()
            .map_err(|e| plugin_error(unnamed(), &path, e))?;
        let kind = info.kind;
        let mut meta: PluginMeta = info.into();
        // The contract is what the plugin exports, whatever its ABI string.
        meta.contract = if module_v2.is_some() { 2 } else { 1 };
        Ok(Plugin {
            meta,
            kind,
            path,
            module,
            module_v2: module_v2.filter(|_| kind == PluginKind::Policy),
            search: SearchPath::from_env(),
        })
    }

    /// Builds a policy from RON options (empty for defaults).
    pub fn new_policy(&self, options: &str) -> Result<PolicyHandle, LoadError> {
        self.expect_kind(PluginKind::Policy)?;
        let host = host_services();
        // Metrics are loaded in the constructor (the SDK hands it the host
        // services by reference only), so this plugin's search path is in
        // scope exactly while it runs.
        let _scope = MetricScope::enter(self.search.clone());
        let panicked = |message| LoadError::Panic {
            name: self.meta.name.clone(),
            path: self.path.clone(),
            message,
        };
        let failed = |e| plugin_error(self.meta.name.clone(), &self.path, e);
        let policy = match self.module_v2 {
            Some(m) => Inner::V2(
                call_guarded(|| (m.new_policy())(RStr::from(options), host))
                    .map_err(panicked)?
                    .into_result()
                    .map_err(failed)?,
            ),
            None => Inner::V1(
                call_guarded(|| (self.module.new_policy())(RStr::from(options), host))
                    .map_err(panicked)?
                    .into_result()
                    .map_err(failed)?,
            ),
        };
        let needs = match &policy {
            Inner::V1(p) => p.needs().intersection(CONTRACT_1_NEEDS),
            Inner::V2(p) => p.needs(),
        };
        Ok(PolicyHandle {
            meta: self.meta.clone(),
            path: self.path.clone(),
            options: options.to_string(),
            needs,
            inner: policy,
        })
    }

    /// Builds a metric from RON options (empty for defaults).
    pub fn new_metric(&self, options: &str) -> Result<MetricBox, LoadError> {
        self.expect_kind(PluginKind::Metric)?;
        call_guarded(|| (self.module.new_metric())(RStr::from(options)))
            .map_err(|message| LoadError::Panic {
                name: self.meta.name.clone(),
                path: self.path.clone(),
                message,
            })?
            .into_result()
            .map_err(|e| plugin_error(self.meta.name.clone(), &self.path, e))
    }

    fn expect_kind(&self, expected: PluginKind) -> Result<(), LoadError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(LoadError::WrongKind {
                name: self.meta.name.clone(),
                path: self.path.clone(),
                expected: expected.as_str(),
                found: self.kind.as_str(),
            })
        }
    }
}

/// The contract-2 module of the plugin at `path`, if it exports one: the
/// symbol's layout is checked against this host's as abi_stable checks
/// the root module.
fn contract_v2_module(path: &Path) -> Result<Option<PolicyModuleV2Ref>, LoadError> {
    let lib = RawLibrary::load_at(path).map_err(|e| map_library_error(path, e))?;
    // SAFETY: the symbol is the `extern "C" fn() -> ContractV2Root` that
    // `export_policy!` defines; its layout is checked before any use.
    let root = unsafe {
        match lib.get::<extern "C" fn() -> ContractV2Root>(CONTRACT_2_SYMBOL) {
            Ok(f) => f(),
            Err(_) => return Ok(None),
        }
    };
    // Plugins are never unloaded (the module points into the library).
    std::mem::forget(lib);
    let ours = <PolicyModuleV2Ref as StableAbi>::LAYOUT;
    check_layout_compatibility(ours, root.layout).map_err(|e| LoadError::AbiLayout {
        path: path.to_owned(),
        plugin: format!("{HOST_ABI} (contract 2)"),
        detail: summarize_layout_report(&e.to_string()),
    })?;
    Ok(Some(root.module))
}

/// The needs a contract-1 policy can have (a bit it sets beyond them means
/// nothing to it).
const CONTRACT_1_NEEDS: Needs = Needs(0b111);

/// Same major version, and for 0.x the same minor (semver).
pub fn abi_compatible(plugin: &str, host: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(plugin), parse(host)) {
        (Some((pm, pn)), Some((hm, hn))) => pm == hm && (hm != 0 || pn == hn),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_versions_follow_semver() {
        assert!(abi_compatible("0.1.0", "0.1.0"));
        assert!(abi_compatible("0.1.3", "0.1.0"));
        assert!(!abi_compatible("0.2.0", "0.1.0"));
        assert!(!abi_compatible("0.0.1", "0.1.0"));
        assert!(abi_compatible("1.4.0", "1.2.0"));
        assert!(!abi_compatible("2.0.0", "1.2.0"));
        assert!(!abi_compatible("garbage", "0.1.0"));
    }

    #[test]
    fn resolve_reports_every_directory_searched() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sp = SearchPath {
            dirs: vec![a.path().into(), b.path().into()],
        };
        let err = sp.resolve("atsf").unwrap_err().to_string();
        assert!(err.contains("libatsf.so"), "{err}");
        assert!(err.contains(&a.path().display().to_string()), "{err}");
        assert!(err.contains(&b.path().display().to_string()), "{err}");
    }

    #[test]
    fn resolve_prefers_earlier_directories_and_accepts_file_names() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("libx.so"), b"").unwrap();
        let sp = SearchPath {
            dirs: vec![a.path().into(), b.path().into()],
        };
        assert_eq!(sp.resolve("x").unwrap(), b.path().join("libx.so"));
        assert_eq!(sp.resolve("libx.so").unwrap(), b.path().join("libx.so"));
        std::fs::write(a.path().join("libx.so"), b"").unwrap();
        assert_eq!(sp.resolve("x").unwrap(), a.path().join("libx.so"));
    }

    #[test]
    fn a_text_file_is_not_a_plugin() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("libfake.so");
        std::fs::write(&p, b"definitely not ELF").unwrap();
        let err = Plugin::load(&p).unwrap_err();
        assert!(matches!(err, LoadError::NotAPlugin { .. }), "{err}");
        assert!(err.to_string().contains("libfake.so"));
    }

    #[test]
    fn layout_reports_shrink_to_their_verdict() {
        let report = "Compared <this>:\n  lots\n\nError:mismatched type\nExpected:\n    PluginModule\nFound:\n    OldModule\n";
        assert_eq!(
            summarize_layout_report(report),
            "mismatched type: expected `PluginModule`, found `OldModule`"
        );
        assert_eq!(summarize_layout_report("one\ntwo"), "one");
    }

    #[test]
    fn a_missing_path_is_not_found() {
        let err = SearchPath { dirs: vec![] }
            .resolve("./nowhere/libx.so")
            .unwrap_err();
        assert!(matches!(err, LoadError::NotFound { .. }), "{err}");
    }
}
