//! ldm-train: training the system of Rombach et al. 2022 — autoencoders (KL and VQ, with perceptual and
//! adversarial losses) and latent diffusion models (ε/v objective, classifier-free-guidance dropout), fine-tuning
//! and LoRA, with optimiser, EMA, checkpoints that resume bit-exactly, and data readers.
pub mod autoencoder;
pub mod checkpoint;
pub mod concat;
pub mod data;
pub mod diffusion;
pub mod ema;
pub mod error;
pub mod grad;
pub mod grid;
pub mod init;
pub mod ldm;
pub mod log;
pub mod lora;
pub mod losses;
pub mod lr;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod run;
pub mod setup;

pub use error::{Result, TrainError};
pub use run::{Event, RunOptions, Summary};
