//! Datasets held in memory as normalised `[N, C, H, W]` f32 tensors with
//! i64 labels (and the bytes they were decoded to, while a GPU's batches
//! may travel as those): Fashion-MNIST from its IDX+gzip files, a deterministic
//! synthetic class-structured dataset for tests, class subsets with
//! relabelling (source/target splits), and batches in an order that is a
//! pure function of (seed, epoch).
//!
//! Image-file datasets (ImageFolder, CUB-200-2011, NABirds, Stanford Dogs)
//! and their augmentation live in [`images`], MATLAB list files in
//! [`matfile`]; which source a run reads is decided in [`crate::plan`].
//!
//! Invariant: a missing or corrupt file is an error that names the file.

pub mod augment;
pub mod images;
pub mod matfile;
pub mod prefetch;

use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use simfreeze_runtime::rng::Rng;

pub use crate::error::DataError;

/// Images and labels in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `[N, C, H, W]` f32, normalised.
    pub images: Tensor,
    /// `[N]` i64 in `0..classes`.
    pub labels: Tensor,
    /// Number of classes.
    pub classes: i64,
    /// The bytes `images` were normalised from, when they were decoded
    /// from bytes (image files, Fashion-MNIST): batches bound for a GPU
    /// travel as these and are normalised there.
    pub bytes: Option<Bytes>,
}

/// A dataset's images as the bytes they were decoded to: its `images` are
/// `(bytes / 255 - mean) / std` per channel in float32, exactly
/// ([`images::normalise_bytes`]).
#[derive(Debug)]
pub struct Bytes {
    /// `[N, C, H, W]` uint8.
    pub images: Tensor,
    /// Per channel.
    pub mean: Vec<f64>,
    /// Per channel.
    pub std: Vec<f64>,
}

impl Bytes {
    /// A copy sharing the tensor.
    pub fn shallow_clone(&self) -> Bytes {
        self.with(self.images.shallow_clone())
    }

    /// The same statistics over other bytes.
    fn with(&self, images: Tensor) -> Bytes {
        Bytes {
            images,
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only `classes` (in that order) and relabels them `0..k`.
    pub fn subset(&self, classes: &[i64]) -> Result<Dataset, DataError> {
        if classes.is_empty() {
            return Err(DataError::Invalid("class subset is empty".into()));
        }
        if let Some(c) = classes.iter().find(|c| **c < 0 || **c >= self.classes) {
            return Err(DataError::Invalid(format!(
                "class {c} is outside 0..{}",
                self.classes
            )));
        }
        let mut mask = self.labels.zeros_like().to_kind(Kind::Bool);
        let mut relabel = self.labels.full_like(-1);
        for (new, &old) in classes.iter().enumerate() {
            let hit = self.labels.eq(old);
            mask = mask.logical_or(&hit);
            relabel = relabel.where_self(&hit.logical_not(), &relabel.full_like(new as i64));
        }
        let idx = mask.nonzero().squeeze_dim(1);
        Ok(Dataset {
            images: self.images.index_select(0, &idx),
            labels: relabel.index_select(0, &idx),
            classes: classes.len() as i64,
            bytes: self
                .bytes
                .as_ref()
                .map(|b| b.with(b.images.index_select(0, &idx))),
        })
    }

    /// The first `n` samples (all if fewer).
    pub fn take(&self, n: i64) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
            classes: self.classes,
            bytes: self
                .bytes
                .as_ref()
                .map(|b| b.with(b.images.narrow(0, 0, n))),
        }
    }

    /// The sample order of `epoch`: a permutation that depends only on
    /// `(seed, epoch)`.
    pub fn order(&self, seed: u64, epoch: u64) -> Vec<i64> {
        let n = self.len() as usize;
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch));
        let mut idx: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = rng.below(i + 1);
            idx.swap(i, j);
        }
        idx
    }

    /// A deterministic class-structured image set for tests: each class has
    /// a fixed random template (the same for every `seed`, so a training
    /// and an evaluation set drawn with different seeds pose one task),
    /// each sample is its template plus noise drawn from `seed`.
    pub fn synthetic(n: i64, classes: i64, channels: i64, size: i64, seed: u64) -> Dataset {
        let mut task = Rng::new(0x7A5C_0DE5);
        let px = (channels * size * size) as usize;
        let templates: Vec<f32> = (0..classes as usize * px)
            .map(|_| task.normal() as f32)
            .collect();
        let mut rng = Rng::new(seed);
        let mut images = Vec::with_capacity(n as usize * px);
        let mut labels = Vec::with_capacity(n as usize);
        for i in 0..n {
            let c = (i % classes) as usize;
            labels.push(c as i64);
            for j in 0..px {
                images.push(templates[c * px + j] + 0.5 * rng.normal() as f32);
            }
        }
        Dataset {
            images: Tensor::from_slice(&images).reshape([n, channels, size, size]),
            labels: Tensor::from_slice(&labels),
            classes,
            bytes: None,
        }
    }
}

