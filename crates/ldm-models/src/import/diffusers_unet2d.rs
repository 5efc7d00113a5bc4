//! diffusers `UNet2DModel` (the UNet of `LDMPipeline` and `LDMSuperResolutionPipeline`, e.g.
//! `CompVis/ldm-celebahq-256`, `CompVis/ldm-super-resolution-4x-openimages`) onto the original LDM `UNetModel`
//! without cross-attention (`use_spatial_transformer=False`): config translation ([`DiffusersUnet2dConfig::arch`],
//! straight to a [`UnetConfig`]) and key map ([`unet2d_key_map_for`]).
//!
//! | diffusers (0.42.1 `unet_2d.py`)                     | original `UNetModel`                               |
//! |-----------------------------------------------------|----------------------------------------------------|
//! | `AttnDownBlock2D` / `AttnUpBlock2D`                 | level in `attention_resolutions` (legacy `AttentionBlock`) |
//! | `DownBlock2D` / `UpBlock2D`                          | level without attention, conv resampling            |
//! | `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`, `downsample_type`/`upsample_type: "resnet"` | `resblock_updown` |
//! | `attention_head_dim` d (a WIDTH here, unlike `UNet2DConditionModel`) | `num_head_channels` d; `null`: one head (`num_heads: 1`) |
//! | `resnet_time_scale_shift: "scale_shift"`            | `use_scale_shift_norm`                              |
//! | `num_class_embeds` (`class_embed_type: null`)        | `num_classes` (`label_emb`)                         |
//! | `add_attention: false`, `mid_block_type: null`       | refused: the original middle block always has attention |
//!
//! Attention weights: the original fuses q, k, v into one 1-D conv `qkv` `[3C, C, 1]` whose rows are ordered head,
//! then q/k/v, then row (`QKVAttentionLegacy`); diffusers has `to_q`/`to_k`/`to_v` `[C, C]`. The map entries are
//! [`Conversion::HeadBlock`] (diffusers' own converter splits the same way: `reshape(heads, 3·C/heads, C)` then
//! `split(C/heads)`). `proj_out` `[C, C, 1]` is `to_out.0` `[C, C]`, `norm` is `group_norm`.
//! Mid-block attention has a GroupNorm only when `attn_norm_num_groups` is set or the time shift is "default"
//! (diffusers' `UNetMidBlock2D`); ldm-rs requires it, as the original always normalises.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::diffusers_unet::resnet_block;
use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, Accepted, Fixed, BOOKKEEPING};
use super::key_map::{Conversion, Entry, KeyMap};
use crate::unet::{HeadSpec, UnetConfig};

const WHAT: &str = "UNet2DModel";

/// The entries of a diffusers `UNet2DModel` `config.json` that shape the weights; the rest is checked against
/// what the original hard-wires.
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersUnet2dConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Head WIDTH (`null`: one head per attention layer).
    #[serde(default = "eight")]
    pub attention_head_dim: Option<usize>,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "conv")]
    pub downsample_type: String,
    #[serde(default = "conv")]
    pub upsample_type: String,
    #[serde(default = "yes")]
    pub add_attention: bool,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn eight() -> Option<usize> {
    Some(8)
}
fn groups() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn conv() -> String {
    "conv".into()
}
fn default_shift() -> String {
    "default".into()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2D".into())
}

#[rustfmt::skip]
const FIXED: &[Fixed] = &[
    Fixed { field: "act_fn", accepted: &[Accepted::Str("silu")], reason: "the original ResBlock uses SiLU" },
    Fixed { field: "norm_eps", accepted: &[Accepted::Num(1e-5)], reason: "GroupNorm32 uses eps 1e-5" },
    Fixed { field: "flip_sin_to_cos", accepted: &[Accepted::Bool(true)], reason: "the original embedding is [cos, sin]" },
    Fixed { field: "freq_shift", accepted: &[Accepted::Num(0.0)], reason: "the original embedding has no shift" },
    Fixed { field: "center_input_sample", accepted: &[Accepted::Bool(false)], reason: "no input centring in LDM" },
    Fixed { field: "downsample_padding", accepted: &[Accepted::Num(1.0)], reason: "the original Downsample pads by 1" },
    Fixed { field: "mid_block_scale_factor", accepted: &[Accepted::Num(1.0)], reason: "no output scaling in LDM" },
    Fixed { field: "time_embedding_type", accepted: &[Accepted::Str("positional")], reason: "LDM uses the sinusoidal embedding" },
    Fixed { field: "class_embed_type", accepted: &[Accepted::Null], reason: "only an `nn.Embedding` label input (num_class_embeds) exists in LDM" },
];

