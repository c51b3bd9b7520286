//! Owned buffers behind an [`ObservationV2`]: what a host (the trainer, the
//! simulator, the conformance suite) fills for the on-demand observations
//! of contract 2, and the synthetic values `simfreeze simulate` and
//! `simfreeze check` hand policies.
//!
//! Invariant: a buffer is filled only when its bit is in `provided`, with
//! the shapes [`ObservationV2`] documents (`blocks × rows × dim` tokens,
//! `blocks × rows × rows` Gram matrices, `layers × samples` weights, one
//! accumulated norm per block).

use abi_stable::std_types::{ROption, RSlice};
use serde::{Deserialize, Serialize};
use simfreeze_abi::ffi::{BlockObservations, Needs, ObservationV2};

use crate::rng::Rng;

/// Per-block reductions of one set of samples, owned (and, in a run's
/// `observations.jsonl`, recorded: floats as the hex of their bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlocksData {
    /// First block observed.
    pub first: usize,
    /// Blocks observed.
    pub blocks: usize,
    /// Samples.
    pub rows: usize,
    /// Token width.
    pub dim: usize,
    /// `blocks × rows × dim`, or empty.
    #[serde(with = "hex_f32")]
    pub tokens: Vec<f32>,
    /// `blocks × rows × rows`, or empty.
    #[serde(with = "hex_f32")]
    pub grams: Vec<f32>,
}

impl BlocksData {
    /// An owned copy of what `b` points to.
    pub fn of(b: &BlockObservations<'_>) -> Self {
        BlocksData {
            first: b.first as usize,
            blocks: b.blocks as usize,
            rows: b.rows as usize,
            dim: b.dim as usize,
            tokens: b.tokens.to_vec(),
            grams: b.grams.to_vec(),
        }
    }

    /// The stable view.
    pub fn view(&self) -> BlockObservations<'_> {
        BlockObservations {
            first: self.first as u32,
            blocks: self.blocks as u32,
            rows: self.rows as u32,
            dim: self.dim as u32,
            tokens: RSlice::from_slice(&self.tokens),
            grams: RSlice::from_slice(&self.grams),
        }
    }
}

/// Everything an [`ObservationV2`] points to, owned. Recorded in a run's
/// `observations.jsonl` under `more` (`train.record_on_demand`); `provided`
/// is not part of it (the record names it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoreData {
    /// What was computed.
    #[serde(skip)]
    pub provided: Needs,
    /// The batch through the model.
    pub batch: BlocksData,
    /// The batch through the reference.
    pub batch_reference: BlocksData,
    /// The fixed batch through the model (`fixed` in a record; `probe`,
    /// its first name, is read too).
    #[serde(rename = "fixed", alias = "probe")]
    pub probe: BlocksData,
    /// The fixed batch through the reference.
    #[serde(rename = "fixed_reference", alias = "probe_reference")]
    pub probe_reference: BlocksData,
    /// When the reference was taken.
    pub reference_step: Option<u64>,
    /// `layers × samples_per_block`.
    #[serde(with = "hex_f32")]
    pub sampled_weights: Vec<f32>,
    /// Samples per block.
    pub samples_per_block: usize,
    /// L1 norms of the accumulated gradients.
    pub acc_grad_l1: Vec<f64>,
    /// L2 norms of the accumulated gradients.
    pub acc_grad_l2: Vec<f64>,
    /// Steps accumulated.
    pub acc_grad_steps: u64,
}

impl MoreData {
    /// An owned copy of what `v` points to.
    pub fn of(v: &ObservationV2<'_>) -> Self {
        MoreData {
            provided: v.provided,
            batch: BlocksData::of(&v.batch),
            batch_reference: BlocksData::of(&v.batch_reference),
            probe: BlocksData::of(&v.probe),
            probe_reference: BlocksData::of(&v.probe_reference),
            reference_step: v.reference_step.into_option(),
            sampled_weights: v.sampled_weights.to_vec(),
            samples_per_block: v.samples_per_block as usize,
            acc_grad_l1: v.acc_grad_l1.to_vec(),
            acc_grad_l2: v.acc_grad_l2.to_vec(),
            acc_grad_steps: v.acc_grad_steps,
        }
    }

    /// The stable view a policy receives.
    pub fn view(&self) -> ObservationV2<'_> {
        ObservationV2 {
            provided: self.provided,
            batch: self.batch.view(),
            batch_reference: self.batch_reference.view(),
            probe: self.probe.view(),
            probe_reference: self.probe_reference.view(),
            reference_step: ROption::from(self.reference_step),
            sampled_weights: RSlice::from_slice(&self.sampled_weights),
            samples_per_block: self.samples_per_block as u32,
            acc_grad_l1: RSlice::from_slice(&self.acc_grad_l1),
            acc_grad_l2: RSlice::from_slice(&self.acc_grad_l2),
            acc_grad_steps: self.acc_grad_steps,
            extra: RSlice::from_slice(&[]),
        }
    }
}

/// Block `block`'s `n` sampled-weight positions (`Needs::SAMPLED_WEIGHTS`),
/// sorted, among its `total` weights (its parameters sorted by name, each
/// flattened, one after the other), drawn from the run's `seed`: the same
/// every time in a run, and the same in every host (the trainer and the
/// Python controller draw them here).
pub fn sample_positions(total: usize, seed: u64, block: usize, n: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (0x5a3d_u64 << 16) ^ block as u64);
    let mut picks: Vec<usize> = (0..n).map(|_| rng.below(total.max(1))).collect();
    picks.sort_unstable();
    picks
}

