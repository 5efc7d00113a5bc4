//! The error type of ldm-pipeline.
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, PipelineError>;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("invalid request: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Core(#[from] ldm_core::Error),
    #[error(transparent)]
    Ckpt(#[from] ldm_core::ckpt::CkptError),
    /// Boxed, like [`PipelineError::Config`]: both are large and rare, and every `Result` of the pipeline
    /// carries this type.
    #[error(transparent)]
    Load(Box<ldm_core::weights::LoadReport>),
    #[error(transparent)]
    Config(Box<ldm_models::original_config::ConfigError>),
    #[error("{0}")]
    Model(String),
    /// The compute device cannot be used (no CUDA device or driver, …).
    #[error("device: {0}")]
    Device(String),
    /// A LoRA file that cannot be applied (boxed: large and rare).
    #[error(transparent)]
    Lora(Box<ldm_models::lora::LoraError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<ldm_core::weights::LoadReport> for PipelineError {
    fn from(e: ldm_core::weights::LoadReport) -> Self {
        PipelineError::Load(Box::new(e))
    }
}

impl From<ldm_models::original_config::ConfigError> for PipelineError {
    fn from(e: ldm_models::original_config::ConfigError) -> Self {
        PipelineError::Config(Box::new(e))
    }
}

impl From<ldm_models::lora::LoraError> for PipelineError {
    fn from(e: ldm_models::lora::LoraError) -> Self {
        PipelineError::Lora(Box::new(e))
    }
}

impl PipelineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PipelineError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        PipelineError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
