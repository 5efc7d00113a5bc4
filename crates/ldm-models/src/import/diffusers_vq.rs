//! diffusers `VQModel` (`vqvae/config.json` + `vqvae/diffusion_pytorch_model.safetensors`, as in `LDMPipeline`
//! folders) onto the original LDM `VQModel` (`ldm/models/autoencoder.py` + `ldm/modules/diffusionmodules/model.py`
//! `Encoder` / `Decoder`, taming's `VectorQuantizer2`).
//!
//! Names follow the KL map ([`super::diffusers_vae`]): `down_blocks.i.resnets.j` -> `down.i.block.j`, the decoder's
//! `up_blocks.i` is the original's `up.(n-1-i)`, mid-block resnets -> `mid.block_{1,2}`. In addition:
//! - levels with attention (`AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D`): `attentions.j` -> `attn.j` with
//!   `group_norm` -> `norm`, linear `to_q/to_k/to_v/to_out.0` `[C, C]` -> 1x1 conv `q/k/v/proj_out` `[C, C, 1, 1]`
//!   (legacy `query/key/value/proj_attn` accepted on input, as in old `LDMPipeline` repos);
//! - `mid_block_add_attention: false` is the original's `attn_type: none` (no `mid.attn_1`); the original then has
//!   no attention in the levels either, so that combination alone is accepted;
//! - `quantize.embedding.weight` `[n_embed, embed_dim]` keeps its name; `quant_conv` maps `latent_channels`
//!   (= `z_channels`) to `vq_embed_dim` (= `embed_dim`, default `latent_channels`).
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::diffusers_vae::resnet;
use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, Accepted, Fixed, BOOKKEEPING};
use super::key_map::KeyMap;

const WHAT: &str = "VQModel";

/// Prefix of the first stage's canonical keys in an original single file.
pub const VQ_PREFIX: &str = "first_stage_model.";

