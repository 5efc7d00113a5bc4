//! A restricted pickle virtual machine that reads PyTorch checkpoints without ever executing code.
//!
//! Python's `pickle` is a small stack machine whose `GLOBAL` + `REDUCE` opcodes import and call arbitrary
//! functions, so `torch.load` on an untrusted `.ckpt` can run anything (`os.system`, `subprocess.Popen`, …).
//! This machine implements the opcodes of protocols 0–5 (see CPython `Lib/pickle.py` and `pickletools.py`)
//! over plain data, and resolves globals against a fixed allow-list of *data-only* constructors that are
//! modelled in Rust ([`globals`]); anything else stops the load with [`PickleError::ForbiddenGlobal`] before any
//! effect. Nothing from the file is ever looked up by name in a live Python environment or run.
//!
//! Notation: the *stack* holds [`Value`]s; `MARK` remembers a stack height; the *memo* maps integer keys to
//! values for `PUT`/`GET`; objects with identity (lists, dicts, tensors, …) live in an [`Arena`].
//! Storages are external: `BINPERSID` turns a persistent id `('storage', FloatStorage, key, location, numel)`
//! into a [`StorageRef`] whose bytes the caller ([`crate::ckpt`]) reads from the archive.
mod decode;
pub mod globals;
pub mod value;

use std::collections::HashMap;
use std::rc::Rc;

pub use decode::op_name;
use decode::{
    decimal_to_long, decode_raw_unicode_escape, decode_string_escape, long_from_bytes, py2_string,
};
pub use globals::Global;
pub use value::{Arena, Dict, NpDtype, Obj, ObjId, StorageDtype, StorageRef, TensorRef, Value};

/// Why a pickle could not be read. Positions are byte offsets into the pickle data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    #[error("pickle data ends early at byte {pos}")]
    Truncated { pos: usize },
    #[error("bad opcode 0x{op:02x} at byte {pos}")]
    BadOpcode { op: u8, pos: usize },
    #[error("opcode {op} at byte {pos} is not supported in checkpoints")]
    Unsupported { op: &'static str, pos: usize },
    #[error("stack underflow at byte {pos} ({op})")]
    StackUnderflow { op: &'static str, pos: usize },
    #[error("forbidden global '{module}.{name}'")]
    ForbiddenGlobal { module: String, name: String },
    #[error("{op} at byte {pos}: {detail}")]
    Invalid {
        op: &'static str,
        pos: usize,
        detail: String,
    },
}

/// Which persistent-id layout `BINPERSID` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistentIds {
    /// Zip format (torch >= 1.6): `('storage', storage_type, key, location, numel)`.
    Zip,
    /// Legacy format: `('storage', storage_type, root_key, location, numel, view_metadata)`.
    Legacy,
}

/// The unpickler. One instance can read several consecutive pickles from the same bytes (the legacy format
/// stores four in a row); objects of all of them stay in one [`Arena`].
pub struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    op: u8,
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    pids: PersistentIds,
    /// All objects created so far.
    pub arena: Arena,
    /// Every storage a persistent id named: key → (dtype, numel of the root storage).
    pub storages: HashMap<String, (StorageDtype, u64)>,
}

/// Unpickles one zip-format `data.pkl`.
pub fn unpickle(data: &[u8]) -> Result<(Value, Arena), PickleError> {
    let mut u = Unpickler::new(data, PersistentIds::Zip);
    let v = u.load()?;
    Ok((v, u.arena))
}

type Res<T> = Result<T, PickleError>;

impl<'a> Unpickler<'a> {
    pub fn new(data: &'a [u8], pids: PersistentIds) -> Self {
        Unpickler {
            data,
            pos: 0,
            op: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            pids,
            arena: Arena::default(),
            storages: HashMap::new(),
        }
    }

