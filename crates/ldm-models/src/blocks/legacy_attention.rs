//! The self-attention block of the ADM / LDM UNet without cross-attention (`openaimodel.AttentionBlock`),
//! used by unconditional, concat-conditioned and class-conditional LDMs (`use_spatial_transformer=False`).
//!
//! Vaswani et al. 2017, Eq. 1 over the H·W positions of a feature map, in the layout of Dhariwal & Nichol 2021:
//! ```text
//! x   : [B, C, T]            (T = H·W)
//! qkv = qkv(GN(x))           qkv: 1-D conv, kernel 1, [3C, C, 1] + bias   → [B, 3C, T]
//! a   = attention(qkv)       per head: softmax(qᵀk / √d) vᵀ               → [B, C, T]
//! out = x + proj_out(a)      proj_out: 1-D conv, kernel 1, [C, C, 1] + bias
//! ```
//! GN is `normalization(C)` (32 groups, eps 1e-5). How the 3C channels of `qkv` split into heads:
//!
//! | `use_new_attention_order` | module               | channel `r` of `qkv` is                           |
//! |---------------------------|----------------------|---------------------------------------------------|
//! | false (all released LDMs) | `QKVAttentionLegacy` | head `r / 3d`, part (q,k,v) `(r mod 3d) / d`, row `r mod d` |
//! | true                      | `QKVAttention`       | part `r / C`, head `(r mod C) / d`, row `r mod d` |
//!
//! The head outputs are concatenated head-major (channel `h·d + i`). The original scales q and k by `d^(-1/4)`
//! each; here the scores are scaled by `d^(-1/2)` once (equal up to f32 rounding).
use super::attention::{attention, MAX_SCORE_BYTES};
use super::resnet::RES_GROUP_NORM_EPS;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::nn::Linear;
use ldm_kernels::GroupNorm;

#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: GroupNorm,  // norm
    qkv: Linear,      // qkv ([3C, C, 1] conv1d weight, applied to tokens)
    proj_out: Linear, // proj_out ([C, C, 1])
    num_heads: usize,
    new_order: bool,
    max_score_bytes: usize,
}

/// A kernel-1 `conv_nd(1, cin, cout, 1)` read with its `[cout, cin, 1]` weight and used as a Linear on tokens.
fn conv1x1_1d(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb
        .get_with_hints(
            (cout, cin, 1),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?
        .reshape((cout, cin))?;
    let b = vb.get(cout, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

impl AttentionBlock {
    /// `vb` is positioned at the block (e.g. `input_blocks.4.1`). `num_heads` must divide `channels`.
    pub fn new(
        channels: usize,
        num_heads: usize,
        num_groups: usize,
        use_new_attention_order: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if num_heads == 0 || !channels.is_multiple_of(num_heads) {
            candle_core::bail!(
                "AttentionBlock: {num_heads} heads do not divide {channels} channels"
            );
        }
        Ok(Self {
            norm: ldm_kernels::nn::group_norm(
                num_groups,
                channels,
                RES_GROUP_NORM_EPS,
                vb.pp("norm"),
            )?,
            qkv: conv1x1_1d(channels, 3 * channels, vb.pp("qkv"))?,
            proj_out: conv1x1_1d(channels, channels, vb.pp("proj_out"))?,
            num_heads,
            new_order: use_new_attention_order,
            max_score_bytes: MAX_SCORE_BYTES,
        })
    }

    /// Sets the largest attention-score tensor materialised at once.
    pub fn with_max_score_bytes(mut self, bytes: usize) -> Self {
        self.max_score_bytes = bytes;
        self
    }

    /// `x`: `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (heads, d) = (self.num_heads, c / self.num_heads);
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            // Required: candle 0.11.1's CPU Linear/matmul silently gives wrong values on this transposed view.
            .contiguous()?; // [B, T, C]
        let qkv = self.qkv.forward(&tokens)?; // [B, T, 3C]
                                              // [B, T, 3, heads, d] (new order) or [B, T, heads, 3, d] (legacy), then part p as [B, heads, T, d]
        let part = |p: usize| -> Result<Tensor> {
            let t = if self.new_order {
                qkv.reshape((b, h * w, 3, heads, d))?.narrow(2, p, 1)?
            } else {
                qkv.reshape((b, h * w, heads, 3, d))?.narrow(3, p, 1)?
            };
            t.reshape((b, h * w, heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let a = attention(&part(0)?, &part(1)?, &part(2)?, self.max_score_bytes)?; // [B, heads, T, d]
        let a = a.transpose(1, 2)?.reshape((b, h * w, c))?; // [B, T, C], channel h·d + i
        let out = self.proj_out.forward(&a)?; // [B, T, C]
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + out
    }
}
