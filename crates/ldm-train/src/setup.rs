//! Shared set-up of the trainers: the data set a recipe names, its held-out split, weight files as stores, and
//! copying weights into a `VarMap`.
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ldm_core::rng::TorchRng;
use ldm_core::weights::{SafetensorsFile, WeightStore};

use crate::data::{
    find_idx_pair, load_idx_dataset, open_image_folder, randperm, ColorMode, Crop, DataReport,
    Dataset, FolderOptions, IdxOptions, IdxSplit, ImageDataset, ImageTransform, LabelSource,
};
use crate::error::{Result, TrainError};
use crate::recipe::{self, DataRecipe};

/// The training data a recipe names, and what was skipped while reading it.
pub fn open_dataset(r: &DataRecipe) -> Result<(ImageDataset, Option<DataReport>)> {
    let transform = if r.no_resize {
        ImageTransform::exact(r.size)
    } else {
        ImageTransform::new(r.size)
    }
    .with_flip(r.random_flip)
    .with_crop(if r.random_crop {
        Crop::Random
    } else {
        Crop::Center
    });
    if let Some(dir) = &r.mnist {
        let (images, labels) = find_idx_pair(dir, IdxSplit::Train)?;
        let opts = match r.size {
            28 => IdxOptions {
                transform: ImageTransform::exact(28).with_flip(r.random_flip),
                ..IdxOptions::native()
            },
            32 => IdxOptions {
                transform: ImageTransform::exact(32).with_flip(r.random_flip),
                ..IdxOptions::padded_32()
            },
            _ => IdxOptions {
                transform,
                ..IdxOptions::native()
            },
        };
        return Ok((load_idx_dataset(&images, Some(&labels), &opts)?, None));
    }
    let Some(dir) = &r.folder else {
        return Err(TrainError::invalid(
            "data",
            "name a source: `folder` or `mnist`",
        ));
    };
    let mut opts = FolderOptions::new(transform);
    opts.color = ColorMode::Auto;
    opts.labels = match &r.labels {
        None => LabelSource::None,
        Some(recipe::LabelSource::Subfolders) => LabelSource::SubFolders,
        Some(recipe::LabelSource::Csv(p)) => LabelSource::File(p.clone()),
    };
    let (ds, report) = open_image_folder(dir, &opts)?;
    Ok((ds, Some(report)))
}

/// Splits `ds` into a training and a held-out part: `fraction` of the examples (at least one when the fraction
/// is positive and there are two or more), chosen by a fixed permutation of `seed`.
pub fn split_holdout(
    ds: ImageDataset,
    fraction: f64,
    seed: u64,
) -> Result<(ImageDataset, Option<ImageDataset>)> {
    let n = ds.examples().len();
    let k = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
    let k = if fraction > 0.0 && n >= 2 {
        k.max(1)
    } else {
        k
    };
    if k == 0 {
        return Ok((ds, None));
    }
    let order = randperm(n, &mut TorchRng::new(seed ^ 0x5eed_401d));
    let (held, train): (Vec<usize>, Vec<usize>) = (order[..k].to_vec(), order[k..].to_vec());
    let pick = |idx: &[usize]| -> Result<ImageDataset> {
        let mut sorted = idx.to_vec();
        sorted.sort_unstable();
        let ex = sorted.iter().map(|&i| ds.examples()[i].clone()).collect();
        let part = ImageDataset::new(ex, ds.transform().clone())?;
        match ds.class_names() {
            Some(names) => part.with_class_names(names.to_vec()),
            None => Ok(part),
        }
    };
    Ok((pick(&train)?, Some(pick(&held)?)))
}

/// A weight file (safetensors, or a PyTorch `.ckpt`/`.pt`/`.pth` read by the safe unpickler) as a store with its
/// keys under `prefix`: a file that already keeps keys under `prefix` (a whole checkpoint) is taken as it is,
/// any other (e.g. an exported autoencoder) gets `prefix` put before every key. The file is read once.
pub fn open_store(path: &Path, prefix: &str) -> Result<WeightStore> {
    if !path.is_file() {
        return Err(TrainError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let mut store = WeightStore::new(path.display().to_string());
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        let file = Arc::new(SafetensorsFile::open(path)?);
        let add = if file.names().any(|k| k.starts_with(prefix)) {
            ""
        } else {
            prefix
        };
        store.add_file(&file, add);
    } else {
        let ckpt = ldm_core::ckpt::read_ckpt(path).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let add = if ckpt.tensors.iter().any(|(k, _)| k.starts_with(prefix)) {
            ""
        } else {
            prefix
        };
        for (k, t) in ckpt.tensors {
            store.insert(&format!("{add}{k}"), t);
        }
    }
    Ok(store)
}

/// Every variable of `varmap` whose name starts with one of `prefixes`, sorted by name.
pub fn vars_under(varmap: &VarMap, prefixes: &[&str]) -> Vec<(String, Var)> {
    let data = varmap
        .data()
        .lock()
        .expect("invariant: the VarMap lock is not poisoned");
    let mut out: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Sets each of `vars` from `store` (converted to the variable's dtype). With `required`, a variable the store
/// lacks is an error naming it; otherwise it keeps its value. Shape mismatches are always errors. Returns how
/// many were set.
pub fn load_into(
    vars: &[(String, Var)],
    store: &WeightStore,
    required: bool,
    what: &str,
) -> Result<usize> {
    let mut missing = Vec::new();
    let mut set = 0;
    for (name, var) in vars {
        match store.shape(name) {
            None => missing.push(name.as_str()),
            Some(shape) if shape != var.dims() => {
                return Err(TrainError::invalid(
                    "weights",
                    format!(
                        "{}: `{name}` has shape {shape:?}, the model {:?} ({what})",
                        store.origin(),
                        var.dims()
                    ),
                ))
            }
            Some(_) => {
                let t = store.load(name, var.dtype(), var.device())?;
                var.set(&t)?;
                set += 1;
            }
        }
    }
    if required && !missing.is_empty() {
        return Err(TrainError::invalid(
            "weights",
            format!(
                "{}: {} weights of the {what} are missing (first: `{}`)",
                store.origin(),
                missing.len(),
                missing[0]
            ),
        ));
    }
    Ok(set)
}

/// The device and dtype training runs in.
pub fn train_device() -> (Device, DType) {
    (Device::Cpu, DType::F32)
}

/// Single-channel images for a 3-channel model are repeated over the channels (grey → RGB); others pass as they
/// are ([`check_channels`] has refused other mismatches).
pub fn match_channels(x: &Tensor, want: usize) -> Result<Tensor> {
    if x.dim(1)? == 1 && want == 3 {
        Ok(x.repeat((1, 3, 1, 1))?)
    } else {
        Ok(x.clone())
    }
}

/// The data set's images have the channels a model takes (`want`), or are grey for an RGB model.
pub fn check_channels(ds: &impl Dataset, want: usize) -> Result<()> {
    let (c, _, _) = ds.sample_shape();
    if c != want && !(c == 1 && want == 3) {
        return Err(TrainError::invalid(
            "data",
            format!("the images have {c} channels, the model takes {want}"),
        ));
    }
    Ok(())
}
