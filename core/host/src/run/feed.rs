//! What the loop reads its batches from, and how a batch reaches the
//! engine's device.
//!
//! - A dataset held in memory is kept on the GPU when it fits
//!   ([`Data::keep_on_device`]): a step then selects its rows there and
//!   uploads nothing but its indices. On the CPU the dataset is where it
//!   always was.
//! - Otherwise (an augmented image folder, or a dataset too large for the
//!   GPU) a [`Prefetch`] thread assembles the batches ahead (as bytes when
//!   the dataset was decoded from bytes), and the loop
//!   queues the next batch's upload for the step's first host read, so that
//!   on a GPU it runs on a side stream behind the step.
//! - With the activation cache, a step whose prefix is committed reads the
//!   cached rows instead of the images.

use std::sync::Arc;

use anyhow::Result;
use tch::{Device, Tensor};

use crate::data::augment::Augmenter;
use crate::data::images::Normaliser;
use crate::data::prefetch::{Prefetch, Source};
use crate::data::Dataset;
use crate::engine::cache::PrefixCache;
use crate::engine::single::upload;
use crate::engine::{Batch, Engine};
use crate::error::{torch_guard, TorchError};
use crate::run::faults::Faults;

/// What the loop reads its batches from.
pub(super) struct Data {
    pub train: Dataset,
    pub eval: Dataset,
    /// The faults the tests inject ([`Faults`]).
    pub faults: Faults,
    pub augment: Option<Arc<Augmenter>>,
    pub cache: Option<PrefixCache>,
    /// The training images kept on the GPU as their bytes, normalised
    /// there per batch ([`Data::keep_on_device`]).
    pub resident_bytes: Option<(Tensor, Normaliser)>,
}

impl Data {
    /// The data of rank `rank`'s run, with the test hooks the environment
    /// sets.
    pub fn new(
        (train, eval): (Dataset, Dataset),
        augment: Option<Augmenter>,
        cache: Option<PrefixCache>,
        rank: usize,
    ) -> Data {
        Data {
            train,
            eval,
            augment: augment.map(Arc::new),
            faults: Faults::from_env(rank),
            cache,
            resident_bytes: None,
        }
    }

    /// Moves the in-memory training images (unless `training` is false:
    /// with the activation cache, which takes its share of the memory
    /// after this and serves most steps), then the evaluation images, to
    /// GPU `device` when they fit in what is left of a quarter of its free
    /// memory (`free_mib`); the labels stay in host memory (the policy
    /// reads them there; a step uploads its few). Training images decoded
    /// from bytes go as those (a quarter of float32's), normalised per
    /// batch on the device to the same float32 values; the evaluation set
    /// goes as float32. The numbers do not change. What was moved, for the
    /// run's log.
    pub fn keep_on_device(
        &mut self,
        device: Device,
        free_mib: Option<u64>,
        training: bool,
    ) -> Vec<String> {
        let (true, Some(free)) = (device.is_cuda(), free_mib) else {
            return Vec::new();
        };
        let mib = |t: &Tensor| match t.numel() {
            0 => None,
            n => Some((n * t.kind().elt_size_in_bytes()).div_ceil(1 << 20) as u64),
        };
        let train_bytes = self
            .train
            .bytes
            .as_ref()
            .filter(|_| mib(&self.train.images).is_some());
        let sizes = [
            train_bytes.map_or_else(|| mib(&self.train.images), |b| mib(&b.images)),
            mib(&self.eval.images),
        ];
        let keep = resident(sizes, free, training);
        let mut moved = Vec::new();
        let size = |i: usize| sizes[i].unwrap_or(0);
        if keep[0] {
            match train_bytes {
                Some(b) => {
                    let norm = Normaliser::new(&b.mean, &b.std, device);
                    self.resident_bytes = Some((b.images.to_device(device), norm));
                    moved.push(format!("training images as bytes ({} MiB)", size(0)));
                }
                None => {
                    self.train.images = self.train.images.to_device(device);
                    moved.push(format!("training images ({} MiB)", size(0)));
                }
            }
        }
        if keep[1] {
            self.eval.images = self.eval.images.to_device(device);
            moved.push(format!("evaluation images ({} MiB)", size(1)));
        }
        moved
    }

    /// Drops the datasets' bytes where no batch will travel as bytes: they
    /// serve only the training batches the batch thread uploads to a GPU
    /// (not on the CPU, not when the images stay on the device, not with
    /// the activation cache, and never for evaluation).
    pub fn drop_unused_bytes(&mut self, device: Device) {
        self.eval.bytes = None;
        let used = device.is_cuda()
            && self.augment.is_none()
            && self.cache.is_none()
            && self.resident_bytes.is_none()
            && self.train.images.device() != device;
        if !used {
            self.train.bytes = None;
        }
    }

