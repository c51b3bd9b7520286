//! The run directory and a typed writer for each of its files.
//!
//! Invariants: a run directory is created fresh and never reused; on
//! resume, `metrics.csv` and `events.jsonl` are cut back to their length at
//! the checkpoint, so a resumed run's files hold exactly what an
//! uninterrupted run's would.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use simfreeze_runtime::observations::ObservationRecord;

use crate::config::{RunConfig, TrainSection};
use crate::run::records::{Event, MetricsRow};
use crate::run::tensorboard::{self, EventWriter};

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

/// The files a run appends to while it trains: metrics, events and, unless
/// `train.tensorboard` is off, TensorBoard's event file.
pub struct RunLog {
    /// `None`: a log that writes nothing (data-parallel ranks other than
    /// 0; rank 0 writes the run directory).
    files: Option<LogFiles>,
}

struct LogFiles {
    metrics: BufWriter<File>,
    events: BufWriter<File>,
    tensorboard: Option<EventWriter>,
    observations: Option<BufWriter<File>>,
}

/// How long the appended files are (a checkpoint records it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLengths {
    /// Bytes of `metrics.csv`.
    pub metrics: u64,
    /// Bytes of `events.jsonl`.
    pub events: u64,
    /// Bytes of the TensorBoard event file, when there is one.
    pub tensorboard: Option<u64>,
    /// Bytes of `observations.jsonl`, when it is written.
    pub observations: Option<u64>,
}

/// What a run's log writes beside its metrics and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogFileSet {
    /// TensorBoard's event file.
    pub tensorboard: bool,
    /// `observations.jsonl` (`train.record_observations`).
    pub observations: bool,
}

impl LogFileSet {
    /// The files the train section asks for.
    pub fn of(train: &TrainSection) -> LogFileSet {
        LogFileSet {
            tensorboard: train.tensorboard,
            observations: train.record_observations,
        }
    }
}

impl RunLog {
    /// Creates the files (header included), or, when resuming, opens them
    /// cut back to `at`; `set` adds the TensorBoard event file and the
    /// observation stream.
    pub fn open(dir: &RunDir, at: Option<LogLengths>, set: LogFileSet) -> Result<RunLog> {
        let observations = match set.observations {
            // A run that recorded none before its checkpoint starts the
            // file afresh on resume.
            true => Some(open_truncated(
                &dir.file(OBSERVATIONS_FILE),
                at.and_then(|l| l.observations),
                None,
            )?),
            false => None,
        };
        let tensorboard = match set.tensorboard {
            true => Some(EventWriter::open(
                &dir.file(tensorboard::EVENTS_FILE),
                at.and_then(|l| l.tensorboard),
            )?),
            false => None,
        };
        Ok(RunLog {
            files: Some(LogFiles {
                metrics: open_truncated(
                    &dir.file(METRICS_FILE),
                    at.map(|l| l.metrics),
                    Some(MetricsRow::HEADER),
                )?,
                events: open_truncated(&dir.file(EVENTS_FILE), at.map(|l| l.events), None)?,
                tensorboard,
                observations,
            }),
        })
    }

    /// A log that writes nothing.
    pub fn muted() -> RunLog {
        RunLog { files: None }
    }

    /// TensorBoard scalars at `step` (nothing when TensorBoard is off).
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        match self.files.as_mut().and_then(|f| f.tensorboard.as_mut()) {
            Some(tb) => tb.scalars(step, values),
            None => Ok(()),
        }
    }

    /// Appends an epoch's row.
    pub fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        if let Some(f) = self.files.as_mut() {
            writeln!(f.metrics, "{}", row.csv())?;
        }
        Ok(())
    }

    /// Appends events.
    pub fn events(&mut self, events: &[Event]) -> Result<()> {
        if let Some(f) = self.files.as_mut() {
            for e in events {
                writeln!(f.events, "{}", serde_json::to_string(e)?)?;
            }
        }
        Ok(())
    }

    /// Appends a step's observation record (when the run records them).
    pub fn observation(&mut self, record: &ObservationRecord) -> Result<()> {
        if let Some(f) = self.files.as_mut().and_then(|f| f.observations.as_mut()) {
            writeln!(f, "{}", serde_json::to_string(record)?)?;
        }
        Ok(())
    }

    /// Flushes every file and returns their lengths.
    pub fn flush(&mut self) -> Result<LogLengths> {
        let Some(f) = self.files.as_mut() else {
            return Ok(LogLengths {
                metrics: 0,
                events: 0,
                tensorboard: None,
                observations: None,
            });
        };
        f.metrics.flush()?;
        f.events.flush()?;
        let tensorboard = match f.tensorboard.as_mut() {
            Some(tb) => Some(tb.flush()?),
            None => None,
        };
        let observations = match f.observations.as_mut() {
            Some(o) => {
                o.flush()?;
                Some(o.get_ref().metadata()?.len())
            }
            None => None,
        };
        Ok(LogLengths {
            metrics: f.metrics.get_ref().metadata()?.len(),
            events: f.events.get_ref().metadata()?.len(),
            tensorboard,
            observations,
        })
    }
}

/// Creates `path` (with `header` as its first line), or, with `len`, opens
/// it for appending cut back to `len` bytes.
pub(super) fn open_truncated(
    path: &Path,
    len: Option<u64>,
    header: Option<&str>,
) -> Result<BufWriter<File>> {
    let file = match len {
        Some(len) => {
            let f = OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            f.set_len(len)?;
            f
        }
        None => File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    };
    let mut w = BufWriter::new(file);
    if let (None, Some(h)) = (len, header) {
        writeln!(w, "{h}")?;
    }
    Ok(w)
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

    #[test]
    fn a_resumed_log_is_cut_back_to_the_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let dir = RunDir::create(d.path(), "x").unwrap();
        let mut log = RunLog::open(&dir, None, LogFileSet::default()).unwrap();
        let freeze = |step| Event {
            step,
            kind: crate::run::records::EventKind::Freeze {
                blocks: vec![0],
                decided_at: None,
            },
        };
        log.events(&[freeze(1)]).unwrap();
        let at = log.flush().unwrap();
        log.events(&[freeze(2)]).unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = RunLog::open(&dir, Some(at), LogFileSet::default()).unwrap();
        log.events(&[freeze(3)]).unwrap();
        log.flush().unwrap();
        let steps: Vec<u64> = dir.read_events().unwrap().iter().map(|e| e.step).collect();
        assert_eq!(steps, vec![1, 3]);
        let csv = fs::read_to_string(dir.file(METRICS_FILE)).unwrap();
        assert_eq!(csv, format!("{}\n", MetricsRow::HEADER));
    }
}
