//! `first_stage_config` (and standalone first-stage configs such as `models/first_stage_models/vq-f4/config.yaml`):
//! the autoencoder that maps images to latents (paper §3.1).
//!
//! | original class                      | here                                   |
//! |-------------------------------------|----------------------------------------|
//! | `ldm.models.autoencoder.AutoencoderKL` | [`OriginalFirstStage::Kl`]          |
//! | `ldm.models.autoencoder.VQModel`, `VQModelInterface` | [`OriginalFirstStage::Vq`] ([`VqFirstStage::interface`]) |
//! | `ldm.models.autoencoder.IdentityFirstStage` | [`OriginalFirstStage::Identity`] (pixel space, f = 1) |
use super::targets::{Role, Target};
use super::yaml::{Params, Parsed};

/// `ddconfig` of the original `Encoder`/`Decoder` (`ldm.modules.diffusionmodules.model`), names as there.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalDdConfig {
    pub ch: usize,
    pub out_ch: usize,
    /// Default `[1, 2, 4, 8]`. The downsampling factor is f = 2^(len − 1).
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Feature-map sides (not factors) at which the encoder/decoder levels carry an `AttnBlock`.
    pub attn_resolutions: Vec<usize>,
    pub in_channels: usize,
    pub resolution: usize,
    pub z_channels: usize,
    /// Default true; the KL encoder outputs mean and log-variance (2·z_channels).
    pub double_z: bool,
    pub attn_type: AttnType,
    /// Default true: strided/nearest-upsampling convolutions (false: pooling and plain interpolation).
    pub resamp_with_conv: bool,
    /// Decoder ends in tanh (default false).
    pub tanh_out: bool,
    /// Decoder returns before its final norm and conv (default false).
    pub give_pre_end: bool,
}

impl OriginalDdConfig {
    /// The spatial downsampling factor f = 2^(len(ch_mult) − 1).
    pub fn downsample_factor(&self) -> usize {
        1usize
            .checked_shl(self.ch_mult.len().saturating_sub(1) as u32)
            .unwrap_or(0)
    }
}

/// `ddconfig.attn_type` (`make_attn`): which block sits at `mid.attn_1` and at `attn_resolutions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnType {
    /// `AttnBlock` (also `vanilla-xformers`, the same weights and maths with another kernel).
    Vanilla,
    /// `LinAttnBlock` (also `use_linear_attn: true`); used by no released first stage.
    Linear,
    /// `nn.Identity`: no attention and no attention weights at all (`vq-f4-noattn`, `inpainting_big`).
    None,
}

/// A KL-regularised autoencoder (`AutoencoderKL`).
#[derive(Debug, Clone, PartialEq)]
pub struct KlFirstStage {
    pub embed_dim: usize,
    pub ddconfig: OriginalDdConfig,
}

/// A VQ-regularised autoencoder (`VQModel`, or the LDM's `VQModelInterface`).
#[derive(Debug, Clone, PartialEq)]
pub struct VqFirstStage {
    pub embed_dim: usize,
    /// Codebook size.
    pub n_embed: usize,
    pub ddconfig: OriginalDdConfig,
    /// `VQModelInterface` (as every LDM diffusion config uses): `encode` returns the pre-quantisation latent
    /// and `decode` quantises first. `VQModel` (standalone first-stage configs) quantises in `encode`.
    pub interface: bool,
    /// Path of a `.npy` index remap for the codebook (`remap`), if any.
    pub remap: Option<String>,
    pub sane_index_shape: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OriginalFirstStage {
    Kl(KlFirstStage),
    Vq(VqFirstStage),
    /// `IdentityFirstStage`: the diffusion model works on pixels.
    Identity,
}

impl OriginalFirstStage {
    /// The original class name.
    pub fn target(&self) -> String {
        let class = match self {
            OriginalFirstStage::Kl(_) => Target::AutoencoderKl,
            OriginalFirstStage::Vq(v) if v.interface => Target::VqModelInterface,
            OriginalFirstStage::Vq(_) => Target::VqModel,
            OriginalFirstStage::Identity => Target::IdentityFirstStage,
        };
        super::targets::name_of(Role::FirstStage, class)
    }

