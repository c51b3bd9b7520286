//! Training batches assembled ahead of the trainer, and their upload.
//!
//! A background thread builds each batch in host memory (decoded and
//! augmented, or selected from a dataset held in memory), pinned when it is
//! bound for a GPU; augmented batches for a GPU, and those of a dataset
//! decoded from bytes, stay bytes (a quarter of float32's) and are
//! normalised on the device. The upload of the next
//! batch can be queued early ([`Prefetch::upload_ahead`]): the loop queues
//! it for the step's first host read, so on a GPU it runs on a side stream
//! while the device finishes the step, and the next step's work waits for
//! it on the device, not on the host (timm's `PrefetchLoader` does the
//! same). On the CPU every batch is built, and its numbers are, exactly as
//! without a thread.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use tch::{Device, Tensor};

use super::augment::Augmenter;
use super::images::Normaliser;
use super::DataError;
use crate::error::torch_guard;
use crate::stream::{Event, Stream};

/// Where a [`Prefetch`] thread takes its batches from.
pub enum Source {
    /// Image files, decoded and augmented per batch (random resized crop,
    /// flip).
    Augment(Arc<Augmenter>),
    /// Images held in memory, `[N, C, H, W]` float32, normalised (a
    /// shallow copy of the dataset's tensor).
    Memory(Tensor),
    /// Images held in memory as their bytes (a shallow copy of the
    /// dataset's [`super::Bytes`]), normalised after the upload.
    MemoryBytes(super::Bytes),
}

/// One training batch in host memory, as the prefetch thread left it.
pub struct HostBatch {
    /// `[B, C, H, W]`: float32, normalised; or, for augmented batches
    /// bound for a GPU, the bytes (uint8), normalised on the device.
    pub images: Tensor,
    /// `[B]` i64.
    pub labels: Tensor,
}

impl HostBatch {
    /// A copy sharing the tensors.
    fn shallow_clone(&self) -> HostBatch {
        HostBatch {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }
}

/// One training batch on the trainer's device.
pub struct Uploaded {
    /// `[B, C, H, W]` float32, normalised.
    pub images: Tensor,
    /// `[B]` i64 on the device.
    pub labels: Tensor,
    /// `[B]` i64 in host memory.
    pub labels_host: Tensor,
}

/// Batches of one epoch assembled ahead of the trainer on a background
/// thread (at most `depth` waiting), and uploaded to the trainer's device.
pub struct Prefetch {
    feed: Rc<Feed>,
    _worker: std::thread::JoinHandle<()>,
}

/// The trainer's end of a [`Prefetch`], shared with the upload queued
/// ahead.
struct Feed {
    rx: Receiver<Result<HostBatch, DataError>>,
    device: Device,
    /// The normalisation of batches that come as bytes, on the device.
    norm: Option<Normaliser>,
    /// The side stream of uploads queued ahead (GPUs), until one fails.
    side: Cell<Option<Stream>>,
    /// The next batch, when its upload was queued ahead.
    ahead: RefCell<Option<Ahead>>,
    /// Seconds the uploads queued ahead took on the trainer's thread.
    ahead_seconds: Cell<f64>,
}

/// A batch taken off the thread's queue early.
enum Ahead {
    /// Uploaded on the side stream: the main stream waits for `ready`
    /// before using it.
    Uploaded(Uploaded, Option<(Stream, Event)>),
    /// Received but not uploaded (on the CPU, or after a failure of the
    /// side stream, which the main stream's upload then meets again).
    Received(Result<HostBatch, DataError>),
}

impl Prefetch {
    /// Starts producing the batches of `order` (with their `labels`, all
    /// of the dataset's) from batch `first` on, for `device`.
    pub fn start(
        source: Source,
        labels: &Tensor,
        order: Vec<i64>,
        (batch, first, depth): (usize, usize, usize),
        (seed, epoch): (u64, u64),
        device: Device,
    ) -> Prefetch {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth.max(1));
        let gpu = device.is_cuda();
        let norm = match (&source, gpu) {
            (Source::Augment(a), true) => Some(Normaliser::new(&a.mean, &a.std, device)),
            (Source::MemoryBytes(b), _) => Some(Normaliser::new(&b.mean, &b.std, device)),
            _ => None,
        };
        let labels = labels.shallow_clone();
        let worker = std::thread::spawn(move || {
            for b in first..order.len() / batch {
                let idx = &order[b * batch..(b + 1) * batch];
                let rows = Tensor::from_slice(idx);
                let images = match &source {
                    Source::Augment(a) if gpu => a.batch_bytes(idx, seed, epoch),
                    Source::Augment(a) => a.batch(idx, seed, epoch),
                    Source::Memory(all) => Ok(all.index_select(0, &rows)),
                    Source::MemoryBytes(all) => Ok(all.images.index_select(0, &rows)),
                };
                let out = images.map(|images| {
                    let labels = labels.index_select(0, &rows);
                    match gpu {
                        // `_pin_memory`: `pin_memory(device)` prints a
                        // deprecation warning on every call in libtorch
                        // 2.11.
                        true => HostBatch {
                            images: images.internal_pin_memory(device),
                            labels: labels.internal_pin_memory(device),
                        },
                        false => HostBatch { images, labels },
                    }
                });
                let failed = out.is_err();
                if tx.send(out).is_err() || failed {
                    return;
                }
            }
        });
        let side = match device {
            Device::Cuda(i) => Stream::side(i).map_err(side_stream_lost).ok(),
            _ => None,
        };
        Prefetch {
            feed: Rc::new(Feed {
                rx,
                device,
                norm,
                side: Cell::new(side),
                ahead: RefCell::new(None),
                ahead_seconds: Cell::new(0.0),
            }),
            _worker: worker,
        }
    }

