//! The values a restricted pickle machine can hold.
//!
//! Scalars live inline in [`Value`]; everything with identity (lists, tuples, dicts, storages, tensors, …) lives
//! in an [`Arena`] and is referred to by index. The arena makes shared references (pickle's memo) and even
//! cyclic structures harmless: nothing is reference counted, and dropping the arena never recurses.
use std::collections::HashMap;
use std::rc::Rc;

use super::globals::Global;

/// Index of an object in the [`Arena`].
pub type ObjId = usize;

/// A value on the pickle stack or inside a container.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside the i64 range: little-endian two's-complement bytes, as LONG1/LONG4 store them.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// One of the allow-listed globals (a class or function that was named, not yet called).
    Global(Global),
    /// An object in the arena.
    Ref(ObjId),
}

impl Value {
    pub fn type_name(&self, arena: &Arena) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Global(_) => "global",
            Value::Ref(id) => match arena.get(*id) {
                Some(obj) => obj.type_name(),
                None => "dangling reference",
            },
        }
    }
}

/// Element type of a torch storage, named after the legacy storage classes (`torch.FloatStorage`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    Complex64,
    Complex128,
}

impl StorageDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F64 | StorageDtype::I64 | StorageDtype::Complex64 => 8,
            StorageDtype::Complex128 => 16,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 | StorageDtype::I16 => 2,
            StorageDtype::I8 | StorageDtype::U8 | StorageDtype::Bool => 1,
        }
    }

    /// The torch name of the dtype (`torch.float32` → "float32").
    pub fn torch_name(self) -> &'static str {
        match self {
            StorageDtype::F64 => "float64",
            StorageDtype::F32 => "float32",
            StorageDtype::F16 => "float16",
            StorageDtype::BF16 => "bfloat16",
            StorageDtype::I64 => "int64",
            StorageDtype::I32 => "int32",
            StorageDtype::I16 => "int16",
            StorageDtype::I8 => "int8",
            StorageDtype::U8 => "uint8",
            StorageDtype::Bool => "bool",
            StorageDtype::Complex64 => "complex64",
            StorageDtype::Complex128 => "complex128",
        }
    }
}

/// A storage named by a persistent id: its bytes live outside the pickle (a zip entry or a legacy raw block).
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// Zip: the entry name under `data/`; legacy: the root storage key.
    pub key: String,
    pub dtype: StorageDtype,
    /// Elements in the root storage.
    pub numel: u64,
    /// Elements to skip at the start of the root storage (legacy storage views; 0 otherwise).
    pub base_offset: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements, relative to the storage (including its `base_offset`).
    pub offset: u64,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
}

/// A numpy dtype, as `numpy.dtype('<kind><size>', False, True)` plus its BUILD state gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct NpDtype {
    /// E.g. "i8", "f8", "b1".
    pub descr: String,
    /// '<', '>', '|' or '='.
    pub byte_order: char,
}

/// Key of a dict entry that pickle data can look up again (for SETITEM overwriting an existing key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HashKey {
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

fn hash_key(v: &Value) -> Option<HashKey> {
    match v {
        Value::None => Some(HashKey::None),
        Value::Bool(b) => Some(HashKey::Int(i64::from(*b))),
        Value::Int(i) => Some(HashKey::Int(*i)),
        Value::Str(s) => Some(HashKey::Str(s.clone())),
        Value::Bytes(b) => Some(HashKey::Bytes(b.clone())),
        _ => None,
    }
}

/// An insertion-ordered dict (Python dicts keep insertion order; `OrderedDict` is the same to us).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<HashKey, usize>,
}

impl Dict {
    /// Python `d[key] = value`: overwrites an equal key in place, appends otherwise. Keys that are not plain
    /// data (tuples, objects) are never merged.
    pub fn insert(&mut self, key: Value, value: Value) {
        if let Some(h) = hash_key(&key) {
            if let Some(&i) = self.index.get(&h) {
                if let Some(slot) = self.entries.get_mut(i) {
                    slot.1 = value;
                    return;
                }
            }
            self.index.insert(h, self.entries.len());
        }
        self.entries.push((key, value));
    }

    pub fn get_str(&self, key: &str) -> Option<&Value> {
        let i = self.index.get(&HashKey::Str(Rc::from(key)))?;
        self.entries.get(*i).map(|(_, v)| v)
    }

    pub fn entries(&self) -> &[(Value, Value)] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// An object with identity.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Dict),
    Set(Vec<Value>),
    Storage(StorageRef),
    Tensor(TensorRef),
    NpDtype(NpDtype),
    /// An instance of an allow-listed class that carries no data we use (e.g. Lightning's `ModelCheckpoint`).
    /// Its state is parsed (so it must be plain data too) and dropped.
    Opaque(&'static str),
}

impl Obj {
    pub fn type_name(&self) -> &'static str {
        match self {
            Obj::List(_) => "list",
            Obj::Tuple(_) => "tuple",
            Obj::Dict(_) => "dict",
            Obj::Set(_) => "set",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
            Obj::NpDtype(_) => "numpy.dtype",
            Obj::Opaque(name) => name,
        }
    }
}

/// Most values that constructors may copy out of existing containers during one load. Copies are linear in the
/// pickle size for honest files; the cap stops a small malicious pickle from copying one big container over and
/// over (quadratic memory).
const MAX_COPIED_VALUES: usize = 1 << 26;

/// Owner of all objects created while unpickling.
#[derive(Debug, Default)]
pub struct Arena {
    objs: Vec<Obj>,
    copied: usize,
}

impl Arena {
    /// Accounts for copying `n` values out of an existing container; fails past [`MAX_COPIED_VALUES`].
    pub fn charge_copy(&mut self, n: usize) -> Result<(), String> {
        self.copied = self.copied.saturating_add(n);
        if self.copied > MAX_COPIED_VALUES {
            return Err(format!(
                "the pickle copies more than {MAX_COPIED_VALUES} values; refusing"
            ));
        }
        Ok(())
    }

    /// A copy of the items of a tuple or list, charged to the copy budget.
    pub fn copy_seq(&mut self, v: &Value) -> Result<Vec<Value>, String> {
        let n = self.seq(v).ok_or("expected a tuple or list")?.len();
        self.charge_copy(n)?;
        Ok(self.seq(v).map(<[Value]>::to_vec).unwrap_or_default())
    }

    pub fn alloc(&mut self, obj: Obj) -> Value {
        self.objs.push(obj);
        Value::Ref(self.objs.len() - 1)
    }

    pub fn get(&self, id: ObjId) -> Option<&Obj> {
        self.objs.get(id)
    }

    pub fn get_mut(&mut self, id: ObjId) -> Option<&mut Obj> {
        self.objs.get_mut(id)
    }

    /// The object behind `v`, if `v` is a reference.
    pub fn deref(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Ref(id) => self.objs.get(*id),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn seq(&self, v: &Value) -> Option<&[Value]> {
        match self.deref(v)? {
            Obj::Tuple(items) | Obj::List(items) => Some(items),
            _ => None,
        }
    }

    pub fn dict(&self, v: &Value) -> Option<&Dict> {
        match self.deref(v)? {
            Obj::Dict(d) => Some(d),
            _ => None,
        }
    }
}
