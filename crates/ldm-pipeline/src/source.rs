//! What a model path is: a single-file safetensors, a single-file PyTorch `.ckpt`, or a diffusers folder.
//! Decided by content (magic bytes), not by extension alone, so a renamed file is still read correctly and a
//! file that is no checkpoint at all is named as such.
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointForm {
    /// `.safetensors` with the original CompVis keys.
    Safetensors(PathBuf),
    /// PyTorch `torch.save` file (zip, or the legacy pre-1.6 pickle stream).
    Ckpt(PathBuf),
    /// A diffusers pipeline folder with `model_index.json`.
    Diffusers(PathBuf),
}

impl CheckpointForm {
    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(p) | Self::Ckpt(p) | Self::Diffusers(p) => p,
        }
    }
}

/// Looks at `path` and says which form it is.
pub fn detect_form(path: &Path) -> Result<CheckpointForm> {
    let meta = std::fs::metadata(path).map_err(|e| PipelineError::io(path, e))?;
    if meta.is_dir() {
        if path.join("model_index.json").is_file() {
            return Ok(CheckpointForm::Diffusers(path.to_path_buf()));
        }
        return Err(PipelineError::NotACheckpoint {
            path: path.to_path_buf(),
            reason: "a folder without model_index.json (not a diffusers pipeline)".into(),
        });
    }
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| PipelineError::io(path, e))?;
    let head = &head[..n];
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(CheckpointForm::Safetensors(path.to_path_buf()));
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(&[0x80, 0x02]) {
        return Ok(CheckpointForm::Ckpt(path.to_path_buf()));
    }
    let reason = if n == 0 {
        "the file is empty".to_string()
    } else {
        "neither safetensors nor a PyTorch checkpoint".to_string()
    };
    Err(PipelineError::NotACheckpoint {
        path: path.to_path_buf(),
        reason,
    })
}
