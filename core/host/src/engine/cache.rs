//! The frozen-prefix activation cache (opt-in, `train.cache_frozen`).
//!
//! Once blocks `[0, k)` are committed frozen, their output for a given
//! training sample never changes again (the weights are bit-identical and
//! the sample's transform is deterministic), so it is computed once per
//! sample and reused in later epochs: the frozen prefix then costs nothing,
//! and the compute model's ceiling becomes `L / (L - k)` per step.
//!
//! Invariants: an entry is used only at the level (`k`) it was computed
//! for; when the frontier moves, a stale entry is advanced through the
//! newly frozen blocks on first use (never recomputed from the image).
//! The cache refuses to exist when the training transform is random (the
//! cached activation would freeze one random draw), and when it would not
//! fit under its cap: `train.cache_max_mib`, or by default (0) half of the
//! device's free memory when the cache is made.
//!
//! Under `Bf16` the entries are stored in bfloat16 (half the memory; the
//! blocks run in bfloat16 anyway) and served as float32, the residual
//! stream's type: the boundary is then rounded to bfloat16, the one way a
//! cached run differs from an uncached one. Under `F32` they are exact.

use tch::{Device, Kind, Tensor};

use crate::engine::single::upload;
use crate::error::UsageError;
use crate::model::precision::Precision;
use crate::model::PrefixModel;

/// Cached boundary activations, one slot per training sample.
pub struct PrefixCache {
    levels: Vec<u32>,
    store: Tensor,
    device: Device,
    /// Batch rows served from the cache.
    pub hits: u64,
    /// Batch rows computed (and stored).
    pub misses: u64,
    /// Of the misses, rows advanced from a lower cached level.
    pub advanced: u64,
}

const EMPTY: u32 = u32::MAX;

impl PrefixCache {
    /// A cache for `samples` samples of `tokens × dim` activations, stored
    /// in the precision the model runs in; refused when the transform is
    /// random or the size exceeds `cap_mib` (0: half of `device`'s free
    /// memory now).
    pub fn new(
        samples: i64,
        (tokens, dim): (i64, i64),
        precision: Precision,
        cap_mib: u64,
        random_transform: bool,
        device: Device,
    ) -> Result<Self, UsageError> {
        if random_transform {
            return Err(UsageError(
                "train.cache_frozen needs a deterministic training transform: with random \
                 augmentation a cached activation would replay one random draw forever; turn \
                 augmentation or the cache off"
                    .into(),
            ));
        }
        let (kind, width, name) = match precision {
            Precision::Bf16 => (Kind::BFloat16, 2, "bfloat16"),
            Precision::F32 => (Kind::Float, 4, "float32"),
        };
        let bytes = samples as u128 * tokens as u128 * dim as u128 * width;
        let mib = bytes.div_ceil(1 << 20);
        // Ranks of a data-parallel run on the CPU share the host's memory.
        let sharing = match device {
            Device::Cpu => std::env::var("LOCAL_WORLD_SIZE")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .max(1),
            _ => 1,
        };
        let (cap, whose) = match cap_mib {
            0 => match crate::memory::free_mib(device) {
                Some(free) if sharing > 1 => (
                    free / 2 / sharing,
                    format!("half the free memory of {device:?} ({free} MiB) over {sharing} ranks"),
                ),
                Some(free) => (
                    free / 2,
                    format!("half the free memory of {device:?} ({free} MiB)"),
                ),
                None => (
                    4096,
                    "the default of 4096 MiB (the free memory is unknown)".into(),
                ),
            },
            n => (n, format!("train.cache_max_mib = {n}")),
        };
        if mib > u128::from(cap) {
            return Err(UsageError(format!(
                "the activation cache needs {mib} MiB ({samples} samples x {tokens} tokens x {dim} \
                 {name} values), over its cap, {whose}; set train.cache_max_mib higher, use fewer \
                 samples, or set train.cache_frozen = false"
            )));
        }
        Ok(PrefixCache {
            levels: vec![EMPTY; samples as usize],
            store: Tensor::zeros([samples, tokens, dim], (kind, device)),
            device,
            hits: 0,
            misses: 0,
            advanced: 0,
        })
    }