    /// Byte offset just past the last `STOP` read (where the next pickle or raw data starts).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Runs the machine from the current position to the next `STOP` and returns the value it leaves.
    pub fn load(&mut self) -> Res<Value> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            self.op_pos = self.pos;
            self.op = self.byte()?;
            if self.op == b'.' {
                return self.pop();
            }
            self.step()?;
        }
    }

    fn step(&mut self) -> Res<()> {
        match self.op {
            // --- framing and protocol ---
            0x80 => {
                let proto = self.byte()?;
                if proto > 5 {
                    return Err(self.invalid(format!("protocol {proto} is newer than 5")));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: an 8-byte length; frames need no special handling when all bytes are here
            }
            // --- stack manipulation ---
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.peek()?.clone();
                self.stack.push(top);
            }
            // --- constants and numbers ---
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'K' => {
                let v = self.byte()?;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i64::from(v)));
            }
            0x8a => {
                let n = usize::from(self.byte()?);
                let bytes = self.take(n)?;
                self.stack.push(long_from_bytes(bytes));
            }
            0x8b => {
                let n = i32::from_le_bytes(self.array()?);
                let n =
                    usize::try_from(n).map_err(|_| self.invalid(format!("negative length {n}")))?;
                let bytes = self.take(n)?;
                self.stack.push(long_from_bytes(bytes));
            }
            b'I' => {
                let line = self.line_str()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(
                        s.parse()
                            .map_err(|_| self.invalid(format!("bad integer {s:?}")))?,
                    ),
                };
                self.stack.push(v);
            }
            b'L' => {
                let line = self.line_str()?;
                let s = line.strip_suffix('L').unwrap_or(line);
                let v = match s.parse() {
                    Ok(v) => Value::Int(v),
                    Err(_) => decimal_to_long(s)
                        .ok_or_else(|| self.invalid(format!("bad integer {s:?}")))?,
                };
                self.stack.push(v);
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.stack.push(Value::Float(v));
            }
            b'F' => {
                let line = self.line_str()?;
                let v = line
                    .parse()
                    .map_err(|_| self.invalid(format!("bad float {line:?}")))?;
                self.stack.push(Value::Float(v));
            }
            // --- strings and bytes ---
            b'X' => {
                let n = u32::from_le_bytes(self.array()?);
                self.push_unicode(n as usize)?;
            }
            0x8c => {
                let n = self.byte()?;
                self.push_unicode(usize::from(n))?;
            }
            0x8d => {
                let n = u64::from_le_bytes(self.array()?);
                self.push_unicode(self.len_from_u64(n)?)?;
            }
            b'V' => {
                let line = self.line()?;
                let s = decode_raw_unicode_escape(line).map_err(|d| self.invalid(d))?;
                self.stack.push(Value::Str(Rc::from(s)));
            }
            b'B' => {
                let n = u32::from_le_bytes(self.array()?);
                self.push_bytes(n as usize)?;
            }
            b'C' => {
                let n = self.byte()?;
                self.push_bytes(usize::from(n))?;
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(self.array()?);
                self.push_bytes(self.len_from_u64(n)?)?;
            }
            b'T' => {
                let n = i32::from_le_bytes(self.array()?);
                let n =
                    usize::try_from(n).map_err(|_| self.invalid(format!("negative length {n}")))?;
                let raw = self.take(n)?;
                self.stack.push(py2_string(raw));
            }
            b'U' => {
                let n = usize::from(self.byte()?);
                let raw = self.take(n)?;
                self.stack.push(py2_string(raw));
            }
            b'S' => {
                let line = self.line()?;
                let raw = decode_string_escape(line).map_err(|d| self.invalid(d))?;
                self.stack.push(py2_string(&raw));
            }
            // --- containers ---
            b'}' => {
                let v = self.arena.alloc(Obj::Dict(Dict::default()));
                self.stack.push(v);
            }
            b']' => {
                let v = self.arena.alloc(Obj::List(Vec::new()));
                self.stack.push(v);
            }
            b')' => {
                let v = self.arena.alloc(Obj::Tuple(Vec::new()));
                self.stack.push(v);
            }
            0x8f => {
                let v = self.arena.alloc(Obj::Set(Vec::new()));
                self.stack.push(v);
            }
            0x85..=0x87 => {
                let n = usize::from(self.op - 0x84);
                if self.stack.len() < self.floor() + n {
                    return Err(self.underflow());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let v = self.arena.alloc(Obj::Tuple(items));
                self.stack.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.arena.alloc(Obj::Tuple(items));
                self.stack.push(v);
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.arena.alloc(Obj::List(items));
                self.stack.push(v);
            }
            0x91 => {
                let items = self.pop_mark()?;
                let v = self.arena.alloc(Obj::Set(items));
                self.stack.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let mut d = Dict::default();
                self.fill_dict(&mut d, items)?;
                let v = self.arena.alloc(Obj::Dict(d));
                self.stack.push(v);
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.with_top_dict(|d| d.insert(key, value))?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let mut pairs = Dict::default();
                self.fill_dict(&mut pairs, items)?;
                self.with_top_dict(|d| {
                    for (k, v) in pairs.entries() {
                        d.insert(k.clone(), v.clone());
                    }
                })?;
            }
            b'a' => {
                let v = self.pop()?;
                self.with_top_list(|l| l.push(v), false)?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.with_top_list(|l| l.extend(items), false)?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.with_top_list(|l| l.extend(items), true)?;
            }
            // --- memo ---
            b'q' => {
                let k = self.byte()?;
                self.put(u64::from(k))?;
            }
            b'r' => {
                let k = u32::from_le_bytes(self.array()?);
                self.put(u64::from(k))?;
            }
            b'p' => {
                let line = self.line_str()?;
                let k = line
                    .parse()
                    .map_err(|_| self.invalid(format!("bad memo key {line:?}")))?;
                self.put(k)?;
            }
            0x94 => self.put(self.memo.len() as u64)?,
            b'h' => {
                let k = self.byte()?;
                self.get(u64::from(k))?;
            }
            b'j' => {
                let k = u32::from_le_bytes(self.array()?);
                self.get(u64::from(k))?;
            }
            b'g' => {
                let line = self.line_str()?;
                let k = line
                    .parse()
                    .map_err(|_| self.invalid(format!("bad memo key {line:?}")))?;
                self.get(k)?;
            }
            // --- globals and object construction ---
            b'c' => {
                let module = self.line_str()?.to_string();
                let name = self.line_str()?.to_string();
                let g = resolve(&module, &name)?;
                self.stack.push(Value::Global(g));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(self.invalid("module and name must be strings".into()));
                };
                let g = resolve(&module, &name)?;
                self.stack.push(Value::Global(g));
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let args = self.tuple_items(&args)?;
                let v = self.call(&func, &args)?;
                self.stack.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let args = self.tuple_items(&args)?;
                let v = self.call(&cls, &args)?;
                self.stack.push(v);
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                if self.arena.dict(&kwargs).is_none_or(|d| !d.is_empty()) {
                    return Err(self.invalid("keyword arguments are not supported".into()));
                }
                let args = self.tuple_items(&args)?;
                let v = self.call(&cls, &args)?;
                self.stack.push(v);
            }
            b'i' => {
                let module = self.line_str()?.to_string();
                let name = self.line_str()?.to_string();
                let g = resolve(&module, &name)?;
                let args = self.pop_mark()?;
                let v = self.call(&Value::Global(g), &args)?;
                self.stack.push(v);
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err(self.underflow());
                }
                let cls = items.remove(0);
                let v = self.call(&cls, &items)?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.peek()?.clone();
                globals::build(&obj, &state, &mut self.arena).map_err(|d| self.invalid(d))?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(&pid).map_err(|d| self.invalid(d))?;
                self.stack.push(v);
            }
            b'P' | 0x82..=0x84 | 0x97 | 0x98 => {
                return Err(PickleError::Unsupported {
                    op: op_name(self.op),
                    pos: self.op_pos,
                })
            }
            op => {
                return Err(PickleError::BadOpcode {
                    op,
                    pos: self.op_pos,
                })
            }
        }
        Ok(())
    }

    // --- reading bytes ---

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let data = self.data;
        let end = self.pos.checked_add(n).filter(|&e| e <= data.len());
        let end = end.ok_or(PickleError::Truncated { pos: self.op_pos })?;
        let out = &data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A protocol-0 argument: the bytes up to the next newline (which is consumed).
    fn line(&mut self) -> Res<&'a [u8]> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated { pos: self.op_pos })?;
        let line = self.take(n)?;
        self.pos += 1;
        Ok(line)
    }

    fn line_str(&mut self) -> Res<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.invalid("argument is not UTF-8".into()))
    }

    fn len_from_u64(&self, n: u64) -> Res<usize> {
        usize::try_from(n).map_err(|_| PickleError::Truncated { pos: self.op_pos })
    }

    fn push_unicode(&mut self, n: usize) -> Res<()> {
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| self.invalid("string is not valid UTF-8".into()))?;
        self.stack.push(Value::Str(Rc::from(s)));
        Ok(())
    }

    fn push_bytes(&mut self, n: usize) -> Res<()> {
        let raw = self.take(n)?;
        self.stack.push(Value::Bytes(Rc::from(raw)));
        Ok(())
    }

    // --- stack ---

    /// Lowest stack index the current mark frame may touch.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn underflow(&self) -> PickleError {
        PickleError::StackUnderflow {
            op: op_name(self.op),
            pos: self.op_pos,
        }
    }

    fn invalid(&self, detail: String) -> PickleError {
        PickleError::Invalid {
            op: op_name(self.op),
            pos: self.op_pos,
            detail,
        }
    }

    fn pop(&mut self) -> Res<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow());
        }
        self.stack.pop().ok_or_else(|| self.underflow())
    }

    fn peek(&self) -> Res<&Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow());
        }
        self.stack.last().ok_or_else(|| self.underflow())
    }

    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| self.underflow())?;
        if mark > self.stack.len() {
            return Err(self.underflow());
        }
        Ok(self.stack.split_off(mark))
    }

    fn put(&mut self, key: u64) -> Res<()> {
        let v = self.peek()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn get(&mut self, key: u64) -> Res<()> {
        let v = self.memo.get(&key).cloned();
        let v = v.ok_or_else(|| self.invalid(format!("memo key {key} was never stored")))?;
        self.stack.push(v);
        Ok(())
    }

    fn fill_dict(&self, d: &mut Dict, items: Vec<Value>) -> Res<()> {
        if items.len() & 1 == 1 {
            return Err(self.invalid(format!("odd number of items ({}) for a dict", items.len())));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.insert(k, v);
        }
        Ok(())
    }

    fn top_id(&self) -> Res<ObjId> {
        match self.peek()? {
            Value::Ref(id) => Ok(*id),
            other => Err(self.invalid(format!(
                "expected a container on the stack, found {other:?}"
            ))),
        }
    }

    fn with_top_dict(&mut self, f: impl FnOnce(&mut Dict)) -> Res<()> {
        let id = self.top_id()?;
        match self.arena.get_mut(id) {
            Some(Obj::Dict(d)) => {
                f(d);
                Ok(())
            }
            _ => Err(self.invalid(format!(
                "target is a {}, not a dict",
                Value::Ref(id).type_name(&self.arena)
            ))),
        }
    }

    fn with_top_list(&mut self, f: impl FnOnce(&mut Vec<Value>), set: bool) -> Res<()> {
        let id = self.top_id()?;
        match (self.arena.get_mut(id), set) {
            (Some(Obj::List(l)), false) | (Some(Obj::Set(l)), true) => {
                f(l);
                Ok(())
            }
            _ => Err(self.invalid(format!(
                "cannot add items to a {}",
                Value::Ref(id).type_name(&self.arena)
            ))),
        }
    }

    /// The argument tuple of REDUCE/NEWOBJ. No allow-listed constructor takes more than 7 arguments.
    fn tuple_items(&self, v: &Value) -> Res<Vec<Value>> {
        match self.arena.deref(v) {
            Some(Obj::Tuple(items)) if items.len() <= 8 => Ok(items.clone()),
            Some(Obj::Tuple(items)) => {
                Err(self.invalid(format!("{} arguments is too many", items.len())))
            }
            _ => Err(self.invalid(format!(
                "arguments are a {}, not a tuple",
                v.type_name(&self.arena)
            ))),
        }
    }

    fn call(&mut self, func: &Value, args: &[Value]) -> Res<Value> {
        let Value::Global(g) = func else {
            return Err(self.invalid(format!("cannot call a {}", func.type_name(&self.arena))));
        };
        globals::call(*g, args, &mut self.arena).map_err(|d| self.invalid(d))
    }

    /// `BINPERSID`: a storage reference, never anything else.
    fn persistent_load(&mut self, pid: &Value) -> Result<Value, String> {
        let items = self.arena.seq(pid).ok_or("persistent id is not a tuple")?;
        if let Some(Value::Str(tag)) = items.first() {
            if &**tag == "module" {
                return Err(
                    "the checkpoint pickles an nn.Module class ('module' persistent id); \
                            only state dicts can be read"
                        .into(),
                );
            }
        }
        if items.len() > 6 {
            return Err(format!("persistent id has {} fields", items.len()));
        }
        let items = items.to_vec();
        let (head, view) = match (self.pids, items.len()) {
            (PersistentIds::Zip, 5) => (&items[..], None),
            (PersistentIds::Legacy, 6) => (&items[..5], items.get(5)),
            (_, n) => return Err(format!("persistent id has {n} fields")),
        };
        let [Value::Str(tag), storage_type, key, _location, numel] = head else {
            return Err("persistent id is not ('storage', type, key, location, numel)".into());
        };
        if &**tag != "storage" {
            return Err(format!("persistent id of kind {tag:?} is not supported"));
        }
        let Value::Global(Global::StorageClass(dtype)) = storage_type else {
            return Err(format!(
                "storage type is a {}, not a torch storage class",
                storage_type.type_name(&self.arena)
            ));
        };
        let key = key_string(key)?;
        let Value::Int(numel) = numel else {
            return Err("storage numel is not an int".into());
        };
        let numel = u64::try_from(*numel).map_err(|_| format!("negative storage numel {numel}"))?;
        match self.storages.get(&key) {
            Some((d, _)) if d != dtype => {
                return Err(format!(
                    "storage '{key}' is used as both {} and {}",
                    d.torch_name(),
                    dtype.torch_name()
                ))
            }
            _ => {
                self.storages.insert(key.clone(), (*dtype, numel));
            }
        }
        let mut storage = StorageRef {
            key,
            dtype: *dtype,
            numel,
            base_offset: 0,
        };
        if let Some(view) = view {
            if *view != Value::None {
                let Some([_view_key, Value::Int(offset), Value::Int(_size)]) = self.arena.seq(view)
                else {
                    return Err("storage view metadata is not (key, offset, size)".into());
                };
                storage.base_offset =
                    u64::try_from(*offset).map_err(|_| "negative storage view offset")?;
            }
        }
        Ok(self.arena.alloc(Obj::Storage(storage)))
    }
}

