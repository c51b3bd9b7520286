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

/// Environment variable with extra plugin directories (`:`-separated),
/// searched before the build's output directory.
pub const PLUGIN_PATH_VAR: &str = "SIMFREEZE_PLUGIN_PATH";

/// The ABI version of this host.
pub const HOST_ABI: &str = simfreeze_abi::ABI_VERSION;

/// Why a plugin could not be loaded or constructed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file at the given path, or no library of that name on the search
    /// path.
    #[error("plugin `{spec}` not found (looked for {candidates} in: {searched})")]
    NotFound {
        /// What the user asked for.
        spec: String,
        /// File names tried.
        candidates: String,
        /// Directories searched, `:`-separated.
        searched: String,
    },
    /// The file exists but the dynamic loader refused it.
    #[error("{path}: cannot be opened as a shared library: {reason}")]
    Open {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// A shared library that does not export a simfreeze root module.
    #[error("{path}: not a simfreeze plugin ({reason})")]
    NotAPlugin {
        /// The library.
        path: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// A plugin built against an incompatible ABI version.
    #[error(
        "{path}: plugin built for simfreeze ABI {plugin}, this simfreeze has ABI {host}. \
         Rebuild the plugin against simfreeze-abi {host} (point its `simfreeze-abi` \
         dependency at this simfreeze checkout and run `cargo build --release`)."
    )]
    AbiMismatch {
        /// The library.
        path: PathBuf,
        /// ABI version the plugin was built against.
        plugin: String,
        /// ABI version of this host.
        host: String,
    },
    /// Same ABI version, but the plugin's types differ from the host's (a
    /// modified or stale copy of simfreeze-abi).
    #[error(
        "{path}: plugin claims simfreeze ABI {plugin} but its types differ from this \
         simfreeze's ({detail}). Rebuild it against this checkout's simfreeze-abi."
    )]
    AbiLayout {
        /// The library.
        path: PathBuf,
        /// ABI version the plugin claims.
        plugin: String,
        /// First line of the layout report.
        detail: String,
    },
    /// A policy was asked for where a metric was given, or the other way.
    #[error("plugin `{name}` ({path}) is a {found}, not a {expected}")]
    WrongKind {
        /// Plugin name.
        name: String,
        /// The library.
        path: PathBuf,
        /// What was needed.
        expected: &'static str,
        /// What the plugin is.
        found: &'static str,
    },
    /// The plugin's constructor (or `info`) returned an error, e.g. an
    /// unknown option.
    #[error("plugin `{name}` ({path}) could not be created: {message}")]
    Constructor {
        /// Plugin name.
        name: String,
        /// The library.
        path: PathBuf,
        /// The plugin's message.
        message: String,
    },
    /// The plugin panicked while being loaded or constructed.
    #[error("plugin `{name}` ({path}) panicked while being created: {message}")]
    Panic {
        /// Plugin name.
        name: String,
        /// The library.
        path: PathBuf,
        /// The panic message.
        message: String,
    },
}

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
    /// matrices, the reference snapshot, the probe batch, sampled weights,
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

fn plugin_error(name: String, path: &Path, e: PluginError) -> LoadError {
    let message = e.message.to_string();
    match e.kind {
        ErrorKind::Panic => LoadError::Panic {
            name,
            path: path.to_owned(),
            message,
        },
        _ => LoadError::Constructor {
            name,
            path: path.to_owned(),
            message,
        },
    }
}

/// Runs a call into plugin code; the SDK already catches panics inside the
/// plugin, this is the host's own safety net for hand-written plugins.
fn call_guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into())
    })
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

