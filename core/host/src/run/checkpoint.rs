//! Checkpoints: everything needed to continue a run exactly where it was.
//!
//! A checkpoint is two files in the run directory:
//! `checkpoint-<step>.safetensors` (model weights under their timm names,
//! the optimizer state under `momentum/<name>` for SGD, or
//! `adamw.exp_avg/<name>`, `adamw.exp_avg_sq/<name>` and
//! `adamw.step/<name>`) and `checkpoint.json` (step, epoch accumulators, freeze
//! state, timeline, the policy's state, and how long `metrics.csv` and
//! `events.jsonl` were). Each is written to a temporary file and renamed;
//! the rename of `checkpoint.json` is the commit point, so a crash leaves
//! the previous checkpoint intact. The data order is a pure function of
//! (seed, epoch) and the model has no dropout, so no RNG state is needed.
//!
//! The files are written off the training loop's path by a [`Writer`]: the
//! loop only copies the tensors (into pinned host memory from a GPU,
//! without waiting for the copies), and a background thread writes and
//! commits them while training goes on; one write is in flight at most.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use simfreeze_runtime::contract::FreezeState;
use simfreeze_runtime::driver::Timeline;
use tch::{Device, Tensor};

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Format version of this file.
    pub format: u32,
    /// Steps completed.
    pub step: u64,
    /// Sum of batch losses in the current (partial) epoch.
    pub epoch_loss_sum: f64,
    /// Training seconds spent in the current (partial) epoch.
    pub epoch_seconds: f64,
    /// Training seconds of completed epochs.
    pub train_seconds: f64,
    /// Best top-1 so far.
    pub best_top1: Option<f64>,
    /// Top-1 of the last completed epoch.
    pub last_top1: Option<f64>,
    /// Freeze state for the next step.
    pub freeze: FreezeState,
    /// Freeze timeline so far.
    pub timeline: Timeline,
    /// The policy's saved state, hex-encoded.
    pub policy_state: String,
    /// File name of the tensor half.
    pub weights: String,
    /// Bytes of `metrics.csv` at this point.
    pub metrics_len: u64,
    /// Bytes of `events.jsonl` at this point.
    pub events_len: u64,
    /// Bytes of the TensorBoard event file at this point (when written).
    #[serde(default)]
    pub tensorboard_len: Option<u64>,
    /// Bytes of `observations.jsonl` at this point (when written).
    #[serde(default)]
    pub observations_len: Option<u64>,
    /// Ranks of the run that wrote it (a resume must have as many).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Bytes all-reduced so far.
    #[serde(default)]
    pub allreduce_bytes: u64,
    /// Seconds in collectives so far.
    #[serde(default)]
    pub comm_seconds: f64,
    /// Bytes all-reduced in the current (partial) epoch.
    #[serde(default)]
    pub epoch_allreduce_bytes: u64,
    /// Seconds in collectives in the current (partial) epoch.
    #[serde(default)]
    pub epoch_comm_seconds: f64,
    /// Bytes per step of the last `allreduce` event.
    #[serde(default)]
    pub last_allreduce_bytes: Option<u64>,
    /// What the on-demand observations keep (the reference snapshot, whose
    /// tensors are `observer.reference/<name>` in the tensor half).
    #[serde(default)]
    pub observer: Option<crate::observe::observer::ObserverMeta>,
}

const FORMAT: u32 = 1;
const META: &str = "checkpoint.json";

fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Hex encoding of policy state bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Inverse of [`to_hex`].
pub fn from_hex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd-length hex string");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex digit"))
        .collect()
}

fn one() -> usize {
    1
}