/// Entries that do not affect the weights or the numerics (`num_train_timesteps` only sizes a learned time
/// embedding, which `time_embedding_type` refuses).
const HARMLESS: &[&str] = &["sample_size", "dropout", "num_train_timesteps"];

/// A `UNet2DModel` config as the original `UNetModel` it describes.
#[derive(Debug, Clone, PartialEq)]
pub struct Unet2dArch {
    pub unet: UnetConfig,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

/// How a level changes resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resampler {
    Conv,
    Resnet,
}

impl DiffusersUnet2dConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    /// Checks the config against what the original `UNetModel` can express and translates it.
    pub fn arch(&self) -> Result<Unet2dArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, FIXED, &harmless)?;
        let inconsistent = |detail: String| ImportError::Inconsistent { what: WHAT, detail };
        let unsupported = |field, value: String, reason| ImportError::Unsupported {
            what: WHAT,
            field,
            value,
            reason,
        };
        let n = self.block_out_channels.len();
        let mc = self.block_out_channels.first().copied().unwrap_or(0);
        if mc == 0 || self.block_out_channels.iter().any(|c| c % mc != 0) {
            return Err(inconsistent(format!(
                "block_out_channels {:?} must be positive multiples of the first (LDM's channel_mult)",
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
        let sampler = |field, value: &str| match value {
            "conv" => Ok(Resampler::Conv),
            "resnet" => Ok(Resampler::Resnet),
            other => Err(unsupported(
                field,
                other.to_string(),
                "LDM resamples with a conv or a ResBlock",
            )),
        };
        let down_type = sampler("downsample_type", &self.downsample_type)?;
        let up_type = sampler("upsample_type", &self.upsample_type)?;
        let mut attention_levels = Vec::new();
        let mut resamplers = Vec::new(); // one per resolution change, down then up
        for (i, down) in self.down_block_types.iter().enumerate() {
            let (attn, resample) = match down.as_str() {
                "AttnDownBlock2D" => (true, down_type),
                "DownBlock2D" => (false, Resampler::Conv),
                "ResnetDownsampleBlock2D" => (false, Resampler::Resnet),
                _ => return Err(unsupported(
                    "down_block_types",
                    down.clone(),
                    "only AttnDownBlock2D, DownBlock2D and ResnetDownsampleBlock2D exist in LDM without cross-attention",
                )),
            };
            let up = &self.up_block_types[n - 1 - i];
            let (up_attn, up_resample) = match up.as_str() {
                "AttnUpBlock2D" => (true, up_type),
                "UpBlock2D" => (false, Resampler::Conv),
                "ResnetUpsampleBlock2D" => (false, Resampler::Resnet),
                _ => return Err(unsupported(
                    "up_block_types",
                    up.clone(),
                    "only AttnUpBlock2D, UpBlock2D and ResnetUpsampleBlock2D exist in LDM without cross-attention",
                )),
            };
            if attn != up_attn {
                return Err(inconsistent(format!(
                    "down block {i} is {down} but its mirror, up block {}, is {up} (LDM's attention_resolutions apply to both paths)",
                    n - 1 - i
                )));
            }
            if attn {
                attention_levels.push(i);
            }
            if i + 1 != n {
                resamplers.push(resample);
            }
            if i != 0 {
                resamplers.push(up_resample);
            }
        }
        let resblock_updown =
            match resamplers.first() {
                Some(&first) if resamplers.iter().any(|&r| r != first) => return Err(unsupported(
                    "down_block_types",
                    format!("{:?} / {:?}", self.down_block_types, self.up_block_types),
                    "LDM resamples every level the same way (conv or ResBlock, `resblock_updown`)",
                )),
                first => first == Some(&Resampler::Resnet),
            };
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2D") if self.add_attention => {}
            other => {
                return Err(unsupported(
                    "mid_block_type",
                    format!("{other:?} (add_attention {})", self.add_attention),
                    "LDM's middle block is resnet, attention, resnet",
                ))
            }
        }
        let use_scale_shift_norm = match self.resnet_time_scale_shift.as_str() {
            "default" => false,
            "scale_shift" => true,
            other => {
                return Err(unsupported(
                    "resnet_time_scale_shift",
                    other.to_string(),
                    "LDM adds the time embedding or applies it as scale and shift",
                ))
            }
        };
        match self.attn_norm_num_groups {
            None if use_scale_shift_norm => {
                return Err(unsupported(
                    "attn_norm_num_groups",
                    "null".into(),
                    "with scale_shift, diffusers' mid-block attention then has no GroupNorm; LDM's always has one",
                ))
            }
            Some(g) if g != self.norm_num_groups => {
                return Err(unsupported(
                    "attn_norm_num_groups",
                    g.to_string(),
                    "LDM normalises attention inputs with the same groups as the ResBlocks",
                ))
            }
            _ => {}
        }
        if let Some(d) = self.time_embedding_dim {
            if d != 4 * mc {
                return Err(unsupported(
                    "time_embedding_dim",
                    d.to_string(),
                    "LDM's time embedding is 4 * model_channels wide",
                ));
            }
        }
        let heads = match self.attention_head_dim {
            Some(d) => HeadSpec::Dim(d),
            None => HeadSpec::Count(1),
        };
        let unet = UnetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            model_channels: mc,
            channel_mult: self.block_out_channels.iter().map(|c| c / mc).collect(),
            num_res_blocks: self.layers_per_block,
            attention_levels,
            heads,
            transformer_depth: 1,
            context_dim: None,
            use_linear_in_transformer: false,
            num_groups: self.norm_num_groups,
            use_new_attention_order: false,
            use_scale_shift_norm,
            resblock_updown,
            conv_resample: true,
            num_classes: self.num_class_embeds,
            disable_self_attentions: None,
            disable_middle_self_attn: false,
            num_attention_blocks: None,
        };
        unet.validate().map_err(|e| inconsistent(e.to_string()))?;
        Ok(Unet2dArch { unet, ignored })
    }
}

