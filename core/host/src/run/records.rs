//! The records a run directory holds, one type each: the same serde type
//! writes a record and reads it back (`compare` reads events, `resume`
//! reads the policy identity), so nothing is re-parsed as untyped JSON.
//!
//! - `policy.json` holds a [`PolicyIdentity`];
//! - `summary.json` holds a [`Summary`];
//! - each line of `events.jsonl` is an [`Event`];
//! - each line of `metrics.csv` is a [`MetricsRow`].
//!
//! One convention for step numbers, in every record (docs/architecture.md,
//! "Records"): steps are numbered from 0, and a record names the step it
//! is true of. A freeze or probe change names the first step that ran
//! with it (the policy decided it after the step before, which the event
//! also gives as `decided_at`), so an event's `step` equals the summary's
//! `freeze_step` and TensorBoard's `freeze/frontier` changes at that step;
//! a policy scalar names the step whose observation it was computed from;
//! a metrics row's `frozen_blocks` is the frontier its epoch's last step
//! ran with, and the epoch's TensorBoard scalars are written at that step.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use simfreeze_runtime::driver::{StepOutcome, Timeline};
use simfreeze_runtime::loader::PolicyHandle;

pub use crate::error::Status;

/// Identity of the policy of a run (`policy.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyIdentity {
    /// Name (`none` for full fine-tuning).
    pub name: String,
    /// Version.
    pub version: String,
    /// Library path.
    pub path: Option<PathBuf>,
    /// SHA-256 of the library file.
    pub sha256: Option<String>,
    /// RON options.
    pub options: String,
}

impl PolicyIdentity {
    /// The identity of `p` (`none` without a policy); hashes its library.
    pub fn of(p: Option<&PolicyHandle>) -> Result<Self> {
        let Some(p) = p else {
            return Ok(PolicyIdentity {
                name: "none".into(),
                version: String::new(),
                path: None,
                sha256: None,
                options: String::new(),
            });
        };
        let bytes = fs::read(&p.path).with_context(|| format!("reading {}", p.path.display()))?;
        let digest = Sha256::digest(&bytes);
        Ok(PolicyIdentity {
            name: p.meta.name.clone(),
            version: p.meta.version.clone(),
            path: Some(p.path.clone()),
            sha256: Some(digest.iter().map(|b| format!("{b:02x}")).collect()),
            options: p.options.clone(),
        })
    }
}

/// Where a run stands: what a checkpoint carries besides tensors and
/// policy state, and what the summary reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Steps completed.
    pub step: u64,
    /// Top-1 (%) of the last completed epoch.
    pub last_top1: Option<f64>,
    /// Best top-1 (%) over completed epochs.
    pub best_top1: Option<f64>,
    /// Training seconds of completed epochs, evaluation excluded.
    pub train_seconds: f64,
    /// Ranks (1 in one process).
    pub world_size: usize,
    /// Images per step over all ranks (`train.batch` times the ranks).
    pub global_batch: i64,
    /// Bytes of gradients all-reduced so far (data-parallel runs).
    pub allreduce_bytes: u64,
    /// Seconds spent in collectives so far.
    pub comm_seconds: f64,
    /// The main thread's time this process: the steps it ran, their
    /// seconds outside the engine's step (batch assembly and upload,
    /// policy, records) and the host reads made inside the step (not
    /// checkpointed: a resumed run reports the steps it ran itself).
    pub host: HostTime,
}