/// Writes a checkpoint into `dir` (the engine's named tensors: weights and
/// optimizer state) and removes the tensors of older ones.
pub fn save(
    dir: &Path,
    mut meta: CheckpointMeta,
    mut tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    meta.format = FORMAT;
    meta.weights = format!("checkpoint-{:08}.safetensors", meta.step);
    let weights = dir.join(&meta.weights);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomic(&weights, |tmp| {
        Tensor::write_safetensors(&tensors, tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })?;
    write_atomic(&dir.join(META), |tmp| {
        fs::write(tmp, serde_json::to_string_pretty(&meta)?)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })?;
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && name.ends_with(".safetensors") && name != meta.weights
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Writes checkpoints in a background thread, one at a time, in order.
///
/// [`Writer::submit`] snapshots the tensors and returns; the write of the
/// previous checkpoint is waited for first, so checkpoints commit in the
/// order they were taken and at most one snapshot is held besides the
/// model. [`Writer::wait`] returns once the last one is committed (before
/// a run reports a checkpoint or exits); dropping the writer waits too, so
/// no exit path leaves a checkpoint half written.
#[derive(Default)]
pub struct Writer {
    pending: Option<JoinHandle<Result<()>>>,
}

impl Writer {
    /// Takes a copy of `tensors` (their values now; training may go on
    /// changing the originals) and writes the checkpoint into `dir` in the
    /// background. An error of the previous write is returned here.
    pub fn submit(
        &mut self,
        dir: &Path,
        meta: CheckpointMeta,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<()> {
        self.wait()?;
        let gpu = tensors.iter().find_map(|(_, t)| match t.device() {
            Device::Cuda(i) => Some(i),
            _ => None,
        });
        // From a GPU a non-blocking copy lands in pinned host memory and is
        // queued behind the step that produced the values, so the loop does
        // not wait for it; on the CPU this is a plain copy.
        let snapshot: Vec<(String, Tensor)> = tch::no_grad(|| {
            tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.to_device_(Device::Cpu, t.kind(), true, true)))
                .collect()
        });
        let dir = dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                if let Some(i) = gpu {
                    // The copies must have landed before they are read.
                    tch::Cuda::synchronize(i as i64);
                }
                save(&dir, meta, snapshot)
            })
            .context("cannot start the checkpoint writer thread")?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Waits until the last submitted checkpoint is committed; its error,
    /// if writing it failed.
    pub fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => match h.join() {
                Ok(r) => r,
                Err(_) => bail!("the checkpoint writer thread panicked"),
            },
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("error: the last checkpoint was not written: {e:#}");
        }
    }
}

/// The checkpoint of a run directory, if it has one.
pub fn load_meta(dir: &Path) -> Result<Option<CheckpointMeta>> {
    let path = dir.join(META);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{} has format {}, this simfreeze reads {FORMAT}",
            path.display(),
            meta.format
        );
    }
    Ok(Some(meta))
}

