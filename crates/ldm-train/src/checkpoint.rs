//! Training checkpoints: one safetensors file with everything a run needs to continue bit-exactly.
//!
//! Tensors: `model.<name>` (the weights), `ema.<name>` (the EMA shadow, if any), `<slot>.exp_avg.<name>` and
//! `<slot>.exp_avg_sq.<name>` for each optimiser (slot `optim` for the main one, e.g. `optim_disc` for a
//! discriminator's). `__metadata__` (strings): `format` = [`FORMAT`], `format_version`, `step`, `model_kind`,
//! `config` (the caller's training config, opaque JSON), `rng` (JSON: generator name → [`TorchRngState`]),
//! `model` (JSON list of weight names), `ema` (JSON: decay, num_updates, names), `optimizers` (JSON: slot →
//! hyper-parameters and per-parameter step counts). The name lists let [`TrainCheckpoint::load`] tell a
//! complete file from one with missing tensors.
//!
//! Files are written atomically ([`write_atomic`]): to `<path>.tmp-<pid>` in the same directory, fsync'd, renamed
//! over `<path>`, and the directory fsync'd. A crash or SIGKILL at any moment leaves either the old file or the
//! new one under the final name, never a partial one; at worst a stale `*.tmp-<pid>` file remains, which
//! loading never looks at and [`CheckpointDir::remove_stale_temp_files`] deletes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use ldm_core::rng::TorchRngState;
use ldm_core::weights::SafetensorsFile;
use serde::{Deserialize, Serialize};

use crate::ema::{match_named, EmaState};
use crate::error::{Result, TrainError};
use crate::optim::{AdamWConfig, AdamWState};