/// The key map of a `UNet2DModel` config: diffusers names -> canonical names relative to `model.diffusion_model.`.
pub fn unet2d_key_map(cfg: &DiffusersUnet2dConfig) -> Result<KeyMap> {
    unet2d_key_map_for(&cfg.arch()?.unet)
}

/// The key map of an original UNet without cross-attention, in `UNet2DModel` names.
pub fn unet2d_key_map_for(u: &UnetConfig) -> Result<KeyMap> {
    let unsupported = |field, value: String, reason| ImportError::Unsupported {
        what: WHAT,
        field,
        value,
        reason,
    };
    if u.context_dim.is_some() {
        return Err(unsupported(
            "context_dim",
            format!("{:?}", u.context_dim),
            "UNet2DModel has no cross-attention (use UNet2DConditionModel)",
        ));
    }
    if !u.conv_resample || u.num_attention_blocks.is_some() {
        return Err(unsupported(
            "conv_resample",
            format!("{} / num_attention_blocks {:?}", u.conv_resample, u.num_attention_blocks),
            "UNet2DModel always resamples with weights and puts attention after every res block of a level",
        ));
    }
    u.validate().map_err(|e| ImportError::Inconsistent {
        what: WHAT,
        detail: e.to_string(),
    })?;
    let mut m = KeyMap::new();
    let mc = u.model_channels;
    let temb = u.time_embed_dim();
    let n = u.channel_mult.len();
    let ch_of = |l: usize| mc * u.channel_mult[l];
    let ss = u.use_scale_shift_norm;
    m.conv("conv_in", "input_blocks.0.0", mc, u.in_channels, 3)?;
    m.linear("time_embedding.linear_1", "time_embed.0", temb, mc, true)?;
    m.linear("time_embedding.linear_2", "time_embed.2", temb, temb, true)?;
    if let Some(classes) = u.num_classes {
        m.rename(
            "class_embedding.weight",
            "label_emb.weight",
            &[classes, temb],
        )?;
    }
    let heads = |ch: usize| -> Result<usize> {
        let (h, _) = u.heads.split(ch).map_err(|e| ImportError::Inconsistent {
            what: WHAT,
            detail: e.to_string(),
        })?;
        Ok(if u.use_new_attention_order { 1 } else { h })
    };

    let mut skips = vec![mc];
    let mut ch = mc;
    let mut block = 1;
    for level in 0..n {
        let out = ch_of(level);
        for j in 0..u.num_res_blocks {
            let c = format!("input_blocks.{block}");
            resnet_block(
                &mut m,
                &format!("down_blocks.{level}.resnets.{j}"),
                &format!("{c}.0"),
                ch,
                out,
                temb,
                ss,
            )?;
            ch = out;
            if u.attention_levels.contains(&level) {
                attention(
                    &mut m,
                    &format!("down_blocks.{level}.attentions.{j}"),
                    &format!("{c}.1"),
                    ch,
                    heads(ch)?,
                )?;
            }
            skips.push(ch);
            block += 1;
        }
        if level + 1 != n {
            let (d, c) = (
                format!("down_blocks.{level}.downsamplers.0"),
                format!("input_blocks.{block}.0"),
            );
            if u.resblock_updown {
                resnet_block(&mut m, &d, &c, ch, ch, temb, ss)?;
            } else {
                m.conv(&format!("{d}.conv"), &format!("{c}.op"), ch, ch, 3)?;
            }
            skips.push(ch);
            block += 1;
        }
    }
    resnet_block(
        &mut m,
        "mid_block.resnets.0",
        "middle_block.0",
        ch,
        ch,
        temb,
        ss,
    )?;
    attention(
        &mut m,
        "mid_block.attentions.0",
        "middle_block.1",
        ch,
        heads(ch)?,
    )?;
    resnet_block(
        &mut m,
        "mid_block.resnets.1",
        "middle_block.2",
        ch,
        ch,
        temb,
        ss,
    )?;

    let mut block = 0;
    for (up, level) in (0..n).rev().enumerate() {
        let out = ch_of(level);
        for j in 0..=u.num_res_blocks {
            let skip = skips.pop().ok_or_else(|| ImportError::Inconsistent {
                what: WHAT,
                detail: "more up-path res blocks than skip connections".to_string(),
            })?;
            let c = format!("output_blocks.{block}");
            resnet_block(
                &mut m,
                &format!("up_blocks.{up}.resnets.{j}"),
                &format!("{c}.0"),
                ch + skip,
                out,
                temb,
                ss,
            )?;
            ch = out;
            let mut slot = 1;
            if u.attention_levels.contains(&level) {
                attention(
                    &mut m,
                    &format!("up_blocks.{up}.attentions.{j}"),
                    &format!("{c}.1"),
                    ch,
                    heads(ch)?,
                )?;
                slot = 2;
            }
            if level != 0 && j == u.num_res_blocks {
                let (d, c) = (
                    format!("up_blocks.{up}.upsamplers.0"),
                    format!("{c}.{slot}"),
                );
                if u.resblock_updown {
                    resnet_block(&mut m, &d, &c, ch, ch, temb, ss)?;
                } else {
                    m.conv(&format!("{d}.conv"), &format!("{c}.conv"), ch, ch, 3)?;
                }
            }
            block += 1;
        }
    }
    m.norm("conv_norm_out", "out.0", mc)?;
    m.conv("conv_out", "out.2", u.out_channels, mc, 3)?;
    Ok(m)
}

