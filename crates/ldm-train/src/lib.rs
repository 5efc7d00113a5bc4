//! ldm-train: training the system of Rombach et al. 2022 — autoencoders (KL and VQ, with perceptual and
//! adversarial losses) and latent diffusion models (ε/v objective, classifier-free-guidance dropout), fine-tuning
//! and LoRA, with optimiser, EMA, checkpoints that resume bit-exactly, and data readers.
pub mod error;
pub mod lora;

pub use error::{Result, TrainError};