/// The entries of a diffusers `VQModel` `config.json` that shape the weights or the latent scaling (defaults as
/// in diffusers 0.42.1).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersVqConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "three")]
    pub latent_channels: usize,
    #[serde(default = "two_fifty_six")]
    pub num_vq_embeddings: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Codebook width; `null` / absent means `latent_channels`.
    #[serde(default)]
    pub vq_embed_dim: Option<usize>,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// All other entries, checked by [`DiffusersVqConfig::arch`].
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn thirty_two() -> usize {
    32
}
fn two_fifty_six() -> usize {
    256
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The architecture in the original's terms (`ddconfig` + `embed_dim` + `n_embed`; `double_z` is false).
#[derive(Debug, Clone, PartialEq)]
pub struct VqArch {
    pub in_channels: usize,
    /// `out_ch`
    pub out_channels: usize,
    /// `ch`: width of `conv_in` and level 0.
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// `z_channels`: encoder output / decoder input (diffusers `latent_channels`).
    pub z_channels: usize,
    /// `embed_dim`: codebook width and channels of the diffused latent (diffusers `vq_embed_dim`).
    pub embed_dim: usize,
    /// `n_embed`: codebook size (diffusers `num_vq_embeddings`).
    pub n_embed: usize,
    pub norm_groups: usize,
    /// Level indices (0 = finest) whose blocks are followed by an `AttnBlock`, in encoder and decoder alike.
    pub attention_levels: Vec<usize>,
    /// `mid.attn_1` exists (`attn_type: vanilla`); false is `attn_type: none`.
    pub mid_attention: bool,
    /// Latent scale (`scale_factor` of the LDM yaml); `LDMPipeline` divides by it before decoding.
    pub scaling_factor: f64,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

impl VqArch {
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
    Fixed { field: "norm_type", accepted: &[Accepted::Str("group")], reason: "the LDM VQModel uses GroupNorm (\"spatial\" is MoVQ)" },
    Fixed { field: "lookup_from_codebook", accepted: &[Accepted::Bool(false)], reason: "LDM decodes latents, not codebook indices (MoVQ)" },
];

/// `force_upcast` only says the model overflows in f16 (a precision hint).
const HARMLESS: &[&str] = &["sample_size", "force_upcast", "_use_default_values"];

impl DiffusersVqConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `vqvae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    /// Checks the config against what the original VQ autoencoder can express and translates it.
    pub fn arch(&self) -> Result<VqArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, FIXED, &harmless)?;
        let inconsistent = |detail: String| ImportError::Inconsistent { what: WHAT, detail };
        let n = self.block_out_channels.len();
        let ch = self.block_out_channels.first().copied().unwrap_or(0);
        if ch == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % ch != 0)
        {
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
        let embed_dim = self.vq_embed_dim.unwrap_or(self.latent_channels);
        if self.latent_channels == 0 || embed_dim == 0 || self.num_vq_embeddings == 0 {
            return Err(inconsistent(format!(
                "latent_channels {}, vq_embed_dim {embed_dim}, num_vq_embeddings {} must be positive",
                self.latent_channels, self.num_vq_embeddings
            )));
        }
        let unsupported = |field, value: &String, reason| ImportError::Unsupported {
            what: WHAT,
            field,
            value: value.clone(),
            reason,
        };
        let mut attention_levels = Vec::new();
        for (level, t) in self.down_block_types.iter().enumerate() {
            match t.as_str() {
                "DownEncoderBlock2D" => {}
                "AttnDownEncoderBlock2D" => attention_levels.push(level),
                _ => return Err(unsupported(
                    "down_block_types",
                    t,
                    "only DownEncoderBlock2D and AttnDownEncoderBlock2D exist in the LDM encoder",
                )),
            }
        }
        // up_blocks.u is the original's level n-1-u; the original has attention at the same levels in both.
        for (u, t) in self.up_block_types.iter().enumerate() {
            let level = n - 1 - u;
            let attn =
                match t.as_str() {
                    "UpDecoderBlock2D" => false,
                    "AttnUpDecoderBlock2D" => true,
                    _ => return Err(unsupported(
                        "up_block_types",
                        t,
                        "only UpDecoderBlock2D and AttnUpDecoderBlock2D exist in the LDM decoder",
                    )),
                };
            if attn != attention_levels.contains(&level) {
                return Err(inconsistent(format!(
                    "up_block_types {:?} put attention at other levels than down_block_types {:?} (the original's \
                     attn_resolutions apply to both)",
                    self.up_block_types, self.down_block_types
                )));
            }
        }
        if !self.mid_block_add_attention && !attention_levels.is_empty() {
            return Err(unsupported(
                "mid_block_add_attention",
                &"false".to_string(),
                "the original drops attention only all at once (attn_type: none), but the levels have attention",
            ));
        }
        Ok(VqArch {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            ch,
            ch_mult: self.block_out_channels.iter().map(|c| c / ch).collect(),
            num_res_blocks: self.layers_per_block,
            z_channels: self.latent_channels,
            embed_dim,
            n_embed: self.num_vq_embeddings,
            norm_groups: self.norm_num_groups,
            attention_levels,
            mid_attention: self.mid_block_add_attention,
            scaling_factor: self.scaling_factor,
            ignored,
        })
    }
}

/// The key map of a diffusers VQModel config: diffusers names -> canonical names relative to [`VQ_PREFIX`].
pub fn vq_key_map(cfg: &DiffusersVqConfig) -> Result<KeyMap> {
    vq_key_map_for(&cfg.arch()?)
}

/// The key map of an architecture (canonical names relative to [`VQ_PREFIX`]).
pub fn vq_key_map_for(a: &VqArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let n = a.levels();
    let top = a.channels(n - 1);
    let (z, e) = (a.z_channels, a.embed_dim);

    m.conv("encoder.conv_in", "encoder.conv_in", a.ch, a.in_channels, 3)?;
    let mut ch = a.ch;
    for level in 0..n {
        let out = a.channels(level);
        let attn = a.attention_levels.contains(&level);
        for j in 0..a.num_res_blocks {
            let (d, c) = (
                format!("encoder.down_blocks.{level}"),
                format!("encoder.down.{level}"),
            );
            resnet(
                &mut m,
                &format!("{d}.resnets.{j}"),
                &format!("{c}.block.{j}"),
                ch,
                out,
            )?;
            ch = out;
            if attn {
                attention(
                    &mut m,
                    &format!("{d}.attentions.{j}"),
                    &format!("{c}.attn.{j}"),
                    ch,
                )?;
            }
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
    mid(&mut m, "encoder", top, a.mid_attention)?;
    m.norm("encoder.conv_norm_out", "encoder.norm_out", top)?;
    m.conv("encoder.conv_out", "encoder.conv_out", z, top, 3)?;
    m.conv("quant_conv", "quant_conv", e, z, 1)?;
    m.rename(
        "quantize.embedding.weight",
        "quantize.embedding.weight",
        &[a.n_embed, e],
    )?;
    m.conv("post_quant_conv", "post_quant_conv", z, e, 1)?;

    m.conv("decoder.conv_in", "decoder.conv_in", top, z, 3)?;
    mid(&mut m, "decoder", top, a.mid_attention)?;
    let mut ch = top;
    for (u, level) in (0..n).rev().enumerate() {
        let out = a.channels(level);
        let attn = a.attention_levels.contains(&level);
        let (d, c) = (
            format!("decoder.up_blocks.{u}"),
            format!("decoder.up.{level}"),
        );
        for j in 0..=a.num_res_blocks {
            resnet(
                &mut m,
                &format!("{d}.resnets.{j}"),
                &format!("{c}.block.{j}"),
                ch,
                out,
            )?;
            ch = out;
            if attn {
                attention(
                    &mut m,
                    &format!("{d}.attentions.{j}"),
                    &format!("{c}.attn.{j}"),
                    ch,
                )?;
            }
        }
        if level != 0 {
            m.conv(
                &format!("{d}.upsamplers.0.conv"),
                &format!("{c}.upsample.conv"),
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

/// diffusers single-head `Attention` over pixels -> LDM `AttnBlock` (linear -> 1x1 conv, legacy names accepted).
fn attention(m: &mut KeyMap, d: &str, c: &str, ch: usize) -> Result<()> {
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
    Ok(())
}

/// Mid block: resnet, (attention), resnet.
fn mid(m: &mut KeyMap, side: &str, ch: usize, with_attention: bool) -> Result<()> {
    let (d, c) = (format!("{side}.mid_block"), format!("{side}.mid"));
    resnet(
        m,
        &format!("{d}.resnets.0"),
        &format!("{c}.block_1"),
        ch,
        ch,
    )?;
    if with_attention {
        attention(m, &format!("{d}.attentions.0"), &format!("{c}.attn_1"), ch)?;
    }
    resnet(
        m,
        &format!("{d}.resnets.1"),
        &format!("{c}.block_2"),
        ch,
        ch,
    )
}