fn map_library_error(path: &Path, e: LibraryError) -> LoadError {
    let path = path.to_owned();
    match e {
        LibraryError::OpenError { err, .. } => {
            let reason = err.to_string();
            // dlopen on a file that is not a shared object.
            if reason.contains("invalid ELF header") || reason.contains("file too short") {
                LoadError::NotAPlugin {
                    path,
                    reason: "not a shared library".into(),
                }
            } else {
                LoadError::Open { path, reason }
            }
        }
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path,
            reason: "it exports no abi_stable root module".into(),
        },
        LibraryError::ParseVersionError(v) => LoadError::NotAPlugin {
            path,
            reason: format!("unreadable ABI version: {v}"),
        },
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => LoadError::AbiMismatch {
            path,
            plugin: actual_version.to_string(),
            host: HOST_ABI.to_string(),
        },
        LibraryError::InvalidAbiHeader(h) => LoadError::AbiMismatch {
            path,
            plugin: format!("(abi_stable header {h:?})"),
            host: HOST_ABI.to_string(),
        },
        LibraryError::AbiInstability(report) => LoadError::AbiLayout {
            path,
            plugin: HOST_ABI.to_string(),
            detail: summarize_layout_report(&report.to_string()),
        },
        LibraryError::InvalidCAbi { .. } => LoadError::AbiLayout {
            path,
            plugin: HOST_ABI.to_string(),
            detail: "built with an incompatible Rust C ABI".into(),
        },
        LibraryError::RootModule { err, .. } => LoadError::Panic {
            name: String::new(),
            path,
            message: first_line(&err.to_string()),
        },
        LibraryError::Many(mut errs) => match errs.pop() {
            Some(e) => map_library_error(&path, e),
            None => LoadError::NotAPlugin {
                path,
                reason: "unknown abi_stable error".into(),
            },
        },
    }
}

/// abi_stable's layout report runs to hundreds of lines; its verdict is the
/// last `Error:` line, followed by `Expected:` and `Found:` type names.
fn summarize_layout_report(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let Some(at) = lines.iter().rposition(|l| l.starts_with("Error:")) else {
        return first_line(report);
    };
    let after = |label: &str| {
        lines[at..]
            .iter()
            .position(|l| *l == label)
            .and_then(|i| lines.get(at + i + 1))
            .map(|s| s.to_string())
    };
    let mut out = lines[at].trim_start_matches("Error:").trim().to_string();
    if let (Some(e), Some(f)) = (after("Expected:"), after("Found:")) {
        out.push_str(&format!(": expected `{e}`, found `{f}`"));
    }
    out
}

fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut line = line.to_string();
    if line.len() > 200 {
        line.truncate(200);
        line.push_str("...");
    }
    line
}

/// Where plugins are looked for, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPath {
    /// Directories, searched first to last.
    pub dirs: Vec<PathBuf>,
}

