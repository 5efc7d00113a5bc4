//! Merging LoRAs into a [`WeightStore`] at load: W = W0 + Σ_files weight · (alpha / r) · up @ down, summed in f32
//! by [`WeightStore::add_delta`]; the model is then built from the store as usual.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ldm_core::weights::WeightStore;

use super::error::{LoraError, Result, ShapeError};
use super::file::{read_lora, LoraFile};
use super::names::LoraTargets;

/// What one file patched.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFileReport {
    pub path: PathBuf,
    pub weight: f64,
    /// Modules of the file, all of which matched a weight.
    pub modules: usize,
    /// Canonical keys patched by this file (a fused q/k/v weight once).
    pub keys: usize,
}

/// What [`apply_loras`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    pub files: Vec<LoraFileReport>,
    /// Every canonical key that was patched, by any file.
    pub keys: BTreeSet<String>,
}

impl LoraReport {
    pub fn modules_matched(&self) -> usize {
        self.files.iter().map(|f| f.modules).sum()
    }
}

/// Reads each `(file, weight)` and adds its changes to `store`. Every file is checked completely (names, ranks,
/// shapes) before anything of it is added, so a failing file leaves the store as the previous files left it.
pub fn apply_loras(
    store: &mut WeightStore,
    targets: &LoraTargets,
    loras: &[(PathBuf, f64)],
) -> Result<LoraReport> {
    let mut report = LoraReport::default();
    for (path, weight) in loras {
        let file = read_lora(path)?;
        let keys = apply_lora(store, targets, &file, *weight)?;
        report.files.push(LoraFileReport {
            path: path.clone(),
            weight: *weight,
            modules: file.modules.len(),
            keys: keys.len(),
        });
        report.keys.extend(keys);
    }
    Ok(report)
}

/// Adds `weight` times the changes of `file` to `store`; returns the canonical keys patched.
pub fn apply_lora(
    store: &mut WeightStore,
    targets: &LoraTargets,
    file: &LoraFile,
    weight: f64,
) -> Result<BTreeSet<String>> {
    if !weight.is_finite() {
        return Err(LoraError::Invalid {
            field: "lora weight",
            reason: format!("{weight} for {}", file.path.display()),
        });
    }
    let unknown: Vec<String> = file
        .modules
        .iter()
        .filter(|m| targets.get(&m.name).is_none())
        .map(|m| m.name.clone())
        .collect();
    if !unknown.is_empty() {
        return Err(LoraError::UnknownModules {
            path: file.path.clone(),
            modules: unknown,
        });
    }
    let mut patches = Vec::with_capacity(file.modules.len());
    for m in &file.modules {
        let Some(t) = targets.get(&m.name) else {
            continue; // checked above
        };
        let want = t.module_shape();
        let got = m.delta_shape();
        let fits = if got.len() == want.len() {
            got == want
        } else {
            // a linear LoRA on a 1x1 conv weight (or the reverse): same rows, same element count
            got[0] == want[0] && numel(&got) == numel(&want)
        };
        if !fits {
            return Err(shape_error(&file.path, &m.name, &t.key, t.block, got, want));
        }
        let delta = (m.delta()? * weight)?.reshape(want.as_slice())?;
        let full = match t.block {
            None => delta,
            Some((index, count)) => embed_rows(&delta, index, count)?,
        };
        patches.push((t.key.clone(), full));
    }
    let mut keys = BTreeSet::new();
    for (key, delta) in patches {
        store.add_delta(&key, &delta)?;
        keys.insert(key);
    }
    Ok(keys)
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn shape_error(
    path: &Path,
    module: &str,
    key: &str,
    block: Option<(usize, usize)>,
    lora: Vec<usize>,
    base: Vec<usize>,
) -> LoraError {
    LoraError::Shape(Box::new(ShapeError {
        path: path.to_path_buf(),
        module: module.to_string(),
        key: key.to_string(),
        what: if block.is_some() {
            "(its q/k/v block)"
        } else {
            "(the weight)"
        },
        lora,
        base,
    }))
}

/// `delta` as row block `index` of `count` of a tensor that is zero elsewhere.
fn embed_rows(delta: &Tensor, index: usize, count: usize) -> Result<Tensor> {
    let rows = delta.dims()[0];
    let mut parts = Vec::with_capacity(3);
    let zeros = |n: usize| -> Result<Tensor> {
        let mut s = delta.dims().to_vec();
        s[0] = n;
        Ok(Tensor::zeros(s, DType::F32, &Device::Cpu)?)
    };
    if index > 0 {
        parts.push(zeros(index * rows)?);
    }
    parts.push(delta.clone());
    if index + 1 < count {
        parts.push(zeros((count - index - 1) * rows)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
