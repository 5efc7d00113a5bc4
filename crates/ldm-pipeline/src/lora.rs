//! Applying kohya LoRA files to an opened checkpoint before its models are built (`--lora FILE[:WEIGHT]`).
use std::path::PathBuf;
use std::sync::Arc;

use ldm_models::lora::{self, LoraReport, LoraTargets, TextTarget};

use crate::error::Result;
use crate::load::Opened;
use crate::spec::{CondSpec, TextSpec};

/// The kohya module names of `opened`'s UNet and text encoder.
pub fn lora_targets(opened: &Opened) -> LoraTargets {
    let text = match &opened.spec.cond {
        CondSpec::Text(TextSpec::Clip { config, layout, .. }) => Some(TextTarget {
            config,
            layout: *layout,
        }),
        _ => None,
    };
    LoraTargets::for_model(&opened.store, Some(&opened.spec.unet), text)
}

/// Merges each `(file, weight)` into `opened`'s weights (W0 + Σ weight · ΔW, in f32, when the models are built).
pub fn apply_loras(opened: &mut Opened, loras: &[(PathBuf, f64)]) -> Result<LoraReport> {
    if loras.is_empty() {
        return Ok(LoraReport::default());
    }
    let targets = lora_targets(opened);
    // Freshly opened stores are not shared; a shared one is copied (entries only, the data stays mapped).
    let store = Arc::make_mut(&mut opened.store);
    Ok(lora::apply_loras(store, &targets, loras)?)
}

/// `FILE[:WEIGHT]` (weight 1 when absent or when the text after the last `:` is not a number).
pub fn parse_lora_arg(arg: &str) -> (PathBuf, f64) {
    match arg.rsplit_once(':') {
        Some((file, w)) if !file.is_empty() => match w.parse::<f64>() {
            Ok(w) => (PathBuf::from(file), w),
            Err(_) => (PathBuf::from(arg), 1.0),
        },
        _ => (PathBuf::from(arg), 1.0),
    }
}
