//! The allow-list of globals and what "calling" each of them means.
//!
//! Every entry is a data-only constructor, modelled here in Rust; nothing is ever looked up in or run by Python.
//! The list follows the spirit of AUTOMATIC1111's `modules/safe.py` (`RestrictedUnpickler`): what `torch.save`
//! emits for tensors and parameters, numpy scalars (Lightning's `global_step` in older versions), `_codecs.encode`
//! (bytes in protocol 2) and Lightning's `ModelCheckpoint` callback, kept as an inert opaque object.
use std::rc::Rc;

use super::value::{Arena, NpDtype, Obj, StorageDtype, TensorRef, Value};

/// An allow-listed global, resolved from its `module` and `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Global {
    /// `collections.OrderedDict`
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter`
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state` (a parameter with Python attributes; they are dropped)
    RebuildParameterWithState,
    /// `torch._tensor._rebuild_from_type_v2`, accepted only with `torch.Tensor` as the type
    RebuildFromTypeV2,
    /// `torch.Tensor` (only usable as the type argument of `_rebuild_from_type_v2`)
    TensorClass,
    /// `torch.FloatStorage`, `torch.HalfStorage`, …
    StorageClass(StorageDtype),
    /// `torch.float32`, `torch.float16`, …
    TorchDtype(StorageDtype),
    /// `torch.Size` (a tuple of ints)
    TorchSize,
    /// `numpy.core.multiarray.scalar` (numpy < 2) or `numpy._core.multiarray.scalar` (numpy >= 2)
    NumpyScalar,
    /// `numpy.dtype`
    NumpyDtype,
    /// `_codecs.encode`
    CodecsEncode,
    /// `builtins.bytes` / `__builtin__.bytes` (protocol 2 pickles `b""` as `bytes()`)
    Bytes,
    /// `builtins.set` / `__builtin__.set`
    Set,
    /// `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` (or `lightning.pytorch…`): inert
    ModelCheckpoint,
}

const STORAGE_CLASSES: [(&str, StorageDtype); 12] = [
    ("DoubleStorage", StorageDtype::F64),
    ("FloatStorage", StorageDtype::F32),
    ("HalfStorage", StorageDtype::F16),
    ("BFloat16Storage", StorageDtype::BF16),
    ("LongStorage", StorageDtype::I64),
    ("IntStorage", StorageDtype::I32),
    ("ShortStorage", StorageDtype::I16),
    ("CharStorage", StorageDtype::I8),
    ("ByteStorage", StorageDtype::U8),
    ("BoolStorage", StorageDtype::Bool),
    ("ComplexFloatStorage", StorageDtype::Complex64),
    ("ComplexDoubleStorage", StorageDtype::Complex128),
];

const TORCH_DTYPES: [(&str, StorageDtype); 19] = [
    ("float64", StorageDtype::F64),
    ("double", StorageDtype::F64),
    ("float32", StorageDtype::F32),
    ("float", StorageDtype::F32),
    ("float16", StorageDtype::F16),
    ("half", StorageDtype::F16),
    ("bfloat16", StorageDtype::BF16),
    ("int64", StorageDtype::I64),
    ("long", StorageDtype::I64),
    ("int32", StorageDtype::I32),
    ("int", StorageDtype::I32),
    ("int16", StorageDtype::I16),
    ("short", StorageDtype::I16),
    ("int8", StorageDtype::I8),
    ("uint8", StorageDtype::U8),
    ("bool", StorageDtype::Bool),
    ("complex64", StorageDtype::Complex64),
    ("cfloat", StorageDtype::Complex64),
    ("complex128", StorageDtype::Complex128),
];

