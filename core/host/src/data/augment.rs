//! Augmentation of an image dataset for training: the training split kept
//! as decoded images, and each epoch's random resized crops and flips,
//! drawn from (seed, epoch, sample) only so that a resumed run sees the
//! same crops.

use image::imageops::FilterType;
use tch::Tensor;

use simfreeze_runtime::rng::Rng;

use super::images::{decode, fill_parallel, normalise, resize_shorter, to_chw, Split};
use crate::data::DataError;

/// The training split kept as images (shorter side `resize`), for random
/// augmentation each epoch: random resized crop (scale 0.08-1, aspect
/// 3/4-4/3, bilinear, as torchvision's `RandomResizedCrop`) and a
/// horizontal flip with probability 1/2. Unlike torchvision, the crop is
/// taken from the image already resized to `resize` (memory: the originals
/// are not kept), so small crops are upsampled from fewer pixels. The draws depend only on (seed,
/// epoch, sample), so a resumed run sees the same crops.
pub struct Augmenter {
    images: Vec<image::DynamicImage>,
    channels: i64,
    size: u32,
    pub(super) mean: Vec<f64>,
    pub(super) std: Vec<f64>,
}

impl Augmenter {
    /// Decodes `split` on all cores, shorter side resized to `resize`.
    pub fn new(
        split: &Split,
        channels: i64,
        size: i64,
        resize: i64,
        mean: &[f64],
        std: &[f64],
    ) -> Result<Augmenter, DataError> {
        let n = split.items.len();
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(n.max(1));
        let chunk = n.div_ceil(threads).max(1);
        let images = std::thread::scope(|s| -> Result<Vec<image::DynamicImage>, DataError> {
            let handles: Vec<_> = split
                .items
                .chunks(chunk)
                .map(|items| {
                    s.spawn(move || -> Result<Vec<image::DynamicImage>, DataError> {
                        items
                            .iter()
                            .map(|(p, _)| Ok(resize_shorter(&decode(p)?, resize as u32)))
                            .collect()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(n);
            for h in handles {
                all.extend(h.join().expect("decoder thread panicked")?);
            }
            Ok(all)
        })?;
        Ok(Augmenter {
            images,
            channels,
            size: size as u32,
            mean: mean.to_vec(),
            std: std.to_vec(),
        })
    }

    /// One augmented sample as CHW bytes.
    fn sample(&self, i: usize, seed: u64, epoch: u64, out: &mut [u8]) -> Result<(), DataError> {
        let img = &self.images[i];
        let mut rng = Rng::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ epoch.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                ^ (i as u64).wrapping_mul(0x1656_67B1_9E37_79F9),
        );
        let (w, h) = (img.width() as f64, img.height() as f64);
        let area = w * h;
        let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let mut crop = None;
        for _ in 0..10 {
            let target = area * (0.08 + 0.92 * rng.uniform());
            let ratio = (lo + (hi - lo) * rng.uniform()).exp();
            let cw = (target * ratio).sqrt().round();
            let ch = (target / ratio).sqrt().round();
            if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
                let x = (rng.uniform() * (w - cw + 1.0)).floor().min(w - cw);
                let y = (rng.uniform() * (h - ch + 1.0)).floor().min(h - ch);
                crop = Some((x as u32, y as u32, cw as u32, ch as u32));
                break;
            }
        }
        // Fallback, as torchvision: the whole image's centre, aspect clamped.
        let (x, y, cw, ch) = crop.unwrap_or_else(|| {
            let (cw, ch) = if w / h < 0.75 {
                (w, (w / 0.75).round())
            } else if w / h > 4.0 / 3.0 {
                ((h * 4.0 / 3.0).round(), h)
            } else {
                (w, h)
            };
            (
                ((w - cw) / 2.0) as u32,
                ((h - ch) / 2.0) as u32,
                cw as u32,
                ch as u32,
            )
        });
        let mut patch =
            img.crop_imm(x, y, cw, ch)
                .resize_exact(self.size, self.size, FilterType::Triangle);
        if rng.uniform() < 0.5 {
            patch = patch.fliph();
        }
        to_chw(&patch, self.channels, out)
    }

    /// The augmented, normalised batch `[B, C, size, size]` of samples
    /// `idx`, built on all cores.
    pub fn batch(&self, idx: &[i64], seed: u64, epoch: u64) -> Result<Tensor, DataError> {
        let (c, size) = (self.channels, self.size as i64);
        let bytes = fill_parallel(idx, (c * size * size) as usize, |i, out| {
            self.sample(*i as usize, seed, epoch, out)
        })?;
        Ok(normalise(
            bytes,
            [idx.len() as i64, c, size, size],
            &self.mean,
            &self.std,
        ))
    }

    /// The augmented batch of samples `idx` as bytes, `[B, C, size, size]`
    /// uint8 (the same draws as [`Self::batch`], not normalised).
    pub fn batch_bytes(&self, idx: &[i64], seed: u64, epoch: u64) -> Result<Tensor, DataError> {
        let (c, size) = (self.channels, self.size as i64);
        let bytes = fill_parallel(idx, (c * size * size) as usize, |i, out| {
            self.sample(*i as usize, seed, epoch, out)
        })?;
        Ok(Tensor::from_slice(&bytes).reshape([idx.len() as i64, c, size, size]))
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::images::tests::write_image;
    use crate::data::images::{image_folder, normalise_bytes};

    #[test]
    fn augmentation_is_random_per_epoch_and_repeatable() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..4 {
            write_image(
                &d.path().join(format!("train/a/{i}.png")),
                40 + 3 * i,
                30,
                100,
            );
        }
        let (train, _) = image_folder(d.path(), "train", "train").unwrap();
        let aug = Augmenter::new(&train, 3, 16, 18, &[0.5; 3], &[0.5; 3]).unwrap();
        assert_eq!(aug.len(), 4);
        let a = aug.batch(&[0, 1, 2, 3], 7, 0).unwrap();
        assert_eq!(a.size(), [4, 3, 16, 16]);
        assert_eq!(a, aug.batch(&[0, 1, 2, 3], 7, 0).unwrap());
        assert_ne!(a, aug.batch(&[0, 1, 2, 3], 7, 1).unwrap());
        let bytes = aug.batch_bytes(&[0, 1, 2, 3], 7, 0).unwrap();
        assert_eq!(bytes.kind(), tch::Kind::Uint8);
        assert!(normalise_bytes(&bytes, &[0.5; 3], &[0.5; 3]).equal(&a));
    }
}
