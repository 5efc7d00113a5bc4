//! The spatial transformer of the LDM UNet (`ldm.modules.attention.SpatialTransformer`), Rombach et al.
//! 2022 §3.3: cross-attention from image features to the conditioning sequence τ_θ(y).
//!
//! ```text
//! x_in = x                                             [B, C, H, W]
//! x    = GN(x)  (32 groups, eps 1e-6)                  norm
//! x    = proj_in(x) → [B, H·W, inner]                  proj_in: 1×1 conv before the reshape, or Linear after it
//! for each block:                                      transformer_blocks.i (BasicTransformerBlock)
//!     x = attn1(LN₁(x)) + x                            self-attention (or, with disable_self_attn, attention
//!                                                      to the context: SD x4 upscaler, Stability's attention.py)
//!     x = attn2(LN₂(x), context) + x                   cross-attention to context [B, M, context_dim]
//!     x = ff(LN₃(x)) + x                               GEGLU feed-forward, inner width 4·dim
//! x    = proj_out(x) → [B, C, H, W]                    Linear before the reshape, or 1×1 conv after it
//! out  = x + x_in
//! ```
//! LayerNorms use torch's default eps 1e-5. GEGLU (Shazeer 2020): `[a, g] = proj(x)`, `a · GELU(g)` with the
//! exact (erf) GELU; keys `ff.net.0.proj` and `ff.net.2` (`ff.net.1` is Dropout).
use super::attention::CrossAttention;
use crate::ops::LayerNorm;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use ldm_kernels::nn::Linear;
use ldm_kernels::{Conv2d, GroupNorm};

/// eps of the transformer's `Normalize` GroupNorm.
pub const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
/// eps of `nn.LayerNorm` (torch default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear, // net.0.proj (GEGLU: [value, gate] halves)
    out: Linear,  // net.2
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: ldm_kernels::nn::linear(dim, 2 * inner, vb.pp("net").pp("0").pp("proj"))?,
            out: ldm_kernels::nn::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?; // [B, N, 2·inner]: value, gate
        self.out.forward(&ldm_kernels::geglu(&h)?)
    }
}

#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    attn1: CrossAttention, // self-attention
    attn2: CrossAttention, // cross-attention
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    disable_self_attn: bool,
}

impl BasicTransformerBlock {
    /// `disable_self_attn`: `attn1` takes its keys and values from the context too.
    pub fn new(
        dim: usize,
        num_heads: usize,
        head_dim: usize,
        context_dim: usize,
        disable_self_attn: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn1_context = disable_self_attn.then_some(context_dim);
        let ln = |name: &str| crate::ops::layer_norm(dim, LAYER_NORM_EPS, vb.pp(name));
        Ok(Self {
            attn1: CrossAttention::new(dim, attn1_context, num_heads, head_dim, vb.pp("attn1"))?,
            attn2: CrossAttention::new(
                dim,
                Some(context_dim),
                num_heads,
                head_dim,
                vb.pp("attn2"),
            )?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            norm1: ln("norm1")?,
            norm2: ln("norm2")?,
            norm3: ln("norm3")?,
            disable_self_attn,
        })
    }

    /// `x`: `[B, N, dim]`, `context`: `[B, M, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let attn1_context = self.disable_self_attn.then_some(context);
        let x = (self.attn1.forward(&self.norm1.forward(x)?, attn1_context)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }

    /// Applies `bytes` as the attention-score memory bound of both attentions.
    pub fn with_max_score_bytes(mut self, bytes: usize) -> Self {
        self.attn1 = self.attn1.with_max_score_bytes(bytes);
        self.attn2 = self.attn2.with_max_score_bytes(bytes);
        self
    }
}

/// `proj_in` / `proj_out`: a 1×1 conv on `[B, C, H, W]` (SD1) or a Linear on `[B, H·W, C]` (SD2).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(in_dim: usize, out_dim: usize, linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(ldm_kernels::nn::linear(in_dim, out_dim, vb)?)
        } else {
            Projection::Conv(ldm_kernels::nn::conv2d(
                in_dim,
                out_dim,
                1,
                Conv2dConfig::default(),
                vb,
            )?)
        })
    }
}

/// Shape of the transformer stack inside one `SpatialTransformer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerShape {
    pub num_heads: usize,
    pub head_dim: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub num_groups: usize,
    /// `attn1` attends the context (`disable_self_attn`).
    pub disable_self_attn: bool,
}

#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>, // transformer_blocks.i
    proj_out: Projection,
}

impl SpatialTransformer {
    /// `vb` is positioned at the transformer (e.g. `input_blocks.1.1`).
    pub fn new(channels: usize, shape: &TransformerShape, vb: VarBuilder) -> Result<Self> {
        let inner = shape.num_heads * shape.head_dim;
        let norm = ldm_kernels::nn::group_norm(
            shape.num_groups,
            channels,
            TRANSFORMER_GROUP_NORM_EPS,
            vb.pp("norm"),
        )?;
        let proj_in = Projection::new(channels, inner, shape.linear_projection, vb.pp("proj_in"))?;
        let vbt = vb.pp("transformer_blocks");
        let blocks = (0..shape.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    shape.num_heads,
                    shape.head_dim,
                    shape.context_dim,
                    shape.disable_self_attn,
                    vbt.pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // The original builds the linear proj_out as Linear(in_channels, inner_dim) (a transposition that only
        // type-checks because SD always has inner == channels); the weight is [channels, inner] either way.
        let proj_out =
            Projection::new(inner, channels, shape.linear_projection, vb.pp("proj_out"))?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Applies `bytes` as the attention-score memory bound of every attention inside.
    pub fn with_max_score_bytes(mut self, bytes: usize) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|b| b.with_max_score_bytes(bytes))
            .collect();
        self
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, M, context_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.reshape((b, ch, h * w))?.transpose(1, 2)?.contiguous() // [B, H·W, ch]
        };
        let mut t = self.norm.forward(x)?;
        t = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&t)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(t)?)?,
        }; // [B, H·W, inner]
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.transpose(1, 2)?.reshape((b, ch, h, w)) // [B, ch, H, W]
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(t)?)?,
            Projection::Linear(lin) => to_image(lin.forward(&t)?)?,
        }; // [B, C, H, W]
        out + x
    }
}
