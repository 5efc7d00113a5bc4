//! ldm-models: the networks of latent diffusion — CLIP/OpenCLIP text encoders and the CLIP tokenizer, the LDM
//! UNet, the autoencoders — with their typed configs, presets and the import of foreign configs and key names.
pub mod autoencoder;
pub mod blocks;
pub mod cond;
pub mod import;
pub mod lora;
pub mod ops;
pub mod original_config;
pub mod text;
pub mod tokenizer;
pub mod unet;
