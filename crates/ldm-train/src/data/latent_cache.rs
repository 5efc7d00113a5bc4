//! A data set encoded once by the first stage: latents `[N, c, h, w]` with their labels and captions, in
//! one safetensors file, so LDM training need not run the encoder every step.
//!
//! File layout: tensor `latents` (F32, F16 or BF16, as given), tensor `labels` (I64 `[N]`, −1 = none; only
//! if some example has a label); metadata `format` = `ldm-rs-latent-cache`, `version` = `1`, `captions` (a
//! JSON array of strings or nulls, only if some example has a caption), `class_names` (a JSON array, if
//! known) and any entries of [`LatentCache::info`] (e.g. the first stage's scale factor), prefixed `info.`.
//! The cache holds the plain (center-cropped, unflipped) images; drawing from it applies no transform.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use ldm_core::rng::TorchRng;
use safetensors::tensor::{Dtype, SafeTensors, View};

use super::{Dataset, ImageDataset, Sample};
use crate::error::{Result, TrainError};

const FORMAT: &str = "ldm-rs-latent-cache";
const VERSION: &str = "1";

/// Latents of a data set with their labels and captions (one entry per example).
#[derive(Debug, Clone)]
pub struct LatentCache {
    /// `[N, c, h, w]` on the CPU.
    latents: Tensor,
    labels: Vec<Option<usize>>,
    captions: Vec<Option<String>>,
    pub class_names: Option<Vec<String>>,
    /// Free-form notes kept in the file (e.g. `scale_factor`, the first stage's file name).
    pub info: BTreeMap<String, String>,
}

impl LatentCache {
    /// Checks that `latents` is `[N, c, h, w]` with `N ≥ 1` and that there are `N` labels and captions.
    pub fn new(
        latents: Tensor,
        labels: Vec<Option<usize>>,
        captions: Vec<Option<String>>,
    ) -> Result<Self> {
        let (n, ..) = latents.dims4().map_err(|_| {
            TrainError::invalid(
                "latents",
                format!("shape {:?}, expected [N, c, h, w]", latents.dims()),
            )
        })?;
        if n == 0 {
            return Err(TrainError::invalid("latents", "no examples"));
        }
        if labels.len() != n || captions.len() != n {
            return Err(TrainError::invalid(
                "latents",
                format!(
                    "{n} latents, {} labels, {} captions",
                    labels.len(),
                    captions.len()
                ),
            ));
        }
        if !matches!(latents.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(TrainError::invalid(
                "latents",
                format!("dtype {:?}; F32, F16 or BF16 are stored", latents.dtype()),
            ));
        }
        Ok(Self {
            latents: latents.to_device(&Device::Cpu)?,
            labels,
            captions,
            class_names: None,
            info: BTreeMap::new(),
        })
    }

