//! A drop-in for `candle_nn::Conv2d` (same constructor, accessors, initialisation hints and `Module`) whose
//! forward pass goes through [`crate::conv2d`]: our im2col + GEMM kernels with their backward pass for f32 on
//! the CPU, candle's convolution otherwise (and for grouped convolutions).
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};

use crate::conv::{conv2d as kernel_conv2d, conv2d_bias as kernel_conv2d_bias, ConvParams};

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let p = ConvParams {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
        };
        match (&self.bias, c.groups) {
            (Some(b), 1) => kernel_conv2d_bias(x, &self.weight, b, p),
            (None, 1) => kernel_conv2d(x, &self.weight, p),
            (bias, groups) => {
                let y = x.conv2d(&self.weight, c.padding, c.stride, c.dilation, groups)?;
                match bias {
                    None => Ok(y),
                    Some(b) => y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?),
                }
            }
        }
    }
}

fn weight(
    in_ch: usize,
    out_ch: usize,
    k: usize,
    cfg: &Conv2dConfig,
    vb: &VarBuilder,
) -> Result<Tensor> {
    vb.get_with_hints(
        (out_ch, in_ch / cfg.groups, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

/// `candle_nn::conv2d` with our forward pass: the same variables and initialisation hints.
pub fn conv2d(
    in_ch: usize,
    out_ch: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = weight(in_ch, out_ch, k, &cfg, &vb)?;
    let bound = 1. / (in_ch as f64).sqrt();
    let b = vb.get_with_hints(
        out_ch,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv2d::new(w, Some(b), cfg))
}

/// `candle_nn::conv2d_no_bias` with our forward pass.
pub fn conv2d_no_bias(
    in_ch: usize,
    out_ch: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::new(weight(in_ch, out_ch, k, &cfg, &vb)?, None, cfg))
}

/// A drop-in for `candle_nn::GroupNorm` (same constructor and `Module`), through [`crate::group_norm`], with
/// [`GroupNorm::forward_silu`] for the GroupNorm–SiLU pairs of the ResBlocks.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        num_channels: usize,
        num_groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm: {num_channels} channels cannot be split into {num_groups} groups"
            );
        }
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// SiLU(GroupNorm(x)) in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm(x, &self.weight, &self.bias, self.num_groups, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm(
            x,
            &self.weight,
            &self.bias,
            self.num_groups,
            self.eps,
            false,
        )
    }
}

/// `candle_nn::group_norm` with our forward pass: the same variables and initialisation (ones, zeros).
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_channels, num_groups, eps)
}