    pub fn ddconfig(&self) -> Option<&OriginalDdConfig> {
        match self {
            OriginalFirstStage::Kl(k) => Some(&k.ddconfig),
            OriginalFirstStage::Vq(v) => Some(&v.ddconfig),
            OriginalFirstStage::Identity => None,
        }
    }

    /// Channels of the latent the diffusion model sees (`embed_dim`; for the identity unknown here).
    pub fn latent_channels(&self) -> Option<usize> {
        match self {
            OriginalFirstStage::Kl(k) => Some(k.embed_dim),
            OriginalFirstStage::Vq(v) => Some(v.embed_dim),
            OriginalFirstStage::Identity => None,
        }
    }

    /// f: image side / latent side (1 for the identity).
    pub fn downsample_factor(&self) -> usize {
        self.ddconfig()
            .map_or(1, OriginalDdConfig::downsample_factor)
    }
}

/// Keys of an autoencoder's `params` with no effect on inference.
const HARMLESS: &[&str] = &[
    "lossconfig",
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "batch_resize_range",
    "scheduler_config",
    "lr_g_factor",
    "use_ema",
    "ema_decay",
    "learn_logvar",
    "base_learning_rate",
    "vq_interface",
];

/// Parses the `params` of first-stage class `class`.
pub(crate) fn parse(
    class: Target,
    p: &Params<'_>,
    ignored: &mut Vec<String>,
) -> Parsed<OriginalFirstStage> {
    let stage = match class {
        Target::AutoencoderKl => OriginalFirstStage::Kl(KlFirstStage {
            embed_dim: p.req_usize("embed_dim")?,
            ddconfig: ddconfig(p, ignored)?,
        }),
        Target::VqModel | Target::VqModelInterface => OriginalFirstStage::Vq(VqFirstStage {
            embed_dim: p.req_usize("embed_dim")?,
            n_embed: p.req_usize("n_embed")?,
            ddconfig: ddconfig(p, ignored)?,
            interface: class == Target::VqModelInterface,
            remap: p.opt_str("remap")?,
            sane_index_shape: p.bool_or("sane_index_shape", false)?,
        }),
        // `IdentityFirstStage(*args, vq_interface=False, **kwargs)` ignores all its arguments.
        _ => return Ok(OriginalFirstStage::Identity),
    };
    p.finish(HARMLESS, ignored);
    Ok(stage)
}

fn ddconfig(p: &Params<'_>, ignored: &mut Vec<String>) -> Parsed<OriginalDdConfig> {
    let d = p.sub("ddconfig")?;
    if p.get("ddconfig").is_none() {
        return Err(p.missing("ddconfig"));
    }
    let attn_type = match d.opt_str("attn_type")?.as_deref() {
        None | Some("vanilla") | Some("vanilla-xformers") => AttnType::Vanilla,
        Some("linear") => AttnType::Linear,
        Some("none") => AttnType::None,
        Some(other) => {
            return Err(d.invalid(
                "attn_type",
                other,
                "expected `vanilla`, `vanilla-xformers`, `linear` or `none`",
            ))
        }
    };
    let attn_type = if d.bool_or("use_linear_attn", false)? {
        AttnType::Linear
    } else {
        attn_type
    };
    let cfg = OriginalDdConfig {
        ch: d.req_usize("ch")?,
        out_ch: d.req_usize("out_ch")?,
        ch_mult: d
            .opt_usize_list("ch_mult")?
            .unwrap_or_else(|| vec![1, 2, 4, 8]),
        num_res_blocks: d.req_usize("num_res_blocks")?,
        attn_resolutions: d.req_usize_list("attn_resolutions")?,
        in_channels: d.req_usize("in_channels")?,
        resolution: d.req_usize("resolution")?,
        z_channels: d.req_usize("z_channels")?,
        double_z: d.bool_or("double_z", true)?,
        attn_type,
        resamp_with_conv: d.bool_or("resamp_with_conv", true)?,
        tanh_out: d.bool_or("tanh_out", false)?,
        give_pre_end: d.bool_or("give_pre_end", false)?,
    };
    if cfg.ch_mult.is_empty() {
        return Err(d.invalid("ch_mult", "[]", "at least one level is needed"));
    }
    d.finish(&["dropout"], ignored);
    Ok(cfg)
}