/// The tensor half of the checkpoint `meta` describes, and its path (for
/// the messages of whoever loads it).
pub fn read_tensors(dir: &Path, meta: &CheckpointMeta) -> Result<(PathBuf, Vec<(String, Tensor)>)> {
    let path: PathBuf = dir.join(&meta.weights);
    let loaded = Tensor::read_safetensors(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((path, loaded))
}

/// Taking and restoring a trainer's checkpoint (the trainer's side: what
/// it copies into a checkpoint, and what it restores from one).
mod trainer {
    use super::super::*;

    impl Trainer {
        /// Writes a checkpoint of everything needed to continue after the
        /// current step; `epoch_loss` and `epoch_seconds` are the current
        /// epoch's so far.
        pub(in crate::run) fn checkpoint(
            &mut self,
            epoch_loss: f64,
            epoch_seconds: f64,
        ) -> Result<()> {
            if !self.writes {
                // Rank 0 writes it; every rank holds the same state.
                return Ok(());
            }
            let lengths = self.log.flush()?;
            let step = self.totals.step;
            let policy_state = match self.driver.policy() {
                Some(p) => p.save_state(step)?,
                None => Vec::new(),
            };
            let meta = CheckpointMeta {
                format: 0,
                step,
                epoch_loss_sum: epoch_loss,
                epoch_seconds,
                train_seconds: self.totals.train_seconds,
                best_top1: self.totals.best_top1,
                last_top1: self.totals.last_top1,
                freeze: self.driver.state().clone(),
                timeline: self.driver.timeline().clone(),
                policy_state: checkpoint::to_hex(&policy_state),
                weights: String::new(),
                metrics_len: lengths.metrics,
                events_len: lengths.events,
                tensorboard_len: lengths.tensorboard,
                observations_len: lengths.observations,
                world_size: self.totals.world_size,
                allreduce_bytes: self.totals.allreduce_bytes,
                comm_seconds: self.totals.comm_seconds,
                epoch_allreduce_bytes: self.epoch_comm.bytes,
                epoch_comm_seconds: self.epoch_comm.seconds,
                last_allreduce_bytes: self.last_allreduce,
                observer: None,
            };
            let mut meta = meta;
            let mut tensors = self.engine.state_tensors();
            if let Some(o) = &self.observer {
                let (m, t) = o.state();
                meta.observer = Some(m);
                tensors.extend(t);
            }
            self.writer.submit(&self.dir.path, meta, tensors)
        }

        /// Continues from a checkpoint: tensors, policy state, freeze state,
        /// timeline and the run's accumulators.
        pub(in crate::run) fn restore(&mut self, m: CheckpointMeta) -> Result<()> {
            let (path, tensors) = checkpoint::read_tensors(&self.dir.path, &m)?;
            let (observed, tensors): (Vec<_>, Vec<_>) = tensors
                .into_iter()
                .partition(|(n, _)| n.starts_with(observer::CHECKPOINT_PREFIX));
            self.engine.load_state_tensors(&path, tensors)?;
            if let (Some(o), Some(meta)) = (&mut self.observer, &m.observer) {
                o.restore(meta, observed)?;
            }
            let state = checkpoint::from_hex(&m.policy_state)?;
            if let Some(p) = self.driver.policy_mut() {
                p.load_state(m.step, &state)?;
            }
            self.driver.restore_state(m.freeze);
            self.driver.restore_timeline(m.timeline);
            self.totals = Totals {
                step: m.step,
                last_top1: m.last_top1,
                best_top1: m.best_top1,
                train_seconds: m.train_seconds,
                allreduce_bytes: m.allreduce_bytes,
                comm_seconds: m.comm_seconds,
                ..self.totals.clone()
            };
            self.epoch_comm = Comm {
                bytes: m.epoch_allreduce_bytes,
                seconds: m.epoch_comm_seconds,
                params: 0,
            };
            self.last_allreduce = m.last_allreduce_bytes;
            self.epoch_loss = m.epoch_loss_sum;
            self.carried_seconds = m.epoch_seconds;
            self.progress.println(&format!(
                "resuming {} at step {}/{}",
                self.dir.path.display(),
                m.step,
                self.total
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = vec![0u8, 1, 127, 200, 255];
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    fn meta(step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format: 0,
            step,
            epoch_loss_sum: 0.0,
            epoch_seconds: 0.0,
            train_seconds: 0.0,
            best_top1: None,
            last_top1: None,
            freeze: FreezeState::new(3),
            timeline: Timeline::default(),
            policy_state: String::new(),
            weights: String::new(),
            metrics_len: 0,
            events_len: 0,
            tensorboard_len: None,
            observations_len: None,
            world_size: 1,
            allreduce_bytes: 0,
            comm_seconds: 0.0,
            epoch_allreduce_bytes: 0,
            epoch_comm_seconds: 0.0,
            last_allreduce_bytes: None,
            observer: None,
        }
    }

    /// The writer keeps the values of the moment it was handed them (the
    /// loop goes on changing the tensors in place), commits checkpoints in
    /// order, keeps only the last one's tensors, and a write that fails is
    /// reported by the next call, naming the file.
    #[test]
    fn the_background_writer_snapshots_commits_in_order_and_reports_failures() {
        let d = tempfile::tempdir().unwrap();
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut writer = Writer::default();
        writer
            .submit(d.path(), meta(3), vec![("w".into(), w.shallow_clone())])
            .unwrap();
        let _ = w.shallow_clone().fill_(7.0);
        writer
            .submit(d.path(), meta(6), vec![("w".into(), w.shallow_clone())])
            .unwrap();
        let _ = w.shallow_clone().fill_(9.0);
        writer.wait().unwrap();
        let m = load_meta(d.path()).unwrap().expect("a checkpoint");
        assert_eq!(m.step, 6);
        let (_, t) = read_tensors(d.path(), &m).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t[0].1).unwrap(), [7.0, 7.0, 7.0]);
        let tensors: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .collect();
        assert_eq!(
            tensors.len(),
            1,
            "the older checkpoint's tensors are removed"
        );

        let gone = d.path().join("missing");
        writer
            .submit(&gone, meta(9), vec![("w".into(), w.shallow_clone())])
            .unwrap();
        let e = writer.wait().unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
        // The committed checkpoint is untouched.
        assert_eq!(load_meta(d.path()).unwrap().unwrap().step, 6);
    }
}
