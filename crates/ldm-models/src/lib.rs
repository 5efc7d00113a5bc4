//! ldm-models
pub mod blocks;
pub mod unet;
