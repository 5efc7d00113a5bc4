//! The first stage of a latent diffusion model, whichever regulariser it uses (Rombach et al. 2022, §3): what a
//! pipeline needs from it, independent of the kind.
//!
//! | kind | original | `encode` gives | `decode` does |
//! |---|---|---|---|
//! | [`FirstStage::Kl`] | `AutoencoderKL` | the posterior `q(z|x)` ([`Encoded::Posterior`]); the pipeline draws `z = μ + σ·ε` with its own RNG or takes the mode | `D(post_quant_conv(z))` |
//! | [`FirstStage::Vq`] | `VQModelInterface` | the pre-quantisation latent `h` ([`Encoded::Latent`]) | quantise `h`, then `D(post_quant_conv(z_q))` |
//! | [`FirstStage::Identity`] | `IdentityFirstStage` (pixel-space DMs, `f = 1`) | the image itself | nothing (identity) |
//!
//! Latents are UNSCALED: the LDM `scale_factor` (SD 0.18215, most VQ LDMs 1.0) is applied by the pipeline,
//! `z_diffusion = scale_factor · z` after encoding and `z = z_diffusion / scale_factor` before decoding.
use candle_core::{Result, Tensor};

use super::kl::{AutoencoderKl, DiagonalGaussian};
use super::vq::VqModel;

/// A first-stage model: KL autoencoder, VQ autoencoder, or the identity (pixel space).
#[derive(Debug, Clone)]
pub enum FirstStage {
    Kl(AutoencoderKl),
    Vq(VqModel),
    /// Pixel space: the "latent" is the image, with `channels` channels and `f = 1`.
    Identity {
        channels: usize,
    },
}

/// What [`FirstStage::encode`] returns.
#[derive(Debug, Clone)]
pub enum Encoded {
    /// KL: a diagonal Gaussian to sample from (`DiagonalGaussian::sample` with the pipeline's noise) or take
    /// the mode of.
    Posterior(DiagonalGaussian),
    /// VQ (the unquantised `h`) or identity (the image): deterministic.
    Latent(Tensor),
}

impl Encoded {
    /// The deterministic latent: the posterior mean (mode) for KL, the latent itself otherwise.
    pub fn mode(&self) -> &Tensor {
        match self {
            Encoded::Posterior(q) => q.mode(),
            Encoded::Latent(z) => z,
        }
    }

    /// A latent drawn with `noise` (standard normal, shape of the latent): `μ + σ·noise` for KL; VQ and identity
    /// latents are deterministic and ignore `noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        match self {
            Encoded::Posterior(q) => q.sample(noise),
            Encoded::Latent(z) => Ok(z.clone()),
        }
    }

    /// Whether [`Encoded::sample`] uses its noise (only the KL posterior does).
    pub fn is_stochastic(&self) -> bool {
        matches!(self, Encoded::Posterior(_))
    }
}

impl FirstStage {
    /// Spatial down-sampling factor `f` (1 for the identity).
    pub fn downsample_factor(&self) -> usize {
        match self {
            FirstStage::Kl(m) => m.config().ddconfig.downsample_factor(),
            FirstStage::Vq(m) => m.downsample_factor(),
            FirstStage::Identity { .. } => 1,
        }
    }

    /// Channels of the latent the diffusion model sees (`embed_dim`; image channels for the identity).
    pub fn latent_channels(&self) -> usize {
        match self {
            FirstStage::Kl(m) => m.config().embed_dim,
            FirstStage::Vq(m) => m.config().embed_dim,
            FirstStage::Identity { channels } => *channels,
        }
    }

    /// Channels of the images it encodes and decodes.
    pub fn image_channels(&self) -> usize {
        match self {
            FirstStage::Kl(m) => m.config().ddconfig.out_ch,
            FirstStage::Vq(m) => m.config().ddconfig.out_ch,
            FirstStage::Identity { channels } => *channels,
        }
    }

    /// Image `[B, C, H, W]` in [−1, 1] (H, W multiples of `f`) → latent distribution or latent
    /// `[B, latent_channels, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<Encoded> {
        match self {
            FirstStage::Kl(m) => Ok(Encoded::Posterior(m.encode(x)?)),
            FirstStage::Vq(m) => Ok(Encoded::Latent(m.encode(x)?)),
            FirstStage::Identity { channels } => {
                check_identity_channels("encode", x, *channels)?;
                Ok(Encoded::Latent(x.clone()))
            }
        }
    }

    /// Unscaled latent `[B, latent_channels, h, w]` → image `[B, C, f·h, f·w]`; a VQ model quantises first.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match self {
            FirstStage::Kl(m) => m.decode(z),
            FirstStage::Vq(m) => m.decode(z),
            FirstStage::Identity { channels } => {
                check_identity_channels("decode", z, *channels)?;
                Ok(z.clone())
            }
        }
    }
}

fn check_identity_channels(what: &str, x: &Tensor, channels: usize) -> Result<()> {
    let c = x.dim(1)?;
    if c != channels {
        candle_core::bail!(
            "IdentityFirstStage::{what}: input has {c} channels, expected {channels}"
        );
    }
    Ok(())
}