    /// The next batch on the device: the one uploaded ahead, or the next
    /// of the queue uploaded now (a non-blocking copy from pinned memory
    /// on a GPU). A libtorch failure of the upload panics, as tch does.
    pub fn next(&self) -> Result<Uploaded, DataError> {
        let feed = &self.feed;
        let ahead = feed.ahead.borrow_mut().take();
        match ahead {
            Some(Ahead::Uploaded(batch, ready)) => {
                if let Some((main, event)) = ready {
                    let wait = main
                        .wait(&event)
                        .and_then(|()| main.keep(&batch.images))
                        .and_then(|()| main.keep(&batch.labels));
                    wait.map_err(DataError::Invalid)?;
                }
                Ok(batch)
            }
            Some(Ahead::Received(host)) => Ok(feed.upload(host?)),
            None => Ok(feed.upload(feed.receive()?)),
        }
    }

    /// Work that takes the next batch off the queue and uploads it: on a
    /// GPU on the side stream, so that it overlaps the device's current
    /// work; [`Self::next`] then hands it out. The loop queues it for the
    /// step's first host read ([`crate::engine::reads::before_next_read`]);
    /// queued when the thread has no batch left, it leaves that error for
    /// [`Self::next`].
    pub fn upload_ahead(&self) -> impl FnOnce() + 'static {
        let feed = self.feed.clone();
        move || {
            if feed.ahead.borrow().is_some() {
                return;
            }
            let started = std::time::Instant::now();
            let ahead = match (feed.receive(), feed.side.get()) {
                (Ok(host), Some(side)) => feed.upload_on(side, host),
                // A libtorch failure here would surface as the step's own:
                // the batch stays received, and `next` meets the failure
                // again where it is named as the fetch's.
                (Ok(host), None) => {
                    let keep = host.shallow_clone();
                    let during = || "uploading the next batch".to_string();
                    match torch_guard(during, || feed.upload(host)) {
                        Ok(batch) => Ahead::Uploaded(batch, None),
                        Err(_) => Ahead::Received(Ok(keep)),
                    }
                }
                (Err(e), _) => Ahead::Received(Err(e)),
            };
            *feed.ahead.borrow_mut() = Some(ahead);
            let took = started.elapsed().as_secs_f64();
            feed.ahead_seconds.set(feed.ahead_seconds.get() + took);
        }
    }

    /// Seconds the uploads queued ahead took on the trainer's thread since
    /// the last call (waiting for the batch thread included).
    pub fn take_ahead_seconds(&self) -> f64 {
        self.feed.ahead_seconds.replace(0.0)
    }
}

impl Feed {
    fn receive(&self) -> Result<HostBatch, DataError> {
        self.rx
            .recv()
            .map_err(|_| DataError::Invalid("the batch thread stopped early".into()))?
    }

    /// `host` on the device, on the thread's current stream: the images
    /// normalised there when they came as bytes.
    fn upload(&self, host: HostBatch) -> Uploaded {
        let device = self.device;
        let put = |t: &Tensor| match device.is_cuda() {
            true => t.to_device_(device, t.kind(), true, false),
            false => t.to_device(device),
        };
        let images = match (&self.norm, host.images.kind()) {
            (Some(norm), tch::Kind::Uint8) => norm.apply(&put(&host.images)),
            _ => put(&host.images),
        };
        Uploaded {
            images,
            labels: put(&host.labels),
            labels_host: host.labels,
        }
    }

