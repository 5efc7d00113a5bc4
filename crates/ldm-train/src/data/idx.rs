//! MNIST and Fashion-MNIST: the IDX file format (`train-images-idx3-ubyte[.gz]`, `…-labels-idx1-ubyte[.gz]`).
//!
//! An IDX file is a big-endian header — two zero bytes, a type byte (`0x08` = unsigned byte), the number of
//! dimensions — then one `u32` per dimension, then the values. Images are `0x00000803` with
//! `[count, rows, cols]`, labels `0x00000801` with `[count]`. Gzip is recognised by its magic bytes, not by
//! the file name. Images are 1-channel (white digit on black); [`IdxOptions::pad`] adds a black border
//! (2 → the 32 × 32 of the LDM/DDPM MNIST setups); resizing goes through the usual [`ImageTransform`].
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{Example, HwcImage, ImageDataset, ImageTransform, Pixels};
use crate::error::{Result, TrainError};

/// MNIST's classes.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
/// Fashion-MNIST's classes, in label order (from the data set's README).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The images of an IDX3 file: `count` images of `rows × cols` bytes, one after the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxSplit {
    /// `train-*` (60 000 examples in MNIST and Fashion-MNIST).
    Train,
    /// `t10k-*` (10 000).
    Test,
}

/// How [`load_idx_dataset`] builds the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxOptions {
    /// Applied after padding; e.g. `ImageTransform::exact(28)`, or `exact(32)` with `pad = 2`.
    pub transform: ImageTransform,
    /// Black pixels added on every side.
    pub pad: usize,
    pub class_names: Option<Vec<String>>,
}

impl IdxOptions {
    /// 28 × 28 as stored, no flip, no class names.
    pub fn native() -> Self {
        Self {
            transform: ImageTransform::exact(28),
            pad: 0,
            class_names: None,
        }
    }
    /// Padded by 2 to 32 × 32.
    pub fn padded_32() -> Self {
        Self {
            transform: ImageTransform::exact(32),
            pad: 2,
            class_names: None,
        }
    }
    pub fn with_class_names(self, names: &[&str]) -> Self {
        Self {
            class_names: Some(names.iter().map(|s| s.to_string()).collect()),
            ..self
        }
    }
}

/// The image and label files of `split` in `dir`: `{train,t10k}-images-idx3-ubyte` (or `-images.idx3-ubyte`),
/// gzipped (`.gz`) or not.
pub fn find_idx_pair(dir: &Path, split: IdxSplit) -> Result<(PathBuf, PathBuf)> {
    let prefix = match split {
        IdxSplit::Train => "train",
        IdxSplit::Test => "t10k",
    };
    let find = |kind: &str, dims: &str| -> Result<PathBuf> {
        let names = [
            format!("{prefix}-{kind}-{dims}-ubyte"),
            format!("{prefix}-{kind}.{dims}-ubyte"),
        ];
        names
            .iter()
            .flat_map(|n| [dir.join(n), dir.join(format!("{n}.gz"))])
            .find(|p| p.is_file())
            .ok_or_else(|| TrainError::Data {
                path: dir.to_path_buf(),
                reason: format!("no {}[.gz] in this folder", names[0]),
            })
    };
    Ok((find("images", "idx3")?, find("labels", "idx1")?))
}

/// Reads an IDX3 image file (gzipped or not), checking the magic number, the sizes and the length.
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, IMAGES_MAGIC, "images (idx3)")?;
    let [count, rows, cols] = dims[..] else {
        return Err(bad(path, "image header does not have 3 dimensions"));
    };
    if rows == 0 || cols == 0 {
        return Err(bad(path, format!("images of {rows}×{cols} pixels")));
    }
    let pixels = body(path, &bytes, 16, &[count, rows, cols])?;
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels,
    })
}

/// Reads an IDX1 label file (gzipped or not), checking the magic number and the length.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, LABELS_MAGIC, "labels (idx1)")?;
    body(path, &bytes, 8, &dims)
}

/// Images (and labels, if given) as a data set of 1-channel examples, padded and transformed per `opts`.
/// The counts of the two files must agree.
pub fn load_idx_dataset(
    images: &Path,
    labels: Option<&Path>,
    opts: &IdxOptions,
) -> Result<ImageDataset> {
    let imgs = read_idx_images(images)?;
    let labels = labels
        .map(|p| read_idx_labels(p).map(|l| (p, l)))
        .transpose()?;
    if let Some((path, l)) = &labels {
        if l.len() != imgs.count {
            return Err(bad(
                path,
                format!(
                    "{} labels for the {} images of {}",
                    l.len(),
                    imgs.count,
                    images.display()
                ),
            ));
        }
    }
    if imgs.count == 0 {
        return Err(bad(images, "no images (count 0)"));
    }
    let (rows, cols, p) = (imgs.rows, imgs.cols, opts.pad);
    let (h, w) = (rows + 2 * p, cols + 2 * p);
    let examples = imgs
        .pixels
        .chunks_exact(rows * cols)
        .enumerate()
        .map(|(i, src)| {
            let data = if p == 0 {
                src.to_vec()
            } else {
                let mut out = vec![0u8; h * w];
                for (y, row) in src.chunks_exact(cols).enumerate() {
                    out[(y + p) * w + p..(y + p) * w + p + cols].copy_from_slice(row);
                }
                out
            };
            Ok(Example {
                image: HwcImage::new(h, w, 1, Pixels::U8(data))?,
                caption: None,
                label: labels
                    .as_ref()
                    .and_then(|(_, l)| l.get(i))
                    .map(|&b| b as usize),
                source: PathBuf::from(format!("{}[{i}]", images.display())),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dataset = ImageDataset::new(examples, opts.transform.clone())?;
    match &opts.class_names {
        Some(names) => dataset.with_class_names(names.clone()),
        None => Ok(dataset),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("truncated or corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks the magic number and returns the dimensions.
fn header(path: &Path, bytes: &[u8], magic: u32, what: &str) -> Result<Vec<usize>> {
    let word = |i: usize| -> Option<u32> {
        let b = bytes.get(4 * i..4 * i + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let found = word(0).ok_or_else(|| {
        bad(
            path,
            format!("{} bytes: too short for an IDX header", bytes.len()),
        )
    })?;
    if found != magic {
        return Err(bad(
            path,
            format!("magic number {found:#010x}, expected {magic:#010x} for IDX {what}"),
        ));
    }
    let ndims = (magic & 0xff) as usize;
    (1..=ndims)
        .map(|i| {
            word(i).map(|d| d as usize).ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "truncated header: {} bytes, {ndims} dimensions",
                        bytes.len()
                    ),
                )
            })
        })
        .collect()
}

/// The values after a header of `offset` bytes, which must be exactly `prod(dims)`.
fn body(path: &Path, bytes: &[u8], offset: usize, dims: &[usize]) -> Result<Vec<u8>> {
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(path, format!("dimensions {dims:?} overflow")))?;
    let found = bytes.len().saturating_sub(offset);
    if found < expected {
        return Err(bad(
            path,
            format!("truncated: {found} data bytes, the header {dims:?} needs {expected}"),
        ));
    }
    if found > expected {
        return Err(bad(
            path,
            format!(
                "{} bytes past the {expected} that the header {dims:?} describes",
                found - expected
            ),
        ));
    }
    Ok(bytes[offset..].to_vec())
}