/// The row-normalised Gram matrix `G = A Aᵀ`, each row divided by its L2
/// norm (a zero row stays zero) of `rows` samples of width `width`: what
/// [`Needs::BLOCK_GRAMS`] hands policies, computed on the host (the trainer
/// computes it on the device).
pub fn row_normalised_gram(a: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let mut g = vec![0f64; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            let (x, y) = (
                &a[i * width..(i + 1) * width],
                &a[j * width..(j + 1) * width],
            );
            g[i * rows + j] = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
        }
    }
    let mut out = vec![0f32; rows * rows];
    for i in 0..rows {
        let row = &g[i * rows..(i + 1) * rows];
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for j in 0..rows {
            out[i * rows + j] = if norm > 0.0 {
                (row[j] / norm) as f32
            } else {
                0.0
            };
        }
    }
    out
}

/// Synthetic per-block reductions for a simulated or hostile step: `tokens`
/// of block `i` are `base` (`rows × dim`) scaled by `1 + i / L` plus noise
/// of size `noise`; the Gram matrices follow from the tokens.
pub fn synthetic_blocks(
    asked: Needs,
    layers: usize,
    base: &[f32],
    (rows, dim): (usize, usize),
    noise: f64,
    rng: &mut Rng,
) -> BlocksData {
    let mut out = BlocksData {
        first: 0,
        blocks: layers,
        rows,
        dim,
        ..BlocksData::default()
    };
    let mut tokens = Vec::with_capacity(layers * rows * dim);
    for i in 0..layers {
        let scale = 1.0 + i as f32 / layers.max(1) as f32;
        for j in 0..rows * dim {
            let b = base.get(j).copied().unwrap_or(0.0);
            tokens.push(b * scale + (noise * rng.normal()) as f32);
        }
    }
    if asked.contains(Needs::BLOCK_GRAMS) {
        for i in 0..layers {
            let t = &tokens[i * rows * dim..(i + 1) * rows * dim];
            out.grams.extend(row_normalised_gram(t, rows, dim));
        }
    }
    if asked.contains(Needs::BLOCK_TOKENS) {
        out.tokens = tokens;
    }
    out
}

/// Replaces about one value in `1/every` of `v` by NaN, ±infinity or 0:
/// the hostile values of `simfreeze check`.
pub fn spoil(v: &mut [f32], every: usize, rng: &mut Rng) {
    for x in v.iter_mut() {
        if rng.below(every.max(1)) == 0 {
            *x = match rng.below(4) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                _ => 0.0,
            };
        }
    }
}

/// `Vec<f32>` as the hex of its little-endian bytes.
pub mod hex_f32 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes `v`.
    pub fn encode(v: &[f32]) -> String {
        let mut s = String::with_capacity(v.len() * 8);
        for x in v {
            for b in x.to_le_bytes() {
                s.push_str(&format!("{b:02x}"));
            }
        }
        s
    }

    /// Decodes what [`encode`] wrote.
    pub fn decode(s: &str) -> Result<Vec<f32>, String> {
        if s.len() % 8 != 0 || !s.is_ascii() {
            return Err(format!(
                "{} hex digits do not make whole f32 values",
                s.len()
            ));
        }
        s.as_bytes()
            .chunks_exact(8)
            .map(|c| {
                let mut bytes = [0u8; 4];
                for (i, b) in bytes.iter_mut().enumerate() {
                    let pair = std::str::from_utf8(&c[2 * i..2 * i + 2]).unwrap_or("");
                    *b = u8::from_str_radix(pair, 16)
                        .map_err(|_| format!("`{pair}` is not a hex byte"))?;
                }
                Ok(f32::from_le_bytes(bytes))
            })
            .collect()
    }

    /// Serde's side.
    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v))
    }

    /// Serde's side.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_rows_have_unit_norm_and_zero_rows_stay_zero() {
        let a = [1.0, 2.0, 0.0, 0.0, 3.0, -1.0];
        let g = row_normalised_gram(&a, 3, 2);
        for i in [0, 2] {
            let n: f32 = g[i * 3..i * 3 + 3].iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-6, "{n}");
        }
        assert_eq!(&g[3..6], &[0.0, 0.0, 0.0]);
        // G[0][2] = (1*3 + 2*-1) / |(5, 0, 1)| = 1 / sqrt(26).
        assert!((g[2] - 1.0 / 26f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn synthetic_blocks_fill_only_what_was_asked() {
        let mut rng = Rng::new(1);
        let base = [0.5; 6];
        let b = synthetic_blocks(Needs::BLOCK_GRAMS, 4, &base, (3, 2), 0.1, &mut rng);
        assert!(b.tokens.is_empty());
        assert_eq!(b.grams.len(), 4 * 9);
        let both = Needs::BLOCK_GRAMS | Needs::BLOCK_TOKENS;
        let b = synthetic_blocks(both, 4, &base, (3, 2), 0.1, &mut rng);
        assert_eq!(b.tokens.len(), 4 * 6);
    }
}
