//! diffusers `AutoencoderKL` (`vae/config.json` + `vae/diffusion_pytorch_model.safetensors`) onto the original
//! LDM `AutoencoderKL` (`ldm/modules/diffusionmodules/model.py` `Encoder` / `Decoder` + `quant_conv`s).
//!
//! Names: `down_blocks.i.resnets.j` -> `down.i.block.j` (`conv_shortcut` -> `nin_shortcut`),
//! `downsamplers.0.conv` -> `downsample.conv`, `mid_block.resnets.{0,1}` -> `mid.block_{1,2}`,
//! `conv_norm_out` -> `norm_out`. The decoder counts its levels the other way: diffusers' `up_blocks.i` (from the
//! lowest resolution) is the original's `up.(n-1-i)`. The mid-block attention is the one place where values change
//! shape: diffusers stores `to_q/to_k/to_v/to_out.0` as linear `[C, C]`, the original `q/k/v/proj_out` as 1x1
//! convolutions `[C, C, 1, 1]` (diffusers 0.42.1 `single_file_utils.update_vae_attentions_ldm_to_diffusers`).
//! Old diffusers files name them `query/key/value/proj_attn`; those names are accepted on input.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, Accepted, Fixed, BOOKKEEPING};
use super::key_map::KeyMap;

const WHAT: &str = "AutoencoderKL";

/// Prefix of the first stage's canonical keys in an original single file.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// The entries of a diffusers `vae/config.json` that shape the weights or the latent scaling.
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersVaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    /// All other entries, checked by [`DiffusersVaeConfig::arch`].
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}

/// The architecture in the original's terms (`ddconfig` + `embed_dim`); `double_z` is always true and
/// `attn_resolutions` always empty for a diffusers `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeArch {
    pub in_channels: usize,
    /// `out_ch`
    pub out_channels: usize,
    /// `ch`: width of `conv_in` and level 0.
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// `z_channels` (= `embed_dim` for every diffusers AutoencoderKL).
    pub z_channels: usize,
    pub embed_dim: usize,
    pub norm_groups: usize,
    /// Latent scale (`scale_factor` in the LDM yaml).
    pub scaling_factor: f64,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

impl VaeArch {
    pub fn levels(&self) -> usize {
        self.ch_mult.len()
    }
    pub fn channels(&self, level: usize) -> usize {
        self.ch * self.ch_mult[level]
    }
}

#[rustfmt::skip]
const FIXED: &[Fixed] = &[
    Fixed { field: "act_fn", accepted: &[Accepted::Str("silu")], reason: "the original uses SiLU" },
    Fixed { field: "use_quant_conv", accepted: &[Accepted::Bool(true)], reason: "the original always has quant_conv" },
    Fixed { field: "use_post_quant_conv", accepted: &[Accepted::Bool(true)], reason: "the original always has post_quant_conv" },
    Fixed { field: "mid_block_add_attention", accepted: &[Accepted::Bool(true)], reason: "the original always has mid.attn_1" },
    Fixed { field: "shift_factor", accepted: &[Accepted::Null, Accepted::Num(0.0)], reason: "LDM scales latents without a shift" },
    Fixed { field: "latents_mean", accepted: &[Accepted::Null], reason: "LDM scales latents by one factor" },
    Fixed { field: "latents_std", accepted: &[Accepted::Null], reason: "LDM scales latents by one factor" },
];

/// `force_upcast` only says the VAE overflows in f16 (a precision hint).
const HARMLESS: &[&str] = &["sample_size", "force_upcast"];

impl DiffusersVaeConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    /// Checks the config against what the original autoencoder can express and translates it.
    pub fn arch(&self) -> Result<VaeArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, FIXED, &harmless)?;
        let inconsistent = |detail: String| ImportError::Inconsistent { what: WHAT, detail };
        let n = self.block_out_channels.len();
        let ch = self.block_out_channels.first().copied().unwrap_or(0);
        if ch == 0 || self.block_out_channels.iter().any(|c| c % ch != 0) {
            return Err(inconsistent(format!(
                "block_out_channels {:?} must be positive multiples of the first (LDM's ch_mult are integers)",
                self.block_out_channels
            )));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(inconsistent(format!(
                "{} down and {} up block types for {n} levels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let unsupported = |field, value: &String| {
            ImportError::Unsupported {
            what: WHAT,
            field,
            value: value.clone(),
            reason: "only DownEncoderBlock2D / UpDecoderBlock2D (no attention in the levels) exist in the KL autoencoder",
        }
        };
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(unsupported("down_block_types", t));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(unsupported("up_block_types", t));
        }
        Ok(VaeArch {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            ch,
            ch_mult: self.block_out_channels.iter().map(|c| c / ch).collect(),
            num_res_blocks: self.layers_per_block,
            z_channels: self.latent_channels,
            embed_dim: self.latent_channels,
            norm_groups: self.norm_num_groups,
            scaling_factor: self.scaling_factor,
            ignored,
        })
    }
}

