//! First-stage autoencoders of Latent Diffusion: the shared convolutional [`Encoder`]/[`Decoder`], the
//! KL-regularised [`AutoencoderKl`] used by Stable Diffusion, the VQ-regularised [`VqModel`], and
//! [`FirstStage`], which puts them (and the pixel-space identity) behind one interface. Key names are the
//! original LDM ones.
pub mod blocks;
pub mod first_stage;
pub mod kl;
pub mod model;
pub mod quantize;
pub mod tiled;
pub mod vq;

pub use first_stage::{Encoded, FirstStage};
pub use kl::{AutoencoderKl, AutoencoderKlConfig, DiagonalGaussian};
pub use model::{AttnType, DdConfig, Decoder, Encoder};
pub use quantize::{Quantized, QuantizedTrain, VectorQuantizer};
pub use tiled::{tiled_decode, tiled_encode, TileConfig, TileConfigError, TileMode};
pub use vq::{VqModel, VqModelConfig};