/// The main thread's time outside the engine's step, and the engine's
/// host reads (`engine::reads`), over the steps this process ran.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostTime {
    /// Steps timed.
    pub steps: u64,
    /// Seconds of the main thread outside `Engine::step`.
    pub outside_seconds: f64,
    /// Host reads inside `Engine::step`.
    pub reads: u64,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How the run ended.
    pub status: Status,
    /// Why it stopped early, if it did.
    pub reason: Option<String>,
    /// Top-1 (%) after the last completed epoch.
    pub final_top1: Option<f64>,
    /// Best top-1 (%) over completed epochs.
    pub best_top1: Option<f64>,
    /// Training wall seconds, evaluation excluded.
    pub train_seconds: f64,
    /// The device the run trained on (`cpu`, `cuda:N`), as resolved from
    /// `train.device`.
    #[serde(default)]
    pub device: String,
    /// Optimizer steps.
    pub steps: u64,
    /// Compute-model cost (units).
    pub compute_cost: f64,
    /// Compute-model cost of full fine-tuning.
    pub full_compute_cost: f64,
    /// `full_compute_cost / (compute_cost + observe_cost)`: what freezing
    /// saves, less what observing for the policy costs.
    pub compute_speedup: f64,
    /// Compute-model units spent observing for the policy (contract 2's
    /// on-demand observations; 0 in summaries written before they were
    /// charged).
    #[serde(default)]
    pub observe_cost: f64,
    /// `full_compute_cost / compute_cost`: training alone (absent in
    /// summaries written before observation was charged, where it equals
    /// `compute_speedup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_compute_speedup: Option<f64>,
    /// Per block: the first step that ran with it frozen (the `step` of
    /// its `freeze` event), or null. A block frozen by the decision after
    /// the last step has `steps`, a step that never ran.
    pub freeze_step: Vec<Option<u64>>,
    /// Steps with a probe.
    pub probe_steps: u64,
    /// Policy identity.
    pub policy: PolicyIdentity,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Ranks that trained (1: one process; more under torchrun).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Images per optimizer step over all ranks.
    #[serde(default)]
    pub global_batch: i64,
    /// Bytes of gradients all-reduced (data-parallel runs; frozen blocks
    /// are not communicated).
    #[serde(default)]
    pub allreduce_bytes: u64,
    /// Seconds spent in collectives.
    #[serde(default)]
    pub comm_seconds: f64,
    /// Data-parallel runs that completed: a digest of each rank's final
    /// weights, in rank order (all equal when the ranks stayed in step).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weight_digests: Vec<String>,
    /// Seconds per step the main thread spent outside the engine's step
    /// (fetching and uploading the batch, the policy, the records), over
    /// the steps this process ran (after a resume, those since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_seconds_per_step: Option<f64>,
    /// Host reads per step inside the engine's step (the loss, and the
    /// gradient norms when the policy asks for them), over the same steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_reads_per_step: Option<f64>,
    /// Where and from what the run was made (absent in summaries written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// What a result depends on beyond its configuration: the checkpoint it
/// started from, the machine, libtorch and the code. Two tables are
/// comparable only where these agree (or the difference is stated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// SHA-256 of the weights file the run started from (`model.weights`),
    /// none for a model initialised from scratch.
    pub weights_sha256: Option<String>,
    /// The CPU model (`/proc/cpuinfo`'s `model name`).
    pub cpu: String,
    /// libtorch's intra-op threads during the run.
    pub threads: i64,
    /// The device trained on (`cpu`, `cuda:0`), with the GPU's name on CUDA.
    pub device: String,
    /// libtorch's version, as compiled into the program.
    pub libtorch: String,
    /// The code revision (`git describe --always --dirty` of the source
    /// tree the program was run from, `SIMFREEZE_REVISION` when set, or
    /// `unknown`).
    pub revision: String,
}

fn one() -> usize {
    1
}

impl Summary {
    /// The summary of a run in `run_dir` on `device` that ended with
    /// `status` (and `reason` when it stopped early) after `totals`, with
    /// the freeze timeline `t`.
    pub fn new(
        (status, reason): (Status, Option<String>),
        totals: &Totals,
        t: &Timeline,
        policy: PolicyIdentity,
        (run_dir, device): (PathBuf, String),
    ) -> Self {
        Summary {
            status,
            reason,
            final_top1: totals.last_top1,
            best_top1: totals.best_top1,
            train_seconds: totals.train_seconds,
            device,
            steps: totals.step,
            compute_cost: t.cost,
            full_compute_cost: t.full_cost,
            compute_speedup: t.compute_speedup(),
            observe_cost: t.observe_cost,
            train_compute_speedup: Some(t.train_compute_speedup()),
            freeze_step: t.freeze_step.clone(),
            probe_steps: t.probe_steps,
            policy,
            run_dir,
            world_size: totals.world_size.max(1),
            global_batch: totals.global_batch,
            allreduce_bytes: totals.allreduce_bytes,
            comm_seconds: totals.comm_seconds,
            weight_digests: Vec::new(),
            host_seconds_per_step: (totals.host.steps > 0)
                .then(|| totals.host.outside_seconds / totals.host.steps as f64),
            host_reads_per_step: (totals.host.steps > 0)
                .then(|| totals.host.reads as f64 / totals.host.steps as f64),
            provenance: None,
        }
    }
}

