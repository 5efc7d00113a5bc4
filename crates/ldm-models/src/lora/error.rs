//! Errors of reading and merging LoRA files. Every variant names the file and, where there is one, the module.
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, LoraError>;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file holds no kohya LoRA modules (e.g. a checkpoint or an embedding was given).
    #[error("{path}: not a kohya LoRA file ({reason})")]
    NotLora { path: PathBuf, reason: String },
    /// A LyCORIS network type (LoHa, LoKr, ...), a diffusers/PEFT-named LoRA, or another non-kohya format.
    #[error(
        "{path}: {kind} is not supported (module `{module}`, {count} tensors of that kind); only kohya LoRA \
         (`lora_down.weight`, `lora_up.weight`, `alpha`) is"
    )]
    Unsupported {
        path: PathBuf,
        kind: &'static str,
        module: String,
        count: usize,
    },
    /// Module names that match no weight of the model (another architecture, e.g. SDXL, or another model).
    #[error("{path}: {} LoRA modules this model does not have: {}", .modules.len(), list(.modules))]
    UnknownModules { path: PathBuf, modules: Vec<String> },
    /// A module whose tensors are incomplete or not LoRA-shaped.
    #[error("{path}: module `{module}`: {reason}")]
    Module {
        path: PathBuf,
        module: String,
        reason: String,
    },
    #[error("{path}: module `{module}`: lora_down has rank {down} but lora_up has rank {up}")]
    RankMismatch {
        path: PathBuf,
        module: String,
        down: usize,
        up: usize,
    },
    /// `up @ down` does not have the shape of the weight (or the q/k/v block of a fused weight) it patches.
    #[error(transparent)]
    Shape(Box<ShapeError>),
    /// A setting outside its range (a non-finite weight, rank 0).
    #[error("invalid LoRA setting `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Core(#[from] ldm_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The details of [`LoraError::Shape`] (boxed: the error type stays small).
#[derive(Debug, thiserror::Error)]
#[error("{path}: module `{module}`: up @ down is {lora:?} but `{key}` {what} is {base:?}")]
pub struct ShapeError {
    pub path: PathBuf,
    pub module: String,
    pub key: String,
    pub what: &'static str,
    pub lora: Vec<usize>,
    pub base: Vec<usize>,
}

fn list(names: &[String]) -> String {
    const SHOW: usize = 6;
    let mut s: Vec<String> = names.iter().take(SHOW).map(|n| format!("`{n}`")).collect();
    if names.len() > SHOW {
        s.push(format!("and {} more", names.len() - SHOW));
    }
    s.join(", ")
}
