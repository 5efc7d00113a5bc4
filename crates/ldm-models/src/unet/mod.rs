//! The LDM UNet ε/v-predictor (`ldm.modules.diffusionmodules.openaimodel.UNetModel`), Rombach et al. 2022
//! §3.3 / App. E, on the ADM layout of Dhariwal & Nichol 2021. Keys are the original checkpoint names
//! relative to `model.diffusion_model`.
//!
//! | code             | math / shape                                                        |
//! |------------------|---------------------------------------------------------------------|
//! | `x`              | z_t (concatenated with mask and masked-image latent for inpainting), `[B, in_channels, H, W]` |
//! | `t`              | model timestep t (f32, possibly fractional), `[B]` (or `[1]`, broadcast) |
//! | `context`        | τ_θ(y), the conditioning encoder's output, `[B, M, context_dim]` (models with a `context_dim`) |
//! | `y`              | class labels (`num_classes` models; the x4 upscaler's noise level), integer `[B]` |
//! | `emb`            | MLP(sinusoid(t)) (+ label_emb(y)), `[B, 4·model_channels]`          |
//! | output           | ε_θ(z_t, t, y) (or v), `[B, out_channels, H, W]`                    |
//!
//! Key tree (TimestepEmbedSequential indices are positions in the original `nn.Sequential`s):
//! `time_embed.{0,2}` (`.1` SiLU), `label_emb` (class-conditional), `input_blocks.0.0` (conv_in),
//! `input_blocks.N.{0: ResBlock, 1: SpatialTransformer | AttentionBlock}` or `input_blocks.N.0` (Downsample `op`,
//! or a down-ResBlock with `resblock_updown`), `middle_block.{0,2}` ResBlocks around `middle_block.1`,
//! `output_blocks.N.{0: ResBlock, 1: attention, 1|2: Upsample (`conv`) or up-ResBlock}`, `out.{0: GroupNorm, 2: conv}`
//! (`.1` SiLU). Without `conv_resample` the resampling layers have no weights (their index is unused).
pub mod config;
pub mod keys;
pub mod original;

pub use config::{HeadSpec, UnetConfig, UnetConfigError};
pub use original::OriginalUnetParams;

use crate::blocks::embed::{timestep_embedding, MAX_PERIOD};
use crate::blocks::legacy_attention::AttentionBlock;
use crate::blocks::resnet::{conv3x3, ResBlock, ResBlockOptions, Resample, RES_GROUP_NORM_EPS};
use crate::blocks::sample::{Downsample, Upsample};
use crate::blocks::transformer::{SpatialTransformer, TransformerShape};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use ldm_kernels::nn::Linear;
use ldm_kernels::{Conv2d, GroupNorm};

/// One entry of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    SelfAttn(AttentionBlock),
    Down(Downsample),
    Up(Upsample),
}

/// `TimestepEmbedSequential`: layers applied in order, each given what it needs.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(&self, x: &Tensor, emb: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(conv) => conv.forward(&h)?,
                Layer::Res(res) => res.forward(&h, emb)?,
                Layer::Attn(attn) => match context {
                    Some(c) => attn.forward(&h, c)?,
                    None => candle_core::bail!("UNet: a SpatialTransformer needs a context"),
                },
                Layer::SelfAttn(attn) => attn.forward(&h)?,
                Layer::Down(down) => down.forward(&h)?,
                Layer::Up(up) => up.forward(&h)?,
            };
        }
        Ok(h)
    }

    fn with_max_score_bytes(self, bytes: usize) -> Self {
        let layers = self.0.into_iter().map(|l| match l {
            Layer::Attn(a) => Layer::Attn(a.with_max_score_bytes(bytes)),
            Layer::SelfAttn(a) => Layer::SelfAttn(a.with_max_score_bytes(bytes)),
            other => other,
        });
        Block(layers.collect())
    }
}

#[derive(Debug, Clone)]
pub struct Unet {
    config: UnetConfig,
    time_embed: [Linear; 2],      // time_embed.0, time_embed.2
    label_emb: Option<Embedding>, // label_emb (num_classes models)
    input_blocks: Vec<Block>,     // input_blocks.N
    middle_block: Block,          // middle_block.{0,1,2}
    output_blocks: Vec<Block>,    // output_blocks.N
    out_norm: GroupNorm,          // out.0
    out_conv: Conv2d,             // out.2
    /// The compute dtype (the builder's). Matrices and kernels may be held narrower (weights kept in a
    /// checkpoint's stored dtype), so it is not read off a weight.
    dtype: DType,
}

/// Builds the UNet from `vb` positioned at `model.diffusion_model`.
pub fn unet_from_vb(vb: VarBuilder, config: &UnetConfig) -> Result<Unet> {
    Unet::new(vb, config)
}

