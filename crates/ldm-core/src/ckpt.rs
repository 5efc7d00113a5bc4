//! Reading PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`) into candle tensors, without executing code.
//!
//! Two container formats exist (torch `serialization.py`):
//!
//! * **zip** (torch >= 1.6, the default): `<archive>/data.pkl` is a pickle whose tensors point through
//!   persistent ids `('storage', FloatStorage, key, location, numel)` at raw little-endian entries
//!   `<archive>/data/<key>`; `<archive>/byteorder` says "little" or "big" (absent: little).
//! * **legacy** (`_use_new_zipfile_serialization=False`, torch < 1.6): five pickles in a row — magic number
//!   `0x1950a86a20f9469cfc6c`, protocol version 1001, sys info, the object, the sorted storage keys — then, for
//!   each key, an 8-byte element count and the raw little-endian elements.
//!
//! The even older tar format (torch < 0.4) is recognised and refused with a clear message.
//!
//! The pickle is run by the restricted machine of [`crate::pickle`] first; it only records where each tensor's
//! bytes are. Then the state dict is chosen (the top-level dict, or its `state_dict` entry), nested dicts are
//! flattened with '.', and each storage those tensors use is read exactly once, straight from a memory map of the
//! file, into one tensor copy per tensor (strided views become contiguous copies). Storages outside the state
//! dict (optimizer state, callbacks) are never read.
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::pickle::{
    Arena, Obj, PersistentIds, PickleError, StorageDtype, TensorRef, Unpickler, Value,
};

/// Why a checkpoint could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a PyTorch checkpoint ({reason})", path.display())]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("{}: legacy tar checkpoint (torch < 0.4) is not supported; load and re-save it with a recent torch", path.display())]
    LegacyTar { path: PathBuf },
    #[error("{}: unreadable zip archive (truncated or corrupt): {detail}", path.display())]
    Zip { path: PathBuf, detail: String },
    #[error("{}: truncated: {detail}", path.display())]
    Truncated { path: PathBuf, detail: String },
    #[error("{}: missing zip entry '{entry}'", path.display())]
    MissingEntry { path: PathBuf, entry: String },
    #[error("forbidden global '{global}' in {} ({entry}): ldm-rs never executes code from a checkpoint", path.display())]
    ForbiddenGlobal {
        path: PathBuf,
        entry: String,
        global: String,
    },
    #[error("{} ({entry}): {source}", path.display())]
    Pickle {
        path: PathBuf,
        entry: String,
        source: PickleError,
    },
    #[error("{}: tensor '{key}' has dtype {dtype}, which ldm-rs does not support", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: &'static str,
    },
    #[error("{}: tensor '{key}': {detail}", path.display())]
    BadTensor {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("{}: {detail}", path.display())]
    Layout { path: PathBuf, detail: String },
    #[error("{}: {source}", path.display())]
    Candle {
        path: PathBuf,
        source: candle_core::Error,
    },
}

pub type Result<T> = std::result::Result<T, CkptError>;

/// A non-tensor value found beside the weights (e.g. `global_step`, `epoch`).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// Which container the checkpoint used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CkptFormat {
    /// torch >= 1.6 zip archive.
    Zip,
    /// torch < 1.6 (or `_use_new_zipfile_serialization=False`) raw pickle stream.
    Legacy,
}

/// The weights and scalars of a checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// State-dict tensors in file order, on the CPU, in their stored dtype (torch `bool` becomes `U8`).
    /// Names are flattened with '.' (`{"model": {"w": t}}` gives `model.w`).
    pub tensors: Vec<(String, Tensor)>,
    /// Plain values at the top level and inside the state dict: ints (numpy scalars included), floats,
    /// bools, strings.
    pub scalars: Vec<(String, Scalar)>,
    pub format: CkptFormat,
}

impl Checkpoint {
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn scalar(&self, name: &str) -> Option<&Scalar> {
        self.scalars.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }
}

