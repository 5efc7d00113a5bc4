//! The error type of ldm-core. Every variant names the file or key it is about.
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file ({reason})")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{path}: truncated safetensors file ({have} bytes, the header promises {want})")]
    TruncatedSafetensors { path: PathBuf, have: u64, want: u64 },
    #[error("{path}: tensor `{key}` has dtype {dtype}, which ldm-rs cannot load")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{0}")]
    Load(#[from] crate::weights::LoadReport),
    #[error("{path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
