//! The LDM first-stage `Encoder` and `Decoder` (`ldm/modules/diffusionmodules/model.py`,
//! CompVis/stable-diffusion@21f890f), shared by the KL and VQ autoencoders.
//!
//! Resolution levels are indexed `0..L` from the finest (image resolution) to the coarsest, in BOTH
//! networks: the decoder runs its `up.N` levels in reverse order (`up.{L-1}` first, `up.0` last), exactly
//! as the original stores them. With `f = 2^(L-1)` the latent is `H/f × W/f`.
//!
//! | field              | meaning                                                                    |
//! |--------------------|----------------------------------------------------------------------------|
//! | `ch`               | base channel count; level `i` has `ch·ch_mult[i]` channels                 |
//! | `num_res_blocks`   | ResNet blocks per encoder level (decoder levels have one more)             |
//! | `attn_resolutions` | feature-map sizes (given `resolution` at level 0) that get an `AttnBlock`   |
//! | `z_channels`       | latent channels at the encoder output / decoder input                      |
//! | `double_z`         | the encoder emits `2·z_channels` (mean and log-variance)                   |
//! | `attn_type`        | `vanilla` (AttnBlock) or `none` (no attention at all, not even `mid.attn_1`) |
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::Conv2d;
use serde::{Deserialize, Serialize};

use super::blocks::{conv3x3, AttnBlock, Downsample, Norm, ResnetBlock, Upsample};

fn default_num_groups() -> usize {
    32
}

/// `ddconfig.attn_type` of the original `make_attn`: which block sits at `mid.attn_1` and at the levels of
/// `attn_resolutions`. The original's third kind, `linear` (`LinAttnBlock`), is used by no released first stage
/// and is not implemented (parsing it fails with serde's "unknown variant" error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnType {
    /// Single-head softmax self-attention over the pixels ([`AttnBlock`]).
    #[default]
    Vanilla,
    /// `nn.Identity`: no attention anywhere and no attention weights (LDM `vq-f4-noattn`).
    None,
}

/// `first_stage_config.params.ddconfig` of an LDM YAML (minus `dropout`, which inference ignores), plus
/// the GroupNorm group count that the original hard-codes as 32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdConfig {
    pub ch: usize,
    pub out_ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub in_channels: usize,
    pub resolution: usize,
    pub z_channels: usize,
    pub double_z: bool,
    #[serde(default = "default_num_groups")]
    pub num_groups: usize,
    /// Absent in most YAMLs, which then mean `vanilla`.
    #[serde(default)]
    pub attn_type: AttnType,
}

impl DdConfig {
    /// The first stage of Stable Diffusion 1.x/2.x (`f = 8`, 4 latent channels).
    pub fn sd() -> Self {
        Self {
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![],
            in_channels: 3,
            resolution: 256,
            z_channels: 4,
            double_z: true,
            num_groups: 32,
            attn_type: AttnType::Vanilla,
        }
    }

    /// Spatial down-sampling factor `f = 2^(levels − 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Whether the levels at feature-map size `res` get an `AttnBlock` after each ResNet block.
    fn has_attention_at(&self, res: usize) -> bool {
        self.attn_type == AttnType::Vanilla && self.attn_resolutions.contains(&res)
    }

    fn check(&self) -> Result<()> {
        if self.ch_mult.is_empty() {
            candle_core::bail!(
                "DdConfig: ch_mult is empty, at least one resolution level is needed"
            );
        }
        if self.ch_mult.contains(&0) || self.ch == 0 {
            candle_core::bail!(
                "DdConfig: zero channels (ch {}, ch_mult {:?})",
                self.ch,
                self.ch_mult
            );
        }
        Ok(())
    }
}

/// The ResNet blocks, attention blocks and resampler of one level (`down.N` / `up.N`).
#[derive(Debug, Clone)]
pub(crate) struct Level<R> {
    pub(crate) blocks: Vec<ResnetBlock>,
    pub(crate) attns: Vec<AttnBlock>, // empty or one per block
    pub(crate) resample: Option<R>,
}

impl<R: Module> Level<R> {
    fn forward(&self, mut h: Tensor) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        match &self.resample {
            Some(r) => r.forward(&h),
            None => Ok(h),
        }
    }
}

