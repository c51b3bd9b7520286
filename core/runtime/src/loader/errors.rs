//! What goes wrong loading a plugin or calling a policy: `LoadError` (with
//! abi_stable's library and layout errors turned into one line that says
//! what to do) and `PolicyCallError`.

use super::*;

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

pub(super) fn plugin_error(name: String, path: &Path, e: PluginError) -> LoadError {
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

pub(super) fn map_library_error(path: &Path, e: LibraryError) -> LoadError {
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
pub(super) fn summarize_layout_report(report: &str) -> String {
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

pub(super) fn first_line(s: &str) -> String {
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
