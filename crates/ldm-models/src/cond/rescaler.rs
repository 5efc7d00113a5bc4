//! `ldm.modules.encoders.modules.SpatialRescaler`: `n_stages` resizes by `multiplier` with
//! `torch.nn.functional.interpolate(x, scale_factor=multiplier, mode=method)` (PyTorch defaults:
//! `align_corners=False`, no antialiasing), then, when `out_channels` is set, a 1×1 convolution `channel_mapper`.
//! The semantic-synthesis models (`semantic_synthesis256/512`) use it with `n_stages: 2`, bilinear, ×0.5 and
//! 182 → 3 channels, so a one-hot map at image resolution becomes a 3-channel map at latent resolution (f = 4)
//! that is concatenated to the UNet input (`concat_mode: true`).
//!
//! [`interpolate`] reproduces PyTorch's CPU kernels (`aten/src/ATen/native/UpSample.h`, `UpSampleKernel.cpp`,
//! `AdaptiveAveragePooling.cpp`): output size `floor(size · scale)`, source coordinate
//! `(dst + 0.5) / scale − 0.5` in f32 (clamped at 0 for linear modes), nearest `min(floor(dst / scale), size − 1)`,
//! cubic convolution with A = −0.75 and clamped taps, and `area` = adaptive average pooling over
//! `[floor(i·in/out), ceil((i+1)·in/out))`. Every mode is separable, so each spatial axis is resampled by a
//! `[out, in]` matrix.
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use ldm_kernels::Conv2d;
use serde::{Deserialize, Serialize};

use super::{CondError, Result};

/// `method` of `SpatialRescaler` (= the `mode` of `F.interpolate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMethod {
    Nearest,
    Linear,
    Bilinear,
    Trilinear,
    Bicubic,
    Area,
}

