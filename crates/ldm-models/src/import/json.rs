//! Shared pieces for reading diffusers / transformers `config.json` files.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ImportError, Result};

/// diffusers writes many per-level settings either as one value or as a list with one value per level.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> OneOrMany<T> {
    /// One value per level; `field` names the config entry in the error when the list has the wrong length.
    pub fn per_level(&self, levels: usize, what: &'static str, field: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); levels]),
            OneOrMany::Many(v) if v.len() == levels => Ok(v.clone()),
            OneOrMany::Many(v) => Err(ImportError::Inconsistent {
                what,
                detail: format!(
                    "`{field}` = {v:?} has {} entries for {levels} levels",
                    v.len()
                ),
            }),
        }
    }
}

/// A config entry that ldm-rs accepts only at one value (or one of a few), because the original LDM code
/// hard-wires it. Absent entries take diffusers' default, which is always among the accepted values.
pub(crate) struct Fixed {
    pub field: &'static str,
    pub accepted: &'static [Accepted],
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Accepted {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'static str),
}

impl Accepted {
    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Accepted::Null, Value::Null) => true,
            (Accepted::Bool(a), Value::Bool(b)) => a == b,
            (Accepted::Num(a), Value::Number(n)) => n.as_f64() == Some(*a),
            (Accepted::Str(a), Value::String(s)) => a == s,
            _ => false,
        }
    }
}

/// Checks the `fixed` entries among `rest` (the config entries not read into typed fields) and returns the
/// names of the remaining entries that are neither fixed nor listed in `harmless`: the caller should log them.
pub(crate) fn check_rest(
    what: &'static str,
    rest: &BTreeMap<String, Value>,
    fixed: &[Fixed],
    harmless: &[&str],
) -> Result<Vec<String>> {
    let mut ignored = Vec::new();
    for (key, value) in rest {
        if let Some(f) = fixed.iter().find(|f| f.field == key) {
            if !f.accepted.iter().any(|a| a.matches(value)) {
                return Err(ImportError::Unsupported {
                    what,
                    field: f.field,
                    value: value.to_string(),
                    reason: f.reason,
                });
            }
        } else if !harmless.contains(&key.as_str()) {
            ignored.push(key.clone());
        }
    }
    Ok(ignored)
}

/// Reads and parses a config file.
pub(crate) fn read_config<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    path: &Path,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ImportError::Json { what, source })
}

/// Config entries every diffusers / transformers config carries that say nothing about the model.
pub(crate) const BOOKKEEPING: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_commit_hash",
];
