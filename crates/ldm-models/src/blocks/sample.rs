//! Resolution changes of the LDM UNet (`openaimodel.Downsample` / `Upsample` with `conv_resample=True`).
//!
//! | block        | op                                          | key    |
//! |--------------|---------------------------------------------|--------|
//! | `Downsample` | 3×3 conv, stride 2, padding 1: H → ⌈H/2⌉     | `op`   |
//! | `Upsample`   | nearest-neighbour ×2, then 3×3 conv, pad 1  | `conv` |
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

#[derive(Debug, Clone)]
pub struct Downsample {
    op: Conv2d, // op
}

impl Downsample {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            op: candle_nn::conv2d(in_channels, out_channels, 3, cfg, vb.pp("op"))?,
        })
    }

    /// `[B, C, H, W]` → `[B, C_out, ⌈H/2⌉, ⌈W/2⌉]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(x)
    }
}

#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d, // conv
}

impl Upsample {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: super::resnet::conv3x3(in_channels, out_channels, vb.pp("conv"))?,
        })
    }

    /// `[B, C, H, W]` → `[B, C_out, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}
