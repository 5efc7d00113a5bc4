//! Drop-ins for `candle_nn::Conv2d`, `Linear` and `GroupNorm` (same constructors, accessors, initialisation
//! hints and `Module`). `Conv2d`'s forward pass goes through [`crate::conv2d`]: our im2col + GEMM kernels with
//! their backward pass for f32 on the CPU, candle's convolution otherwise (and for grouped convolutions).
//! `Conv2d` and `Linear` also take weights kept in a narrower dtype than their input and widen them per pass.
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

/// `w` in `x`'s dtype: weights kept in their stored dtype (f16/bf16 checkpoints, see
/// `ldm_core::weights::StrictLoader::keep_stored_dtype`) are widened for the duration of one forward pass.
fn as_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        Ok(w.clone())
    } else {
        w.to_dtype(x.dtype())
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = as_dtype_of(&self.weight, x)?;
        let c = &self.config;
        let p = ConvParams {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
        };
        match (&self.bias, c.groups) {
            (Some(b), 1) => kernel_conv2d_bias(x, &weight, b, p),
            (None, 1) => kernel_conv2d(x, &weight, p),
            (bias, groups) => {
                let y = x.conv2d(&weight, c.padding, c.stride, c.dilation, groups)?;
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

/// `candle_nn::Linear` (same constructor, accessors, variables and initialisation hints, through `linear` and
/// `linear_no_bias`) whose weight may be kept in a narrower dtype than its input (f16/bf16 checkpoints loaded
/// with `keep_stored_dtype`): it is widened for each forward pass, which gives the same result as widening at load.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }

    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.0.weight().dtype() == x.dtype() {
            return self.0.forward(x);
        }
        let w = self.0.weight().to_dtype(x.dtype())?;
        let b = match self.0.bias() {
            Some(b) => Some(as_dtype_of(b, x)?),
            None => None,
        };
        candle_nn::Linear::new(w, b).forward(x)
    }
}

/// `candle_nn::linear` returning our [`Linear`]: the same variables and initialisation hints.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// `candle_nn::linear_no_bias` returning our [`Linear`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(in_dim, out_dim, vb)?))
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
