//! ldm-models
pub mod autoencoder;
pub mod text;