impl Global {
    /// Looks `module.name` up in the allow-list. `None` means forbidden.
    pub fn resolve(module: &str, name: &str) -> Option<Global> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("torch", "Tensor") | ("torch._tensor", "Tensor") => Global::TensorClass,
            ("torch", "Size") => Global::TorchSize,
            ("numpy.core.multiarray", "scalar") | ("numpy._core.multiarray", "scalar") => {
                Global::NumpyScalar
            }
            ("numpy", "dtype") => Global::NumpyDtype,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("builtins", "bytes") | ("__builtin__", "bytes") => Global::Bytes,
            ("builtins", "set") | ("__builtin__", "set") => Global::Set,
            ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
            | ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint") => {
                Global::ModelCheckpoint
            }
            ("torch", n) => {
                if let Some((_, dt)) = STORAGE_CLASSES.iter().find(|(s, _)| *s == n) {
                    Global::StorageClass(*dt)
                } else if let Some((_, dt)) = TORCH_DTYPES.iter().find(|(s, _)| *s == n) {
                    Global::TorchDtype(*dt)
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        Some(g)
    }

    /// The dotted Python name (for messages and non-string dict keys).
    pub fn name(self) -> String {
        let fixed = match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
            Global::TensorClass => "torch.Tensor",
            Global::TorchSize => "torch.Size",
            Global::NumpyScalar => "numpy.core.multiarray.scalar",
            Global::NumpyDtype => "numpy.dtype",
            Global::CodecsEncode => "_codecs.encode",
            Global::Bytes => "builtins.bytes",
            Global::Set => "builtins.set",
            Global::ModelCheckpoint => {
                "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
            }
            Global::StorageClass(dt) => {
                let n = STORAGE_CLASSES
                    .iter()
                    .find(|(_, d)| *d == dt)
                    .map_or("?Storage", |(s, _)| *s);
                return format!("torch.{n}");
            }
            Global::TorchDtype(dt) => return format!("torch.{}", dt.torch_name()),
        };
        fixed.to_string()
    }
}

/// Calls an allow-listed global with positional `args` (REDUCE, NEWOBJ, INST/OBJ). Errors are plain messages;
/// the machine adds the opcode position.
pub fn call(g: Global, args: &[Value], arena: &mut Arena) -> Result<Value, String> {
    match g {
        Global::OrderedDict | Global::Set => build_container(g, args, arena),
        Global::RebuildTensorV2 => rebuild_tensor_v2(args, arena),
        Global::RebuildParameter | Global::RebuildParameterWithState => {
            let want = if g == Global::RebuildParameter { 3 } else { 4 };
            if args.len() != want {
                return Err(format!(
                    "{} takes {want} arguments, got {}",
                    g.name(),
                    args.len()
                ));
            }
            expect_tensor(&args[0], arena, "parameter data")?;
            Ok(args[0].clone())
        }
        Global::RebuildFromTypeV2 => {
            let [func, new_type, inner, _state] = args else {
                return Err(format!(
                    "{} takes 4 arguments, got {}",
                    g.name(),
                    args.len()
                ));
            };
            if *new_type != Value::Global(Global::TensorClass) {
                return Err(format!(
                    "{} with a tensor subclass is not supported (only torch.Tensor)",
                    g.name()
                ));
            }
            let Value::Global(f) = func else {
                return Err(format!(
                    "{}: the rebuild function is not a global",
                    g.name()
                ));
            };
            if *f == Global::RebuildFromTypeV2 {
                return Err(format!("{} may not nest itself", g.name()));
            }
            let inner = arena
                .copy_seq(inner)
                .map_err(|e| format!("rebuild arguments: {e}"))?;
            let out = call(*f, &inner, arena)?;
            expect_tensor(&out, arena, "rebuilt object")?;
            Ok(out)
        }
        Global::TorchSize => {
            let [dims] = args else {
                return Err(format!("torch.Size takes 1 argument, got {}", args.len()));
            };
            let dims = arena
                .copy_seq(dims)
                .map_err(|e| format!("torch.Size: {e}"))?;
            Ok(arena.alloc(Obj::Tuple(dims)))
        }
        Global::NumpyDtype => {
            let (Some(Value::Str(descr)), 1..=3) = (args.first(), args.len()) else {
                return Err("numpy.dtype expects a type string such as 'i8'".into());
            };
            Ok(arena.alloc(Obj::NpDtype(NpDtype {
                descr: descr.to_string(),
                byte_order: '=',
            })))
        }
        Global::NumpyScalar => numpy_scalar(args, arena),
        Global::CodecsEncode => codecs_encode(args),
        Global::Bytes => match args {
            [] => Ok(Value::Bytes(Rc::from(&[][..]))),
            [Value::Bytes(b)] => Ok(Value::Bytes(b.clone())),
            _ => Err("builtins.bytes is only accepted with no argument or a bytes argument".into()),
        },
        Global::ModelCheckpoint => Ok(arena.alloc(Obj::Opaque("ModelCheckpoint"))),
        Global::TensorClass | Global::StorageClass(_) | Global::TorchDtype(_) => {
            Err(format!("{} cannot be called from a checkpoint", g.name()))
        }
    }
}