/// Reads a PyTorch checkpoint. Nothing in the file is executed: any global outside the data-only allow-list of
/// [`crate::pickle::Global`] fails with [`CkptError::ForbiddenGlobal`].
pub fn read_ckpt(path: &Path) -> Result<Checkpoint> {
    let io = |source| CkptError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(not_ckpt(path, "the file is empty"));
    }
    // SAFETY: the map is only read; like every memory-mapped weight loader (safetensors included) we rely on
    // the file not being truncated by another process while it is loaded.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    // Each storage is read once, front to back: let the kernel read ahead and drop pages behind us.
    let _ = map.advise(memmap2::Advice::Sequential);
    let bytes: &[u8] = &map;
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        read_zip(path, bytes)
    } else if bytes.get(257..262) == Some(b"ustar") {
        Err(CkptError::LegacyTar {
            path: path.to_path_buf(),
        })
    } else if bytes.first() == Some(&0x80) {
        read_legacy(path, bytes)
    } else {
        Err(not_ckpt(
            path,
            "neither a zip archive nor a torch pickle stream",
        ))
    }
}

fn not_ckpt(path: &Path, reason: &str) -> CkptError {
    CkptError::NotACheckpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn layout(path: &Path, detail: String) -> CkptError {
    CkptError::Layout {
        path: path.to_path_buf(),
        detail,
    }
}

fn pickle_error(path: &Path, entry: &str, e: PickleError) -> CkptError {
    match e {
        PickleError::ForbiddenGlobal { module, name } => CkptError::ForbiddenGlobal {
            path: path.to_path_buf(),
            entry: entry.to_string(),
            global: format!("{module}.{name}"),
        },
        source => CkptError::Pickle {
            path: path.to_path_buf(),
            entry: entry.to_string(),
            source,
        },
    }
}

// ------------------------------------------------------------------------------------------------ zip format

type Zip<'a> = zip::ZipArchive<Cursor<&'a [u8]>>;

fn read_zip(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let zip_err = |e: zip::result::ZipError| CkptError::Zip {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut zip = Zip::new(Cursor::new(bytes)).map_err(zip_err)?;
    // torch writes every record under one top-level folder (the archive name, e.g. "archive/").
    // Entry names that are not valid UTF-8 cannot be torch's own records; they are left out.
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .find(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        .map(str::to_string)
        .ok_or_else(|| CkptError::MissingEntry {
            path: path.to_path_buf(),
            entry: "<archive>/data.pkl".into(),
        })?;
    if names
        .iter()
        .any(|n| *n == format!("{prefix}constants.pkl") || n.starts_with(&format!("{prefix}code/")))
    {
        return Err(not_ckpt(
            path,
            "a TorchScript archive (torch.jit.save); only torch.save checkpoints are read",
        ));
    }
    let big_endian = match entry_bytes(path, &mut zip, bytes, &format!("{prefix}byteorder"), 16) {
        Ok(b) => match &*b {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(layout(
                    path,
                    format!(
                        "unknown byteorder record {:?}",
                        String::from_utf8_lossy(other)
                    ),
                ))
            }
        },
        Err(CkptError::MissingEntry { .. }) => false,
        Err(e) => return Err(e),
    };
    let pkl = entry_bytes(path, &mut zip, bytes, &format!("{prefix}data.pkl"), 1 << 30)?;
    let mut machine = Unpickler::new(&pkl, PersistentIds::Zip);
    let root = machine
        .load()
        .map_err(|e| pickle_error(path, "data.pkl", e))?;
    let (refs, scalars) = select(path, &root, &machine.arena)?;

    let mut tensors: Vec<Option<Tensor>> = vec![None; refs.len()];
    for (key, indices) in group_by_storage(&refs) {
        let first = &refs[indices[0]].1.storage;
        let nbytes = storage_nbytes(path, &refs[indices[0]].0, first.numel, first.dtype)?;
        let name = format!("{prefix}data/{key}");
        let data = entry_bytes(path, &mut zip, bytes, &name, nbytes.saturating_add(1))?;
        if data.len() < nbytes {
            let detail = format!(
                "entry '{name}' has {} bytes, its storage needs {nbytes}",
                data.len()
            );
            return Err(CkptError::Truncated {
                path: path.to_path_buf(),
                detail,
            });
        }
        for i in indices {
            let (name, tref) = &refs[i];
            tensors[i] = Some(make_tensor(path, name, tref, &data, big_endian)?);
        }
    }
    finish(refs, tensors, scalars, CkptFormat::Zip)
}

/// The bytes of one zip entry: borrowed from the map when stored uncompressed (torch always does this),
/// decompressed otherwise (reading at most `limit` bytes).
fn entry_bytes<'a>(
    path: &Path,
    zip: &mut Zip<'a>,
    bytes: &'a [u8],
    name: &str,
    limit: usize,
) -> Result<Cow<'a, [u8]>> {
    let mut file = zip.by_name(name).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => CkptError::MissingEntry {
            path: path.to_path_buf(),
            entry: name.into(),
        },
        e => CkptError::Zip {
            path: path.to_path_buf(),
            detail: format!("entry '{name}': {e}"),
        },
    })?;
    let truncated = |detail: String| CkptError::Truncated {
        path: path.to_path_buf(),
        detail,
    };
    if file.compression() == zip::CompressionMethod::Stored && !file.encrypted() {
        let start = file.data_start().and_then(|s| usize::try_from(s).ok());
        let size = usize::try_from(file.size()).ok();
        let end = start
            .zip(size)
            .and_then(|(s, n)| s.checked_add(n).map(|e| (s, e)));
        return match end.and_then(|(s, e)| bytes.get(s..e)) {
            Some(slice) => Ok(Cow::Borrowed(&slice[..slice.len().min(limit)])),
            None => Err(truncated(format!(
                "entry '{name}' extends past the end of the file"
            ))),
        };
    }
    let mut out = Vec::new();
    (&mut file)
        .take(limit as u64)
        .read_to_end(&mut out)
        .map_err(|e| CkptError::Zip {
            path: path.to_path_buf(),
            detail: format!("entry '{name}': {e}"),
        })?;
    Ok(Cow::Owned(out))
}

