//! Image datasets on disk: ImageFolder, CUB-200-2011, NABirds and Stanford
//! Dogs, decoded (JPEG, PNG) on all cores into the in-memory [`Dataset`]
//! the trainer uses, with the evaluation transform (resize the shorter side,
//! centre crop) and per-channel normalisation.
//!
//! Layouts (`root` is what the archive unpacks to):
//! - ImageFolder: `root/<train>/<class>/*.{jpg,jpeg,png}` and
//!   `root/<eval>/<class>/...`; classes are the sorted directory names of the
//!   training split.
//! - CUB-200-2011: `images.txt` (`id path`), `image_class_labels.txt`
//!   (`id class`), `train_test_split.txt` (`id is_train`), `images/<path>`.
//! - NABirds: the same three files and `images/` (class ids are sparse; they
//!   are numbered 0..k in increasing order).
//! - Stanford Dogs: `train_list.mat` / `test_list.mat` (MATLAB v5:
//!   `file_list` cell array, `labels` 1-based), `Images/<path>`.
//!
//! Invariant: a missing, unreadable or corrupt file is a [`DataError`]
//! that names the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use tch::Tensor;

use simfreeze_runtime::rng::Rng;

use crate::data::{DataError, Dataset};

/// One split: image files with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// `(path, label)` in listing order.
    pub items: Vec<(PathBuf, i64)>,
    /// Number of classes of the dataset.
    pub classes: i64,
}

fn io_err(path: &Path, cause: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_owned(),
        cause,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_dir(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| io_err(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

impl Split {
    /// Keeps only `classes` (relabelled `0..k` in that order), then at
    /// most `limit` items; done before decoding so nothing unused is read.
    pub fn select(self, classes: Option<&[i64]>, limit: Option<i64>) -> Result<Split, DataError> {
        let mut split = match classes {
            None => self,
            Some(keep) => {
                if keep.is_empty() {
                    return Err(DataError::Invalid("class subset is empty".into()));
                }
                if let Some(c) = keep.iter().find(|c| **c < 0 || **c >= self.classes) {
                    return Err(DataError::Invalid(format!(
                        "class {c} is outside 0..{}",
                        self.classes
                    )));
                }
                Split {
                    items: self
                        .items
                        .into_iter()
                        .filter_map(|(p, l)| {
                            keep.iter().position(|c| *c == l).map(|n| (p, n as i64))
                        })
                        .collect(),
                    classes: keep.len() as i64,
                }
            }
        };
        if let Some(n) = limit {
            // The listings are grouped by class: take the first n of a
            // fixed shuffle, so a limit keeps every class represented.
            let mut rng = Rng::new(0x11_A1E5);
            for i in (1..split.items.len()).rev() {
                let j = rng.below(i + 1);
                split.items.swap(i, j);
            }
            split.items.truncate(n.max(0) as usize);
        }
        Ok(split)
    }
}

/// ImageFolder: `(train, eval)` splits under `root/train_dir` and
/// `root/eval_dir`.
pub fn image_folder(
    root: &Path,
    train_dir: &str,
    eval_dir: &str,
) -> Result<(Split, Split), DataError> {
    let train_root = root.join(train_dir);
    let names: Vec<String> = sorted_dir(&train_root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if names.is_empty() {
        return Err(DataError::Invalid(format!(
            "{} has no class directories (ImageFolder expects {}/<class>/*.jpg)",
            train_root.display(),
            train_root.display()
        )));
    }
    let index: BTreeMap<&str, i64> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as i64))
        .collect();
    let list = |split_root: &Path| -> Result<Split, DataError> {
        let mut items = Vec::new();
        for class_dir in sorted_dir(split_root)?.into_iter().filter(|p| p.is_dir()) {
            let name = class_dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let label = *index.get(name.as_str()).ok_or_else(|| {
                DataError::Invalid(format!(
                    "{}: class `{name}` is not among the training classes",
                    class_dir.display()
                ))
            })?;
            for f in sorted_dir(&class_dir)?.into_iter().filter(|p| is_image(p)) {
                items.push((f, label));
            }
        }
        if items.is_empty() {
            return Err(DataError::Invalid(format!(
                "{} holds no .jpg/.jpeg/.png images",
                split_root.display()
            )));
        }
        Ok(Split {
            items,
            classes: names.len() as i64,
        })
    };
    Ok((list(&train_root)?, list(&root.join(eval_dir))?))
}

fn read_pairs(path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next()) {
                (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                _ => Err(corrupt(path, format!("line {} is not `id value`", i + 1))),
            }
        })
        .collect()
}

