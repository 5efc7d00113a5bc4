//! The LDM UNet ε/v-predictor (`ldm.modules.diffusionmodules.openaimodel.UNetModel`), Rombach et al. 2022
//! §3.3 / App. E, on the ADM layout of Dhariwal & Nichol 2021. Keys are the original checkpoint names
//! relative to `model.diffusion_model`.
//!
//! | code             | math / shape                                                        |
//! |------------------|---------------------------------------------------------------------|
//! | `x`              | z_t (concatenated with mask and masked-image latent for inpainting), `[B, in_channels, H, W]` |
//! | `t`              | model timestep t (f32, possibly fractional), `[B]` (or `[1]`, broadcast) |
//! | `context`        | τ_θ(y), the text encoder's hidden states, `[B, M, context_dim]`     |
//! | `emb`            | time embedding MLP(sinusoid(t)), `[B, 4·model_channels]`            |
//! | output           | ε_θ(z_t, t, y) (or v), `[B, out_channels, H, W]`                    |
//!
//! Key tree (TimestepEmbedSequential indices are positions in the original `nn.Sequential`s):
//! `time_embed.{0,2}` (`.1` SiLU), `input_blocks.0.0` (conv_in), `input_blocks.N.{0: ResBlock, 1: SpatialTransformer}`
//! or `input_blocks.N.0.op` (Downsample), `middle_block.{0,2}` ResBlocks around `middle_block.1`,
//! `output_blocks.N.{0: ResBlock, 1: SpatialTransformer, 1|2: Upsample}`, `out.{0: GroupNorm, 2: conv}` (`.1` SiLU).
pub mod config;
pub mod keys;

pub use config::{HeadSpec, UnetConfig, UnetConfigError};

use crate::blocks::embed::{timestep_embedding, MAX_PERIOD};
use crate::blocks::resnet::{conv3x3, ResBlock, RES_GROUP_NORM_EPS};
use crate::blocks::sample::{Downsample, Upsample};
use crate::blocks::transformer::{SpatialTransformer, TransformerShape};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, GroupNorm, Linear, VarBuilder};

/// One entry of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    Down(Downsample),
    Up(Upsample),
}

/// `TimestepEmbedSequential`: layers applied in order, each given what it needs.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(&self, x: &Tensor, emb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(conv) => conv.forward(&h)?,
                Layer::Res(res) => res.forward(&h, emb)?,
                Layer::Attn(attn) => attn.forward(&h, context)?,
                Layer::Down(down) => down.forward(&h)?,
                Layer::Up(up) => up.forward(&h)?,
            };
        }
        Ok(h)
    }

    fn with_max_score_bytes(self, bytes: usize) -> Self {
        let layers = self.0.into_iter().map(|l| match l {
            Layer::Attn(a) => Layer::Attn(a.with_max_score_bytes(bytes)),
            other => other,
        });
        Block(layers.collect())
    }
}

#[derive(Debug, Clone)]
pub struct Unet {
    config: UnetConfig,
    time_embed: [Linear; 2],   // time_embed.0, time_embed.2
    input_blocks: Vec<Block>,  // input_blocks.N
    middle_block: Block,       // middle_block.{0,1,2}
    output_blocks: Vec<Block>, // output_blocks.N
    out_norm: GroupNorm,       // out.0
    out_conv: Conv2d,          // out.2
}

/// Builds the UNet from `vb` positioned at `model.diffusion_model`.
pub fn unet_from_vb(vb: VarBuilder, config: &UnetConfig) -> Result<Unet> {
    Unet::new(vb, config)
}