// --------------------------------------------------------------------------------------------- legacy format

/// `0x1950a86a20f9469cfc6c` as LONG1 stores it (little-endian two's complement).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let mut machine = Unpickler::new(bytes, PersistentIds::Legacy);
    let perr = |e| pickle_error(path, "legacy pickle", e);
    match machine.load() {
        Ok(Value::BigInt(m)) if *m == LEGACY_MAGIC => {}
        _ => {
            return Err(not_ckpt(
                path,
                "a pickle stream without torch's legacy magic number",
            ))
        }
    }
    match machine.load().map_err(perr)? {
        Value::Int(LEGACY_PROTOCOL) => {}
        other => {
            return Err(layout(
                path,
                format!("legacy protocol version {other:?}, expected {LEGACY_PROTOCOL}"),
            ))
        }
    }
    let _sys_info = machine.load().map_err(perr)?; // storages are little-endian whatever the writer was
    let root = machine.load().map_err(perr)?;
    let keys_value = machine.load().map_err(perr)?;
    let keys: Vec<String> = match machine.arena.seq(&keys_value) {
        Some(items) => items
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s.to_string()),
                _ => Err(layout(path, "legacy storage key is not a string".into())),
            })
            .collect::<Result<_>>()?,
        None => return Err(layout(path, "legacy storage key list is missing".into())),
    };
    // Each storage: an 8-byte element count, then the elements. Find them all (reading only the counts).
    let mut pos = machine.position();
    let mut blocks: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Some(&(dtype, _)) = machine.storages.get(&key) else {
            return Err(layout(
                path,
                format!("legacy storage '{key}' is listed but never used"),
            ));
        };
        let header = bytes
            .get(pos..pos.saturating_add(8))
            .and_then(|h| <[u8; 8]>::try_from(h).ok());
        let header = header
            .ok_or_else(|| truncated(path, format!("legacy storage '{key}' header missing")))?;
        let numel = u64::from_le_bytes(header);
        let nbytes = storage_nbytes(path, &key, numel, dtype)?;
        let start = pos + 8;
        let block = start
            .checked_add(nbytes)
            .and_then(|end| bytes.get(start..end));
        let block = block
            .ok_or_else(|| truncated(path, format!("legacy storage '{key}' data ends early")))?;
        blocks.insert(key, block);
        pos = start + nbytes;
    }
    let (refs, scalars) = select(path, &root, &machine.arena)?;
    let mut tensors: Vec<Option<Tensor>> = vec![None; refs.len()];
    for (key, indices) in group_by_storage(&refs) {
        let data = blocks
            .get(&key)
            .ok_or_else(|| layout(path, format!("legacy storage '{key}' is not in the file")))?;
        for i in indices {
            let (name, tref) = &refs[i];
            tensors[i] = Some(make_tensor(path, name, tref, data, false)?);
        }
    }
    finish(refs, tensors, scalars, CkptFormat::Legacy)
}