impl SearchPath {
    /// `$SIMFREEZE_PLUGIN_PATH`, then the directory of the running binary
    /// (the build's output directory: `target/release` for a cargo build).
    pub fn from_env() -> Self {
        let mut dirs = Vec::new();
        if let Some(var) = std::env::var_os(PLUGIN_PATH_VAR) {
            dirs.extend(std::env::split_paths(&var).filter(|p| !p.as_os_str().is_empty()));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_owned))
        {
            // Test binaries live in target/<profile>/deps; plugins one level up.
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(parent) = dir.parent() {
                    dirs.push(parent.to_owned());
                }
            }
            dirs.push(dir);
        }
        SearchPath { dirs }
    }

    /// Resolves a `--policy` argument: a path (it contains `/` or ends in
    /// `.so`) is used as is; a name `x` is looked up as `libx.so`, `x.so` and
    /// `x` in each directory.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf, LoadError> {
        let as_path = Path::new(spec);
        if spec.contains('/') || spec.ends_with(".so") {
            if as_path.is_file() {
                return Ok(as_path.to_owned());
            }
            if spec.contains('/') {
                return Err(LoadError::NotFound {
                    spec: spec.into(),
                    candidates: "that file".into(),
                    searched: as_path
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                });
            }
        }
        let stem = spec.trim_end_matches(".so").trim_start_matches("lib");
        let candidates = [
            format!("lib{stem}.so"),
            format!("{stem}.so"),
            spec.to_string(),
        ];
        for dir in &self.dirs {
            for c in &candidates {
                let p = dir.join(c);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(LoadError::NotFound {
            spec: spec.into(),
            candidates: candidates[..2].join(", "),
            searched: self.searched(),
        })
    }

    fn searched(&self) -> String {
        if self.dirs.is_empty() {
            format!("no directories; set {PLUGIN_PATH_VAR}")
        } else {
            self.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        }
    }

    /// Every `*.so` file on the search path; a file name seen in an earlier
    /// directory hides later ones.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "so") && p.is_file())
                .collect();
            files.sort();
            for f in files {
                if seen.insert(f.file_name().map(|n| n.to_owned())) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// Loads every plugin on the search path. Files that are not simfreeze
    /// plugins are skipped; other failures are returned beside the plugins.
    pub fn discover(&self) -> (Vec<Plugin>, Vec<LoadError>) {
        let mut plugins = Vec::new();
        let mut errors = Vec::new();
        for path in self.candidates() {
            match Plugin::load(&path) {
                Ok(p) => plugins.push(p),
                Err(LoadError::NotAPlugin { .. }) => {}
                Err(e) => errors.push(e),
            }
        }
        (plugins, errors)
    }

    /// Resolves and loads `spec`; its policies load their metrics from
    /// this search path too.
    pub fn load(&self, spec: &str) -> Result<Plugin, LoadError> {
        Plugin::open(&self.resolve(spec)?, self.clone())
    }
}

thread_local! {
    /// The search path of the policy constructor running on this thread.
    static METRIC_SEARCH: RefCell<Option<SearchPath>> = const { RefCell::new(None) };
}

/// Puts a search path in scope for [`host_load_metric`] while a policy
/// constructor runs; the previous one comes back when it is dropped.
struct MetricScope(Option<SearchPath>);

impl MetricScope {
    fn enter(search: SearchPath) -> MetricScope {
        MetricScope(METRIC_SEARCH.with(|s| s.replace(Some(search))))
    }
}

impl Drop for MetricScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        METRIC_SEARCH.with(|s| *s.borrow_mut() = previous);
    }
}

/// The host services handed to policy constructors.
fn host_services() -> HostRef {
    static HOST: OnceLock<HostRef> = OnceLock::new();
    *HOST.get_or_init(|| {
        Host {
            load_metric: host_load_metric,
        }
        .leak_into_prefix()
    })
}

extern "C" fn host_load_metric(
    name: RStr<'_>,
    options: RStr<'_>,
) -> RResult<MetricBox, PluginError> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let search = METRIC_SEARCH.with(|s| s.borrow().clone());
        match search {
            Some(search) => search
                .load(name.as_str())
                .and_then(|p| p.new_metric(options.as_str()))
                .map_err(|e| e.to_string()),
            None => Err(format!(
                "metric `{name}` requested outside a policy constructor; load metrics in `new`"
            )),
        }
    }));
    match result {
        Ok(Ok(m)) => RResult::ROk(m),
        Ok(Err(message)) => RResult::RErr(PluginError {
            kind: ErrorKind::Options,
            message: message.into(),
        }),
        Err(_) => RResult::RErr(PluginError {
            kind: ErrorKind::Other,
            message: "the host panicked while loading a metric".into(),
        }),
    }
}

/// A policy failed while running.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCallError {
    /// The policy returned an error.
    #[error("policy `{policy}` ({path}) failed at step {step}: {message}")]
    Failed {
        /// Policy name.
        policy: String,
        /// Library path.
        path: PathBuf,
        /// Step of the call.
        step: u64,
        /// Its message.
        message: String,
    },
    /// The policy panicked (caught at the boundary).
    #[error("policy `{policy}` ({path}) panicked at step {step}: {message}")]
    Panicked {
        /// Policy name.
        policy: String,
        /// Library path.
        path: PathBuf,
        /// Step of the call.
        step: u64,
        /// The panic message.
        message: String,
    },
}

/// A constructed policy, owned by the host.
pub struct PolicyHandle {
    /// The plugin's description.
    pub meta: PluginMeta,
    /// The library it came from.
    pub path: PathBuf,
    /// The RON options it was built with.
    pub options: String,
    needs: Needs,
    inner: Inner,
}

/// A policy of either contract.
enum Inner {
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