/// The `format` metadata value of an ldm-rs training checkpoint.
pub const FORMAT: &str = "ldm-rs-train-checkpoint";
/// The layout version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Everything saved at a checkpoint.
#[derive(Debug, Clone)]
pub struct TrainCheckpoint {
    /// What is being trained (e.g. `"ldm"`, `"autoencoder-kl"`), as the caller names it.
    pub model_kind: String,
    /// Optimiser steps completed.
    pub step: u64,
    /// The training configuration as JSON (stored as is).
    pub config: String,
    /// Random generators by name (e.g. `"noise"`, `"data"`).
    pub rng: BTreeMap<String, TorchRngState>,
    /// The weights by parameter name (see [`snapshot`]).
    pub model: Vec<(String, Tensor)>,
    pub ema: Option<EmaState>,
    /// Optimiser states by slot name (`"optim"` for the main optimiser); a slot is a plain identifier.
    pub optimizers: BTreeMap<String, AdamWState>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmaMeta {
    decay: f64,
    num_updates: Option<u64>,
    names: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimMeta {
    config: AdamWConfig,
    steps: BTreeMap<String, u64>,
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| TrainError::invalid("checkpoint metadata", e.to_string()))
}

fn valid_slot(slot: &str) -> bool {
    !slot.is_empty()
        && slot != "model"
        && slot != "ema"
        && slot
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl TrainCheckpoint {
    /// Writes the checkpoint to `path` atomically (see the module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, &Tensor)> = Vec::new();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".into(), FORMAT_VERSION.to_string());
        meta.insert("step".into(), self.step.to_string());
        meta.insert("model_kind".into(), self.model_kind.clone());
        meta.insert("config".into(), self.config.clone());
        meta.insert("rng".into(), json(&self.rng)?);
        let names: Vec<&str> = self.model.iter().map(|(n, _)| n.as_str()).collect();
        meta.insert("model".into(), json(&names)?);
        for (name, t) in &self.model {
            tensors.push((format!("model.{name}"), t));
        }
        if let Some(ema) = &self.ema {
            let m = EmaMeta {
                decay: ema.decay,
                num_updates: ema.num_updates,
                names: ema.shadow.iter().map(|(n, _)| n.clone()).collect(),
            };
            meta.insert("ema".into(), json(&m)?);
            for (name, t) in &ema.shadow {
                tensors.push((format!("ema.{name}"), t));
            }
        }
        let mut optim_meta = BTreeMap::new();
        for (slot, state) in &self.optimizers {
            if !valid_slot(slot) {
                return Err(TrainError::invalid(
                    "optimizer slot",
                    format!("`{slot}` is not a plain identifier (or is reserved)"),
                ));
            }
            for name in state.steps.keys() {
                let (Some(m), Some(v)) = (state.exp_avg.get(name), state.exp_avg_sq.get(name))
                else {
                    return Err(TrainError::invalid(
                        "optimizer state",
                        format!("`{slot}`: `{name}` has a step count but not both moments"),
                    ));
                };
                tensors.push((format!("{slot}.exp_avg.{name}"), m));
                tensors.push((format!("{slot}.exp_avg_sq.{name}"), v));
            }
            optim_meta.insert(
                slot.clone(),
                OptimMeta {
                    config: state.config,
                    steps: state.steps.clone(),
                },
            );
        }
        meta.insert("optimizers".into(), json(&optim_meta)?);
        let mut seen = BTreeSet::new();
        for (k, _) in &tensors {
            if !seen.insert(k.as_str()) {
                return Err(TrainError::invalid(
                    "checkpoint",
                    format!("tensor `{k}` would be written twice"),
                ));
            }
        }
        write_atomic(path, |w| write_safetensors(w, &tensors, &meta))
    }

    /// Reads and validates a checkpoint, placing its tensors on `device`. Errors name the file and say whether it
    /// is not a training checkpoint, truncated, from a newer format, or missing tensors.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = SafetensorsFile::open(path).map_err(|e| match e {
            ldm_core::Error::TruncatedSafetensors { have, want, .. } => ckpt_err(
                path,
                format!(
                    "truncated: {have} bytes, the header promises {want} (an interrupted copy or a full disk?)"
                ),
            ),
            ldm_core::Error::NotSafetensors { reason, .. } => {
                ckpt_err(path, format!("not a safetensors file ({reason})"))
            }
            other => TrainError::Core(other),
        })?;
        let meta = file.metadata();
        let get = |key: &str| -> Result<&str> {
            meta.get(key)
                .map(String::as_str)
                .ok_or_else(|| ckpt_err(path, format!("metadata has no `{key}`")))
        };
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(ckpt_err(
                    path,
                    format!("not an ldm-rs training checkpoint (format `{f}`)"),
                ))
            }
            None => {
                return Err(ckpt_err(
                    path,
                    "not an ldm-rs training checkpoint (no `format` metadata; a model file?)",
                ))
            }
        }
        let parse_err = |key: &str, e: &dyn std::fmt::Display| {
            ckpt_err(path, format!("metadata `{key}` is malformed: {e}"))
        };
        let version: u32 = get("format_version")?
            .parse()
            .map_err(|e| parse_err("format_version", &e))?;
        if version > FORMAT_VERSION {
            return Err(ckpt_err(
                path,
                format!(
                    "format version {version} is newer than this build reads ({FORMAT_VERSION})"
                ),
            ));
        }
        let step: u64 = get("step")?.parse().map_err(|e| parse_err("step", &e))?;
        let rng: BTreeMap<String, TorchRngState> =
            serde_json::from_str(get("rng")?).map_err(|e| parse_err("rng", &e))?;
        let model_names: Vec<String> =
            serde_json::from_str(get("model")?).map_err(|e| parse_err("model", &e))?;
        let ema_meta: Option<EmaMeta> = match meta.get("ema") {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| parse_err("ema", &e))?),
            None => None,
        };
        let optim_meta: BTreeMap<String, OptimMeta> =
            serde_json::from_str(get("optimizers")?).map_err(|e| parse_err("optimizers", &e))?;

        // Every tensor the metadata promises must be there, and nothing else.
        let mut expected: Vec<String> = model_names.iter().map(|n| format!("model.{n}")).collect();
        if let Some(e) = &ema_meta {
            expected.extend(e.names.iter().map(|n| format!("ema.{n}")));
        }
        for (slot, o) in &optim_meta {
            for name in o.steps.keys() {
                expected.push(format!("{slot}.exp_avg.{name}"));
                expected.push(format!("{slot}.exp_avg_sq.{name}"));
            }
        }
        let present: BTreeSet<&str> = file.names().collect();
        let missing: Vec<&str> = expected
            .iter()
            .map(String::as_str)
            .filter(|k| !present.contains(k))
            .collect();
        if !missing.is_empty() {
            return Err(ckpt_err(
                path,
                format!(
                    "{} tensor(s) missing (first: `{}`)",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
        let expected_set: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        if let Some(extra) = present.iter().find(|k| !expected_set.contains(*k)) {
            return Err(ckpt_err(
                path,
                format!("tensor `{extra}` is not described by the metadata"),
            ));
        }
        let load = |key: &str| -> Result<Tensor> { Ok(file.load(key)?.to_device(device)?) };

        let mut model = Vec::with_capacity(model_names.len());
        for n in model_names {
            let t = load(&format!("model.{n}"))?;
            model.push((n, t));
        }
        let ema = match ema_meta {
            Some(e) => {
                let mut shadow = Vec::with_capacity(e.names.len());
                for n in e.names {
                    let t = load(&format!("ema.{n}"))?;
                    shadow.push((n, t));
                }
                Some(EmaState {
                    decay: e.decay,
                    num_updates: e.num_updates,
                    shadow,
                })
            }
            None => None,
        };
        let mut optimizers = BTreeMap::new();
        for (slot, o) in optim_meta {
            let mut state = AdamWState {
                config: o.config,
                steps: BTreeMap::new(),
                exp_avg: BTreeMap::new(),
                exp_avg_sq: BTreeMap::new(),
            };
            for (name, s) in o.steps {
                let m = load(&format!("{slot}.exp_avg.{name}"))?;
                let v = load(&format!("{slot}.exp_avg_sq.{name}"))?;
                state.exp_avg.insert(name.clone(), m);
                state.exp_avg_sq.insert(name.clone(), v);
                state.steps.insert(name, s);
            }
            optimizers.insert(slot, state);
        }
        Ok(Self {
            model_kind: get("model_kind")?.to_string(),
            step,
            config: get("config")?.to_string(),
            rng,
            model,
            ema,
            optimizers,
        })
    }
}

/// The current values of named parameters, copied (a `Var` is updated in place by the optimiser).
pub fn snapshot(params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
    params
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Sets named parameters from saved tensors: the names must match exactly and the shapes agree (all problems
/// are reported together, and nothing is set unless all match). Tensors move to each parameter's device and dtype.
pub fn restore_params(params: &[(String, Var)], tensors: &[(String, Tensor)]) -> Result<()> {
    let matched = match_named(params, tensors, "model weights")?;
    for ((_, var), t) in params.iter().zip(matched) {
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn safetensors_dtype(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        _ => return None,
    })
}

/// The little-endian bytes of a tensor in row-major order.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    fn le<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        Ok(t.to_vec1::<T>()?.into_iter().flat_map(f).collect())
    }
    match t.dtype() {
        DType::F32 => le(&t, f32::to_le_bytes),
        DType::F16 => le(&t, half::f16::to_le_bytes),
        DType::BF16 => le(&t, half::bf16::to_le_bytes),
        DType::F64 => le(&t, f64::to_le_bytes),
        DType::I64 => le(&t, i64::to_le_bytes),
        DType::U32 => le(&t, u32::to_le_bytes),
        DType::U8 => le(&t, |v: u8| [v]),
        other => Err(TrainError::invalid(
            "checkpoint",
            format!("cannot store dtype {other:?}"),
        )),
    }
}

/// Writes a safetensors file (header with `__metadata__`, then the tensors in key order) to `w`.
pub fn write_safetensors(
    w: &mut impl Write,
    tensors: &[(String, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata)
            .map_err(|e| TrainError::invalid("checkpoint metadata", e.to_string()))?,
    );
    let mut offset = 0usize;
    for (key, t) in &sorted {
        let dtype = safetensors_dtype(t.dtype()).ok_or_else(|| {
            TrainError::invalid(
                "checkpoint",
                format!(
                    "tensor `{key}` has dtype {:?}, which cannot be stored",
                    t.dtype()
                ),
            )
        })?;
        let len = t.elem_count() * t.dtype().size_in_bytes();
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len() + (8 - header.len() % 8) % 8, b' ');
    let io = |e: std::io::Error| TrainError::invalid("checkpoint", format!("write failed: {e}"));
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (_, t) in sorted {
        w.write_all(&tensor_bytes(t)?).map_err(io)?;
    }
    Ok(())
}

/// Writes `tensors` (with string `metadata`) to `path` as one safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, |w| write_safetensors(w, tensors, metadata))
}

/// The temporary name `path` is written under before the rename: `<path>.tmp-<pid>`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainError::io(dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a file atomically: `write` fills `<path>.tmp-<pid>` (created or truncated), which is fsync'd and then
/// renamed over `path`; the directory is fsync'd after the rename. On any error the temporary file is removed
/// and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    if path.file_name().is_none() {
        return Err(TrainError::invalid(
            "checkpoint path",
            format!("{} names no file", path.display()),
        ));
    }
    let tmp = temp_path(path);
    let written = (|| -> Result<()> {
        let file = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| TrainError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| TrainError::io(&tmp, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::io(path, e));
    }
    sync_dir(parent_dir(path))
}