/// CUB-200-2011 and NABirds: `images.txt`, `image_class_labels.txt`,
/// `train_test_split.txt` under `root`, images under `root/images`.
pub fn cub_like(root: &Path) -> Result<(Split, Split), DataError> {
    let images_txt = root.join("images.txt");
    let labels_txt = root.join("image_class_labels.txt");
    let split_txt = root.join("train_test_split.txt");
    let images = read_pairs(&images_txt)?;
    let labels: BTreeMap<String, String> = read_pairs(&labels_txt)?.into_iter().collect();
    let is_train: BTreeMap<String, String> = read_pairs(&split_txt)?.into_iter().collect();
    let mut class_ids = BTreeSet::new();
    for v in labels.values() {
        let id: i64 = v
            .parse()
            .map_err(|_| corrupt(&labels_txt, format!("class id `{v}` is not an integer")))?;
        class_ids.insert(id);
    }
    let index: BTreeMap<i64, i64> = class_ids
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i as i64))
        .collect();
    let classes = index.len() as i64;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (id, rel) in images {
        let class: i64 = labels
            .get(&id)
            .ok_or_else(|| corrupt(&labels_txt, format!("no class for image {id}")))?
            .parse()
            .expect("checked above");
        let flag = is_train
            .get(&id)
            .ok_or_else(|| corrupt(&split_txt, format!("no split for image {id}")))?;
        let item = (root.join("images").join(rel), index[&class]);
        match flag.as_str() {
            "1" => train.push(item),
            "0" => eval.push(item),
            other => {
                return Err(corrupt(
                    &split_txt,
                    format!("split flag `{other}` for image {id}"),
                ))
            }
        }
    }
    Ok((
        Split {
            items: train,
            classes,
        },
        Split {
            items: eval,
            classes,
        },
    ))
}

/// Stanford Dogs: `train_list.mat` and `test_list.mat`, images under
/// `root/Images`.
pub fn stanford_dogs(root: &Path) -> Result<(Split, Split), DataError> {
    let read = |name: &str| -> Result<Vec<(PathBuf, i64)>, DataError> {
        let path = root.join(name);
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        let vars = crate::data::matfile::parse(&bytes).map_err(|r| corrupt(&path, r))?;
        let files = vars
            .get("file_list")
            .and_then(|v| v.strings())
            .ok_or_else(|| corrupt(&path, "no `file_list` cell array of file names"))?;
        let labels = match vars.get("labels") {
            Some(crate::data::matfile::MatValue::Num(v)) => v.clone(),
            _ => return Err(corrupt(&path, "no numeric `labels`")),
        };
        if labels.len() != files.len() {
            return Err(corrupt(
                &path,
                format!("{} labels for {} files", labels.len(), files.len()),
            ));
        }
        files
            .into_iter()
            .zip(labels)
            .map(|(f, l)| {
                if l < 1.0 || l.fract() != 0.0 {
                    return Err(corrupt(&path, format!("label {l} is not a 1-based class")));
                }
                Ok((root.join("Images").join(f), l as i64 - 1))
            })
            .collect()
    };
    let train = read("train_list.mat")?;
    let eval = read("test_list.mat")?;
    let classes = train
        .iter()
        .chain(&eval)
        .map(|(_, l)| l + 1)
        .max()
        .unwrap_or(0);
    Ok((
        Split {
            items: train,
            classes,
        },
        Split {
            items: eval,
            classes,
        },
    ))
}

