//! First-stage autoencoders of Latent Diffusion: the shared convolutional [`Encoder`]/[`Decoder`] and the
//! KL-regularised [`AutoencoderKl`] used by Stable Diffusion. Key names are the original LDM ones.
pub mod blocks;
pub mod kl;
pub mod model;
pub mod tiled;

pub use kl::{AutoencoderKl, AutoencoderKlConfig, DiagonalGaussian};
pub use model::{DdConfig, Decoder, Encoder};
pub use tiled::{tiled_decode, tiled_encode, TileConfig, TileConfigError};