fn truncated(path: &Path, detail: String) -> CkptError {
    CkptError::Truncated {
        path: path.to_path_buf(),
        detail,
    }
}

// ------------------------------------------------------------------------------------ choosing the state dict

type Refs = Vec<(String, TensorRef)>;

/// Nesting deeper than this is refused (it also stops cycles that pickle can express).
const MAX_DEPTH: usize = 64;

/// The state dict's tensors and the scalars, in file order.
fn select(path: &Path, root: &Value, arena: &Arena) -> Result<(Refs, Vec<(String, Scalar)>)> {
    let top = arena.dict(root).ok_or_else(|| {
        layout(
            path,
            format!(
                "the checkpoint holds a {}, not a dict",
                root.type_name(arena)
            ),
        )
    })?;
    let mut out = Walk {
        arena,
        refs: Vec::new(),
        scalars: Vec::new(),
        names: HashSet::new(),
    };
    match top
        .get_str("state_dict")
        .filter(|sd| arena.dict(sd).is_some())
    {
        Some(sd) => {
            for (k, v) in top.entries() {
                if let (Value::Str(k), Some(s)) = (k, scalar(v)) {
                    out.scalars.push((k.to_string(), s));
                }
            }
            out.walk(path, sd, String::new(), 0)?;
        }
        None => out.walk(path, root, String::new(), 0)?,
    }
    Ok((out.refs, out.scalars))
}

struct Walk<'a> {
    arena: &'a Arena,
    refs: Refs,
    scalars: Vec<(String, Scalar)>,
    names: HashSet<String>,
}

impl Walk<'_> {
    fn walk(&mut self, path: &Path, v: &Value, name: String, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(layout(
                path,
                format!("'{name}' is nested more than {MAX_DEPTH} levels deep"),
            ));
        }
        let join = |k: String| {
            if name.is_empty() {
                k
            } else {
                format!("{name}.{k}")
            }
        };
        match self.arena.deref(v) {
            Some(Obj::Tensor(t)) => {
                if !self.names.insert(name.clone()) {
                    return Err(layout(
                        path,
                        format!("tensor name '{name}' occurs twice after flattening"),
                    ));
                }
                self.refs.push((name, t.clone()));
            }
            Some(Obj::Dict(d)) => {
                for (k, item) in d.entries() {
                    self.walk(path, item, join(key_name(k)), depth + 1)?;
                }
            }
            Some(Obj::List(items) | Obj::Tuple(items)) => {
                for (i, item) in items.iter().enumerate() {
                    self.walk(path, item, join(i.to_string()), depth + 1)?;
                }
            }
            Some(_) => {}
            None => {
                if let (Some(s), false) = (scalar(v), name.is_empty()) {
                    self.scalars.push((name, s));
                }
            }
        }
        Ok(())
    }
}

fn key_name(k: &Value) -> String {
    match k {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::Global(g) => g.name(),
        other => format!("{other:?}"),
    }
}

fn scalar(v: &Value) -> Option<Scalar> {
    match v {
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Int(i) => Some(Scalar::Int(*i)),
        Value::Float(f) => Some(Scalar::Float(*f)),
        Value::Str(s) => Some(Scalar::Str(s.to_string())),
        _ => None,
    }
}

/// Indices into `refs` per storage key, keys in order of first use.
fn group_by_storage(refs: &Refs) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<(String, Vec<usize>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for (i, (_, t)) in refs.iter().enumerate() {
        let s = *slot.entry(t.storage.key.as_str()).or_insert_with(|| {
            order.push((t.storage.key.clone(), Vec::new()));
            order.len() - 1
        });
        order[s].1.push(i);
    }
    order
}