fn expect_tensor(v: &Value, arena: &Arena, what: &str) -> Result<(), String> {
    match arena.deref(v) {
        Some(Obj::Tensor(_)) => Ok(()),
        _ => Err(format!(
            "{what} is a {}, expected a tensor",
            v.type_name(arena)
        )),
    }
}

fn build_container(g: Global, args: &[Value], arena: &mut Arena) -> Result<Value, String> {
    if let [src] = args {
        let n = match arena.deref(src) {
            Some(Obj::List(v) | Obj::Tuple(v) | Obj::Set(v)) => v.len(),
            Some(Obj::Dict(d)) => d.len(),
            _ => 0,
        };
        arena.charge_copy(n)?;
    }
    let items: Vec<Value> = match args {
        [] => Vec::new(),
        [src] => match arena.deref(src) {
            Some(Obj::List(v) | Obj::Tuple(v) | Obj::Set(v)) => v.clone(),
            Some(Obj::Dict(d)) if g == Global::OrderedDict => {
                let d = d.clone();
                return Ok(arena.alloc(Obj::Dict(d)));
            }
            _ => {
                return Err(format!(
                    "{}: unsupported argument {}",
                    g.name(),
                    src.type_name(arena)
                ))
            }
        },
        _ => {
            return Err(format!(
                "{} takes at most 1 argument, got {}",
                g.name(),
                args.len()
            ))
        }
    };
    if g == Global::Set {
        return Ok(arena.alloc(Obj::Set(items)));
    }
    let mut d = super::value::Dict::default();
    for item in &items {
        match arena.seq(item) {
            Some([k, v]) => d.insert(k.clone(), v.clone()),
            _ => return Err("OrderedDict items must be (key, value) pairs".into()),
        }
    }
    Ok(arena.alloc(Obj::Dict(d)))
}

fn non_negative(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        Value::Bool(b) => Ok(u64::from(*b)),
        _ => Err(format!("{what} must be a non-negative int, got {v:?}")),
    }
}

