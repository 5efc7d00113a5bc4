//! Training data: image folders (with captions or class labels), MNIST-style IDX files, the transforms of the
//! LDM training recipes, a seeded and resumable batch loader, and a cache of first-stage latents.
//!
//! The pipeline, as in the LDM/SD training scripts (torchvision `Resize` → `CenterCrop`/`RandomCrop` →
//! `RandomHorizontalFlip` → `ToTensor` → `Normalize(0.5, 0.5)`):
//!
//! | stage | when | where |
//! |---|---|---|
//! | decode, RGBA over white, gray/RGB choice | once, at load | [`folder`], [`idx`] |
//! | resize (shorter side → `size`) | once, at load ([`ImageTransform::prepare`]) | [`transform`] |
//! | crop to `size × size`, random flip (p = ½) | every time an example is drawn ([`Dataset::get`]) | [`transform`] |
//! | bytes → f32 in [−1, 1] (`x/127.5 − 1`), `[C, H, W]` | every draw | [`transform`] |
//!
//! Only the random stages run per draw, so the data set in memory is already at training resolution
//! (an image costs about `3·size²·(long/short)` bytes).
//!
//! Randomness is reproducible from one seed and resumable from a position (epoch, index): the order of epoch
//! `e` is `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))` (PyTorch's
//! `DistributedSampler` convention, bit for bit), and the crop/flip draws of the example at position `k` of
//! epoch `e` come from a generator seeded from `(seed, e, k)` alone. See [`loader`].
pub mod folder;
pub mod idx;
pub mod latent_cache;
pub mod loader;
pub mod transform;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_core::rng::TorchRng;

use crate::error::{Result, TrainError};

pub use folder::{open_image_folder, ColorMode, DataReport, FolderOptions, LabelSource};
pub use idx::{
    find_idx_pair, load_idx_dataset, read_idx_images, read_idx_labels, IdxImages, IdxOptions,
    IdxSplit, FASHION_MNIST_CLASSES, MNIST_CLASSES,
};
pub use latent_cache::LatentCache;
pub use loader::{randperm, Batch, Loader, LoaderConfig, LoaderPosition};
pub use transform::{resize_batch, Crop, ImageTransform, Resize, ResizeFilter};

/// Pixel values of an [`HwcImage`], row-major `[H, W, C]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// Bytes, 0..=255.
    U8(Vec<u8>),
    /// Floats in [−1, 1] (values outside are clamped when drawn).
    F32(Vec<f32>),
}

/// An image with 1 (gray) or 3 (RGB) channels, stored `[H, W, C]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HwcImage {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: Pixels,
}

impl HwcImage {
    /// Checks that the sizes are non-zero, the channel count is 1 or 3 and the buffer has `H·W·C` values.
    pub fn new(height: usize, width: usize, channels: usize, pixels: Pixels) -> Result<Self> {
        let len = match &pixels {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        };
        if height == 0 || width == 0 {
            return Err(TrainError::invalid(
                "image",
                format!("empty image ({width}×{height})"),
            ));
        }
        if channels != 1 && channels != 3 {
            return Err(TrainError::invalid(
                "image",
                format!("{channels} channels; images have 1 (gray) or 3 (RGB)"),
            ));
        }
        if Some(len)
            != height
                .checked_mul(width)
                .and_then(|n| n.checked_mul(channels))
        {
            return Err(TrainError::invalid(
                "image",
                format!("{len} values for {height}×{width}×{channels}"),
            ));
        }
        Ok(Self {
            height,
            width,
            channels,
            pixels,
        })
    }
}

/// One stored example: an image with an optional caption and class label.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: HwcImage,
    pub caption: Option<String>,
    pub label: Option<usize>,
    /// Where it came from (a file, or `file[index]` for IDX records); used in error messages.
    pub source: PathBuf,
}

/// One drawn example, transforms applied.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `[C, H, W]` f32 on the CPU: an image in [−1, 1], or a cached latent.
    pub image: Tensor,
    pub caption: Option<String>,
    pub label: Option<usize>,
}