    /// The batch thread of an epoch's batches (`order`, from its batch
    /// `first` on), or `None` when a step selects its batch on the main
    /// thread: with the activation cache (whose steps read cached rows),
    /// with the images already on the device, and on the CPU for a dataset
    /// in memory, where a batch thread competes with the step's own threads
    /// for the cores (on 2 cores, `run` fell from 0.70-1.11x of `bench`'s
    /// img/s to 0.34-0.66x with it). Augmented batches are always built on
    /// the thread.
    pub fn prefetch(
        &self,
        order: &[i64],
        (batch, first): (usize, usize),
        (seed, epoch): (u64, u64),
        device: Device,
    ) -> Option<Prefetch> {
        let source = match (&self.augment, &self.cache) {
            (Some(a), _) => Source::Augment(a.clone()),
            (None, None)
                if device != Device::Cpu
                    && self.resident_bytes.is_none()
                    && self.train.images.device() != device =>
            {
                match &self.train.bytes {
                    Some(b) => Source::MemoryBytes(b.shallow_clone()),
                    None => Source::Memory(self.train.images.shallow_clone()),
                }
            }
            (None, _) => return None,
        };
        Some(Prefetch::start(
            source,
            &self.train.labels,
            order.to_vec(),
            (batch, first, 3),
            (seed, epoch),
            device,
        ))
    }
}

/// Which of the training and evaluation images (their MiB, `None` when
/// not held in memory) to keep on a GPU with `free_mib` free: the training
/// set first (unless `training` is false), then the evaluation set, each
/// when it fits in what is left of a quarter of the free memory.
fn resident(sizes: [Option<u64>; 2], free_mib: u64, training: bool) -> [bool; 2] {
    let mut left = free_mib / 4;
    let mut keep = [false; 2];
    for (i, size) in sizes.into_iter().enumerate() {
        match size {
            Some(mib) if mib <= left && (i == 1 || training) => {
                keep[i] = true;
                left -= mib;
            }
            _ => {}
        }
    }
    keep
}

/// The input of step `step` (samples `idx`, in host memory) and its
/// labels, in host memory and on the engine's device: the committed
/// prefix's output from the activation cache when there is one, else the
/// images, prefetched (assembled on the batch thread, perhaps uploaded
/// ahead) or selected here (on the device when the images are there). The
/// labels go up behind the images, non-blocking from pinned memory on a
/// GPU. A libtorch error is an outcome ([`Fetched::Failed`]): the run
/// stops on it.
pub(super) fn fetch(
    data: &mut Data,
    engine: &dyn Engine,
    prefetch: Option<&Prefetch>,
    idx: &Tensor,
    (step, committed): (u64, usize),
) -> Result<Fetched> {
    let device = engine.device();
    let fetched = torch_guard(
        || format!("fetching the batch of step {step}"),
        || -> Result<(Batch, Tensor, Tensor)> {
            data.faults.fail_fetch_if_due(step);
            let (input, y_host) = match (data.cache.as_mut(), prefetch) {
                (Some(c), _) if committed > 0 => (
                    Batch::Boundary {
                        h: c.boundary(engine.model(), &data.train.images, idx, committed),
                        after: committed,
                    },
                    data.train.labels.index_select(0, idx),
                ),
                (_, Some(p)) => {
                    let b = p.next()?;
                    return Ok((Batch::Images(b.images), b.labels_host, b.labels));
                }
                (_, None) => {
                    let x = match &data.resident_bytes {
                        Some((bytes, norm)) => {
                            norm.apply(&bytes.index_select(0, &upload(idx, bytes.device())))
                        }
                        None => {
                            let images = &data.train.images;
                            let rows = upload(idx, images.device());
                            upload(&images.index_select(0, &rows), device)
                        }
                    };
                    (Batch::Images(x), data.train.labels.index_select(0, idx))
                }
            };
            let y = upload(&y_host, device);
            Ok((input, y_host, y))
        },
    );
    match fetched {
        Ok(batch) => batch.map(|(input, y_host, y)| Fetched::Batch(input, y_host, y)),
        Err(e) => Ok(Fetched::Failed(e)),
    }
}

