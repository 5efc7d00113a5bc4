//! Weight files and strict loading.
//!
//! A [`WeightStore`] maps canonical keys (the original CompVis/LDM names, see docs/adr/0001) to where each
//! tensor lives: a memory-mapped safetensors file (read only when a model asks for the tensor, in its stored
//! dtype until then) or a tensor already in memory (from a `.ckpt`). Models are built through a candle
//! `VarBuilder` backed by a [`StrictLoader`], which records every request: missing tensors, tensors of the wrong
//! shape and tensors nobody asked for are all collected and reported together ([`LoadReport`], STYLE P6).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, Result};

/// One safetensors file, memory-mapped, with its header parsed and checked against the file length.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, StoredInfo>,
    metadata: HashMap<String, String>,
}

#[derive(Debug, Clone)]
struct StoredInfo {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Opens and validates `path`. The data is not read; tensors are paged in when loaded.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap reader we rely on the file not being truncated while
        // open (a concurrent writer of checkpoints would be a user error; ldm-rs writes files atomically).
        let mmap =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let not_st = |reason: String| Error::NotSafetensors {
            path: path.to_path_buf(),
            reason,
        };
        if mmap.len() < 8 {
            return Err(not_st(format!(
                "{} bytes is too short for a header",
                mmap.len()
            )));
        }
        let mut n_bytes = [0u8; 8];
        n_bytes.copy_from_slice(&mmap[..8]);
        let n = u64::from_le_bytes(n_bytes);
        if n > 100_000_000 || mmap.get(8) != Some(&b'{') {
            return Err(not_st("no JSON header at the start".into()));
        }
        let data_start = 8 + n as usize;
        if mmap.len() < data_start {
            return Err(Error::TruncatedSafetensors {
                path: path.to_path_buf(),
                have: mmap.len() as u64,
                want: data_start as u64,
            });
        }
        let header: serde_json::Value = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| not_st(format!("header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| not_st("header is not a JSON object".into()))?;
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::new();
        let mut data_end = 0usize;
        for (name, v) in obj {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone())
                .map_err(|e| not_st(format!("bad entry for `{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            let dtype = candle_dtype(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
                path: path.to_path_buf(),
                key: name.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
            let want = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
            if end < start || end - start != want {
                return Err(not_st(format!(
                    "tensor `{name}`: {} bytes for shape {:?} of {dtype:?}",
                    end.saturating_sub(start),
                    info.shape
                )));
            }
            data_end = data_end.max(end);
            tensors.insert(
                name.clone(),
                StoredInfo {
                    dtype,
                    shape: info.shape,
                    start,
                    end,
                },
            );
        }
        if mmap.len() < data_start + data_end {
            return Err(Error::TruncatedSafetensors {
                path: path.to_path_buf(),
                have: mmap.len() as u64,
                want: (data_start + data_end) as u64,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|i| i.dtype)
    }

    /// Reads one tensor onto the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            Error::Candle(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
        })?;
        let (start, end) = (self.data_start + info.start, self.data_start + info.end);
        let t = Tensor::from_raw_buffer(
            &self.mmap[start..end],
            info.dtype,
            &info.shape,
            &Device::Cpu,
        )?;
        // The tensor now owns a copy: drop the file's pages from this process's resident set, or they would count
        // a second time in its peak until the whole map is closed. They stay in the page cache, so a second read
        // of the same tensor only faults them back in.
        #[cfg(unix)]
        // SAFETY: the map is read-only (no private changes to lose), and `t` no longer borrows it; DontNeed only
        // unmaps pages, which the next access maps again from the file.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
        Ok(t)
    }
}

/// Where one canonical tensor comes from.
#[derive(Clone)]
enum Source {
    File {
        file: Arc<SafetensorsFile>,
        key: String,
    },
    Memory(Tensor),
}

#[derive(Clone)]
struct Entry {
    source: Source,
    /// The shape models see. It differs from the stored shape only by a declared reshape (same element count),
    /// e.g. diffusers' linear attention weights [C, C] standing for LDM's 1×1 convolutions [C, C, 1, 1].
    shape: Vec<usize>,
    dtype: DType,
    /// A patch added on load, in f32 on the CPU (merged LoRAs: base + Σ delta, see [`WeightStore::add_delta`]).
    delta: Option<Tensor>,
}

/// Canonical key → stored tensor.
#[derive(Clone, Default)]
pub struct WeightStore {
    entries: BTreeMap<String, Entry>,
    origin: String,
}

impl WeightStore {
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            entries: BTreeMap::new(),
            origin: origin.into(),
        }
    }