fn finish(
    refs: Refs,
    tensors: Vec<Option<Tensor>>,
    scalars: Vec<(String, Scalar)>,
    format: CkptFormat,
) -> Result<Checkpoint> {
    let tensors = refs
        .into_iter()
        .zip(tensors)
        .filter_map(|((name, _), t)| t.map(|t| (name, t)))
        .collect();
    Ok(Checkpoint {
        tensors,
        scalars,
        format,
    })
}

// ------------------------------------------------------------------------------------------ building tensors

fn candle_dtype(d: StorageDtype) -> Option<DType> {
    Some(match d {
        StorageDtype::F64 => DType::F64,
        StorageDtype::F32 => DType::F32,
        StorageDtype::F16 => DType::F16,
        StorageDtype::BF16 => DType::BF16,
        StorageDtype::I64 => DType::I64,
        StorageDtype::I32 => DType::I32,
        StorageDtype::I16 => DType::I16,
        StorageDtype::U8 | StorageDtype::Bool => DType::U8,
        StorageDtype::I8 | StorageDtype::Complex64 | StorageDtype::Complex128 => return None,
    })
}

fn storage_nbytes(path: &Path, key: &str, numel: u64, dtype: StorageDtype) -> Result<usize> {
    numel
        .checked_mul(dtype.size() as u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| truncated(path, format!("storage '{key}' claims {numel} elements")))
}

/// One tensor from its storage bytes: a slice when the view is contiguous, a gathered copy otherwise.
fn make_tensor(
    path: &Path,
    name: &str,
    t: &TensorRef,
    storage: &[u8],
    big_endian: bool,
) -> Result<Tensor> {
    let bad = |detail: String| CkptError::BadTensor {
        path: path.to_path_buf(),
        key: name.to_string(),
        detail,
    };
    let dtype = candle_dtype(t.storage.dtype).ok_or_else(|| CkptError::UnsupportedDtype {
        path: path.to_path_buf(),
        key: name.to_string(),
        dtype: t.storage.dtype.torch_name(),
    })?;
    let es = t.storage.dtype.size();
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(format!("size {:?} is too large", t.shape)))?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let numel = numel
        .filter(|n| n.checked_mul(es).is_some())
        .ok_or_else(|| bad(format!("size {:?} overflows", t.shape)))?;
    let available = (storage.len() / es) as u64;
    let bytes: Cow<[u8]> = if numel == 0 {
        Cow::Borrowed(&[])
    } else {
        // Largest element index the view touches (u128: no overflow for any u64 inputs).
        let last = t
            .shape
            .iter()
            .zip(&t.strides)
            .fold(u128::from(t.offset), |a, (&d, &s)| {
                a + u128::from(d - 1) * u128::from(s)
            });
        if last >= u128::from(t.storage.numel.min(available)) {
            return Err(bad(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage with {} elements",
                t.offset, t.shape, t.strides, t.storage.numel
            )));
        }
        // `last` fits in the storage, so every offset below is a valid usize.
        let offset = t.offset as usize;
        if is_contiguous(&t.shape, &t.strides) {
            Cow::Borrowed(&storage[offset * es..(offset + numel) * es])
        } else {
            Cow::Owned(gather(storage, es, offset, &shape, &t.strides))
        }
    };
    let bytes = if big_endian && es > 1 {
        let mut owned = bytes.into_owned();
        owned.chunks_exact_mut(es).for_each(<[u8]>::reverse);
        Cow::Owned(owned)
    } else {
        bytes
    };
    Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu).map_err(|source| {
        CkptError::Candle {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Row-major contiguity, ignoring the strides of size-1 dimensions (torch does the same).
fn is_contiguous(shape: &[u64], strides: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view into a contiguous buffer. The caller checked that every index is in bounds.
fn gather(storage: &[u8], es: usize, offset: usize, shape: &[usize], strides: &[u64]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    // A size-1 dimension never moves (its stride may be anything, even past the storage).
    let strides: Vec<usize> = shape
        .iter()
        .zip(strides)
        .map(|(&d, &s)| if d == 1 { 0 } else { s as usize })
        .collect();
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    let mut cur = offset;
    for _ in 0..numel {
        out.extend_from_slice(&storage[cur * es..(cur + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            cur += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            cur -= shape[d] * strides[d];
            idx[d] = 0;
        }
    }
    out
}
