//! The error type of ldm-train. Variants name the file, key or setting they are about.
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A recipe file that is not valid TOML or has unknown or mistyped fields.
    #[error("{path}: {reason}")]
    Recipe { path: PathBuf, reason: String },
    /// A setting outside its valid range, or settings that contradict each other.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A training data problem (empty folder, unreadable files, mixed sizes, a bad IDX file).
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    /// A checkpoint that is not one of ours, is truncated, or does not fit the model being trained.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error(transparent)]
    Core(#[from] ldm_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        TrainError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
