//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in the kohya / AUTOMATIC1111
//! safetensors format that Stable Diffusion tools exchange.
//!
//! A LoRA module changes one weight W (`[out, in]`, or `[out, in, k, k]`) by
//! ΔW = (α / r) · U · D, with D = `lora_down` `[r, in(, k, k)]`, U = `lora_up` `[out, r(, 1, 1)]` and α = `alpha`;
//! applying a file with weight w merges W0 + w · ΔW.
//!
//! | symbol | here |
//! |---|---|
//! | r (rank) | [`LoraModule::rank`] |
//! | α / r | [`LoraModule::scale`] |
//! | w (user weight, `--lora FILE:w`) | the `f64` of [`apply_loras`] |
//!
//! [`names`] maps kohya module names onto canonical keys, [`file`] reads and checks a file, [`apply`] merges
//! files into a [`ldm_core::weights::WeightStore`] before the model is built.
pub mod apply;
pub mod error;
pub mod file;
pub mod names;

pub use apply::{apply_lora, apply_loras, LoraFileReport, LoraReport};
pub use error::{LoraError, Result, ShapeError};
pub use file::{read_lora, LoraFile, LoraModule};
pub use names::{LoraTarget, LoraTargets, TextTarget, KOHYA_TE, KOHYA_UNET};
