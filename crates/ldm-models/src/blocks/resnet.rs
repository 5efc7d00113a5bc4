//! The LDM UNet residual block (`openaimodel.ResBlock`), with the original checkpoint key names.
//!
//! He et al. 2016 residual unit in the DDPM form (Ho et al. 2020, App. B): two GroupNorm–SiLU–conv stages,
//! with the timestep embedding projected and added in between.
//!
//! ```text
//! h   = conv₁(SiLU(GN(x)))                      in_layers.{0,2}
//! h  += Linear(SiLU(emb))[:, :, None, None]     emb_layers.1
//! h   = conv₂(SiLU(GN(h)))                      out_layers.{0,3}   (Dropout at out_layers.2 is inference-inert)
//! out = skip(x) + h                             skip_connection: 1×1 conv when channels change, else identity
//! ```
//! The GroupNorms are `normalization(ch)` = `GroupNorm32(32, ch)` with eps 1e-5, computed in f32.
//!
//! Options of the original (`ResBlockOptions`):
//! - `use_scale_shift_norm` (FiLM, Perez et al. 2018): `emb_layers.1` outputs `2·C_out` = [scale, shift] and
//!   the second stage becomes `h = conv₂(SiLU(GN(h)·(1 + scale) + shift))`.
//! - `up` / `down` (`resblock_updown`): after `SiLU(GN(x))` and before `conv₁`, `h` is resampled by ×2
//!   nearest-neighbour or 2×2 average pooling; `x` is resampled the same way before the skip.
//!
//! The 3×3 skip convolution (`use_conv=True`) is used by no UNet layout and is not built.
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use ldm_kernels::nn::Linear;
use ldm_kernels::{Conv2d, GroupNorm};

/// eps of `normalization()` (torch's GroupNorm default).
pub const RES_GROUP_NORM_EPS: f64 = 1e-5;

pub(crate) fn conv3x3(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    ldm_kernels::nn::conv2d(in_ch, out_ch, 3, cfg, vb)
}

/// Resampling inside a ResBlock (`up=True` / `down=True` of the original).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// ×2 nearest-neighbour upsampling (`Upsample(use_conv=False)`).
    Up,
    /// 2×2 average pooling, stride 2 (`Downsample(use_conv=False)`).
    Down,
}

impl Resample {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Resample::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
            Resample::Down => x.avg_pool2d(2),
        }
    }
}

/// The ResBlock options of the original `ResBlock` constructor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResBlockOptions {
    pub use_scale_shift_norm: bool,
    pub resample: Option<Resample>,
}

#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,   // in_layers.0
    in_conv: Conv2d,      // in_layers.2 (in_layers.1 is SiLU)
    emb_proj: Linear,     // emb_layers.1 (emb_layers.0 is SiLU)
    out_norm: GroupNorm,  // out_layers.0
    out_conv: Conv2d,     // out_layers.3 (out_layers.1 SiLU, out_layers.2 Dropout)
    skip: Option<Conv2d>, // skip_connection, present iff in_channels != out_channels
    options: ResBlockOptions,
}

impl ResBlock {
    /// `vb` is positioned at the block (e.g. `input_blocks.1.0`).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        emb_channels: usize,
        num_groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let options = ResBlockOptions::default();
        Self::with_options(
            in_channels,
            out_channels,
            emb_channels,
            num_groups,
            options,
            vb,
        )
    }

    /// As [`ResBlock::new`], with the scale-shift and resampling options.
    pub fn with_options(
        in_channels: usize,
        out_channels: usize,
        emb_channels: usize,
        num_groups: usize,
        options: ResBlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let emb_out = if options.use_scale_shift_norm {
            2 * out_channels
        } else {
            out_channels
        };
        let vi = vb.pp("in_layers");
        let vo = vb.pp("out_layers");
        let skip = if in_channels == out_channels {
            None
        } else {
            let cfg = Conv2dConfig::default();
            Some(ldm_kernels::nn::conv2d(
                in_channels,
                out_channels,
                1,
                cfg,
                vb.pp("skip_connection"),
            )?)
        };
        Ok(Self {
            in_norm: ldm_kernels::nn::group_norm(
                num_groups,
                in_channels,
                RES_GROUP_NORM_EPS,
                vi.pp("0"),
            )?,
            in_conv: conv3x3(in_channels, out_channels, vi.pp("2"))?,
            emb_proj: ldm_kernels::nn::linear(emb_channels, emb_out, vb.pp("emb_layers").pp("1"))?,
            out_norm: ldm_kernels::nn::group_norm(
                num_groups,
                out_channels,
                RES_GROUP_NORM_EPS,
                vo.pp("0"),
            )?,
            out_conv: conv3x3(out_channels, out_channels, vo.pp("3"))?,
            skip,
            options,
        })
    }

    /// `x`: `[B, C_in, H, W]`, `emb`: `[B, E]` → `[B, C_out, H', W']` (H' = 2H, H/2 or H).
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.in_norm.forward_silu(x)?;
        let (h, x) = match self.options.resample {
            Some(r) => (r.apply(&h)?, r.apply(x)?),
            None => (h, x.clone()),
        };
        let h = self.in_conv.forward(&h)?; // [B, C_out, H', W']
        let e = self
            .emb_proj
            .forward(&emb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?; // [B, C_out or 2·C_out, 1, 1]
        let h = if self.options.use_scale_shift_norm {
            let c = e.dim(1)? / 2;
            let (scale, shift) = (e.narrow(1, 0, c)?, e.narrow(1, c, c)?);
            let h = self
                .out_norm
                .forward(&h)?
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?;
            ldm_kernels::silu(&h)?
        } else {
            self.out_norm.forward_silu(&h.broadcast_add(&e)?)?
        };
        let h = self.out_conv.forward(&h)?;
        match &self.skip {
            Some(skip) => skip.forward(&x)? + h,
            None => x + h,
        }
    }
}