/// The layer constructors of one config (all read `cfg`).
struct Builder<'a> {
    cfg: &'a UnetConfig,
}

impl Builder<'_> {
    /// The attention layer of a block at `level` (`None`: the middle block).
    fn attention(&self, ch: usize, level: Option<usize>, vb: VarBuilder) -> Result<Layer> {
        let cfg = self.cfg;
        let (num_heads, head_dim) = cfg.heads.split(ch).map_err(candle_core::Error::wrap)?;
        Ok(match cfg.context_dim {
            Some(context_dim) => {
                let shape = TransformerShape {
                    num_heads,
                    head_dim,
                    depth: cfg.transformer_depth,
                    context_dim,
                    linear_projection: cfg.use_linear_in_transformer,
                    num_groups: cfg.num_groups,
                    disable_self_attn: cfg.self_attention_disabled(level),
                };
                Layer::Attn(SpatialTransformer::new(ch, &shape, vb)?)
            }
            None => Layer::SelfAttn(AttentionBlock::new(
                ch,
                num_heads,
                cfg.num_groups,
                cfg.use_new_attention_order,
                vb,
            )?),
        })
    }

    fn res(
        &self,
        cin: usize,
        cout: usize,
        resample: Option<Resample>,
        vb: VarBuilder,
    ) -> Result<Layer> {
        let cfg = self.cfg;
        let options = ResBlockOptions {
            use_scale_shift_norm: cfg.use_scale_shift_norm,
            resample,
        };
        let emb = cfg.time_embed_dim();
        Ok(Layer::Res(ResBlock::with_options(
            cin,
            cout,
            emb,
            cfg.num_groups,
            options,
            vb,
        )?))
    }

    /// The level's downsampler at `vb` (`input_blocks.N.0`).
    fn down(&self, ch: usize, vb: VarBuilder) -> Result<Layer> {
        if self.cfg.resblock_updown {
            self.res(ch, ch, Some(Resample::Down), vb)
        } else if self.cfg.conv_resample {
            Ok(Layer::Down(Downsample::new(ch, ch, vb)?))
        } else {
            Ok(Layer::Down(Downsample::pool()))
        }
    }

    /// The level's upsampler at `vb` (`output_blocks.N.{1|2}`).
    fn up(&self, ch: usize, vb: VarBuilder) -> Result<Layer> {
        if self.cfg.resblock_updown {
            self.res(ch, ch, Some(Resample::Up), vb)
        } else if self.cfg.conv_resample {
            Ok(Layer::Up(Upsample::new(ch, ch, vb)?))
        } else {
            Ok(Layer::Up(Upsample::nearest()))
        }
    }
}

impl Unet {
    /// Builds the UNet from `vb` positioned at `model.diffusion_model` (see [`unet_from_vb`]).
    pub fn new(vb: VarBuilder, config: &UnetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let cfg = config;
        let b = Builder { cfg };
        let mc = cfg.model_channels;
        let emb_dim = cfg.time_embed_dim();
        let time_embed = [
            ldm_kernels::nn::linear(mc, emb_dim, vb.pp("time_embed").pp("0"))?,
            ldm_kernels::nn::linear(emb_dim, emb_dim, vb.pp("time_embed").pp("2"))?,
        ];
        let label_emb = match cfg.num_classes {
            Some(n) => {
                let table = candle_nn::embedding(n, emb_dim, vb.pp("label_emb"))?;
                Some(Embedding::new(
                    table.embeddings().to_dtype(vb.dtype())?,
                    emb_dim,
                ))
            }
            None => None,
        };

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
            for i in 0..cfg.num_res_blocks {
                let vbb = vin.pp(input_blocks.len());
                let mut layers = vec![b.res(ch, mult * mc, None, vbb.pp("0"))?];
                ch = mult * mc;
                if cfg.has_attention(level, i) {
                    layers.push(b.attention(ch, Some(level), vbb.pp("1"))?);
                }
                input_blocks.push(Block(layers));
                skip_channels.push(ch);
            }
            if level + 1 != levels {
                let down = b.down(ch, vin.pp(input_blocks.len()).pp("0"))?;
                input_blocks.push(Block(vec![down]));
                skip_channels.push(ch);
            }
        }

        let vmid = vb.pp("middle_block");
        let middle_block = Block(vec![
            b.res(ch, ch, None, vmid.pp("0"))?,
            b.attention(ch, None, vmid.pp("1"))?,
            b.res(ch, ch, None, vmid.pp("2"))?,
        ]);