/// The key map of a diffusers VAE config: diffusers names -> canonical names relative to [`VAE_PREFIX`].
pub fn vae_key_map(cfg: &DiffusersVaeConfig) -> Result<KeyMap> {
    vae_key_map_for(&cfg.arch()?)
}

/// The key map of an architecture (canonical names relative to [`VAE_PREFIX`]).
pub fn vae_key_map_for(a: &VaeArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let n = a.levels();
    let top = a.channels(n - 1);
    let (z, e) = (a.z_channels, a.embed_dim);

    m.conv("encoder.conv_in", "encoder.conv_in", a.ch, a.in_channels, 3)?;
    let mut ch = a.ch;
    for level in 0..n {
        let out = a.channels(level);
        for j in 0..a.num_res_blocks {
            resnet(
                &mut m,
                &format!("encoder.down_blocks.{level}.resnets.{j}"),
                &format!("encoder.down.{level}.block.{j}"),
                ch,
                out,
            )?;
            ch = out;
        }
        if level + 1 != n {
            m.conv(
                &format!("encoder.down_blocks.{level}.downsamplers.0.conv"),
                &format!("encoder.down.{level}.downsample.conv"),
                ch,
                ch,
                3,
            )?;
        }
    }
    mid(&mut m, "encoder", top)?;
    m.norm("encoder.conv_norm_out", "encoder.norm_out", top)?;
    m.conv("encoder.conv_out", "encoder.conv_out", 2 * z, top, 3)?;
    m.conv("quant_conv", "quant_conv", 2 * e, 2 * z, 1)?;
    m.conv("post_quant_conv", "post_quant_conv", z, e, 1)?;

    m.conv("decoder.conv_in", "decoder.conv_in", top, z, 3)?;
    mid(&mut m, "decoder", top)?;
    let mut ch = top;
    for (u, level) in (0..n).rev().enumerate() {
        let out = a.channels(level);
        for j in 0..=a.num_res_blocks {
            resnet(
                &mut m,
                &format!("decoder.up_blocks.{u}.resnets.{j}"),
                &format!("decoder.up.{level}.block.{j}"),
                ch,
                out,
            )?;
            ch = out;
        }
        if level != 0 {
            m.conv(
                &format!("decoder.up_blocks.{u}.upsamplers.0.conv"),
                &format!("decoder.up.{level}.upsample.conv"),
                ch,
                ch,
                3,
            )?;
        }
    }
    m.norm("decoder.conv_norm_out", "decoder.norm_out", a.ch)?;
    m.conv(
        "decoder.conv_out",
        "decoder.conv_out",
        a.out_channels,
        a.ch,
        3,
    )?;
    Ok(m)
}

/// diffusers `ResnetBlock2D` without a time embedding -> LDM `ResnetBlock` (`temb_channels = 0`).
pub(super) fn resnet(m: &mut KeyMap, d: &str, c: &str, inp: usize, out: usize) -> Result<()> {
    m.norm(&format!("{d}.norm1"), &format!("{c}.norm1"), inp)?;
    m.conv(&format!("{d}.conv1"), &format!("{c}.conv1"), out, inp, 3)?;
    m.norm(&format!("{d}.norm2"), &format!("{c}.norm2"), out)?;
    m.conv(&format!("{d}.conv2"), &format!("{c}.conv2"), out, out, 3)?;
    if inp != out {
        m.conv(
            &format!("{d}.conv_shortcut"),
            &format!("{c}.nin_shortcut"),
            out,
            inp,
            1,
        )?;
    }
    Ok(())
}

/// Mid block: resnet, single-head self-attention over pixels (`AttnBlock`), resnet.
fn mid(m: &mut KeyMap, side: &str, ch: usize) -> Result<()> {
    resnet(
        m,
        &format!("{side}.mid_block.resnets.0"),
        &format!("{side}.mid.block_1"),
        ch,
        ch,
    )?;
    let (d, c) = (
        format!("{side}.mid_block.attentions.0"),
        format!("{side}.mid.attn_1"),
    );
    m.norm(&format!("{d}.group_norm"), &format!("{c}.norm"), ch)?;
    for (new, old, orig) in [
        ("to_q", "query", "q"),
        ("to_k", "key", "k"),
        ("to_v", "value", "v"),
        ("to_out.0", "proj_attn", "proj_out"),
    ] {
        m.linear_as_conv1x1(&format!("{d}.{new}"), &format!("{c}.{orig}"), ch, ch)?;
        for p in ["weight", "bias"] {
            m.alias(&format!("{d}.{old}.{p}"), &format!("{d}.{new}.{p}"))?;
        }
    }
    resnet(
        m,
        &format!("{side}.mid_block.resnets.1"),
        &format!("{side}.mid.block_2"),
        ch,
        ch,
    )
}