    /// The output of blocks `[0, level)` for the samples `idx` (CPU i64)
    /// of `images` (all training images), `[B, N+1, D]` on the device.
    /// Entries cached at a lower level are advanced through the blocks in
    /// between (cheaper than recomputing from the image); missing ones are
    /// computed from the image.
    pub fn boundary(
        &mut self,
        model: &dyn PrefixModel,
        images: &Tensor,
        idx: &Tensor,
        level: usize,
    ) -> Tensor {
        let rows: Vec<i64> = Vec::try_from(idx).unwrap_or_default();
        let level32 = level as u32;
        let mut stale: std::collections::BTreeMap<u32, Vec<i64>> = Default::default();
        for &i in &rows {
            let l = self.levels[i as usize];
            if l != level32 {
                stale.entry(l).or_default().push(i);
            }
        }
        let missing: usize = stale.values().map(Vec::len).sum();
        self.misses += missing as u64;
        self.hits += (rows.len() - missing) as u64;
        for (from, ids) in stale {
            let rows = Tensor::from_slice(&ids);
            let at = upload(&rows, self.device);
            let h = if from == EMPTY || from > level32 {
                // The rows are selected where the images are and go up
                // without blocking (no copy of `at` back to the host).
                let x = images.index_select(0, &upload(&rows, images.device()));
                model.frozen_prefix(&upload(&x, self.device), level)
            } else {
                self.advanced += ids.len() as u64;
                let h = self.store.index_select(0, &at).to_kind(Kind::Float);
                model.advance(&h, from as usize, level)
            };
            let _ = self
                .store
                .index_copy_(0, &at, &h.to_kind(self.store.kind()));
            for i in ids {
                self.levels[i as usize] = level32;
            }
        }
        self.store
            .index_select(0, &upload(idx, self.device))
            .to_kind(Kind::Float)
    }

    /// Share of rows served from the cache so far.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Vit, VitConfig};
    use tch::nn;

    fn tiny() -> VitConfig {
        crate::model::test_config(4)
    }

    #[test]
    fn serves_what_the_prefix_computes_and_recomputes_when_the_level_moves() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &tiny());
        let images = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        let mut c = PrefixCache::new(6, (5, 12), Precision::F32, 10, false, Device::Cpu).unwrap();
        let idx = Tensor::from_slice(&[4i64, 1]);
        let first = c.boundary(&m, &images, &idx, 1);
        assert_eq!((c.hits, c.misses), (0, 2));
        let again = c.boundary(&m, &images, &idx, 1);
        assert_eq!((c.hits, c.misses), (2, 2));
        assert!(first.equal(&again));
        let direct = m.frozen_prefix(&images.index_select(0, &idx), 1);
        assert!(first.allclose(&direct, 1e-6, 1e-6, false));
        let deeper = c.boundary(&m, &images, &idx, 2);
        assert_eq!(c.misses, 4);
        assert_eq!(c.advanced, 2, "level-1 entries advance through block 1");
        let direct = m.frozen_prefix(&images.index_select(0, &idx), 2);
        assert!(deeper.allclose(&direct, 1e-6, 1e-6, false));
    }

    #[test]
    fn refuses_random_transforms_and_oversized_caches() {
        let e = PrefixCache::new(10, (5, 12), Precision::F32, 10, true, Device::Cpu)
            .err()
            .unwrap();
        assert!(e.0.contains("deterministic"), "{}", e.0);
        let big = (1_000_000, (197, 768));
        let e = PrefixCache::new(big.0, big.1, Precision::F32, 1024, false, Device::Cpu)
            .err()
            .unwrap();
        assert!(
            e.0.contains("MiB") && e.0.contains("cache_max_mib = 1024"),
            "{}",
            e.0
        );
        // 563 GiB is over half of any development machine's free memory.
        let e = PrefixCache::new(big.0, big.1, Precision::F32, 0, false, Device::Cpu)
            .err()
            .unwrap();
        assert!(
            e.0.contains("577149 MiB") && e.0.contains("half the free memory"),
            "{}",
            e.0
        );
        // The same in bfloat16 is half the size.
        let e = PrefixCache::new(big.0, big.1, Precision::Bf16, 0, false, Device::Cpu)
            .err()
            .unwrap();
        assert!(
            e.0.contains("288575 MiB") && e.0.contains("bfloat16"),
            "{}",
            e.0
        );
    }

    /// Under Bf16 the cache stores bfloat16 and serves float32: the
    /// boundary rounded to bfloat16, nothing else.
    #[test]
    fn bf16_entries_are_the_prefix_rounded_to_bfloat16() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &tiny());
        let images = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        let mut c = PrefixCache::new(6, (5, 12), Precision::Bf16, 10, false, Device::Cpu).unwrap();
        assert_eq!(c.store.kind(), Kind::BFloat16);
        let idx = Tensor::from_slice(&[0i64, 5, 3]);
        let got = c.boundary(&m, &images, &idx, 2);
        assert_eq!(got.kind(), Kind::Float);
        let direct = m.frozen_prefix(&images.index_select(0, &idx), 2);
        let rounded = direct.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert!(got.equal(&rounded));
        assert!(
            !got.equal(&direct),
            "float32 values survive bfloat16 rounding"
        );
    }
}