impl ResizeMethod {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "nearest" => Self::Nearest,
            "linear" => Self::Linear,
            "bilinear" => Self::Bilinear,
            "trilinear" => Self::Trilinear,
            "bicubic" => Self::Bicubic,
            "area" => Self::Area,
            other => {
                return Err(CondError::Config(format!(
                    "unknown SpatialRescaler method `{other}` (nearest, linear, bilinear, trilinear, bicubic, area)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nearest => "nearest",
            Self::Linear => "linear",
            Self::Bilinear => "bilinear",
            Self::Trilinear => "trilinear",
            Self::Bicubic => "bicubic",
            Self::Area => "area",
        }
    }

    /// The number of spatial axes PyTorch requires for this mode (`None`: 1, 2 or 3).
    fn spatial_dims(self) -> Option<usize> {
        match self {
            Self::Linear => Some(1),
            Self::Bilinear | Self::Bicubic => Some(2),
            Self::Trilinear => Some(3),
            Self::Nearest | Self::Area => None,
        }
    }
}

/// `F.interpolate(x, scale_factor=scale, mode=method)` for `x` of shape `[B, C, *spatial]`.
pub fn interpolate(x: &Tensor, method: ResizeMethod, scale: f64) -> Result<Tensor> {
    let rank = x.rank();
    let spatial = rank.saturating_sub(2);
    let ok = match method.spatial_dims() {
        Some(n) => spatial == n,
        None => (1..=3).contains(&spatial),
    };
    if !ok {
        return Err(CondError::Interpolate(format!(
            "mode `{}` cannot resize a {rank}-D tensor {:?} (linear: 3-D, bilinear/bicubic: 4-D, trilinear: 5-D, nearest/area: 3- to 5-D)",
            method.name(),
            x.dims()
        )));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(CondError::Interpolate(format!(
            "scale factor must be positive, got {scale}"
        )));
    }
    let dtype = x.dtype();
    let mut y = x.to_dtype(DType::F32)?;
    for axis in 2..rank {
        let size = y.dim(axis)?;
        let out = (size as f64 * scale).floor() as usize;
        if out == 0 {
            return Err(CondError::Interpolate(format!(
                "scaling a side of {size} by {scale} leaves nothing (input {:?})",
                x.dims()
            )));
        }
        let m = axis_matrix(method, size, out, scale); // [out, in], row-major
        let mt = Tensor::from_vec(m, (out, size), x.device())?.t()?; // [in, out]
        let moved = y.transpose(axis, rank - 1)?.contiguous()?;
        let mut dims = moved.dims().to_vec();
        let rows = moved.elem_count() / size;
        let resized = moved.reshape((rows, size))?.matmul(&mt)?;
        dims[rank - 1] = out;
        y = resized
            .reshape(dims)?
            .transpose(axis, rank - 1)?
            .contiguous()?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// The resampling matrix of one axis, `[out, size]` row-major.
fn axis_matrix(method: ResizeMethod, size: usize, out: usize, scale: f64) -> Vec<f32> {
    let mut m = vec![0f32; out * size];
    // compute_scales_value<float>: 1/scale when a scale factor is given.
    let ratio = (1.0 / scale) as f32;
    let last = size as i64 - 1;
    for i in 0..out {
        let row = &mut m[i * size..(i + 1) * size];
        match method {
            ResizeMethod::Nearest => {
                let src = if out == size {
                    i
                } else if out == 2 * size {
                    i >> 1
                } else {
                    ((i as f32 * ratio).floor() as i64).min(last) as usize
                };
                row[src] = 1.0;
            }
            ResizeMethod::Linear | ResizeMethod::Bilinear | ResizeMethod::Trilinear => {
                let real = (ratio * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real.floor() as i64).min(last);
                let lambda = (real - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < last { i0 + 1 } else { i0 };
                row[i0 as usize] += 1.0 - lambda;
                row[i1 as usize] += lambda;
            }
            ResizeMethod::Bicubic => {
                let real = ratio * (i as f32 + 0.5) - 0.5;
                let i0 = (real.floor() as i64).min(last);
                let t = (real - i0 as f32).clamp(0.0, 1.0);
                for (k, w) in cubic_coefficients(t).into_iter().enumerate() {
                    let idx = (i0 - 1 + k as i64).clamp(0, last) as usize;
                    row[idx] += w;
                }
            }
            ResizeMethod::Area => {
                let start = (i * size) / out;
                let end = ((i + 1) * size).div_ceil(out);
                let w = 1.0 / (end - start) as f32;
                for v in &mut row[start..end] {
                    *v = w;
                }
            }
        }
    }
    m
}

/// Keys' cubic convolution weights for the taps at −1, 0, 1, 2 (A = −0.75, as PyTorch).
fn cubic_coefficients(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let conv1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let x2 = 1.0 - t;
    [conv2(t + 1.0), conv1(t), conv1(x2), conv2(x2 + 1.0)]
}

/// `cond_stage_config.params` of a `SpatialRescaler`; defaults are the original's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpatialRescalerConfig {
    pub n_stages: usize,
    pub method: ResizeMethod,
    pub multiplier: f64,
    pub in_channels: usize,
    /// When set, a 1×1 `channel_mapper` convolution maps `in_channels` → `out_channels` after resizing.
    pub out_channels: Option<usize>,
    pub bias: bool,
}

impl Default for SpatialRescalerConfig {
    fn default() -> Self {
        Self {
            n_stages: 1,
            method: ResizeMethod::Bilinear,
            multiplier: 0.5,
            in_channels: 3,
            out_channels: None,
            bias: false,
        }
    }
}

impl SpatialRescalerConfig {
    /// `models/ldm/semantic_synthesis256/config.yaml` (and 512): two bilinear halvings, 182 → 3 channels.
    pub fn semantic_synthesis() -> Self {
        Self {
            n_stages: 2,
            in_channels: 182,
            out_channels: Some(3),
            ..Self::default()
        }
    }

    /// The total downscaling `multiplier^n_stages` (0.25 for semantic synthesis), ignoring floor rounding.
    pub fn total_scale(&self) -> f64 {
        self.multiplier.powi(self.n_stages as i32)
    }
}

/// `SpatialRescaler`; keys `channel_mapper.weight` `[out, in, 1, 1]` (and `channel_mapper.bias` with `bias`)
/// under `cond_stage_model`.
#[derive(Debug, Clone)]
pub struct SpatialRescaler {
    channel_mapper: Option<Conv2d>,
    config: SpatialRescalerConfig,
}

impl SpatialRescaler {
    /// `vb` at `cond_stage_model` (unused when `out_channels` is `None`).
    pub fn new(config: &SpatialRescalerConfig, vb: VarBuilder) -> Result<Self> {
        if !(config.multiplier.is_finite() && config.multiplier > 0.0) {
            return Err(CondError::Config(format!(
                "SpatialRescaler multiplier must be positive, got {}",
                config.multiplier
            )));
        }
        let channel_mapper = match config.out_channels {
            None => None,
            Some(out) => {
                let vb = vb.pp("channel_mapper");
                let cfg = Conv2dConfig::default();
                Some(if config.bias {
                    ldm_kernels::nn::conv2d(config.in_channels, out, 1, cfg, vb)?
                } else {
                    ldm_kernels::nn::conv2d_no_bias(config.in_channels, out, 1, cfg, vb)?
                })
            }
        };
        Ok(Self {
            channel_mapper,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &SpatialRescalerConfig {
        &self.config
    }

    /// `[B, in_channels, H, W]` → `[B, out_channels, H·m^n, W·m^n]` (each stage floors the size).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for _ in 0..self.config.n_stages {
            x = interpolate(&x, self.config.method, self.config.multiplier)?;
        }
        match &self.channel_mapper {
            None => Ok(x),
            Some(conv) => {
                let c = x.dim(1)?;
                if x.rank() != 4 || c != self.config.in_channels {
                    return Err(CondError::Config(format!(
                        "SpatialRescaler channel_mapper expects [B, {}, H, W], got {:?}",
                        self.config.in_channels,
                        x.dims()
                    )));
                }
                Ok(conv.forward(&x)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resampling_row_is_a_partition_of_unity() {
        let methods = [
            ResizeMethod::Nearest,
            ResizeMethod::Linear,
            ResizeMethod::Bicubic,
            ResizeMethod::Area,
        ];
        for method in methods {
            for (size, scale) in [(9usize, 0.5f64), (13, 0.77), (5, 1.7), (1, 3.0)] {
                let out = (size as f64 * scale).floor() as usize;
                let m = axis_matrix(method, size, out, scale);
                for row in m.chunks(size) {
                    let s: f32 = row.iter().sum();
                    assert!(
                        (s - 1.0).abs() < 1e-6,
                        "{method:?} {size}->{out}: row sums to {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn halving_bilinear_averages_pixel_pairs() -> Result<()> {
        // align_corners=False at x0.5: output i samples at 2i + 0.5, the mean of pixels 2i and 2i+1
        let x = Tensor::from_vec(
            vec![0f32, 2.0, 4.0, 8.0],
            (1, 1, 1, 4),
            &candle_core::Device::Cpu,
        )?;
        let x = x.broadcast_as((1, 1, 2, 4))?.contiguous()?;
        let y = interpolate(&x, ResizeMethod::Bilinear, 0.5)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 6.0]);
        Ok(())
    }
}