/// One line of `events.jsonl`. Lines come in step order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The step this line is true of: for a `freeze` or a `probe` change,
    /// the first step that ran with it (decided after step `decided_at`,
    /// the step before); for a `scalar`, the step whose observation the
    /// policy computed it from; for an `allreduce`, the first step that
    /// all-reduced that many bytes.
    pub step: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What an [`Event`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// Blocks committed frozen, from the event's step on.
    Freeze {
        /// The blocks, in order.
        blocks: Vec<u32>,
        /// The step after which the policy decided it (the event's step
        /// minus one; absent in files written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decided_at: Option<u64>,
    },
    /// The probe changed, from the event's step on.
    Probe {
        /// Probed block before (or none).
        from: Option<u32>,
        /// Probed block after (or none).
        to: Option<u32>,
        /// The step after which the policy decided it (as for `Freeze`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decided_at: Option<u64>,
    },
    /// A scalar the policy logged.
    Scalar {
        /// Its name (ATSF: `eta.<block>`).
        name: String,
        /// Its value; JSON has no NaN, so a non-finite value is written as
        /// `null` and read back as NaN.
        #[serde(deserialize_with = "null_as_nan")]
        value: f64,
    },
    /// A data-parallel run's gradient all-reduce changed size (its first
    /// step, and after each freeze): bytes and parameters per step.
    Allreduce {
        /// Bytes all-reduced per step from now on.
        bytes: u64,
        /// Trainable parameters communicated.
        params: u64,
    },
}

fn null_as_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Event {
    /// The events of the decision the policy took after `step` ran: its
    /// scalars (at `step`, whose observation they measure), then the
    /// freezes and the probe change (at `step + 1`, the first step that
    /// runs with them), so lines stay in step order.
    pub fn of_step(step: u64, o: &StepOutcome) -> Vec<Event> {
        let mut out: Vec<Event> = o
            .scalars
            .iter()
            .map(|(name, value)| Event {
                step,
                kind: EventKind::Scalar {
                    name: name.clone(),
                    value: *value,
                },
            })
            .collect();
        let decided_at = Some(step);
        if !o.change.committed.is_empty() {
            let blocks = o.change.committed.clone().collect();
            let kind = EventKind::Freeze { blocks, decided_at };
            out.push(Event {
                step: step + 1,
                kind,
            });
        }
        if let Some((from, to)) = o.change.probe {
            let kind = EventKind::Probe {
                from,
                to,
                decided_at,
            };
            out.push(Event {
                step: step + 1,
                kind,
            });
        }
        out
    }

    /// Every event of an `events.jsonl` text.
    pub fn parse_all(text: &str) -> Result<Vec<Event>> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("events line {}", i + 1)))
            .collect()
    }
}

/// One line of `metrics.csv`, written at every epoch end.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// The epoch (0-based).
    pub epoch: u64,
    /// Mean training loss over its steps.
    pub train_loss: f64,
    /// Mean evaluation loss and top-1 (%); `None` in an epoch that was not
    /// evaluated (`train.eval_last`), an empty cell in the CSV.
    pub eval: Option<(f64, f64)>,
    /// Learning rate of its last step.
    pub lr: f64,
    /// Blocks committed frozen while its last step ran (the frontier that
    /// step ran with, TensorBoard's `freeze/frontier` at that step; a
    /// freeze decided after it shows in the next row).
    pub frozen_blocks: u32,
    /// Bytes of gradients all-reduced over the epoch (0 in one process).
    pub allreduce_bytes: u64,
    /// Seconds spent in collectives over the epoch.
    pub comm_seconds: f64,
    /// Its training seconds, evaluation excluded.
    pub epoch_seconds: f64,
}

impl MetricsRow {
    /// The CSV header.
    pub const HEADER: &'static str =
        "epoch,train_loss,eval_loss,eval_top1,lr,frozen_blocks,allreduce_bytes,comm_seconds,epoch_seconds";

    /// Blocks committed frozen while `step` ran, from the timeline's
    /// `freeze_step` (first step run frozen, per block).
    pub fn frozen_during(freeze_step: &[Option<u64>], step: u64) -> u32 {
        freeze_step
            .iter()
            .filter(|f| f.is_some_and(|f| f <= step))
            .count() as u32
    }