/// Fashion-MNIST's IDX files under `root` (Debian's `dataset-fashion-mnist`
/// installs them in `/usr/share/datasets/fashion-mnist`).
pub fn fashion_mnist(root: &Path, train: bool, mean: f64, std: f64) -> Result<Dataset, DataError> {
    let split = if train { "train" } else { "t10k" };
    let img_path = root.join(format!("{split}-images-idx3-ubyte.gz"));
    let lbl_path = root.join(format!("{split}-labels-idx1-ubyte.gz"));
    let (dims, pixels) = read_idx(&img_path, 3)?;
    let (ldims, labels) = read_idx(&lbl_path, 1)?;
    if dims[0] != ldims[0] {
        return Err(DataError::Corrupt {
            path: lbl_path,
            reason: format!("{} labels for {} images", ldims[0], dims[0]),
        });
    }
    if let Some(bad) = labels.iter().find(|l| **l > 9) {
        return Err(DataError::Corrupt {
            path: lbl_path,
            reason: format!("label {bad} outside 0..10"),
        });
    }
    let n = dims[0] as i64;
    let bytes = Tensor::from_slice(&pixels).reshape([n, 1, dims[1] as i64, dims[2] as i64]);
    let images = bytes.to_kind(Kind::Float) / 255.0;
    Ok(Dataset {
        images: (images - mean) / std,
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
        classes: 10,
        bytes: Some(Bytes {
            images: bytes,
            mean: vec![mean],
            std: vec![std],
        }),
    })
}

/// Reads a gzip-compressed IDX file of unsigned bytes with `ndim` dimensions.
pub fn read_idx(path: &Path, ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let file = std::fs::File::open(path).map_err(|cause| DataError::Io {
        path: path.to_owned(),
        cause,
    })?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::Corrupt {
            path: path.to_owned(),
            reason: format!("not a valid gzip stream ({e})"),
        })?;
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < 4 + 4 * ndim {
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    // Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != ndim {
        return Err(corrupt(format!(
            "IDX header {:02x?} is not {ndim}-dimensional unsigned bytes",
            &bytes[..4]
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let data = bytes.split_off(4 + 4 * ndim);
    if data.len() != expected {
        return Err(corrupt(format!(
            "header promises {expected} values ({dims:?}), file has {} (truncated?)",
            data.len()
        )));
    }
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_idx(path: &Path, ndim: u8, dims: &[u32], data: &[u8]) {
        let mut raw = vec![0, 0, 8, ndim];
        for d in dims {
            raw.extend_from_slice(&d.to_be_bytes());
        }
        raw.extend_from_slice(data);
        let f = std::fs::File::create(path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap();
    }

    fn fixture(dir: &Path, n: u32) {
        let pixels: Vec<u8> = (0..n * 4 * 4).map(|i| (i % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write_idx(
            &dir.join("train-images-idx3-ubyte.gz"),
            3,
            &[n, 4, 4],
            &pixels,
        );
        write_idx(&dir.join("train-labels-idx1-ubyte.gz"), 1, &[n], &labels);
    }

    #[test]
    fn reads_generated_idx_files() {
        let d = tempfile::tempdir().unwrap();
        fixture(d.path(), 20);
        let ds = fashion_mnist(d.path(), true, 0.0, 1.0).unwrap();
        assert_eq!(ds.images.size(), [20, 1, 4, 4]);
        assert_eq!(ds.labels.int64_value(&[13]), 3);
        assert!((ds.images.double_value(&[0, 0, 0, 1]) - 1.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn the_bytes_normalise_to_the_images_exactly_and_follow_subsets() {
        let d = tempfile::tempdir().unwrap();
        fixture(d.path(), 20);
        // The quickstart's statistics: the device's normalisation of the
        // bytes must give the host's float32 values bit for bit.
        let ds = fashion_mnist(d.path(), true, 0.2860, 0.3530).unwrap();
        let b = ds.bytes.as_ref().unwrap();
        assert_eq!(b.images.kind(), Kind::Uint8);
        assert!(images::normalise_bytes(&b.images, &b.mean, &b.std).equal(&ds.images));
        for part in [ds.subset(&[3, 1]).unwrap(), ds.take(7)] {
            let b = part.bytes.as_ref().unwrap();
            assert!(images::normalise_bytes(&b.images, &b.mean, &b.std).equal(&part.images));
        }
        assert!(Dataset::synthetic(4, 2, 1, 4, 0).bytes.is_none());
    }

    #[test]
    fn missing_file_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let e = fashion_mnist(d.path(), false, 0.0, 1.0).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }));
        assert!(e.to_string().contains("t10k-images-idx3-ubyte.gz"), "{e}");
    }

    #[test]
    fn truncated_file_is_corrupt_and_named() {
        let d = tempfile::tempdir().unwrap();
        fixture(d.path(), 20);
        let p = d.path().join("train-images-idx3-ubyte.gz");
        write_idx(&p, 3, &[20, 4, 4], &[1, 2, 3]);
        let e = fashion_mnist(d.path(), true, 0.0, 1.0).unwrap_err();
        assert!(matches!(e, DataError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("train-images-idx3-ubyte.gz"), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        let e = fashion_mnist(d.path(), true, 0.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("gzip"), "{e}");
    }

    #[test]
    fn subset_relabels_in_the_given_order() {
        let ds = Dataset::synthetic(30, 10, 1, 4, 0);
        let s = ds.subset(&[7, 2]).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.classes, 2);
        let labels: Vec<i64> = Vec::try_from(&s.labels).unwrap();
        assert_eq!(labels, [1, 0, 1, 0, 1, 0]);
        assert!(ds.subset(&[10]).is_err());
    }

    #[test]
    fn order_depends_only_on_seed_and_epoch() {
        let ds = Dataset::synthetic(50, 5, 1, 4, 0);
        assert_eq!(ds.order(1, 2), ds.order(1, 2));
        assert_ne!(ds.order(1, 2), ds.order(1, 3));
        let mut o = ds.order(1, 2);
        o.sort();
        assert_eq!(o, (0..50).collect::<Vec<_>>());
    }
}
