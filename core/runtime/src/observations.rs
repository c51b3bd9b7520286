//! The observation stream of a run as its policy received it, step by step,
//! with the freeze state each decision set: what a run writes to
//! `observations.jsonl` when `train.record_observations` is on, and what a
//! replay feeds a policy again (the Python package checks its decisions
//! against a run's this way).
//!
//! One JSON line per step ([`ObservationRecord`]). Invariant: a record holds
//! exactly what [`PolicyDriver::after_step`](crate::driver::PolicyDriver::after_step)
//! handed the policy (features, labels and gradient norms only when the
//! policy's `needs()` asked for them), so replaying the records through a
//! fresh driver for the same policy reproduces every `after` state, bit for
//! bit. Batch floats are little-endian `f32` bytes in hex (exact, and
//! shorter than decimals); the loss is the `f32` widened to `f64`, which
//! JSON carries exactly.

use serde::{Deserialize, Serialize};

use crate::contract::FreezeState;
use crate::more::MoreData;

/// One step of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservationRecord {
    /// Step index, from 0.
    pub step: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// Steps in the run.
    pub total_steps: u64,
    /// The batch loss (an `f32`, widened).
    pub loss: f64,
    /// Batch size.
    pub batch: usize,
    /// Feature width (0 when features were not handed over).
    pub feature_dim: usize,
    /// `batch × feature_dim` features, or empty.
    #[serde(with = "hex_f32")]
    pub features: Vec<f32>,
    /// Labels, or empty.
    pub labels: Vec<i64>,
    /// Number of classes (0 when labels were not handed over).
    pub num_classes: usize,
    /// Gradient norm per block, or empty.
    #[serde(with = "hex_f32")]
    pub grad_norms: Vec<f32>,
    /// The step's base learning rate, when the host has one.
    pub lr: Option<f64>,
    /// The on-demand observations (contract 2) the step carried, by name.
    #[serde(default)]
    pub provided: Vec<String>,
    /// Their values, when the run records them (`train.record_on_demand`:
    /// they are large); without them a replay of a step that carried any
    /// cannot be exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more: Option<MoreData>,
    /// The freeze state the policy's decision set for the next step.
    pub after: FreezeState,
}

/// The hex encoding of batch floats (it lives with the on-demand buffers,
/// which records hold too).
pub use crate::more::hex_f32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_every_bit_pattern_class() {
        let v = [
            0.0f32,
            -0.0,
            0.1,
            f32::MIN_POSITIVE,
            f32::MAX,
            -1.5e-42,
            f32::INFINITY,
        ];
        let back = hex_f32::decode(&hex_f32::encode(&v)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&v));
        assert_eq!(hex_f32::encode(&[1.0]), "0000803f");
    }

    #[test]
    fn on_demand_values_round_trip_and_the_fixed_batch_reads_under_its_first_name() {
        let mut more = MoreData {
            reference_step: Some(3),
            sampled_weights: vec![0.5, -1.25],
            samples_per_block: 1,
            acc_grad_l1: vec![1.0, 2.0],
            acc_grad_l2: vec![0.5, 0.25],
            acc_grad_steps: 4,
            ..MoreData::default()
        };
        more.probe.blocks = 2;
        more.probe.rows = 1;
        more.probe.dim = 1;
        more.probe.tokens = vec![0.1, 0.2];
        let json = serde_json::to_string(&more).unwrap();
        assert!(
            json.contains("\"fixed\":") && !json.contains("\"probe\":"),
            "{json}"
        );
        let back: MoreData = serde_json::from_str(&json).unwrap();
        assert_eq!(back, more);
        // A record written before the rename.
        let old = json.replace("\"fixed\":", "\"probe\":");
        let back: MoreData = serde_json::from_str(&old).unwrap();
        assert_eq!(back.probe.tokens, [0.1, 0.2]);
    }

    #[test]
    fn hex_refuses_broken_input() {
        assert!(hex_f32::decode("0000803")
            .unwrap_err()
            .contains("whole f32"));
        assert!(hex_f32::decode("zz00803f").unwrap_err().contains("`zz`"));
    }
}