/// diffusers `Attention` (from a deprecated attention block) -> LDM `AttentionBlock`.
fn attention(m: &mut KeyMap, d: &str, c: &str, ch: usize, heads: usize) -> Result<()> {
    m.norm(&format!("{d}.group_norm"), &format!("{c}.norm"), ch)?;
    for (index, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        let conversion = Conversion::HeadBlock {
            index,
            count: 3,
            heads,
        };
        m.push(Entry {
            diffusers: format!("{d}.{part}.weight"),
            diffusers_shape: vec![ch, ch],
            canonical: format!("{c}.qkv.weight"),
            canonical_shape: vec![3 * ch, ch, 1],
            conversion,
        })?;
        m.push(Entry {
            diffusers: format!("{d}.{part}.bias"),
            diffusers_shape: vec![ch],
            canonical: format!("{c}.qkv.bias"),
            canonical_shape: vec![3 * ch],
            conversion,
        })?;
    }
    m.push(Entry {
        diffusers: format!("{d}.to_out.0.weight"),
        diffusers_shape: vec![ch, ch],
        canonical: format!("{c}.proj_out.weight"),
        canonical_shape: vec![ch, ch, 1],
        conversion: Conversion::Reshape,
    })?;
    m.rename(
        &format!("{d}.to_out.0.bias"),
        &format!("{c}.proj_out.bias"),
        &[ch],
    )
}
