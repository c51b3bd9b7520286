//! The files a run appends to while it trains (`RunLog`): `metrics.csv`,
//! `events.jsonl`, the recorded observations and, unless
//! `train.tensorboard` is off, TensorBoard's event file; each opened fresh
//! or, on resume, cut back to its length at the checkpoint.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

use simfreeze_runtime::observations::ObservationRecord;

use crate::config::TrainSection;
use crate::run::dir::{RunDir, EVENTS_FILE, METRICS_FILE, OBSERVATIONS_FILE};
use crate::run::records::{Event, MetricsRow};
use crate::run::tensorboard::{self, EventWriter};

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
            observations: train.record_observations || train.record_on_demand,
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
            true => {
                let len = at.and_then(|l| l.tensorboard);
                let out = open_truncated(&dir.file(tensorboard::EVENTS_FILE), len, None)?;
                Some(EventWriter::new(out, len.is_none())?)
            }
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
    use std::fs;

    use super::*;

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