    /// Adds every tensor of `file` under its own name prefixed by `prefix`.
    pub fn add_file(&mut self, file: &Arc<SafetensorsFile>, prefix: &str) {
        for name in file.names() {
            self.add_from_file(&format!("{prefix}{name}"), file, name, None);
        }
    }

    /// Adds `file`'s tensor `key` as canonical `canonical`, optionally seen under another shape of the same size.
    pub fn add_from_file(
        &mut self,
        canonical: &str,
        file: &Arc<SafetensorsFile>,
        key: &str,
        reshape: Option<Vec<usize>>,
    ) {
        let (Some(stored), Some(dtype)) = (file.shape(key), file.dtype(key)) else {
            return;
        };
        let shape = reshape.unwrap_or_else(|| stored.to_vec());
        let source = Source::File {
            file: Arc::clone(file),
            key: key.to_string(),
        };
        self.entries.insert(
            canonical.to_string(),
            Entry {
                source,
                shape,
                dtype,
                delta: None,
            },
        );
    }

    /// Adds a tensor that is already in memory (from a `.ckpt`, or computed).
    pub fn insert(&mut self, canonical: &str, tensor: Tensor) {
        let shape = tensor.dims().to_vec();
        let dtype = tensor.dtype();
        self.entries.insert(
            canonical.to_string(),
            Entry {
                source: Source::Memory(tensor),
                shape,
                dtype,
                delta: None,
            },
        );
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.entries.get(key).map(|e| e.dtype)
    }
    /// Keys under `prefix`, with the prefix removed.
    pub fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .keys()
            .filter_map(move |k| k.strip_prefix(prefix))
    }

    /// Adds `delta` (any float dtype, the shape models see) to `key`: [`WeightStore::load`] then returns
    /// `stored + Σ delta`, summed in f32 and cast to the requested dtype. Used to merge LoRAs at load.
    pub fn add_delta(&mut self, key: &str, delta: &Tensor) -> Result<()> {
        let entry = self.entries.get_mut(key).ok_or_else(|| {
            Error::Candle(candle_core::Error::CannotFindTensor {
                path: key.to_string(),
            })
        })?;
        if delta.dims() != entry.shape.as_slice() {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "patch for `{key}`: shape {:?}, the weight is {:?}",
                delta.dims(),
                entry.shape
            ))));
        }
        let delta = delta.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        entry.delta = Some(match entry.delta.take() {
            Some(d) => (d + delta)?,
            None => delta,
        });
        Ok(())
    }

    /// Loads `key` as `dtype` on `device`, in the shape models see.
    /// Whether a delta (a merged LoRA) is added to `key` on load.
    pub fn has_delta(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|e| e.delta.is_some())
    }

    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entries.get(key).ok_or_else(|| {
            Error::Candle(candle_core::Error::CannotFindTensor {
                path: key.to_string(),
            })
        })?;
        let t = match &entry.source {
            Source::File { file, key } => file.load(key)?,
            Source::Memory(t) => t.clone(),
        };
        let t = if t.dims() != entry.shape.as_slice() {
            t.reshape(entry.shape.as_slice())?
        } else {
            t
        };
        let t = match &entry.delta {
            Some(d) => (t.to_dtype(DType::F32)? + d)?,
            None => t,
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Everything that did not fit when models were built from a [`WeightStore`].
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub origin: String,
    pub missing: Vec<(String, Vec<usize>)>,
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    pub unused: Vec<String>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty() && self.unused.is_empty()
    }
}

impl std::error::Error for LoadReport {}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 8;
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            let list: Vec<String> = self
                .missing
                .iter()
                .take(SHOW)
                .map(|(k, s)| format!("`{k}` {s:?}"))
                .collect();
            parts.push(format!(
                "{} missing ({}{})",
                self.missing.len(),
                list.join(", "),
                more(self.missing.len(), SHOW)
            ));
        }
        if !self.mismatched.is_empty() {
            let list: Vec<String> = self
                .mismatched
                .iter()
                .take(SHOW)
                .map(|(k, want, got)| format!("`{k}` is {got:?}, expected {want:?}"))
                .collect();
            parts.push(format!(
                "{} of the wrong shape ({}{})",
                self.mismatched.len(),
                list.join(", "),
                more(self.mismatched.len(), SHOW)
            ));
        }
        if !self.unused.is_empty() {
            let list: Vec<String> = self
                .unused
                .iter()
                .take(SHOW)
                .map(|k| format!("`{k}`"))
                .collect();
            parts.push(format!(
                "{} unexpected ({}{})",
                self.unused.len(),
                list.join(", "),
                more(self.unused.len(), SHOW)
            ));
        }
        write!(
            f,
            "{}: weights do not fit the model: {}",
            self.origin,
            parts.join("; ")
        )
    }
}