/// A step's batch, or the libtorch error that kept it from the device.
pub(super) enum Fetched {
    /// The input, its labels in host memory and on the device.
    Batch(Batch, Tensor, Tensor),
    /// libtorch refused an operation.
    Failed(TorchError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(f: anyhow::Result<Fetched>) -> (Batch, Tensor, Tensor) {
        match f.unwrap() {
            Fetched::Batch(input, y_host, y) => (input, y_host, y),
            Fetched::Failed(e) => panic!("{e}"),
        }
    }

    fn data() -> Data {
        let set = |n| Dataset::synthetic(n, 2, 1, 8, 0);
        Data::new((set(8), set(4)), None, None, 0)
    }

    #[test]
    fn datasets_stay_put_on_the_cpu_and_without_a_free_memory_figure() {
        let mut d = data();
        assert!(d
            .keep_on_device(Device::Cpu, Some(1 << 20), true)
            .is_empty());
        assert!(d.keep_on_device(Device::Cuda(0), None, true).is_empty());
        assert_eq!(d.train.images.device(), Device::Cpu);
        // Too little room on a GPU: nothing is touched (the 4 test images
        // need under a MiB, and a quarter of 3 MiB is 0).
        assert!(d.keep_on_device(Device::Cuda(0), Some(3), true).is_empty());
        assert_eq!(d.eval.images.device(), Device::Cpu);
    }

    #[test]
    fn the_training_set_goes_first_into_a_quarter_of_the_free_memory() {
        // 100 MiB free: 25 for the data.
        assert_eq!(resident([Some(20), Some(5)], 100, true), [true, true]);
        assert_eq!(resident([Some(20), Some(6)], 100, true), [true, false]);
        assert_eq!(resident([Some(26), Some(6)], 100, true), [false, true]);
        // With the activation cache only the evaluation set.
        assert_eq!(resident([Some(20), Some(6)], 100, false), [false, true]);
        // An augmented folder's training set is not in memory.
        assert_eq!(resident([None, Some(25)], 100, true), [false, true]);
    }

    #[test]
    fn the_bytes_stay_only_for_a_gpu_s_uploaded_training_batches() {
        let with_bytes = || {
            let mut d = data();
            for set in [&mut d.train, &mut d.eval] {
                set.bytes = Some(crate::data::Bytes {
                    images: set.images.to_kind(tch::Kind::Uint8),
                    mean: vec![0.0],
                    std: vec![1.0],
                });
            }
            d
        };
        let mut gpu = with_bytes();
        gpu.drop_unused_bytes(Device::Cuda(0));
        assert!(gpu.train.bytes.is_some() && gpu.eval.bytes.is_none());
        let mut cpu = with_bytes();
        cpu.drop_unused_bytes(Device::Cpu);
        assert!(cpu.train.bytes.is_none());
        let mut kept = with_bytes();
        let norm = Normaliser::new(&[0.0], &[1.0], Device::Cpu);
        kept.resident_bytes = Some((kept.train.images.to_kind(tch::Kind::Uint8), norm));
        kept.drop_unused_bytes(Device::Cuda(0));
        assert!(kept.train.bytes.is_none());
    }

    #[test]
    fn an_in_memory_batch_is_the_rows_it_names() {
        let mut d = data();
        let idx = Tensor::from_slice(&[5i64, 0, 3]);
        let engine = crate::engine::SingleEngine::new(
            &crate::model::test_config(2),
            crate::model::precision::Precision::F32,
            crate::config::TrainSection::default().recipe(),
            Device::Cpu,
        )
        .unwrap();
        let (batch, y_host, y) = fetched(fetch(&mut d, &engine, None, &idx, (0, 0)));
        let Batch::Images(x) = batch else {
            panic!("images expected")
        };
        assert!(x.equal(&d.train.images.index_select(0, &idx)));
        assert!(y.equal(&y_host));
        assert_eq!(Vec::<i64>::try_from(&y_host).unwrap(), [1, 0, 1]);
        // The training images kept as bytes (on the CPU here, as on a
        // GPU): the same float32 rows, normalised per batch.
        let bytes = Tensor::randint(256, [8, 1, 8, 8], (tch::Kind::Int64, Device::Cpu))
            .to_kind(tch::Kind::Uint8);
        let (mean, std) = ([0.2860], [0.3530]);
        d.train.images = crate::data::images::normalise_bytes(&bytes, &mean, &std);
        d.resident_bytes = Some((bytes, Normaliser::new(&mean, &std, Device::Cpu)));
        let (batch, _, _) = fetched(fetch(&mut d, &engine, None, &idx, (1, 0)));
        let Batch::Images(x) = batch else {
            panic!("images expected")
        };
        assert!(x.equal(&d.train.images.index_select(0, &idx)));
    }
}
