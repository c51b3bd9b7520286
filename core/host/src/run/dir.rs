//! The run directory and a typed writer for each of its files.
//!
//! Invariants: a run directory is created fresh and never reused; on
//! resume, `metrics.csv` and `events.jsonl` are cut back to their length at
//! the checkpoint, so a resumed run's files hold exactly what an
//! uninterrupted run's would.

use std::fs::{self};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::RunConfig;
use crate::run::records::Event;

/// The resolved configuration a run started with.
pub const CONFIG_FILE: &str = "config.ron";
/// The [`crate::run::records::PolicyIdentity`].
pub const POLICY_FILE: &str = "policy.json";
/// The [`crate::run::records::Summary`].
pub const SUMMARY_FILE: &str = "summary.json";
/// One [`MetricsRow`] per epoch.
pub const METRICS_FILE: &str = "metrics.csv";
/// One [`Event`] per line.
pub const EVENTS_FILE: &str = "events.jsonl";
/// Each step's observation and the state its decision set
/// (`train.record_observations`).
pub const OBSERVATIONS_FILE: &str = "observations.jsonl";
/// The final weights of a completed run (timm names; `model.weights` and
/// `simfreeze eval --weights` read it).
pub const MODEL_FILE: &str = "model.safetensors";

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `<output>/<name>-NNN` with the first free NNN.
    pub fn create(output: &Path, name: &str) -> Result<RunDir> {
        fs::create_dir_all(output)
            .with_context(|| format!("cannot create the output directory {}", output.display()))?;
        for n in 1..100_000 {
            let path = output.join(format!("{name}-{n:03}"));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        anyhow::bail!("no free run directory name under {}", output.display())
    }

    /// An existing run directory (resume).
    pub fn existing(path: &Path) -> RunDir {
        RunDir {
            path: path.to_owned(),
        }
    }

    /// The path of one of its files.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes the resolved configuration.
    pub fn write_config(&self, config: &RunConfig) -> Result<()> {
        let pretty = ron::ser::PrettyConfig::default();
        self.write(CONFIG_FILE, &ron::ser::to_string_pretty(config, pretty)?)
    }

    /// Writes a record as pretty JSON.
    pub fn write_json<T: Serialize>(&self, name: &str, record: &T) -> Result<()> {
        self.write(name, &serde_json::to_string_pretty(record)?)
    }

    /// Reads a record written by [`RunDir::write_json`].
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    /// Every event of the run so far.
    pub fn read_events(&self) -> Result<Vec<Event>> {
        let path = self.file(EVENTS_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Event::parse_all(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    /// Writes through a temporary file and a rename, so a reader (another
    /// rank, a resume) never sees half a file.
    fn write(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        fs::write(&tmp, contents)
            .and_then(|()| fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_never_reused() {
        let d = tempfile::tempdir().unwrap();
        let a = RunDir::create(d.path(), "x").unwrap();
        let b = RunDir::create(d.path(), "x").unwrap();
        assert_ne!(a.path, b.path);
        assert!(a.path.ends_with("x-001") && b.path.ends_with("x-002"));
    }
}