pub(super) fn decode(path: &Path) -> Result<image::DynamicImage, DataError> {
    let img = image::ImageReader::open(path)
        .map_err(|e| io_err(path, e))?
        .with_guessed_format()
        .map_err(|e| io_err(path, e))?
        .decode()
        .map_err(|e| corrupt(path, format!("cannot decode the image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(corrupt(path, "image has no pixels"));
    }
    Ok(img)
}

pub(super) fn to_chw(
    img: &image::DynamicImage,
    channels: i64,
    out: &mut [u8],
) -> Result<(), DataError> {
    let hw = (img.width() * img.height()) as usize;
    match channels {
        1 => out.copy_from_slice(img.to_luma8().as_raw()),
        3 => {
            for (i, px) in img.to_rgb8().pixels().enumerate() {
                for ch in 0..3 {
                    out[ch * hw + i] = px.0[ch];
                }
            }
        }
        _ => {
            return Err(DataError::Invalid(format!(
                "images need 1 or 3 channels, the model has {channels}"
            )))
        }
    }
    Ok(())
}

/// Resizes so the shorter side is `short` (bicubic), keeping the aspect.
pub(super) fn resize_shorter(img: &image::DynamicImage, short: u32) -> image::DynamicImage {
    let (w, h) = (img.width(), img.height());
    let scale = short as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(short),
        ((h as f64 * scale).round() as u32).max(short),
    );
    img.resize_exact(nw, nh, FilterType::CatmullRom)
}

/// The evaluation transform: resize so the shorter side is `resize`
/// (bicubic), centre crop `size`x`size`, written as CHW bytes into `out`.
pub fn decode_into(
    path: &Path,
    channels: i64,
    size: u32,
    resize: u32,
    out: &mut [u8],
) -> Result<(), DataError> {
    let img = resize_shorter(&decode(path)?, resize);
    let (nw, nh) = (img.width(), img.height());
    let img = img.crop_imm((nw - size) / 2, (nh - size) / 2, size, size);
    to_chw(&img, channels, out)
}

/// Decodes a split on all cores into a normalised `[N, C, size, size]`
/// dataset.
pub fn load(
    split: &Split,
    channels: i64,
    size: i64,
    resize: i64,
    mean: &[f64],
    std: &[f64],
) -> Result<Dataset, DataError> {
    let n = split.items.len() as i64;
    let bytes = fill_parallel(
        &split.items,
        (channels * size * size) as usize,
        |(path, _), out| decode_into(path, channels, size as u32, resize as u32, out),
    )?;
    let labels: Vec<i64> = split.items.iter().map(|(_, l)| *l).collect();
    let decoded = bytes;
    let bytes = Tensor::from_slice(&decoded).reshape([n, channels, size, size]);
    drop(decoded);
    Ok(Dataset {
        images: normalise_bytes(&bytes, mean, std),
        labels: Tensor::from_slice(&labels),
        classes: split.classes,
        bytes: Some(super::Bytes {
            images: bytes,
            mean: mean.to_vec(),
            std: std.to_vec(),
        }),
    })
}

/// Fills one `per`-byte slot for each item on all cores.
pub(super) fn fill_parallel<T: Sync>(
    items: &[T],
    per: usize,
    f: impl Fn(&T, &mut [u8]) -> Result<(), DataError> + Sync,
) -> Result<Vec<u8>, DataError> {
    let mut bytes = vec![0u8; items.len() * per];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(items.len().max(1));
    let chunk = items.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|s| -> Result<(), DataError> {
        let handles: Vec<_> = bytes
            .chunks_mut(chunk * per)
            .zip(items.chunks(chunk))
            .map(|(out, items)| {
                s.spawn(move || -> Result<(), DataError> {
                    for (o, item) in out.chunks_mut(per).zip(items) {
                        f(item, o)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("image worker thread panicked")?;
        }
        Ok(())
    })?;
    Ok(bytes)
}

/// `[N, C, H, W]` bytes to `(x / 255 - mean) / std` in float32, in place:
/// the float tensor is the only full-size copy left alive.
pub(super) fn normalise(bytes: Vec<u8>, shape: [i64; 4], mean: &[f64], std: &[f64]) -> Tensor {
    let x = Tensor::from_slice(&bytes).reshape(shape);
    drop(bytes);
    normalise_bytes(&x, mean, std)
}

/// `[N, C, H, W]` bytes as float32 `(x / 255 - mean) / std` per channel,
/// where `x` is (the host, or the device of a batch uploaded as bytes).
pub fn normalise_bytes(bytes: &Tensor, mean: &[f64], std: &[f64]) -> Tensor {
    Normaliser::new(mean, std, bytes.device()).apply(bytes)
}

/// `(x / 255 - mean) / std` per channel for bytes on one device, its
/// constants made there once. Every operand is a tensor on that device:
/// CUDA divides by a host scalar as a product with its reciprocal, one ulp
/// off the host's quotient, while a tensor quotient is exact on both, so a
/// batch normalised on a GPU holds the host's float32 values bit for bit.
/// Made where the batches will be normalised (on a GPU, on the main
/// thread, before a side stream uses it: it is only read there).
pub struct Normaliser {
    div: Tensor,
    mean: Tensor,
    std: Tensor,
}

impl Normaliser {
    /// The constants of `mean` and `std` (one per channel) on `device`.
    pub fn new(mean: &[f64], std: &[f64], device: tch::Device) -> Normaliser {
        let stat = |v: &[f64]| {
            Tensor::from_slice(v)
                .to_kind(tch::Kind::Float)
                .reshape([1, v.len() as i64, 1, 1])
                .to_device(device)
        };
        Normaliser {
            div: Tensor::from(255.0f32).to_device(device),
            mean: stat(mean),
            std: stat(std),
        }
    }

    /// `[N, C, H, W]` bytes (on the normaliser's device) as float32.
    pub fn apply(&self, bytes: &Tensor) -> Tensor {
        let mut x = bytes.to_kind(tch::Kind::Float);
        let _ = x.g_div_(&self.div).g_sub_(&self.mean).g_div_(&self.std);
        x
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::data) fn write_image(path: &Path, w: u32, h: u32, shade: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([shade, (x * 7) as u8, (y * 5) as u8])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn image_folder_lists_classes_and_decodes_jpeg_and_png() {
        let d = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 3), ("val", 2)] {
            for (c, shade) in [("cat", 10u8), ("dog", 200)] {
                for i in 0..n {
                    let ext = if i % 2 == 0 { "png" } else { "jpg" };
                    write_image(
                        &d.path().join(format!("{split}/{c}/{i}.{ext}")),
                        20 + i,
                        16,
                        shade,
                    );
                }
            }
        }
        let (train, eval) = image_folder(d.path(), "train", "val").unwrap();
        assert_eq!(
            (train.items.len(), eval.items.len(), train.classes),
            (6, 4, 2)
        );
        assert_eq!(train.items[3].1, 1);
        let ds = load(&train, 3, 8, 10, &[0.0; 3], &[1.0; 3]).unwrap();
        assert_eq!(ds.images.size(), [6, 3, 8, 8]);
        // Red channel carries the class shade.
        let red0 = ds
            .images
            .get(0)
            .get(0)
            .mean(tch::Kind::Float)
            .double_value(&[]);
        let red5 = ds
            .images
            .get(5)
            .get(0)
            .mean(tch::Kind::Float)
            .double_value(&[]);
        assert!((red0 - 10.0 / 255.0).abs() < 0.02 && (red5 - 200.0 / 255.0).abs() < 0.02);
    }

    #[test]
    fn select_relabels_and_limits_before_decoding() {
        let items = (0..6)
            .map(|i| (PathBuf::from(format!("{i}.png")), i % 3))
            .collect();
        let s = Split { items, classes: 3 }
            .select(Some(&[2, 0]), Some(3))
            .unwrap();
        assert_eq!(s.classes, 2);
        assert_eq!(s.items.iter().map(|i| i.1).collect::<Vec<_>>(), [1, 0, 1]);
        let items = vec![(PathBuf::from("x"), 0)];
        assert!(Split { items, classes: 1 }
            .select(Some(&[4]), None)
            .is_err());
    }

    #[test]
    fn corrupt_image_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        write_image(&d.path().join("train/a/0.png"), 8, 8, 1);
        std::fs::write(d.path().join("train/a/1.jpg"), b"not a jpeg").unwrap();
        let (train, _) = image_folder(d.path(), "train", "train").unwrap();
        let e = load(&train, 3, 8, 8, &[0.0; 3], &[1.0; 3]).unwrap_err();
        assert!(matches!(e, DataError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("1.jpg"), "{e}");
    }

    #[test]
    fn cub_and_nabirds_layouts_split_and_renumber_classes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        // NABirds-like sparse class ids 817 and 295.
        std::fs::write(
            r.join("images.txt"),
            "a1 0817/a1.jpg\nb2 0295/b2.jpg\nc3 0817/c3.jpg\n",
        )
        .unwrap();
        std::fs::write(r.join("image_class_labels.txt"), "a1 817\nb2 295\nc3 817\n").unwrap();
        std::fs::write(r.join("train_test_split.txt"), "a1 1\nb2 1\nc3 0\n").unwrap();
        for f in ["0817/a1.jpg", "0295/b2.jpg", "0817/c3.jpg"] {
            write_image(&r.join("images").join(f), 12, 12, 50);
        }
        let (train, eval) = cub_like(r).unwrap();
        assert_eq!(train.classes, 2);
        assert_eq!(train.items.iter().map(|i| i.1).collect::<Vec<_>>(), [1, 0]);
        assert_eq!(eval.items, vec![(r.join("images/0817/c3.jpg"), 1)]);
        load(&train, 3, 8, 8, &[0.5; 3], &[0.5; 3]).unwrap();
        std::fs::write(r.join("train_test_split.txt"), "a1 1\nb2 x\n").unwrap();
        let e = cub_like(r).unwrap_err();
        assert!(e.to_string().contains("train_test_split.txt"), "{e}");
    }
}