    /// `host` uploaded on the side stream, with the event the main stream
    /// waits for. A failure leaves the batch received, for the main
    /// stream's upload, and turns the side stream off for the epoch.
    fn upload_on(&self, side: Stream, host: HostBatch) -> Ahead {
        let Device::Cuda(i) = self.device else {
            return Ahead::Received(Ok(host));
        };
        let keep = host.shallow_clone();
        let queued = torch_guard(
            || "uploading the next batch on a side stream".into(),
            || -> Result<_, String> {
                let main = Stream::current(i)?;
                let batch = {
                    let _on = side.enter()?;
                    self.upload(host)
                };
                let ready = side.record(false)?;
                Ok((batch, main, ready))
            },
        );
        match queued.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((batch, main, ready)) => Ahead::Uploaded(batch, Some((main, ready))),
            Err(e) => {
                side_stream_lost(e);
                self.side.set(None);
                Ahead::Received(Ok(keep))
            }
        }
    }
}

/// Says on stderr that batches go up on the main stream from now on.
fn side_stream_lost(e: String) {
    eprintln!("warning: {e}; batches are uploaded on the main stream instead");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::images::image_folder;

    #[test]
    fn batches_come_in_order_whether_uploaded_ahead_or_not() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..4u32 {
            let path = d.path().join(format!("train/a/{i}.png"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbImage::from_fn(40 + 3 * i, 30, |x, y| {
                image::Rgb([100, (x * 7) as u8, (y * 5) as u8])
            })
            .save(&path)
            .unwrap();
        }
        let (train, _) = image_folder(d.path(), "train", "train").unwrap();
        let aug = Arc::new(Augmenter::new(&train, 3, 16, 18, &[0.5; 3], &[0.5; 3]).unwrap());
        let labels = Tensor::from_slice(&[10i64, 11, 12, 13]);
        let order = vec![3i64, 1, 0, 2, 1, 3];
        let start = |first| {
            Prefetch::start(
                Source::Augment(aug.clone()),
                &labels,
                order.clone(),
                (2, first, 2),
                (7, 0),
                Device::Cpu,
            )
        };
        // From the second batch on: two batches, then the end.
        let p = start(1);
        let second = p.next().unwrap();
        assert_eq!(second.images.size(), [2, 3, 16, 16]);
        assert_eq!(Vec::<i64>::try_from(&second.labels_host).unwrap(), [10, 12]);
        assert!(second.images.equal(&aug.batch(&[0, 2], 7, 0).unwrap()));
        let third = p.next().unwrap();
        assert_eq!(Vec::<i64>::try_from(&third.labels).unwrap(), [11, 13]);
        assert!(p.next().is_err(), "only two batches after the first");
        // Uploaded ahead (twice queued: the second does not skip a batch),
        // the same batches in the same order.
        let q = start(1);
        let ahead = q.upload_ahead();
        ahead();
        q.upload_ahead()();
        let got = q.next().unwrap();
        assert!(got.images.equal(&second.images));
        assert!(got.labels.equal(&second.labels));
        q.upload_ahead()();
        assert!(q.next().unwrap().images.equal(&third.images));
        // Past the end: the error waits for `next`.
        q.upload_ahead()();
        assert!(q.next().is_err());
    }

    #[test]
    fn bytes_held_in_memory_come_normalised_as_the_dataset_s_rows() {
        let bytes = Tensor::arange(6 * 3 * 4 * 4, (tch::Kind::Int64, Device::Cpu))
            .remainder(256)
            .to_kind(tch::Kind::Uint8)
            .reshape([6, 3, 4, 4]);
        let (mean, std) = (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]);
        let images = super::super::images::normalise_bytes(&bytes, &mean, &std);
        let labels = Tensor::arange(6, (tch::Kind::Int64, Device::Cpu));
        let source = Source::MemoryBytes(super::super::Bytes {
            images: bytes,
            mean,
            std,
        });
        let order = vec![4i64, 0, 5, 2];
        let p = Prefetch::start(source, &labels, order, (2, 0, 2), (0, 0), Device::Cpu);
        p.upload_ahead()();
        for rows in [[4i64, 0], [5, 2]] {
            let got = p.next().unwrap();
            let rows = Tensor::from_slice(&rows);
            assert_eq!(got.images.kind(), tch::Kind::Float);
            assert!(got.images.equal(&images.index_select(0, &rows)));
            assert!(got.labels.equal(&rows));
        }
    }
}
