//! The VQ-regularised autoencoder of Latent Diffusion (Rombach et al. 2022, §3 "Perceptual Image Compression":
//! "VQ-reg. uses a vector quantization layer within the decoder"; App. G) as LDMs use it:
//! `ldm/models/autoencoder.py::VQModelInterface` of CompVis/latent-diffusion@a506df5.
//!
//! | paper / original                               | here                                  |
//! |------------------------------------------------|---------------------------------------|
//! | `h = quant_conv(E(x))` (`VQModelInterface.encode`) | [`VqModel::encode`] `[B, embed_dim, H/f, W/f]` |
//! | `z_q = q(h)`, codebook indices (`quantize`)    | [`VqModel::quantize`] → [`Quantized`] |
//! | `D(post_quant_conv(q(h)))` (`decode`)          | [`VqModel::decode`]                   |
//! | `decode(h, force_not_quantize=True)`           | [`VqModel::decode_unquantized`]       |
//! | `decode_code(indices)`                         | [`VqModel::decode_indices`]           |
//!
//! The diffusion model runs on the UNQUANTISED latent `h` (the quantiser is "absorbed by the decoder"), so
//! `decode` quantises first, as the original and diffusers' `VQModel.decode(force_not_quantize=False)` do.
//! Keys: `encoder.*`, `decoder.*`, `quant_conv`, `quantize.embedding.weight`, `post_quant_conv` under
//! `first_stage_model`.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::Conv2d;
use serde::{Deserialize, Serialize};

use super::blocks::conv1x1;
use super::model::{AttnType, DdConfig, Decoder, Encoder};
use super::quantize::{Quantized, VectorQuantizer};
use crate::import::VqArch;

/// `first_stage_config.params` of a `VQModel` / `VQModelInterface` (without `lossconfig`, `monitor` and other
/// training keys; `remap` and `sane_index_shape` are not supported, indices are always `[B, h, w]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqModelConfig {
    /// Channels of the latent `h` and of each codebook entry (`quant_conv` output).
    pub embed_dim: usize,
    /// Codebook size.
    pub n_embed: usize,
    /// Encoder/decoder; `double_z` must be false.
    pub ddconfig: DdConfig,
}

impl VqModelConfig {
    fn ldm(embed_dim: usize, n_embed: usize, ch_mult: Vec<usize>, attn: Vec<usize>) -> Self {
        Self {
            embed_dim,
            n_embed,
            ddconfig: DdConfig {
                ch: 128,
                out_ch: 3,
                ch_mult,
                num_res_blocks: 2,
                attn_resolutions: attn,
                in_channels: 3,
                resolution: 256,
                z_channels: embed_dim,
                double_z: false,
                num_groups: 32,
                attn_type: AttnType::Vanilla,
            },
        }
    }

    /// LDM `models/first_stage_models/vq-f4` (3 channels, 8192 codes).
    pub fn ldm_vq_f4() -> Self {
        Self::ldm(3, 8192, vec![1, 2, 4], vec![])
    }

    /// LDM `vq-f4-noattn`: `vq-f4` with `attn_type: none` (no `mid.attn_1`).
    pub fn ldm_vq_f4_noattn() -> Self {
        let mut c = Self::ldm_vq_f4();
        c.ddconfig.attn_type = AttnType::None;
        c
    }

    /// LDM `vq-f8` (4 channels, 16384 codes, attention at 32x32).
    pub fn ldm_vq_f8() -> Self {
        Self::ldm(4, 16384, vec![1, 2, 2, 4], vec![32])
    }

    /// LDM `vq-f8-n256` (`vq-f8` with 256 codes).
    pub fn ldm_vq_f8_n256() -> Self {
        Self::ldm(4, 256, vec![1, 2, 2, 4], vec![32])
    }

    /// LDM `vq-f16` (8 channels, 16384 codes, attention at 16x16).
    pub fn ldm_vq_f16() -> Self {
        Self::ldm(8, 16384, vec![1, 1, 2, 2, 4], vec![16])
    }

    /// Spatial down-sampling factor `f`.
    pub fn downsample_factor(&self) -> usize {
        self.ddconfig.downsample_factor()
    }
}

/// The original config of a diffusers `VQModel` ([`crate::import::DiffusersVqConfig::arch`]). `resolution` is
/// nominal (256, or more for very deep models): it only places `attn_resolutions` at the arch's attention levels.
impl From<&VqArch> for VqModelConfig {
    fn from(a: &VqArch) -> Self {
        let levels = a.ch_mult.len();
        let resolution = 256usize.max(1 << levels);
        Self {
            embed_dim: a.embed_dim,
            n_embed: a.n_embed,
            ddconfig: DdConfig {
                ch: a.ch,
                out_ch: a.out_channels,
                ch_mult: a.ch_mult.clone(),
                num_res_blocks: a.num_res_blocks,
                attn_resolutions: a.attention_levels.iter().map(|l| resolution >> l).collect(),
                in_channels: a.in_channels,
                resolution,
                z_channels: a.z_channels,
                double_z: false,
                num_groups: a.norm_groups,
                attn_type: if a.mid_attention {
                    AttnType::Vanilla
                } else {
                    AttnType::None
                },
            },
        }
    }
}