/// Anything the [`Loader`] can batch: a fixed number of examples, each drawn with the random transforms of
/// the data set, using only the generator it is handed (so a draw is reproducible from that generator).
pub trait Dataset {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)` of every sample.
    fn sample_shape(&self) -> (usize, usize, usize);
    /// Example `index` with its transforms applied; an index out of range is an error.
    fn get(&self, index: usize, rng: &mut TorchRng) -> Result<Sample>;
}

/// Examples in memory at their prepared size, drawn through an [`ImageTransform`].
#[derive(Debug, Clone)]
pub struct ImageDataset {
    examples: Vec<Example>,
    transform: ImageTransform,
    channels: usize,
    class_names: Option<Vec<String>>,
}

impl ImageDataset {
    /// Prepares every example with `transform` (resizing where asked) and checks that the set is usable:
    /// not empty, one channel count, and with [`Resize::Off`] one size equal to the training size (the error
    /// names two files that differ, or the file and the training size).
    pub fn new(examples: Vec<Example>, transform: ImageTransform) -> Result<Self> {
        transform.validate()?;
        let first = examples.first().ok_or_else(|| {
            TrainError::invalid(
                "dataset",
                "no examples (an empty data set cannot be trained on)",
            )
        })?;
        let channels = first.image.channels;
        if let Some(other) = examples.iter().find(|e| e.image.channels != channels) {
            return Err(TrainError::Data {
                path: other.source.clone(),
                reason: format!(
                    "{} channel(s), but {} has {channels}; use one color mode for the whole data set",
                    other.image.channels,
                    first.source.display()
                ),
            });
        }
        if transform.resize == Resize::Off {
            let (h, w) = (first.image.height, first.image.width);
            if let Some(other) = examples
                .iter()
                .find(|e| (e.image.height, e.image.width) != (h, w))
            {
                return Err(TrainError::Data {
                    path: other.source.clone(),
                    reason: format!(
                        "mixed image sizes and resizing is off: {} is {w}×{h}, {} is {}×{} (width×height)",
                        first.source.display(),
                        other.source.display(),
                        other.image.width,
                        other.image.height
                    ),
                });
            }
        }
        let examples = examples
            .into_iter()
            .map(|e| {
                let image = transform.prepare(&e.image, &e.source)?;
                Ok(Example { image, ..e })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            examples,
            transform,
            channels,
            class_names: None,
        })
    }

    /// Names the classes: label `i` is `names[i]`. Every label must be below `names.len()`.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self> {
        if let Some(e) = self
            .examples
            .iter()
            .find(|e| e.label.is_some_and(|l| l >= names.len()))
        {
            return Err(TrainError::Data {
                path: e.source.clone(),
                reason: format!("label {:?} but only {} class names", e.label, names.len()),
            });
        }
        self.class_names = Some(names);
        Ok(self)
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }
    pub fn transform(&self) -> &ImageTransform {
        &self.transform
    }
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// The side of the square training images.
    pub fn size(&self) -> usize {
        self.transform.size
    }
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }
    /// The number of classes: the class names if given, else the largest label + 1; `None` without labels.
    pub fn num_classes(&self) -> Option<usize> {
        if let Some(names) = &self.class_names {
            return Some(names.len());
        }
        self.examples
            .iter()
            .filter_map(|e| e.label)
            .max()
            .map(|m| m + 1)
    }

    /// Example `index` without random transforms (center crop, no flip): what a latent cache encodes.
    pub fn get_plain(&self, index: usize) -> Result<Sample> {
        let e = self.example(index)?;
        let chw = self.transform.apply_plain(&e.image);
        self.sample(e, chw)
    }

    fn example(&self, index: usize) -> Result<&Example> {
        self.examples.get(index).ok_or_else(|| {
            TrainError::invalid(
                "index",
                format!("example {index} of a data set of {}", self.examples.len()),
            )
        })
    }

    fn sample(&self, e: &Example, chw: Vec<f32>) -> Result<Sample> {
        let s = self.transform.size;
        Ok(Sample {
            image: Tensor::from_vec(chw, (self.channels, s, s), &Device::Cpu)?,
            caption: e.caption.clone(),
            label: e.label,
        })
    }
}

impl Dataset for ImageDataset {
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn sample_shape(&self) -> (usize, usize, usize) {
        (self.channels, self.transform.size, self.transform.size)
    }
    fn get(&self, index: usize, rng: &mut TorchRng) -> Result<Sample> {
        let e = self.example(index)?;
        let chw = self.transform.apply(&e.image, rng);
        self.sample(e, chw)
    }
}
