//! Non-text conditioning of the original CompVis latent diffusion models (Rombach et al. 2022, §3.3 and §4.3):
//! the inputs `y` that the domain-specific encoder `τ_θ(y)` turns into the UNet's conditioning.
//!
//! | original (CompVis/latent-diffusion@a506df5, taming-transformers@3ba01b2)   | here                          |
//! |----------------------------------------------------------------------------|-------------------------------|
//! | `ldm.modules.encoders.modules.ClassEmbedder` (cin256 models, cross-attn)   | [`ClassEmbedder`]             |
//! | `ldm.modules.encoders.modules.SpatialRescaler` (semantic synthesis, concat)| [`SpatialRescaler`]           |
//! | `np.eye(n_labels)[segmentation]` of `taming/data/sflckr.py`                | [`SemanticMap::one_hot`]      |
//! | `taming/data/conditional_builder/objects_bbox.py` (layout-to-image)        | [`LayoutBuilder`]             |
//!
//! The layout tokens are encoded by the `BERTEmbedder`/`TransformerEmbedder` transformer (with
//! `use_tokenizer: false`), which lives with the text encoders; this module only produces the token ids.
pub mod class_embed;
pub mod layout;
pub mod rescaler;
pub mod semantic;

pub use class_embed::{ClassEmbedder, ClassEmbedderConfig};
pub use layout::{LayoutBuilder, LayoutConfig, LayoutObject, ObjectClass};
pub use rescaler::{interpolate, ResizeMethod, SpatialRescaler, SpatialRescalerConfig};
pub use semantic::SemanticMap;

use std::path::PathBuf;

/// Errors of the conditioning inputs. Each names the offending value and the limit it broke.
#[derive(Debug, thiserror::Error)]
pub enum CondError {
    #[error("class index {index} is out of range: the class embedding has {n_classes} classes (0..={max})", max = n_classes.saturating_sub(1))]
    ClassOutOfRange { index: usize, n_classes: usize },
    #[error("this class embedding ({n_classes} classes) has no unconditional (null) class, so classifier-free guidance is impossible; cin256-v2 style tables with 1001 rows use class 1000")]
    NoNullClass { n_classes: usize },
    #[error("{path}: {reason}")]
    NotALabelMap { path: PathBuf, reason: String },
    #[error("{origin}: label {label} at (x {x}, y {y}) is out of range: the model has {n_classes} classes (0..={max})", max = n_classes.saturating_sub(1))]
    LabelOutOfRange {
        origin: String,
        label: usize,
        x: usize,
        y: usize,
        n_classes: usize,
    },
    #[error("semantic maps of one batch differ in size: {first:?} and {other:?} (width, height)")]
    MapSizeMismatch {
        first: (usize, usize),
        other: (usize, usize),
    },
    #[error("layout object {index}: {reason}")]
    BadObject { index: usize, reason: String },
    #[error("layout has {count} objects, the model takes at most {max}")]
    TooManyObjects { count: usize, max: usize },
    #[error("layout JSON: {0}")]
    LayoutJson(String),
    #[error("invalid conditioning config: {0}")]
    Config(String),
    #[error("interpolate: {0}")]
    Interpolate(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CondError>;
