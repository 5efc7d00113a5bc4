//! The KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022, §3 "Perceptual Image
//! Compression"; `ldm/models/autoencoder.py::AutoencoderKL` and
//! `ldm/modules/distributions/distributions.py::DiagonalGaussianDistribution`, CompVis/stable-diffusion@21f890f).
//!
//! | paper / original                  | here                                  |
//! |-----------------------------------|---------------------------------------|
//! | `E(x)` → moments                  | [`AutoencoderKl::encode`] → [`DiagonalGaussian`] |
//! | `q(z|x) = N(μ, σ²)`, log σ² ∈ [−30, 20] | `mean`, `logvar`                |
//! | `z = μ + σ·ε`                     | [`DiagonalGaussian::sample`]          |
//! | `D(z)`                            | [`AutoencoderKl::decode`]             |
//!
//! Latents here are UNSCALED: multiplying by the latent scale factor (SD: 0.18215) is the pipeline's job.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::Conv2d;
use serde::{Deserialize, Serialize};

use super::blocks::conv1x1;
use super::model::{DdConfig, Decoder, Encoder};

/// `first_stage_config.params` of an LDM YAML (without `lossconfig`, a training-only concern).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderKlConfig {
    /// Latent channels seen by the diffusion model (`quant_conv` output / 2, `post_quant_conv` input).
    pub embed_dim: usize,
    pub ddconfig: DdConfig,
}

impl AutoencoderKlConfig {
    /// Stable Diffusion 1.x / 2.x first stage (`kl-f8`, 4 latent channels).
    pub fn sd() -> Self {
        Self {
            embed_dim: 4,
            ddconfig: DdConfig::sd(),
        }
    }
}

/// The posterior `q(z|x)`: a diagonal Gaussian with `mean` and `logvar` of shape `[B, embed_dim, h, w]`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// log σ², clamped to [−30, 20] as in the original.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[B, 2·C, h, w]` moments into mean and (clamped) log-variance along the channel axis.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if c2 % 2 != 0 {
            candle_core::bail!(
                "DiagonalGaussian: moments have {c2} channels, expected an even count"
            );
        }
        let mean = moments.narrow(1, 0, c2 / 2)?;
        let logvar = moments.narrow(1, c2 / 2, c2 / 2)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// σ = exp(½·log σ²).
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + σ·noise`, with `noise` standard normal of the same shape (randomness is the caller's).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }

    /// The mode of the distribution, i.e. the mean.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// `AutoencoderKL`: keys `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv` under `first_stage_model`.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    config: AutoencoderKlConfig,
}

impl AutoencoderKl {
    /// `vb` at `first_stage_model` (single files) or wherever the same key tree lives.
    pub fn new(config: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let dd = &config.ddconfig;
        if !dd.double_z {
            candle_core::bail!(
                "AutoencoderKL needs double_z = true (mean and log-variance), got false"
            );
        }
        Ok(Self {
            encoder: Encoder::new(dd, vb.pp("encoder"))?,
            decoder: Decoder::new(dd, vb.pp("decoder"))?,
            quant_conv: conv1x1(2 * dd.z_channels, 2 * config.embed_dim, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(config.embed_dim, dd.z_channels, vb.pp("post_quant_conv"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    pub(crate) fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub(crate) fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub(crate) fn quant_conv(&self) -> &Conv2d {
        &self.quant_conv
    }

    pub(crate) fn post_quant_conv(&self) -> &Conv2d {
        &self.post_quant_conv
    }

    /// Checks an image for [`AutoencoderKl::encode`]: `in_channels` channels, sides multiples of `f`.
    pub(crate) fn check_image(&self, x: &Tensor) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        let dd = &self.config.ddconfig;
        let f = dd.downsample_factor();
        if c != dd.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "AutoencoderKL::encode: input [_, {c}, {h}, {w}], expected {} channels and sides divisible by {f}",
                dd.in_channels
            );
        }
        Ok(())
    }

    /// Checks a latent for [`AutoencoderKl::decode`]: `embed_dim` channels.
    pub(crate) fn check_latent<'a>(&self, z: &'a Tensor) -> Result<&'a Tensor> {
        let c = z.dim(1)?;
        if c != self.config.embed_dim {
            candle_core::bail!(
                "AutoencoderKL::decode: latent has {c} channels, expected {}",
                self.config.embed_dim
            );
        }
        Ok(z)
    }

    /// Image `[B, in_channels, H, W]` in [−1, 1] (H, W multiples of `f`) → posterior over `[B, embed_dim, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        self.check_image(x)?;
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?; // [B, 2·embed_dim, H/f, W/f]
        DiagonalGaussian::from_moments(&moments)
    }

    /// [`AutoencoderKl::decode`] without the decoder's last layer (training): the input of
    /// [`AutoencoderKl::decoder_conv_out`].
    pub fn decode_features(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latent(z)?;
        self.decoder
            .forward_features(&self.post_quant_conv.forward(z)?)
    }

    /// The decoder's last layer (`decoder.conv_out`).
    pub fn decoder_conv_out(&self) -> &Conv2d {
        self.decoder.conv_out()
    }

    /// Unscaled latent `[B, embed_dim, h, w]` → image `[B, out_ch, f·h, f·w]` (roughly in [−1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latent(z)?;
        self.decoder.forward(&self.post_quant_conv.forward(z)?)
    }
}
