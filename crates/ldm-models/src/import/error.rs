//! Errors of the diffusers import layer (config translation and key mapping).

/// A diffusers key that the key map expects but the file lacks, with its expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingKey {
    pub key: String,
    pub expected: Vec<usize>,
}

/// A tensor whose shape differs from the one the config implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub key: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Every problem found while mapping one set of tensors, collected before failing (STYLE P6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Which side the keys below are named in (`"diffusers"` or `"canonical"`).
    pub naming: &'static str,
    pub missing: Vec<MissingKey>,
    pub shape: Vec<ShapeMismatch>,
    /// Keys present in the input that the map does not know and that no ignore rule covers.
    pub unused: Vec<String>,
}

impl KeyReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.shape.is_empty() && self.unused.is_empty()
    }
}

impl std::fmt::Display for KeyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOW: usize = 5;
        write!(
            f,
            "{} missing, {} with wrong shape, {} unused ({} names)",
            self.missing.len(),
            self.shape.len(),
            self.unused.len(),
            self.naming
        )?;
        for m in self.missing.iter().take(SHOW) {
            write!(f, "; missing `{}` {:?}", m.key, m.expected)?;
        }
        for s in self.shape.iter().take(SHOW) {
            write!(
                f,
                "; `{}` is {:?}, expected {:?}",
                s.key, s.found, s.expected
            )?;
        }
        for u in self.unused.iter().take(SHOW) {
            write!(f, "; unused `{u}`")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot parse diffusers {what} config: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config value that the original LDM architecture cannot express (or ldm-rs does not implement).
    #[error("diffusers {what} config: `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        what: &'static str,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// Config values that contradict each other (list lengths, divisibility).
    #[error("diffusers {what} config is inconsistent: {detail}")]
    Inconsistent { what: &'static str, detail: String },
    /// Two entries of a key map that claim the same key (a bug in a map builder, never input).
    #[error("key map: `{key}` is claimed twice")]
    Duplicate { key: String },
    /// A fused canonical tensor whose blocks are not all in the map (a bug in a map builder).
    #[error("key map: `{key}` has {have} of {want} blocks")]
    IncompleteFusion {
        key: String,
        have: usize,
        want: usize,
    },
    #[error("{0}")]
    Keys(Box<KeyReport>),
    #[error(transparent)]
    Backend(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ImportError>;
