//! ldm-core: the pieces every other crate of ldm-rs stands on — errors, weight files (safetensors and a
//! restricted, never-executing pickle reader for `.ckpt`), the torch-compatible random number generator, and
//! image/array I/O.
pub mod ckpt;
pub mod error;
pub mod image;
pub mod npy;
pub mod pickle;
pub mod rng;
pub mod weights;

pub use error::{Error, Result};
