//! Reading and writing NumPy `.npy` files holding little-endian float32 arrays in C order.
//!
//! Format (numpy/lib/format.py, NEP 1): the magic `\x93NUMPY`, a version byte pair (1.0, 2.0 or 3.0), the
//! header length (u16 LE for 1.0, u32 LE for 2.0/3.0), then an ASCII (3.0: UTF-8) Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by `\n` so that
//! the data starts on a 64-byte boundary, then the raw values.
//!
//! Only `'<f4'` with `fortran_order: False` is accepted; anything else is a named error, never a silent
//! conversion. The data must be exactly `prod(shape)·4` bytes (too few: [`NpyError::Truncated`], too many:
//! [`NpyError::TrailingBytes`]).

use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// What went wrong reading or writing a `.npy` file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("npy: cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("npy: not a .npy file (bad magic bytes; file is {len} bytes)")]
    BadMagic { len: usize },
    #[error("npy: unsupported format version {major}.{minor} (supported: 1.0, 2.0, 3.0)")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error("npy: malformed header: {reason} (header: {header:?})")]
    BadHeader { reason: String, header: String },
    #[error("npy: dtype {descr:?} is not supported; only little-endian float32 ('<f4') is")]
    UnsupportedDtype { descr: String },
    #[error(
        "npy: Fortran-order arrays are not supported (shape {shape:?}); save a C-contiguous array"
    )]
    FortranOrder { shape: Vec<usize> },
    #[error("npy: data truncated: shape {shape:?} needs {expected} bytes, file has {actual}")]
    Truncated {
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("npy: {extra} unexpected bytes after the data of shape {shape:?}")]
    TrailingBytes { shape: Vec<usize>, extra: usize },
    #[error("npy: shape {shape:?} has too many elements")]
    ShapeOverflow { shape: Vec<usize> },
    #[error("npy: shape {shape:?} holds {expected} values but {actual} were given")]
    LengthMismatch {
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
}

/// A float32 array read from a `.npy` file: `data` in C (row-major) order, `data.len() == shape.product()`.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads a little-endian float32 C-order `.npy` file.
pub fn read_npy_f32(path: impl AsRef<Path>) -> Result<NpyF32, NpyError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        action: "read",
        path: path.into(),
        source,
    })?;
    parse_npy_f32(&bytes)
}

/// Parses the bytes of a little-endian float32 C-order `.npy` file.
pub fn parse_npy_f32(bytes: &[u8]) -> Result<NpyF32, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::BadMagic { len: bytes.len() });
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match (major, minor) {
        (1, 0) => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        (2, 0) | (3, 0) => {
            let Some(len) = bytes.get(8..12) else {
                return Err(NpyError::Truncated {
                    shape: vec![],
                    expected: 12,
                    actual: bytes.len(),
                });
            };
            (
                u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
                12,
            )
        }
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    let data_start = header_start + header_len;
    let Some(header) = bytes.get(header_start..data_start) else {
        return Err(NpyError::Truncated {
            shape: vec![],
            expected: data_start,
            actual: bytes.len(),
        });
    };
    let header = std::str::from_utf8(header).map_err(|_| NpyError::BadHeader {
        reason: "not UTF-8".into(),
        header: String::from_utf8_lossy(header).into_owned(),
    })?;
    let fields = parse_header(header)?;
    if fields.descr != "<f4" {
        return Err(NpyError::UnsupportedDtype {
            descr: fields.descr,
        });
    }
    if fields.fortran_order {
        return Err(NpyError::FortranOrder {
            shape: fields.shape,
        });
    }
    let shape = fields.shape;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|c| c.checked_mul(4).is_some())
        .ok_or_else(|| NpyError::ShapeOverflow {
            shape: shape.clone(),
        })?;
    let body = &bytes[data_start..];
    let expected = count * 4;
    if body.len() < expected {
        return Err(NpyError::Truncated {
            shape,
            expected,
            actual: body.len(),
        });
    }
    if body.len() > expected {
        return Err(NpyError::TrailingBytes {
            shape,
            extra: body.len() - expected,
        });
    }
    let data = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(NpyF32 { shape, data })
}

/// Writes `data` (C order) with the given shape as a version-1.0 `.npy` file (2.0 if the header needs it),
/// byte-identical to what `numpy.save` writes for a float32 array.
pub fn write_npy_f32(
    path: impl AsRef<Path>,
    shape: &[usize],
    data: &[f32],
) -> Result<(), NpyError> {
    let path = path.as_ref();
    let bytes = encode_npy_f32(shape, data)?;
    std::fs::write(path, bytes).map_err(|source| NpyError::Io {
        action: "write",
        path: path.into(),
        source,
    })
}