fn more(n: usize, shown: usize) -> String {
    if n > shown {
        format!(", and {} more", n - shown)
    } else {
        String::new()
    }
}

#[derive(Default)]
struct Requests {
    /// Canonical key → shape the model asked for (None: asked without a shape).
    asked: BTreeMap<String, Option<Vec<usize>>>,
    missing: Vec<(String, Vec<usize>)>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// A `VarBuilder` backend over a [`WeightStore`] that never fails a request: a missing or mis-shaped tensor is
/// recorded and replaced by zeros, so that building all components finds every problem; [`StrictLoader::finish`]
/// then reports them together.
#[derive(Clone)]
pub struct StrictLoader {
    store: Arc<WeightStore>,
    requests: Arc<Mutex<Requests>>,
    keep_stored: bool,
}

impl StrictLoader {
    pub fn new(store: Arc<WeightStore>) -> Self {
        Self {
            store,
            requests: Arc::new(Mutex::new(Requests::default())),
            keep_stored: false,
        }
    }

    /// Matrices and convolution kernels (rank ≥ 2) stored in f16 or bf16 are handed out in their stored dtype
    /// when f32 is asked for on the CPU, instead of being widened at load: half the memory for an fp16
    /// checkpoint. The models' `Linear` and `Conv2d` (`ldm_kernels::nn`) widen them for each forward pass and
    /// every other consumer converts on build, so the outputs are bit-identical to loading in f32. Tensors with a
    /// merged LoRA delta are f32 already. Off by default; inference turns it on.
    pub fn keep_stored_dtype(mut self, keep: bool) -> Self {
        self.keep_stored = keep;
        self
    }

    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    /// A `VarBuilder` rooted at the canonical key root, loading tensors as `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn requests(&self) -> std::sync::MutexGuard<'_, Requests> {
        // A poisoned lock only means another thread panicked mid-record; the data is still a valid record.
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every (key, shape) the models asked for, sorted by key.
    pub fn requested(&self) -> Vec<(String, Option<Vec<usize>>)> {
        self.requests()
            .asked
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Fails with everything that did not fit. Stored keys under one of `ignore_prefixes` (e.g. `model_ema.`, the
    /// DDPM schedule buffers) may stay unused.
    pub fn finish(&self, ignore: &dyn Fn(&str) -> bool) -> std::result::Result<(), LoadReport> {
        let req = self.requests();
        let asked: BTreeSet<&str> = req.asked.keys().map(|s| s.as_str()).collect();
        let unused: Vec<String> = self
            .store
            .keys()
            .filter(|k| !asked.contains(k) && !ignore(k))
            .map(|k| k.to_string())
            .collect();
        let report = LoadReport {
            origin: self.store.origin.clone(),
            missing: req.missing.clone(),
            mismatched: req.mismatched.clone(),
            unused,
        };
        if report.is_clean() {
            Ok(())
        } else {
            Err(report)
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for StrictLoader {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let want = s.dims().to_vec();
        let mut req = self.requests();
        req.asked.insert(name.to_string(), Some(want.clone()));
        match self.store.shape(name) {
            None => {
                req.missing.push((name.to_string(), want));
                Tensor::zeros(s, dtype, dev)
            }
            Some(found) if found != want.as_slice() => {
                req.mismatched
                    .push((name.to_string(), want, found.to_vec()));
                Tensor::zeros(s, dtype, dev)
            }
            Some(_) => {
                drop(req);
                let dtype = match self.store.dtype(name) {
                    Some(stored @ (DType::F16 | DType::BF16))
                        if self.keep_stored
                            && dtype == DType::F32
                            && dev.is_cpu()
                            && want.len() >= 2
                            && !self.store.has_delta(name) =>
                    {
                        stored
                    }
                    _ => dtype,
                };
                self.store
                    .load(name, dtype, dev)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.requests().asked.insert(name.to_string(), None);
        self.store
            .load(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.contains(name)
    }
}
