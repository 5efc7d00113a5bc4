//! Foreign checkpoints onto ldm-rs's canonical weights (STYLE P4, P5).
//!
//! ldm-rs names every weight as the original CompVis / Stability LDM single file does
//! (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`). A diffusers folder stores each
//! component in its own file under other names; this module reads the component's `config.json` and builds a
//! [`KeyMap`]: every expected diffusers key with its shape, the canonical key it becomes and the (exact) value
//! conversion. [`KeyMap::to_canonical`] applies it strictly: all missing, misshapen and unknown keys are reported
//! together ([`KeyReport`]); [`KeyMap::to_diffusers`] is the inverse.
//!
//! | component | config | key map | canonical prefix |
//! |---|---|---|---|
//! | `unet/` | [`DiffusersUnetConfig`] -> [`UnetArch`] | [`unet_key_map`] | [`UNET_PREFIX`] |
//! | `unet/` (`UNet2DModel`, LDM pipelines) | [`DiffusersUnet2dConfig`] -> [`Unet2dArch`] | [`unet2d_key_map`] | [`UNET_PREFIX`] |
//! | `vae/` | [`DiffusersVaeConfig`] -> [`VaeArch`] | [`vae_key_map`] | [`VAE_PREFIX`] |
//! | `vqvae/` (VQModel) | [`DiffusersVqConfig`] -> [`VqArch`] | [`vq_key_map`] | [`VQ_PREFIX`] |
//! | `text_encoder/` SD1 | [`DiffusersClipConfig`] -> [`ClipArch`] | [`clip_key_map`] | [`CLIP_PREFIX`] |
//! | `text_encoder/` SD2 | [`DiffusersClipConfig`] -> [`ClipArch`] | [`open_clip_key_map`] | [`OPEN_CLIP_PREFIX`] |
//! | `bert/` (LDM text2img) | [`DiffusersLdmBertConfig`] -> [`LdmBertArch`] | [`ldmbert_key_map`] | [`LDMBERT_PREFIX`] |
//!
//! [`component_files`] finds a component's `config.json` and weights in a diffusers folder.
//! Maps give canonical names relative to the component's prefix; [`KeyMap::with_canonical_prefix`] adds it.
//!
//! Connecting to the typed model configs: `UnetArch`, `VaeArch` and `ClipArch` state the original
//! architecture's parameters under the original names (`model_channels`, `channel_mult`, `res_blocks` per level,
//! `attention_levels` as level indices, [`Heads::Count`] / [`Heads::Dim`] for `num_heads` /
//! `num_head_channels`, `transformer_depth` per level, `context_dim`, `linear_projection` for
//! `use_linear_in_transformer`, `ch`/`ch_mult`/`num_res_blocks`/`z_channels`/`embed_dim`, `scaling_factor`).
//! The model crate's `UnetConfig`, `DdConfig` and text config get `impl TryFrom<&UnetArch>` (etc.) next to their
//! definitions, failing where they support less (e.g. per-level `res_blocks`). Each `*Arch` lists the config
//! entries it did not understand in `ignored`, for the caller to log.
mod error;
mod folder;
mod json;
mod key_map;

pub mod diffusers_clip;
pub mod diffusers_ldmbert;
pub mod diffusers_unet;
pub mod diffusers_unet2d;
pub mod diffusers_vae;
pub mod diffusers_vq;

pub use diffusers_clip::{
    clip_key_map, clip_key_map_for, open_clip_key_map, open_clip_key_map_for, Activation, ClipArch,
    DiffusersClipConfig, CLIP_PREFIX, OPEN_CLIP_PREFIX, POSITION_IDS,
};
pub use diffusers_ldmbert::{
    ldmbert_key_map, ldmbert_key_map_for, DiffusersLdmBertConfig, LdmBertArch, LDMBERT_PREFIX,
};
pub use diffusers_unet::{
    unet_key_map, unet_key_map_for, DiffusersUnetConfig, Heads, UnetArch, UNET_PREFIX,
};
pub use diffusers_unet2d::{unet2d_key_map, unet2d_key_map_for, DiffusersUnet2dConfig, Unet2dArch};
pub use diffusers_vae::{vae_key_map, vae_key_map_for, DiffusersVaeConfig, VaeArch, VAE_PREFIX};
pub use diffusers_vq::{vq_key_map, vq_key_map_for, DiffusersVqConfig, VqArch, VQ_PREFIX};
pub use error::{ImportError, KeyReport, MissingKey, Result, ShapeMismatch};
pub use folder::{component_files, ComponentFiles};
pub use json::OneOrMany;
pub use key_map::{map_tensors, Conversion, Entry, KeyMap};