    /// The CSV line (no newline).
    pub fn csv(&self) -> String {
        let (eval_loss, eval_top1) = match self.eval {
            Some((loss, top1)) => (format!("{loss:.6}"), format!("{top1:.4}")),
            None => (String::new(), String::new()),
        };
        format!(
            "{},{:.6},{},{},{:.6e},{},{},{:.3},{:.3}",
            self.epoch,
            self.train_loss,
            eval_loss,
            eval_top1,
            self.lr,
            self.frozen_blocks,
            self.allreduce_bytes,
            self.comm_seconds,
            self.epoch_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_serde_with_nan_scalars() {
        let events = vec![
            Event {
                step: 3,
                kind: EventKind::Freeze {
                    blocks: vec![0, 1],
                    decided_at: Some(2),
                },
            },
            Event {
                step: 4,
                kind: EventKind::Probe {
                    from: None,
                    to: Some(2),
                    decided_at: Some(3),
                },
            },
            Event {
                step: 5,
                kind: EventKind::Scalar {
                    name: "eta.2".into(),
                    value: 0.25,
                },
            },
        ];
        let text: String = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        assert!(text.contains(r#""event":"freeze""#), "{text}");
        assert_eq!(Event::parse_all(&text).unwrap(), events);
        let nan = Event {
            step: 6,
            kind: EventKind::Scalar {
                name: "x".into(),
                value: f64::NAN,
            },
        };
        let line = serde_json::to_string(&nan).unwrap();
        assert!(line.contains(r#""value":null"#), "{line}");
        match &Event::parse_all(&line).unwrap()[0].kind {
            EventKind::Scalar { value, .. } => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_decision_is_logged_at_the_first_step_that_ran_with_it() {
        use simfreeze_runtime::contract::Change;
        // The policy, after step 14, logs a scalar, commits blocks 1 and 2
        // and probes block 3.
        let outcome = StepOutcome {
            change: Change {
                committed: 1..3,
                probe: Some((None, Some(3))),
                ..Change::default()
            },
            scalars: vec![("plasticity".into(), 0.5)],
        };
        let events = Event::of_step(14, &outcome);
        let steps: Vec<u64> = events.iter().map(|e| e.step).collect();
        assert_eq!(steps, [14, 15, 15], "scalar at 14, then the changes at 15");
        assert!(matches!(events[0].kind, EventKind::Scalar { .. }));
        assert_eq!(
            events[1].kind,
            EventKind::Freeze {
                blocks: vec![1, 2],
                decided_at: Some(14),
            }
        );
        let line = serde_json::to_string(&events[1]).unwrap();
        assert_eq!(
            line,
            r#"{"step":15,"event":"freeze","blocks":[1,2],"decided_at":14}"#
        );
        // A line written before `decided_at` was recorded still reads.
        let old = Event::parse_all(r#"{"step":4,"event":"freeze","blocks":[0]}"#).unwrap();
        assert_eq!(
            old[0].kind,
            EventKind::Freeze {
                blocks: vec![0],
                decided_at: None,
            }
        );
    }

    #[test]
    fn frozen_blocks_count_the_frontier_a_step_ran_with() {
        // Block 0 frozen from step 0, block 1 from step 8, block 2 decided
        // after the last step (16 steps) and never run frozen.
        let freeze_step = [Some(0), Some(8), Some(16), None];
        assert_eq!(MetricsRow::frozen_during(&freeze_step, 7), 1);
        assert_eq!(MetricsRow::frozen_during(&freeze_step, 8), 2);
        assert_eq!(MetricsRow::frozen_during(&freeze_step, 15), 2);
        assert_eq!(MetricsRow::frozen_during(&[None, None], 15), 0);
    }

    #[test]
    fn metrics_rows_keep_their_csv_format() {
        let row = MetricsRow {
            epoch: 1,
            train_loss: 0.5,
            eval: Some((0.25, 93.5)),
            lr: 0.01,
            frozen_blocks: 3,
            allreduce_bytes: 4096,
            comm_seconds: 0.25,
            epoch_seconds: 12.0,
        };
        assert_eq!(
            row.csv(),
            "1,0.500000,0.250000,93.5000,1.000000e-2,3,4096,0.250,12.000"
        );
        assert_eq!(MetricsRow::HEADER.split(',').count(), 9);
        let skipped = MetricsRow { eval: None, ..row };
        assert_eq!(
            skipped.csv(),
            "1,0.500000,,,1.000000e-2,3,4096,0.250,12.000"
        );
    }
}
