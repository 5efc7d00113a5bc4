//! ldm-models
pub mod import;
