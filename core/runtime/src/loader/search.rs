//! Where plugins are found (`SearchPath`: `$SIMFREEZE_PLUGIN_PATH`, then
//! the program's directory), and the host services a policy constructor
//! gets: loading a metric from the same search path, in scope while the
//! constructor runs.

use super::*;

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
pub(super) struct MetricScope(Option<SearchPath>);

impl MetricScope {
    pub(super) fn enter(search: SearchPath) -> MetricScope {
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
pub(super) fn host_services() -> HostRef {
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
