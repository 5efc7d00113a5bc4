//! Resolution changes of the LDM UNet (`openaimodel.Downsample` / `Upsample`).
//!
//! | block        | `conv_resample=True` (keys)                  | `conv_resample=False` (no weights) |
//! |--------------|----------------------------------------------|------------------------------------|
//! | `Downsample` | 3×3 conv, stride 2, padding 1: H → ⌈H/2⌉ (`op`) | 2×2 average pooling, stride 2      |
//! | `Upsample`   | nearest-neighbour ×2, then 3×3 conv, pad 1 (`conv`) | nearest-neighbour ×2           |
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use ldm_kernels::Conv2d;

#[derive(Debug, Clone)]
pub struct Downsample {
    op: Option<Conv2d>, // op (a conv), or average pooling
}

impl Downsample {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            op: Some(ldm_kernels::nn::conv2d(
                in_channels,
                out_channels,
                3,
                cfg,
                vb.pp("op"),
            )?),
        })
    }

    /// The weightless variant (`conv_resample=False`): 2×2 average pooling.
    pub fn pool() -> Self {
        Self { op: None }
    }

    /// `[B, C, H, W]` → `[B, C_out, ⌈H/2⌉, ⌈W/2⌉]` (pooling: `⌊H/2⌋`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.op {
            Some(op) => op.forward(x),
            None => x.avg_pool2d(2),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Option<Conv2d>, // conv
}

impl Upsample {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Some(super::resnet::conv3x3(
                in_channels,
                out_channels,
                vb.pp("conv"),
            )?),
        })
    }

    /// The weightless variant (`conv_resample=False`): nearest-neighbour ×2 only.
    pub fn nearest() -> Self {
        Self { conv: None }
    }

    /// `[B, C, H, W]` → `[B, C_out, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let x = x.upsample_nearest2d(2 * h, 2 * w)?;
        match &self.conv {
            Some(conv) => conv.forward(&x),
            None => Ok(x),
        }
    }
}