fn resolve(module: &str, name: &str) -> Res<Global> {
    Global::resolve(module, name).ok_or_else(|| PickleError::ForbiddenGlobal {
        module: module.to_string(),
        name: name.to_string(),
    })
}

fn key_string(v: &Value) -> Result<String, String> {
    match v {
        Value::Str(s) => Ok(s.to_string()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Bytes(b) => {
            String::from_utf8(b.to_vec()).map_err(|_| "storage key is not UTF-8".to_string())
        }
        _ => Err("storage key is not a string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &[u8]) -> Result<(Value, Arena), PickleError> {
        unpickle(data)
    }

    fn dict_entries(v: &Value, arena: &Arena) -> Vec<(String, Value)> {
        let d = arena.dict(v).expect("a dict");
        d.entries()
            .iter()
            .map(|(k, v)| match k {
                Value::Str(s) => (s.to_string(), v.clone()),
                other => panic!("key {other:?}"),
            })
            .collect()
    }

    // Both pickles are `pickle.dumps(d, protocol=0 / 1)` (CPython 3.11) of
    // {'a': 12, 'b': 2**40, 'c': 0.5, 'é€': [True, False, 'a', None], 't': (1, -2), 'big': 2**70, 'neg': -2**63}
    const PROTO0: &[u8] = b"(dp0\nVa\np1\nI12\nsVb\np2\nL1099511627776L\nsVc\np3\nF0.5\nsV\xe9\\u20ac\np4\n(lp5\nI01\naI00\nag1\naNasVt\np6\n(I1\nI-2\ntp7\nsVbig\np8\nL1180591620717411303424L\nsVneg\np9\nL-9223372036854775808L\ns.";
    const PROTO1: &[u8] = b"}q\x00(X\x01\x00\x00\x00aq\x01K\x0cX\x01\x00\x00\x00bq\x02L1099511627776L\nX\x01\x00\x00\x00cq\x03G?\xe0\x00\x00\x00\x00\x00\x00X\x05\x00\x00\x00\xc3\xa9\xe2\x82\xacq\x04]q\x05(I01\nI00\nh\x01NeX\x01\x00\x00\x00tq\x06(K\x01J\xfe\xff\xff\xfftq\x07X\x03\x00\x00\x00bigq\x08L1180591620717411303424L\nX\x03\x00\x00\x00negq\tL-9223372036854775808L\nu.";

    #[test]
    fn protocol_0_and_1_plain_data() {
        for data in [PROTO0, PROTO1] {
            let (v, arena) = run(data).expect("valid pickle");
            let e = dict_entries(&v, &arena);
            let keys: Vec<&str> = e.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["a", "b", "c", "é€", "t", "big", "neg"]);
            assert_eq!(e[0].1, Value::Int(12));
            assert_eq!(e[1].1, Value::Int(1 << 40));
            assert_eq!(e[2].1, Value::Float(0.5));
            let list = arena.seq(&e[3].1).expect("list");
            assert_eq!(
                list,
                [
                    Value::Bool(true),
                    Value::Bool(false),
                    Value::Str("a".into()),
                    Value::None
                ]
            );
            assert_eq!(
                arena.seq(&e[4].1).expect("tuple"),
                [Value::Int(1), Value::Int(-2)]
            );
            assert_eq!(
                e[5].1,
                Value::BigInt(Rc::from(&[0, 0, 0, 0, 0, 0, 0, 0, 0x40][..]))
            );
            assert_eq!(e[6].1, Value::Int(i64::MIN));
        }
    }

    #[test]
    fn protocol_5_sets_bytes_frames_memoize() {
        // pickle.dumps(OrderedDict([('x', {1, 2}), ('y', frozenset([3])), ('z', b'\x00\xff'), ('w', bytearray(b'ab'))]), protocol=5)
        let data = b"\x80\x05\x95R\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(\x8c\x01x\x94\x8f\x94(K\x01K\x02\x90\x8c\x01y\x94(K\x03\x91\x94\x8c\x01z\x94C\x02\x00\xff\x94\x8c\x01w\x94\x96\x02\x00\x00\x00\x00\x00\x00\x00ab\x94u.";
        let (v, arena) = run(data).expect("valid pickle");
        let e = dict_entries(&v, &arena);
        assert!(
            matches!(arena.deref(&e[0].1), Some(Obj::Set(s)) if s == &[Value::Int(1), Value::Int(2)])
        );
        assert!(matches!(arena.deref(&e[1].1), Some(Obj::Set(s)) if s == &[Value::Int(3)]));
        assert_eq!(e[2].1, Value::Bytes(Rc::from(&b"\x00\xff"[..])));
        assert_eq!(e[3].1, Value::Bytes(Rc::from(&b"ab"[..])));
    }

    fn forbidden(data: &[u8]) -> (String, String) {
        match run(data) {
            Err(PickleError::ForbiddenGlobal { module, name }) => (module, name),
            other => panic!("expected a forbidden global, got {other:?}"),
        }
    }

    #[test]
    fn code_execution_globals_are_refused_in_every_spelling() {
        // GLOBAL + REDUCE (protocol 0), INST, STACK_GLOBAL (protocol 4), and a global hidden in a tuple
        assert_eq!(
            forbidden(b"cos\nsystem\n(S'true'\ntR."),
            ("os".into(), "system".into())
        );
        assert_eq!(
            forbidden(b"(S'true'\nios\nsystem\n."),
            ("os".into(), "system".into())
        );
        assert_eq!(
            forbidden(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."),
            ("builtins".into(), "eval".into())
        );
        assert_eq!(
            forbidden(b"(K\x01ctorch\nload\nt."),
            ("torch".into(), "load".into())
        );
        // _rebuild_from_type_v2 must not smuggle in a tensor subclass
        let data = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nccollections\nOrderedDict\n)}tR.";
        let err = run(data).expect_err("subclass");
        assert!(err.to_string().contains("tensor subclass"), "{err}");
    }

    #[test]
    fn malformed_pickles_are_named_errors() {
        let cases: [(&[u8], &str); 8] = [
            (b"\x80\x02a.", "stack underflow at byte 2 (APPEND)"),
            (b"K\x01t.", "stack underflow at byte 2 (TUPLE)"),
            (b"(0\x30.", "stack underflow at byte 2 (POP)"),
            (
                b"\x80\x02X\x10\x00\x00\x00ab",
                "pickle data ends early at byte 2",
            ),
            (b"h\x05.", "memo key 5 was never stored"),
            (b"K\x01)R.", "cannot call a int"),
            (b"\xff", "bad opcode 0xff at byte 0"),
            (b"\x80\x09.", "protocol 9 is newer than 5"),
        ];
        for (data, want) in cases {
            let err = run(data).expect_err("malformed");
            assert!(
                err.to_string().contains(want),
                "{data:?}: {err} (wanted {want})"
            );
        }
        assert!(run(b"").is_err());
        assert!(run(b"K\x01").is_err()); // no STOP
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let n = 200_000;
        let mut data = vec![b']'; n];
        data.extend(std::iter::repeat_n(b'a', n - 1));
        data.push(b'.');
        let (v, arena) = run(&data).expect("nested lists");
        assert_eq!(arena.seq(&v).map(<[Value]>::len), Some(1));
    }

    #[test]
    fn decimal_longs_match_long1_encoding() {
        assert_eq!(decimal_to_long("-129"), Some(Value::Int(-129)));
        let big = decimal_to_long("-1180591620717411303424").expect("valid");
        assert_eq!(
            big,
            Value::BigInt(Rc::from(&[0, 0, 0, 0, 0, 0, 0, 0, 0xc0][..]))
        );
        assert_eq!(decimal_to_long("12a"), None);
    }
}
