//! Where a diffusers pipeline folder keeps each component's config and weights.
use std::path::{Path, PathBuf};

use super::error::{ImportError, Result};

/// The files of one component (`unet`, `vae`, `text_encoder`) of a diffusers folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

/// Weight file names in the order they are preferred: full precision first, then the `fp16` variant.
const WEIGHT_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

/// Finds `<dir>/<component>/config.json` and its single safetensors weight file. Sharded weights
/// (`*.safetensors.index.json`) and pickled `.bin` files are not supported and named in the error.
pub fn component_files(dir: &Path, component: &str) -> Result<ComponentFiles> {
    let base = dir.join(component);
    let config = base.join("config.json");
    let missing = |path: PathBuf, why: &str| ImportError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, why.to_string()),
    };
    if !config.is_file() {
        return Err(missing(config, "no config.json for this component"));
    }
    if let Some(weights) = WEIGHT_NAMES
        .iter()
        .map(|n| base.join(n))
        .find(|p| p.is_file())
    {
        return Ok(ComponentFiles { config, weights });
    }
    Err(missing(
        base,
        "no single-file safetensors weights (looked for diffusion_pytorch_model[.fp16].safetensors and \
         model[.fp16].safetensors; sharded and .bin weights are not supported)",
    ))
}