/// The bytes of a `.npy` file holding `data` with the given shape (see [`write_npy_f32`]).
pub fn encode_npy_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>, NpyError> {
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| NpyError::ShapeOverflow {
            shape: shape.to_vec(),
        })?;
    if expected != data.len() {
        return Err(NpyError::LengthMismatch {
            shape: shape.to_vec(),
            expected,
            actual: data.len(),
        });
    }
    let shape_text = match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // numpy pads to a multiple of 64 bytes in total, counting magic, version, length field and the final '\n'.
    let (prefix_len, v1) = if header.len() + 1 + 10 <= usize::from(u16::MAX) {
        (10, true)
    } else {
        (12, false)
    };
    let total = (prefix_len + header.len() + 1).div_ceil(64) * 64;
    header.extend(std::iter::repeat_n(
        ' ',
        total - prefix_len - header.len() - 1,
    ));
    header.push('\n');
    let mut out = Vec::with_capacity(total + data.len() * 4);
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

struct HeaderFields {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the header dict. Accepts exactly the keys 'descr', 'fortran_order' and 'shape' (in any order, with
/// either quote style and optional trailing comma), as numpy writes and requires them.
fn parse_header(header: &str) -> Result<HeaderFields, NpyError> {
    let bad = |reason: &str| NpyError::BadHeader {
        reason: reason.into(),
        header: header.to_string(),
    };
    let mut p = Parser {
        s: header.trim_end().as_bytes(),
        i: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{').ok_or_else(|| bad("expected '{'"))?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("expected a quoted key"))?;
        p.skip_ws();
        p.expect(b':')
            .ok_or_else(|| bad("expected ':' after a key"))?;
        p.skip_ws();
        match key.as_str() {
            "descr" => descr = Some(p.string().ok_or_else(|| bad("'descr' must be a string"))?),
            "fortran_order" => {
                fortran = Some(
                    p.boolean()
                        .ok_or_else(|| bad("'fortran_order' must be True/False"))?,
                )
            }
            "shape" => {
                shape = Some(
                    p.tuple()
                        .ok_or_else(|| bad("'shape' must be a tuple of integers"))?,
                )
            }
            _ => return Err(bad(&format!("unexpected key {key:?}"))),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}').ok_or_else(|| bad("expected ',' or '}'"))?;
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(bad("text after the closing '}'"));
    }
    match (descr, fortran, shape) {
        (Some(descr), Some(fortran_order), Some(shape)) => Ok(HeaderFields {
            descr,
            fortran_order,
            shape,
        }),
        _ => Err(bad("missing one of 'descr', 'fortran_order', 'shape'")),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    fn string(&mut self) -> Option<String> {
        let quote = *self.s.get(self.i).filter(|&&q| q == b'\'' || q == b'"')?;
        let start = self.i + 1;
        let len = self.s.get(start..)?.iter().position(|&c| c == quote)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }

    fn boolean(&mut self) -> Option<bool> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s.get(self.i..self.i + word.len()) == Some(word) {
                self.i += word.len();
                return Some(value);
            }
        }
        None
    }

    fn tuple(&mut self) -> Option<Vec<usize>> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Some(dims);
            }
            let start = self.i;
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            // numpy 1.x may write `2L` on Python 2; not supported.
            dims.push(
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()?
                    .parse()
                    .ok()?,
            );
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Some(dims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/npy")
            .join(name)
    }

    #[test]
    fn reads_numpy_written_v1_file() {
        let a = read_npy_f32(fixture("f32_2x3x4.npy")).expect("read");
        assert_eq!(a.shape, vec![2, 3, 4]);
        // np.arange(24).reshape(2,3,4)*0.5-3 with a few special values put in by make_rng.py
        let mut expected: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        expected[1] = -0.0;
        expected[5] = 1e-40;
        expected[7] = f32::INFINITY;
        expected[11] = f32::MAX;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.data), bits(&expected));
    }

    #[test]
    fn reads_v2_scalar_and_empty_files() {
        let a = read_npy_f32(fixture("f32_5_v2.npy")).expect("read v2");
        assert_eq!(a.shape, vec![5]);
        assert_eq!(a.data, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        let s = read_npy_f32(fixture("f32_scalar.npy")).expect("read 0-d");
        assert_eq!((s.shape, s.data), (vec![], vec![2.5]));
        let e = read_npy_f32(fixture("f32_empty_0x3.npy")).expect("read empty");
        assert_eq!((e.shape, e.data), (vec![0, 3], vec![]));
    }

    #[test]
    fn writer_output_is_byte_identical_to_numpy() {
        for name in ["f32_2x3x4.npy", "f32_scalar.npy", "f32_empty_0x3.npy"] {
            let original = std::fs::read(fixture(name)).expect("read");
            let a = parse_npy_f32(&original).expect("parse");
            assert_eq!(
                encode_npy_f32(&a.shape, &a.data).expect("encode"),
                original,
                "{name}"
            );
        }
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.npy");
        let data: Vec<f32> = (0..60).map(|i| (i as f32).sin()).collect();
        write_npy_f32(&path, &[3, 4, 5], &data).expect("write");
        let back = read_npy_f32(&path).expect("read");
        assert_eq!((back.shape, back.data), (vec![3, 4, 5], data));
        let bytes = std::fs::read(&path).expect("read bytes");
        assert_eq!(
            (bytes.len() - 60 * 4) % 64,
            0,
            "data must start on a 64-byte boundary"
        );
    }

    #[test]
    fn rejects_other_dtypes_orders_and_endianness() {
        match read_npy_f32(fixture("f64_2x2.npy")) {
            Err(NpyError::UnsupportedDtype { descr }) => assert_eq!(descr, "<f8"),
            other => panic!("expected UnsupportedDtype, got {other:?}"),
        }
        match read_npy_f32(fixture("f32_big_endian.npy")) {
            Err(NpyError::UnsupportedDtype { descr }) => assert_eq!(descr, ">f4"),
            other => panic!("expected UnsupportedDtype, got {other:?}"),
        }
        match read_npy_f32(fixture("f32_fortran_2x3.npy")) {
            Err(NpyError::FortranOrder { shape }) => assert_eq!(shape, vec![2, 3]),
            other => panic!("expected FortranOrder, got {other:?}"),
        }
    }

    #[test]
    fn rejects_truncated_and_padded_data() {
        let bytes = std::fs::read(fixture("f32_2x3x4.npy")).expect("read");
        match parse_npy_f32(&bytes[..bytes.len() - 3]) {
            Err(NpyError::Truncated {
                expected: 96,
                actual: 93,
                ..
            }) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
        match parse_npy_f32(&bytes[..40]) {
            Err(NpyError::Truncated { .. }) => {} // header cut short
            other => panic!("expected Truncated, got {other:?}"),
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(matches!(
            parse_npy_f32(&longer),
            Err(NpyError::TrailingBytes { extra: 4, .. })
        ));
        assert!(matches!(
            parse_npy_f32(b"PK\x03\x04 not npy"),
            Err(NpyError::BadMagic { .. })
        ));
        let mut v9 = bytes;
        v9[6] = 9;
        assert!(matches!(
            parse_npy_f32(&v9),
            Err(NpyError::UnsupportedVersion { major: 9, minor: 0 })
        ));
        let err = read_npy_f32(fixture("does_not_exist.npy")).expect_err("missing file");
        assert!(err.to_string().contains("does_not_exist.npy"), "{err}");
    }

    #[test]
    fn parses_header_variants_and_rejects_malformed_ones() {
        let make = |h: &str| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&[1, 0]);
            b.extend_from_slice(&(h.len() as u16).to_le_bytes());
            b.extend_from_slice(h.as_bytes());
            b
        };
        let ok = make("{\"shape\": (1,), \"fortran_order\": False, \"descr\": \"<f4\"}\n");
        let mut with_data = ok.clone();
        with_data.extend_from_slice(&1.5f32.to_le_bytes());
        assert_eq!(parse_npy_f32(&with_data).expect("parse").data, vec![1.5]);
        for h in [
            "{'descr': '<f4', 'fortran_order': False}\n",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}\n",
            "'descr': '<f4'\n",
        ] {
            assert!(
                matches!(parse_npy_f32(&make(h)), Err(NpyError::BadHeader { .. })),
                "{h}"
            );
        }
    }

    #[test]
    fn writer_checks_length() {
        assert!(matches!(
            encode_npy_f32(&[2, 3], &[0.0; 5]),
            Err(NpyError::LengthMismatch {
                expected: 6,
                actual: 5,
                ..
            })
        ));
    }
}
