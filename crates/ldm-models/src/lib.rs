//! ldm-models
pub mod original_config;