/// `mid.{block_1, attn_1, block_2}`; `attn_1` is absent (an identity without weights) for `attn_type: none`.
#[derive(Debug, Clone)]
pub(crate) struct Mid {
    block_1: ResnetBlock,
    attn_1: Option<AttnBlock>,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(ch: usize, cfg: &DdConfig, vb: VarBuilder) -> Result<Self> {
        let groups = cfg.num_groups;
        let attn_1 = match cfg.attn_type {
            AttnType::Vanilla => Some(AttnBlock::new(ch, groups, vb.pp("attn_1"))?),
            AttnType::None => None,
        };
        Ok(Self {
            block_1: ResnetBlock::new(ch, ch, groups, vb.pp("block_1"))?,
            attn_1,
            block_2: ResnetBlock::new(ch, ch, groups, vb.pp("block_2"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = match &self.attn_1 {
            Some(attn) => attn.forward(&h)?,
            None => h,
        };
        self.block_2.forward(&h)
    }
}

/// The first-stage encoder: image `[B, in_channels, H, W]` → `[B, (2·)z_channels, H/f, W/f]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub(crate) conv_in: Conv2d,
    pub(crate) down: Vec<Level<Downsample>>,
    pub(crate) mid: Mid,
    pub(crate) norm_out: Norm,
    pub(crate) conv_out: Conv2d,
}

impl Encoder {
    /// `vb` at the encoder's key (e.g. `first_stage_model.encoder`).
    pub fn new(cfg: &DdConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let g = cfg.num_groups;
        let levels = cfg.ch_mult.len();
        let conv_in = conv3x3(cfg.in_channels, cfg.ch, 1, 1, vb.pp("conv_in"))?;
        let mut block_in = cfg.ch;
        let mut res = cfg.resolution;
        let mut down = Vec::with_capacity(levels);
        for (i, mult) in cfg.ch_mult.iter().enumerate() {
            let vb_level = vb.pp(format!("down.{i}"));
            let block_out = cfg.ch * mult;
            let attn = cfg.has_attention_at(res);
            let (blocks, attns) =
                level_blocks(cfg.num_res_blocks, block_in, block_out, attn, g, &vb_level)?;
            block_in = block_out;
            let resample = if i + 1 != levels {
                res /= 2;
                Some(Downsample::new(block_in, vb_level.pp("downsample"))?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let z_out = if cfg.double_z {
            2 * cfg.z_channels
        } else {
            cfg.z_channels
        };
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(block_in, cfg, vb.pp("mid"))?,
            norm_out: Norm::new(block_in, g, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, z_out, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?; // [B, ch, H, W]
        for level in &self.down {
            h = level.forward(h)?;
        }
        let h = self.mid.forward(&h)?; // [B, ch·ch_mult[L-1], H/f, W/f]
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The first-stage decoder: latent `[B, z_channels, h, w]` → image `[B, out_ch, f·h, f·w]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub(crate) conv_in: Conv2d,
    pub(crate) mid: Mid,
    /// `up.0 .. up.{L-1}` in key order (finest first); `forward` runs them in reverse.
    pub(crate) up: Vec<Level<Upsample>>,
    pub(crate) norm_out: Norm,
    pub(crate) conv_out: Conv2d,
}

impl Decoder {
    /// `vb` at the decoder's key (e.g. `first_stage_model.decoder`).
    pub fn new(cfg: &DdConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let g = cfg.num_groups;
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let mut res = cfg.resolution >> (levels - 1);
        let conv_in = conv3x3(cfg.z_channels, block_in, 1, 1, vb.pp("conv_in"))?;
        let mid = Mid::new(block_in, cfg, vb.pp("mid"))?;
        let mut up = Vec::with_capacity(levels);
        for (i, mult) in cfg.ch_mult.iter().enumerate().rev() {
            let vb_level = vb.pp(format!("up.{i}"));
            let block_out = cfg.ch * mult;
            let attn = cfg.has_attention_at(res);
            let (blocks, attns) = level_blocks(
                cfg.num_res_blocks + 1,
                block_in,
                block_out,
                attn,
                g,
                &vb_level,
            )?;
            block_in = block_out;
            let resample = if i != 0 {
                res *= 2;
                Some(Upsample::new(block_in, vb_level.pp("upsample"))?)
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        up.reverse(); // key order: up.0 first
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: Norm::new(block_in, g, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.out_ch, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Decoder {
    /// Everything up to the last layer: `z` → `swish(norm_out(h))`, the input of `conv_out`
    /// `[B, ch·ch_mult[0], f·h, f·w]`. Training needs the last layer apart (the adaptive GAN weight of the
    /// autoencoder loss is measured at its weight).
    pub fn forward_features(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?; // [B, ch·ch_mult[L-1], h, w]
        for level in self.up.iter().rev() {
            h = level.forward(h)?;
        }
        self.norm_out.forward_silu(&h)
    }

    /// The last layer, `conv_out` (3x3, `ch·ch_mult[0] → out_ch`).
    pub fn conv_out(&self) -> &Conv2d {
        &self.conv_out
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.forward_features(z)?) // [B, out_ch, f·h, f·w]
    }
}

/// The `count` ResnetBlocks of one level (`block.{j}`), each followed by an AttnBlock (`attn.{j}`) when the
/// level's resolution is in `attn_resolutions`; the first block maps `block_in` to `block_out` channels.
fn level_blocks(
    count: usize,
    block_in: usize,
    block_out: usize,
    attn: bool,
    g: usize,
    vb: &VarBuilder,
) -> Result<(Vec<ResnetBlock>, Vec<AttnBlock>)> {
    let (mut blocks, mut attns) = (Vec::new(), Vec::new());
    let mut ch = block_in;
    for j in 0..count {
        blocks.push(ResnetBlock::new(
            ch,
            block_out,
            g,
            vb.pp(format!("block.{j}")),
        )?);
        ch = block_out;
        if attn {
            attns.push(AttnBlock::new(ch, g, vb.pp(format!("attn.{j}")))?);
        }
    }
    Ok((blocks, attns))
}