impl Unet {
    /// Builds the UNet from `vb` positioned at `model.diffusion_model` (see [`unet_from_vb`]).
    pub fn new(vb: VarBuilder, config: &UnetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let cfg = config;
        let mc = cfg.model_channels;
        let emb_dim = cfg.time_embed_dim();
        let groups = cfg.num_groups;
        let transformer = |ch: usize, vb: VarBuilder| -> Result<Layer> {
            let (num_heads, head_dim) = cfg.heads.split(ch).map_err(candle_core::Error::wrap)?;
            let shape = TransformerShape {
                num_heads,
                head_dim,
                depth: cfg.transformer_depth,
                context_dim: cfg.context_dim,
                linear_projection: cfg.use_linear_in_transformer,
                num_groups: groups,
            };
            Ok(Layer::Attn(SpatialTransformer::new(ch, &shape, vb)?))
        };
        let res = |cin, cout, vb| {
            Ok::<_, candle_core::Error>(Layer::Res(ResBlock::new(cin, cout, emb_dim, groups, vb)?))
        };
        let time_embed = [
            candle_nn::linear(mc, emb_dim, vb.pp("time_embed").pp("0"))?,
            candle_nn::linear(emb_dim, emb_dim, vb.pp("time_embed").pp("2"))?,
        ];

        let vin = vb.pp("input_blocks");
        let mut input_blocks = vec![Block(vec![Layer::Conv(conv3x3(
            cfg.in_channels,
            mc,
            vin.pp("0").pp("0"),
        )?)])];
        let mut skip_channels = vec![mc]; // channels of each input block's output, consumed by the up path
        let mut ch = mc;
        let levels = cfg.channel_mult.len();
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vbb = vin.pp(input_blocks.len());
                let mut layers = vec![res(ch, mult * mc, vbb.pp("0"))?];
                ch = mult * mc;
                if cfg.attention_levels.contains(&level) {
                    layers.push(transformer(ch, vbb.pp("1"))?);
                }
                input_blocks.push(Block(layers));
                skip_channels.push(ch);
            }
            if level + 1 != levels {
                let down = Downsample::new(ch, ch, vin.pp(input_blocks.len()).pp("0"))?;
                input_blocks.push(Block(vec![Layer::Down(down)]));
                skip_channels.push(ch);
            }
        }

        let vmid = vb.pp("middle_block");
        let middle_block = Block(vec![
            res(ch, ch, vmid.pp("0"))?,
            transformer(ch, vmid.pp("1"))?,
            res(ch, ch, vmid.pp("2"))?,
        ]);

        let vout = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let vbb = vout.pp(output_blocks.len());
                let skip = skip_channels
                    .pop()
                    .expect("invariant: one skip per input block");
                let mut layers = vec![res(ch + skip, mult * mc, vbb.pp("0"))?];
                ch = mult * mc;
                if cfg.attention_levels.contains(&level) {
                    layers.push(transformer(ch, vbb.pp("1"))?);
                }
                if level > 0 && i == cfg.num_res_blocks {
                    layers.push(Layer::Up(Upsample::new(ch, ch, vbb.pp(layers.len()))?));
                }
                output_blocks.push(Block(layers));
            }
        }

        Ok(Self {
            config: cfg.clone(),
            time_embed,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: candle_nn::group_norm(groups, ch, RES_GROUP_NORM_EPS, vb.pp("out").pp("0"))?,
            out_conv: conv3x3(ch, cfg.out_channels, vb.pp("out").pp("2"))?,
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Sets the largest attention-score tensor materialised at once (default
    /// [`crate::blocks::attention::MAX_SCORE_BYTES`]); larger ones are computed in query chunks.
    pub fn with_max_score_bytes(mut self, bytes: usize) -> Self {
        let f = |blocks: Vec<Block>| {
            blocks
                .into_iter()
                .map(|b| b.with_max_score_bytes(bytes))
                .collect()
        };
        self.input_blocks = f(self.input_blocks);
        self.output_blocks = f(self.output_blocks);
        self.middle_block = self.middle_block.with_max_score_bytes(bytes);
        self
    }

    /// ε (or v) prediction. `x`: `[B, in_channels, H, W]` with H, W multiples of
    /// [`UnetConfig::size_multiple`]; `t`: `[B]` or `[1]` timesteps; `context`: `[B, M, context_dim]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let b = self.check_inputs(x, t, context)?;
        let t = if t.dim(0)? == b {
            t.clone()
        } else {
            t.broadcast_as(b)?.contiguous()?
        };
        let emb = timestep_embedding(&t, self.config.model_channels, MAX_PERIOD)?; // [B, mc]
        let emb = self.time_embed[0].forward(&emb)?.silu()?;
        let emb = self.time_embed[1].forward(&emb)?; // [B, 4·mc]

        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        for block in &self.input_blocks {
            h = block.forward(&h, &emb, context)?;
            skips.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb, context)?;
        for block in &self.output_blocks {
            let skip = skips.pop().expect("invariant: one skip per output block");
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb, context)?;
        }
        self.out_conv.forward(&self.out_norm.forward(&h)?.silu()?) // [B, out_channels, H, W]
    }

    /// Returns the batch size, or an error naming the mismatching input.
    fn check_inputs(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<usize> {
        let cfg = &self.config;
        let m = cfg.size_multiple();
        let (b, c, h, w) = x.dims4()?;
        if c != cfg.in_channels || h % m != 0 || w % m != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "UNet input x has shape {:?}; expected [B, {}, H, W] with H and W positive multiples of {m}",
                x.dims(),
                cfg.in_channels
            );
        }
        let tb = t.dims1().map_err(|_| {
            candle_core::Error::Msg(format!(
                "UNet timesteps t have shape {:?}; expected [{b}] or [1]",
                t.dims()
            ))
        })?;
        if tb != b && tb != 1 {
            candle_core::bail!(
                "UNet timesteps t have shape {:?}; expected [{b}] or [1]",
                t.dims()
            );
        }
        let (cb, _, cd) = context.dims3()?;
        if cb != b || cd != cfg.context_dim {
            candle_core::bail!(
                "UNet context has shape {:?}; expected [{b}, M, {}]",
                context.dims(),
                cfg.context_dim
            );
        }
        Ok(b)
    }
}