    /// Encodes every example of `dataset` (center crop, no flip) in batches of `batch_size` on `device`
    /// with `encode`: `[B, C, H, W]` in [−1, 1] → `[B, c, h, w]` (already scaled as training wants them).
    pub fn encode(
        dataset: &ImageDataset,
        batch_size: usize,
        device: &Device,
        mut encode: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(TrainError::invalid("batch_size", "must be at least 1"));
        }
        let n = dataset.len();
        let mut chunks = Vec::with_capacity(n.div_ceil(batch_size));
        let (mut labels, mut captions) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for start in (0..n).step_by(batch_size) {
            let mut images = Vec::with_capacity(batch_size);
            for i in start..(start + batch_size).min(n) {
                let s = dataset.get_plain(i)?;
                images.push(s.image);
                labels.push(s.label);
                captions.push(s.caption);
            }
            let x = Tensor::stack(&images, 0)?.to_device(device)?;
            chunks.push(encode(&x)?.to_device(&Device::Cpu)?);
        }
        let mut cache = Self::new(Tensor::cat(&chunks, 0)?, labels, captions)?;
        cache.class_names = dataset.class_names().map(<[String]>::to_vec);
        Ok(cache)
    }

    /// `[N, c, h, w]` on the CPU.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }
    pub fn labels(&self) -> &[Option<usize>] {
        &self.labels
    }
    pub fn captions(&self) -> &[Option<String>] {
        &self.captions
    }

    /// Writes the cache atomically (a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let latents = self.latents.contiguous()?;
        let shape = latents.dims().to_vec();
        let (dtype, data) = match latents.dtype() {
            DType::F16 => (
                Dtype::F16,
                le_bytes(latents.flatten_all()?.to_vec1::<half::f16>()?, |v| {
                    v.to_le_bytes()
                }),
            ),
            DType::BF16 => (
                Dtype::BF16,
                le_bytes(latents.flatten_all()?.to_vec1::<half::bf16>()?, |v| {
                    v.to_le_bytes()
                }),
            ),
            _ => (
                Dtype::F32,
                le_bytes(
                    latents
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    |v| v.to_le_bytes(),
                ),
            ),
        };
        let mut tensors = vec![("latents".to_string(), Raw { dtype, shape, data })];
        if self.labels.iter().any(Option::is_some) {
            let values: Vec<i64> = self
                .labels
                .iter()
                .map(|l| l.map_or(-1, |l| l as i64))
                .collect();
            tensors.push((
                "labels".to_string(),
                Raw {
                    dtype: Dtype::I64,
                    shape: vec![values.len()],
                    data: le_bytes(values, |v| v.to_le_bytes()),
                },
            ));
        }
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
        ]);
        if self.captions.iter().any(Option::is_some) {
            meta.insert("captions".into(), json(&self.captions)?);
        }
        if let Some(names) = &self.class_names {
            meta.insert("class_names".into(), json(names)?);
        }
        for (k, v) in &self.info {
            meta.insert(format!("info.{k}"), v.clone());
        }
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| bad(path, format!("cannot serialise: {e}")))?;
        ldm_core::image::write_atomic(path, &bytes)?;
        Ok(())
    }

    /// Reads a cache written by [`save`](Self::save) onto the CPU, checking its format and counts.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(
                path,
                format!("not a latent cache (metadata `format` is not `{FORMAT}`)"),
            ));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(bad(
                path,
                format!(
                    "latent cache version {:?}, expected {VERSION}",
                    meta.get("version")
                ),
            ));
        }
        let view = st
            .tensor("latents")
            .map_err(|e| bad(path, format!("no `latents` tensor: {e}")))?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(bad(path, format!("`latents` has dtype {other:?}"))),
        };
        let latents = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        let n = latents.dims().first().copied().unwrap_or(0);
        let labels = match st.tensor("labels") {
            Ok(v) if v.dtype() == Dtype::I64 && v.shape() == [n] => v
                .data()
                .chunks_exact(8)
                .map(|b| {
                    let x = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    usize::try_from(x).ok()
                })
                .collect(),
            Ok(v) => {
                return Err(bad(
                    path,
                    format!(
                        "`labels` is {:?} {:?}, expected I64 [{n}]",
                        v.dtype(),
                        v.shape()
                    ),
                ))
            }
            Err(_) => vec![None; n],
        };
        let captions = match meta.get("captions") {
            Some(s) => serde_json::from_str(s)
                .map_err(|e| bad(path, format!("metadata `captions`: {e}")))?,
            None => vec![None; n],
        };
        let class_names = meta
            .get("class_names")
            .map(|s| serde_json::from_str(s))
            .transpose()
            .map_err(|e| bad(path, format!("metadata `class_names`: {e}")))?;
        let info = meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("info.").map(|k| (k.to_string(), v.clone())))
            .collect();
        let mut cache =
            Self::new(latents, labels, captions).map_err(|e| bad(path, e.to_string()))?;
        cache.class_names = class_names;
        cache.info = info;
        Ok(cache)
    }
}

impl Dataset for LatentCache {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_shape(&self) -> (usize, usize, usize) {
        let d = self.latents.dims();
        (d[1], d[2], d[3])
    }
    /// The stored latent as f32; `rng` is not used (no transforms).
    fn get(&self, index: usize, _rng: &mut TorchRng) -> Result<Sample> {
        if index >= self.len() {
            return Err(TrainError::invalid(
                "index",
                format!("example {index} of a cache of {}", self.len()),
            ));
        }
        Ok(Sample {
            image: self.latents.i(index)?.to_dtype(DType::F32)?,
            caption: self.captions[index].clone(),
            label: self.labels[index],
        })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| TrainError::invalid("latent cache metadata", e.to_string()))
}

fn le_bytes<T: Copy, const N: usize>(values: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
}

/// A tensor as bytes, for `safetensors::serialize`.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