/// A directory of checkpoints: `step-000100.safetensors` per save, `last.safetensors` for the newest (a hard
/// link to it where the file system allows, else a copy), and only the newest `keep_last` step files kept
/// (0 keeps all).
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep_last: usize,
}

impl CheckpointDir {
    /// Opens (creating it if needed) a checkpoint directory.
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        Ok(Self { dir, keep_last })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn step_path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:06}.safetensors"))
    }

    pub fn last_path(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }

    /// The step files present, oldest first.
    pub fn step_files(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let step = name
                .strip_prefix("step-")
                .and_then(|s| s.strip_suffix(".safetensors"))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(step) = step {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Saves `ckpt` as the step file of its step and as `last.safetensors` (each atomically), then removes
    /// step files beyond the newest `keep_last`. Returns the step file's path.
    pub fn save(&self, ckpt: &TrainCheckpoint) -> Result<PathBuf> {
        let path = self.step_path(ckpt.step);
        ckpt.save(&path)?;
        let last = self.last_path();
        let tmp = temp_path(&last);
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&path, &tmp).is_err() {
            write_atomic(&last, |w| {
                let mut src = File::open(&path).map_err(|e| TrainError::io(&path, e))?;
                std::io::copy(&mut src, w).map_err(|e| TrainError::io(&path, e))?;
                Ok(())
            })?;
        } else {
            std::fs::rename(&tmp, &last).map_err(|e| TrainError::io(&last, e))?;
            sync_dir(&self.dir)?;
        }
        if self.keep_last > 0 {
            let files = self.step_files()?;
            let excess = files.len().saturating_sub(self.keep_last);
            for (step, old) in files.into_iter().take(excess) {
                if step != ckpt.step {
                    std::fs::remove_file(&old).map_err(|e| TrainError::io(&old, e))?;
                }
            }
        }
        Ok(path)
    }

    /// The checkpoint to resume from: `last.safetensors` if present, else the newest step file.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let last = self.last_path();
        if last.is_file() {
            return Ok(Some(last));
        }
        Ok(self.step_files()?.pop().map(|(_, p)| p))
    }

    /// Deletes `*.tmp-<pid>` files left in the directory by interrupted writes of other processes (not this
    /// one's). Call it once at start-up, when no other process writes to the directory. Returns how many.
    pub fn remove_stale_temp_files(&self) -> Result<usize> {
        let own = format!(".tmp-{}", std::process::id());
        let entries = std::fs::read_dir(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = name.rsplit_once(".tmp-").is_some_and(|(stem, pid)| {
                stem.ends_with(".safetensors")
                    && !pid.is_empty()
                    && pid.chars().all(|c| c.is_ascii_digit())
            });
            if stale && !name.ends_with(&own) {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| TrainError::io(&p, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