fn int_tuple(v: &Value, arena: &Arena, what: &str) -> Result<Vec<u64>, String> {
    let items = arena
        .seq(v)
        .ok_or_else(|| format!("{what} is not a tuple"))?;
    items.iter().map(|x| non_negative(x, what)).collect()
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`
fn rebuild_tensor_v2(args: &[Value], arena: &mut Arena) -> Result<Value, String> {
    if !(6..=7).contains(&args.len()) {
        return Err(format!(
            "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
            args.len()
        ));
    }
    let storage = match arena.deref(&args[0]) {
        Some(Obj::Storage(s)) => s.clone(),
        _ => {
            return Err(format!(
                "_rebuild_tensor_v2: first argument is a {}, not a storage",
                args[0].type_name(arena)
            ))
        }
    };
    let offset = non_negative(&args[1], "storage offset")?;
    let shape = int_tuple(&args[2], arena, "tensor size")?;
    let strides = int_tuple(&args[3], arena, "tensor stride")?;
    if shape.len() != strides.len() {
        return Err(format!(
            "size {shape:?} and stride {strides:?} differ in length"
        ));
    }
    let offset = offset
        .checked_add(storage.base_offset)
        .ok_or("storage offset overflows")?;
    Ok(arena.alloc(Obj::Tensor(TensorRef {
        storage,
        offset,
        shape,
        strides,
    })))
}

/// `numpy.core.multiarray.scalar(dtype, raw_bytes)` → an int, float or bool.
fn numpy_scalar(args: &[Value], arena: &Arena) -> Result<Value, String> {
    let [dtype, data] = args else {
        return Err(format!(
            "numpy scalar takes 2 arguments, got {}",
            args.len()
        ));
    };
    let Some(Obj::NpDtype(dt)) = arena.deref(dtype) else {
        return Err(format!(
            "numpy scalar: dtype argument is a {}",
            dtype.type_name(arena)
        ));
    };
    let Value::Bytes(raw) = data else {
        return Err(format!(
            "numpy scalar: data argument is a {}",
            data.type_name(arena)
        ));
    };
    let mut descr = dt.descr.as_str();
    let mut big = dt.byte_order == '>';
    if let Some(rest) = descr.strip_prefix(['<', '>', '|', '=']) {
        big = descr.starts_with('>');
        descr = rest;
    }
    let kind_len = descr.chars().next().map_or(0, char::len_utf8);
    let (kind, size) = descr.split_at(kind_len);
    let size: usize = size
        .parse()
        .map_err(|_| format!("unsupported numpy dtype '{}'", dt.descr))?;
    if raw.len() != size || !matches!(size, 1 | 2 | 4 | 8) {
        return Err(format!(
            "numpy scalar of dtype '{}' has {} bytes",
            dt.descr,
            raw.len()
        ));
    }
    let mut le = [0u8; 8];
    for (i, b) in raw.iter().enumerate() {
        le[if big { size - 1 - i } else { i }] = *b;
    }
    let bits = u64::from_le_bytes(le);
    let sign_extend = |bits: u64| -> i64 {
        let shift = 64 - 8 * size as u32;
        ((bits << shift) as i64) >> shift
    };
    match kind {
        "i" => Ok(Value::Int(sign_extend(bits))),
        "u" => i64::try_from(bits)
            .map(Value::Int)
            .map_err(|_| "numpy uint64 scalar exceeds i64".to_string()),
        "b" => Ok(Value::Bool(bits != 0)),
        "f" => match size {
            2 => Ok(Value::Float(half::f16::from_bits(bits as u16).to_f64())),
            4 => Ok(Value::Float(f64::from(f32::from_bits(bits as u32)))),
            8 => Ok(Value::Float(f64::from_bits(bits))),
            _ => Err(format!("unsupported numpy dtype '{}'", dt.descr)),
        },
        _ => Err(format!("unsupported numpy dtype '{}'", dt.descr)),
    }
}

/// `_codecs.encode(text, encoding)`: how protocol 2 stores `bytes`.
fn codecs_encode(args: &[Value]) -> Result<Value, String> {
    let (text, encoding) = match args {
        [Value::Str(t)] => (t, "utf-8"),
        [Value::Str(t), Value::Str(e)] => (t, &**e),
        _ => return Err("_codecs.encode expects (str, encoding)".into()),
    };
    match encoding.to_ascii_lowercase().as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" => text
            .chars()
            .map(|c| {
                u8::try_from(u32::from(c)).map_err(|_| format!("character {c:?} is not latin-1"))
            })
            .collect::<Result<Vec<u8>, String>>()
            .map(|b| Value::Bytes(Rc::from(b))),
        "utf-8" | "utf8" => Ok(Value::Bytes(Rc::from(text.as_bytes()))),
        other => Err(format!(
            "_codecs.encode with encoding '{other}' is not supported"
        )),
    }
}

/// BUILD: sets the state of an object created before. Only objects whose state we understand or can drop.
pub fn build(obj: &Value, state: &Value, arena: &mut Arena) -> Result<(), String> {
    let byte_order = match arena.seq(state) {
        Some(items) => match items.get(1) {
            Some(Value::Str(s)) => s.chars().next(),
            _ => None,
        },
        None => None,
    };
    let type_name = obj.type_name(arena);
    let Value::Ref(id) = obj else {
        return Err(format!("BUILD on a {type_name}"));
    };
    match arena.get_mut(*id) {
        Some(Obj::NpDtype(dt)) => {
            dt.byte_order = byte_order.ok_or("numpy.dtype state without a byte order")?;
            Ok(())
        }
        // Python attributes of an OrderedDict subclass, a tensor, or an inert object: not data we use.
        Some(Obj::Opaque(_) | Obj::Dict(_) | Obj::Tensor(_)) => Ok(()),
        _ => Err(format!("BUILD on a {type_name} is not supported")),
    }
}