        let vout = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let vbb = vout.pp(output_blocks.len());
                let skip = skip_channels
                    .pop()
                    .expect("invariant: one skip per input block");
                let mut layers = vec![b.res(ch + skip, mult * mc, None, vbb.pp("0"))?];
                ch = mult * mc;
                if cfg.has_attention(level, i) {
                    layers.push(b.attention(ch, Some(level), vbb.pp("1"))?);
                }
                if level > 0 && i == cfg.num_res_blocks {
                    layers.push(b.up(ch, vbb.pp(layers.len()))?);
                }
                output_blocks.push(Block(layers));
            }
        }

        Ok(Self {
            config: cfg.clone(),
            time_embed,
            label_emb,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: ldm_kernels::nn::group_norm(
                cfg.num_groups,
                ch,
                RES_GROUP_NORM_EPS,
                vb.pp("out").pp("0"),
            )?,
            out_conv: conv3x3(ch, cfg.out_channels, vb.pp("out").pp("2"))?,
            dtype: vb.dtype(),
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

    /// ε (or v) prediction of a cross-attention model without class labels (SD1/SD2): see
    /// [`Unet::forward_with`].
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(x, t, Some(context), None)
    }

    /// ε (or v) prediction, `UNetModel.forward(x, timesteps, context, y)`. `x`: `[B, in_channels, H, W]` with
    /// H, W multiples of [`UnetConfig::size_multiple`]; `t`: `[B]` or `[1]` timesteps; `context`:
    /// `[B, M, context_dim]`, given iff the config has a `context_dim`; `y`: integer class labels `[B]`
    /// in `0..num_classes`, given iff the config has `num_classes`.
    pub fn forward_with(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = self.check_inputs(x, t, context)?;
        let t = if t.dim(0)? == b {
            t.clone()
        } else {
            t.broadcast_as(b)?.contiguous()?
        };
        // Inputs in the compute dtype (f16/bf16 models take f32 latents and timesteps); the output keeps it.
        let dtype = self.dtype;
        let x = &x.to_dtype(dtype)?;
        let context = match context {
            Some(c) => Some(c.to_dtype(dtype)?),
            None => None,
        };
        let context = context.as_ref();
        let emb =
            timestep_embedding(&t, self.config.model_channels, MAX_PERIOD)?.to_dtype(dtype)?; // [B, mc]
        let emb = self.time_embed[0].forward(&emb)?.silu()?;
        let mut emb = self.time_embed[1].forward(&emb)?; // [B, 4·mc]
        match (&self.label_emb, y) {
            (Some(label_emb), Some(y)) => {
                emb = (emb + label_emb.forward(&self.check_labels(y, b)?)?)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!(
                "UNet: this model is class-conditional ({} classes): class labels y are required",
                self.config.num_classes.unwrap_or(0)
            ),
            (None, Some(_)) => {
                candle_core::bail!("UNet: class labels y given to a model without num_classes")
            }
        }

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
        self.out_conv.forward(&self.out_norm.forward_silu(&h)?) // [B, out_channels, H, W]
    }

    /// Class labels as U32 `[B]`, each checked to be in `0..num_classes`.
    fn check_labels(&self, y: &Tensor, b: usize) -> Result<Tensor> {
        let n = self.config.num_classes.unwrap_or(0);
        let bad = || {
            candle_core::Error::Msg(format!(
                "UNet class labels y have shape {:?} and dtype {:?}; expected integer [{b}] in 0..{n}",
                y.dims(),
                y.dtype()
            ))
        };
        if y.dims() != [b] {
            return Err(bad());
        }
        let labels: Vec<i64> = match y.dtype() {
            DType::U8 | DType::U32 | DType::I64 => y.to_dtype(DType::I64)?.to_vec1()?,
            _ => return Err(bad()),
        };
        if let Some(l) = labels.iter().find(|&&l| l < 0 || l as usize >= n) {
            candle_core::bail!("UNet class label {l} is outside 0..{n}");
        }
        y.to_dtype(DType::U32)
    }

    /// Returns the batch size, or an error naming the mismatching input.
    fn check_inputs(&self, x: &Tensor, t: &Tensor, context: Option<&Tensor>) -> Result<usize> {
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
        match (cfg.context_dim, context) {
            (Some(dim), Some(context)) => {
                let (cb, _, cd) = context.dims3()?;
                if cb != b || cd != dim {
                    candle_core::bail!(
                        "UNet context has shape {:?}; expected [{b}, M, {dim}]",
                        context.dims()
                    );
                }
            }
            (None, None) => {}
            (Some(dim), None) => {
                candle_core::bail!(
                    "UNet: this model cross-attends a context [{b}, M, {dim}]; none given"
                )
            }
            (None, Some(_)) => {
                candle_core::bail!("UNet: context given to a model without cross-attention")
            }
        }
        Ok(b)
    }
}