/// `VQModelInterface` at inference.
#[derive(Debug, Clone)]
pub struct VqModel {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    quantize: VectorQuantizer,
    post_quant_conv: Conv2d,
    config: VqModelConfig,
}

impl VqModel {
    /// `vb` at `first_stage_model` (single files) or wherever the same key tree lives.
    pub fn new(config: &VqModelConfig, vb: VarBuilder) -> Result<Self> {
        let dd = &config.ddconfig;
        if dd.double_z {
            candle_core::bail!(
                "VQModel needs double_z = false (the encoder emits one latent, not moments), got true"
            );
        }
        // The codebook first: a config/checkpoint disagreement on embed_dim is reported there, by name.
        let quantize = VectorQuantizer::new(config.n_embed, config.embed_dim, vb.pp("quantize"))?;
        Ok(Self {
            encoder: Encoder::new(dd, vb.pp("encoder"))?,
            decoder: Decoder::new(dd, vb.pp("decoder"))?,
            quant_conv: conv1x1(dd.z_channels, config.embed_dim, vb.pp("quant_conv"))?,
            quantize,
            post_quant_conv: conv1x1(config.embed_dim, dd.z_channels, vb.pp("post_quant_conv"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VqModelConfig {
        &self.config
    }

    /// Encoder, decoder, `quant_conv` and `post_quant_conv`, for the tiled passes (autoencoder/tiled.rs).
    pub(crate) fn parts(&self) -> (&Encoder, &Decoder, &Conv2d, &Conv2d) {
        (
            &self.encoder,
            &self.decoder,
            &self.quant_conv,
            &self.post_quant_conv,
        )
    }

    /// The quantiser (codebook access).
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }

    /// Spatial down-sampling factor `f`.
    pub fn downsample_factor(&self) -> usize {
        self.config.downsample_factor()
    }

    /// Image `[B, in_channels, H, W]` in [−1, 1] (H, W multiples of `f`) → pre-quantisation latent `h`
    /// `[B, embed_dim, H/f, W/f]`, the space an LDM diffuses in.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let dd = &self.config.ddconfig;
        let f = dd.downsample_factor();
        if c != dd.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "VQModel::encode: input [_, {c}, {h}, {w}], expected {} channels and sides divisible by {f}",
                dd.in_channels
            );
        }
        self.quant_conv.forward(&self.encoder.forward(x)?)
    }

    /// Nearest codebook entries `z_q` and their indices for a latent `h` `[B, embed_dim, h, w]`.
    pub fn quantize(&self, h: &Tensor) -> Result<Quantized> {
        self.quantize.quantize(h)
    }

    /// Latent `h` `[B, embed_dim, h, w]` → image `[B, out_ch, f·h, f·w]`, quantising `h` first.
    pub fn decode(&self, h: &Tensor) -> Result<Tensor> {
        let z_q = self.quantize.quantize(h)?.z_q;
        self.decode_unquantized(&z_q)
    }

    /// The decoder on `z` as given (`force_not_quantize=True`): `D(post_quant_conv(z))`.
    pub fn decode_unquantized(&self, z: &Tensor) -> Result<Tensor> {
        let c = z.dim(1)?;
        if c != self.config.embed_dim {
            candle_core::bail!(
                "VQModel::decode: latent has {c} channels, expected embed_dim = {}",
                self.config.embed_dim
            );
        }
        self.decoder.forward(&self.post_quant_conv.forward(z)?)
    }

    /// [`VqModel::decode_unquantized`] without the decoder's last layer (training): the input of
    /// [`VqModel::decoder_conv_out`].
    pub fn decode_features(&self, z: &Tensor) -> Result<Tensor> {
        let c = z.dim(1)?;
        if c != self.config.embed_dim {
            candle_core::bail!(
                "VQModel::decode: latent has {c} channels, expected embed_dim = {}",
                self.config.embed_dim
            );
        }
        self.decoder
            .forward_features(&self.post_quant_conv.forward(z)?)
    }

    /// The decoder's last layer (`decoder.conv_out`).
    pub fn decoder_conv_out(&self) -> &Conv2d {
        self.decoder.conv_out()
    }

    /// Codebook indices `[B, h, w]` → image (`decode_code`).
    pub fn decode_indices(&self, indices: &Tensor) -> Result<Tensor> {
        self.decode_unquantized(&self.quantize.lookup(indices)?)
    }
}
