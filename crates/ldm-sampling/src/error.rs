//! The crate's error type.

use crate::plan::SamplerKind;

/// Everything that can go wrong while planning or running a sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// The requested step count is outside `1..=train_steps`.
    #[error("steps must be in 1..={max}, got {steps}")]
    Steps { steps: usize, max: usize },
    /// An img2img/inpainting strength outside [0, 1] (or NaN).
    #[error("strength must be a number in [0, 1], got {0}")]
    Strength(f64),
    /// A sampler name the CLI does not know.
    #[error("unknown sampler `{name}` (expected one of: {expected})")]
    UnknownSampler {
        name: String,
        expected: &'static str,
    },
    /// A scheduler-config value or option this crate does not implement.
    #[error("{sampler}: unsupported {what}")]
    Unsupported { sampler: SamplerKind, what: String },
    /// A scheduler config that is inconsistent in itself.
    #[error("scheduler config: {0}")]
    Config(String),
    /// A scheduler config that is not valid JSON for [`crate::SchedulerConfig`].
    #[error("scheduler config JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A [`ldm_core::rng::NoiseRng`] returned the wrong number of samples.
    #[error("noise source returned {got} samples, expected {expected}")]
    NoiseLength { got: usize, expected: usize },
    /// The noise predictor (the model) failed.
    #[error("noise predictor: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`SamplingError`].
pub type Result<T> = std::result::Result<T, SamplingError>;
