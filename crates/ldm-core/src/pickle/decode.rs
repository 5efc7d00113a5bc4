//! Decoding the arguments of individual opcodes: integers, protocol-0 text, opcode names.
use std::rc::Rc;

use super::value::Value;

/// LONG1/LONG4 payload: little-endian two's complement.
pub(super) fn long_from_bytes(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(Rc::from(bytes));
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut le = if negative { [0xffu8; 8] } else { [0u8; 8] };
    le[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(le))
}

/// A decimal integer outside the i64 range, as LONG1 would store it (minimal little-endian two's complement).
pub(super) fn decimal_to_long(s: &str) -> Option<Value> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Magnitude, little-endian base 256: multiply by 10 and add each digit.
    let mut mag: Vec<u8> = Vec::new();
    for d in digits.bytes() {
        let mut carry = u32::from(d - b'0');
        for byte in mag.iter_mut() {
            let x = u32::from(*byte) * 10 + carry;
            *byte = (x & 0xff) as u8;
            carry = x >> 8;
        }
        while carry > 0 {
            mag.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    mag.push(0); // room for the sign bit
    if negative {
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let x = u16::from(!*byte) + carry;
            *byte = (x & 0xff) as u8;
            carry = x >> 8;
        }
    }
    // Drop redundant sign-extension bytes.
    while mag.len() > 1 {
        let (last, prev) = (mag[mag.len() - 1], mag[mag.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            mag.pop();
        } else {
            break;
        }
    }
    Some(long_from_bytes(&mag))
}

/// Python 2 `str` (STRING/BINSTRING/SHORT_BINSTRING): text when it is UTF-8, bytes otherwise.
pub(super) fn py2_string(raw: &[u8]) -> Value {
    match std::str::from_utf8(raw) {
        Ok(s) => Value::Str(Rc::from(s)),
        Err(_) => Value::Bytes(Rc::from(raw)),
    }
}

/// The quoted `repr` argument of protocol-0 `STRING` (Python's `string-escape` codec).
pub(super) fn decode_string_escape(line: &[u8]) -> Result<Vec<u8>, String> {
    let inner = match line {
        [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
        _ => return Err("STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut it = inner.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'0') => out.push(0),
            Some(b'x') => {
                let hex = [it.next().unwrap_or(b'?'), it.next().unwrap_or(b'?')];
                let s = std::str::from_utf8(&hex).map_err(|_| "bad \\x escape")?;
                out.push(u8::from_str_radix(s, 16).map_err(|_| "bad \\x escape")?);
            }
            Some(c @ (b'\\' | b'\'' | b'"')) => out.push(c),
            Some(c) => {
                out.push(b'\\');
                out.push(c);
            }
            None => return Err("dangling backslash".into()),
        }
    }
    Ok(out)
}

/// The argument of protocol-0 `UNICODE` (Python's `raw-unicode-escape`: latin-1 plus `\uXXXX`/`\UXXXXXXXX`).
pub(super) fn decode_raw_unicode_escape(line: &[u8]) -> Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        let digits = match (b, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if digits == 0 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hex = line
            .get(i + 2..i + 2 + digits)
            .ok_or("truncated \\u escape")?;
        let hex = std::str::from_utf8(hex).map_err(|_| "bad \\u escape")?;
        let code = u32::from_str_radix(hex, 16).map_err(|_| "bad \\u escape")?;
        out.push(char::from_u32(code).ok_or("\\u escape is not a character")?);
        i += 2 + digits;
    }
    Ok(out)
}

/// The `pickletools` name of an opcode (for messages).
pub fn op_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown opcode",
    }
}
