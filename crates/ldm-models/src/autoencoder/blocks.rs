//! The building blocks of the LDM first-stage encoder and decoder
//! (`ldm/modules/diffusionmodules/model.py` of CompVis/stable-diffusion@21f890f).
//!
//! | original            | here            | what it does                                                   |
//! |---------------------|-----------------|----------------------------------------------------------------|
//! | `Normalize`         | [`normalize`]   | GroupNorm, `eps = 1e-6`, affine                                 |
//! | `nonlinearity`      | `swish`         | `x·σ(x)` (SiLU)                                                 |
//! | `ResnetBlock`       | [`ResnetBlock`] | `x + conv2(swish(norm2(conv1(swish(norm1(x))))))`, no time embedding |
//! | `AttnBlock`         | [`AttnBlock`]   | single-head self-attention over all pixels, 1x1-conv q, k, v, proj_out |
//! | `Downsample`        | [`Downsample`]  | pad right/bottom by one, 3x3 conv with stride 2 and no padding |
//! | `Upsample`          | [`Upsample`]    | nearest ×2, then 3x3 conv                                       |
//!
//! Every block takes a [`VarBuilder`] positioned at its own key (e.g. `encoder.down.0.block.1`), so the
//! module tree is the checkpoint key tree.
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use ldm_kernels::{Conv2d, GroupNorm};

/// GroupNorm epsilon of the original `Normalize` (and of diffusers' VAE).
const NORM_EPS: f64 = 1e-6;

/// Attention computes its `[B, N, N]` score matrix in query chunks so that one chunk stays under this many
/// bytes. Rows of the softmax are independent, so chunking gives the same numbers as a single pass.
pub const ATTN_SCORE_BUDGET_BYTES: usize = 256 << 20;

/// `Normalize(in_channels)`: GroupNorm with `num_groups` groups and `eps = 1e-6`.
pub fn normalize(channels: usize, num_groups: usize, vb: VarBuilder) -> Result<GroupNorm> {
    ldm_kernels::nn::group_norm(num_groups, channels, NORM_EPS, vb)
}

/// Per-(batch element, group) mean and (biased) variance of a feature map, as GroupNorm computes them.
/// Tiled first-stage passes compute them over the WHOLE map and hand them to every tile
/// ([`Norm::forward_with_stats`]), so that tiles normalise exactly as the untiled pass does.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Batch size `B`.
    pub batch: usize,
    /// Group count `G`.
    pub groups: usize,
    /// `B·G` means, batch-major.
    pub mean: Vec<f64>,
    /// `B·G` variances, batch-major.
    pub var: Vec<f64>,
}

/// The first stage's GroupNorm ([`normalize`]) with its affine parameters at hand, so that it can also
/// normalise with statistics computed elsewhere (over the whole image, while the input is one tile of it).
#[derive(Debug, Clone)]
pub struct Norm {
    gn: GroupNorm,
    weight: Tensor, // [C]
    bias: Tensor,   // [C]
    channels: usize,
    groups: usize,
    eps: f64,
}

impl Norm {
    /// `Normalize(channels)` at `vb` (keys `weight`, `bias`).
    pub fn new(channels: usize, num_groups: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let gn = GroupNorm::new(weight.clone(), bias.clone(), channels, num_groups, NORM_EPS)?;
        Ok(Self {
            gn,
            weight,
            bias,
            channels,
            groups: num_groups,
            eps: NORM_EPS,
        })
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Normalises `x` `[B, C, H, W]` with the given per-(batch, group) statistics instead of its own:
    /// `(x − μ_g)/√(σ²_g + ε)·γ_c + β_c`, evaluated as one per-channel scale and shift (f32 or wider).
    pub fn forward_with_stats(&self, x: &Tensor, stats: &GroupStats) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        if c != self.channels || stats.groups != self.groups || stats.batch != b {
            candle_core::bail!(
                "GroupNorm with external statistics: input {:?} and statistics for {} × {} groups, \
                 expected {} channels in {} groups",
                x.dims(),
                stats.batch,
                stats.groups,
                self.channels,
                self.groups
            );
        }
        let gamma = self.weight.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let beta = self.bias.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let per_group = c / self.groups;
        let (mut scale, mut shift) = (Vec::with_capacity(b * c), Vec::with_capacity(b * c));
        for bi in 0..b {
            for ci in 0..c {
                let g = bi * self.groups + ci / per_group;
                let s = gamma[ci] / (stats.var[g] + self.eps).sqrt();
                scale.push(s as f32);
                shift.push((beta[ci] - stats.mean[g] * s) as f32);
            }
        }
        let dt = match x.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let scale = Tensor::from_vec(scale, (b, c, 1, 1), x.device())?.to_dtype(dt)?;
        let shift = Tensor::from_vec(shift, (b, c, 1, 1), x.device())?.to_dtype(dt)?;
        x.to_dtype(dt)?
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)?
            .to_dtype(x.dtype())
    }
}

impl Norm {
    /// swish(norm(x)) in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward_silu(x)
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward(x)
    }
}

pub(crate) fn swish(x: &Tensor) -> Result<Tensor> {
    ldm_kernels::silu(x)
}

pub(crate) fn conv3x3(
    in_ch: usize,
    out_ch: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    ldm_kernels::nn::conv2d(in_ch, out_ch, 3, cfg, vb)
}

pub(crate) fn conv1x1(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv2d> {
    ldm_kernels::nn::conv2d(in_ch, out_ch, 1, Conv2dConfig::default(), vb)
}

/// `ResnetBlock` with `temb_channels = 0` (the first stage has no time embedding) and dropout off.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    pub(crate) norm1: Norm,
    pub(crate) conv1: Conv2d,
    pub(crate) norm2: Norm,
    pub(crate) conv2: Conv2d,
    /// `nin_shortcut`, a 1x1 conv, present only when the channel count changes.
    pub(crate) nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(in_ch: usize, out_ch: usize, num_groups: usize, vb: VarBuilder) -> Result<Self> {
        let nin_shortcut = if in_ch != out_ch {
            Some(conv1x1(in_ch, out_ch, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: Norm::new(in_ch, num_groups, vb.pp("norm1"))?,
            conv1: conv3x3(in_ch, out_ch, 1, 1, vb.pp("conv1"))?,
            norm2: Norm::new(out_ch, num_groups, vb.pp("norm2"))?,
            conv2: conv3x3(out_ch, out_ch, 1, 1, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// A 1x1 convolution applied as a matrix product on `[B, C, N]` (N = H·W pixels). Checkpoints store the
/// weight as `[C_out, C_in, 1, 1]` (original) and some converters as `[C_out, C_in]`; both load.
#[derive(Debug, Clone)]
struct PixelLinear {
    weight: Tensor, // [C_out, C_in]
    bias: Tensor,   // [C_out, 1]
}

impl PixelLinear {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        // The original 4-D shape first; its error (missing key or wrong shape) is the one reported.
        let weight = match vb.get((channels, channels, 1, 1), "weight") {
            Ok(w) => w.reshape((channels, channels))?,
            Err(err) => vb.get((channels, channels), "weight").map_err(|_| err)?,
        }
        .to_dtype(vb.dtype())?;
        let bias = vb.get(channels, "bias")?.reshape((channels, 1))?;
        Ok(Self { weight, bias })
    }

    /// `[B, C, N] -> [B, C, N]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.broadcast_matmul(x)?.broadcast_add(&self.bias)
    }
}

/// `AttnBlock`: single-head self-attention over the `H·W` pixels, with `q, k, v, proj_out` as 1x1 convs.
///
/// `out = x + proj_out(softmax(qᵀk / √C) applied to v)`, softmax over the key pixels.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: PixelLinear,
    k: PixelLinear,
    v: PixelLinear,
    proj_out: PixelLinear,
    score_budget_bytes: usize,
}

impl AttnBlock {
    pub fn new(channels: usize, num_groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: normalize(channels, num_groups, vb.pp("norm"))?,
            q: PixelLinear::new(channels, vb.pp("q"))?,
            k: PixelLinear::new(channels, vb.pp("k"))?,
            v: PixelLinear::new(channels, vb.pp("v"))?,
            proj_out: PixelLinear::new(channels, vb.pp("proj_out"))?,
            score_budget_bytes: ATTN_SCORE_BUDGET_BYTES,
        })
    }

    /// The same block with another per-chunk budget for the score matrix (tests use a tiny one).
    pub fn with_score_budget(mut self, bytes: usize) -> Self {
        self.score_budget_bytes = bytes;
        self
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?.reshape((b, c, h * w))?; // [B, C, N]
        let q = self.q.forward(&hn)?.transpose(1, 2)?.contiguous()?; // [B, N, C]
        let k = self.k.forward(&hn)?.contiguous()?; // [B, C, N]
        let v = self.v.forward(&hn)?.transpose(1, 2)?.contiguous()?; // [B, N, C]
        let out = chunked_attention(&q, &k, &v, (c as f64).powf(-0.5), self.score_budget_bytes)?; // [B, N, C]
        let out = self.proj_out.forward(&out.transpose(1, 2)?.contiguous()?)?; // [B, C, N]
        x + out.reshape((b, c, h, w))?
    }
}

/// `softmax(q·kᵀ·scale)·v` with `q: [B, N, C]`, `k_t: [B, C, M]` (already transposed), `v: [B, M, C]`,
/// evaluated over query chunks whose `[B, rows, M]` score matrix fits in `budget_bytes`.
/// The softmax runs in f32 even for half-precision inputs (diffusers' `upcast_softmax`).
pub(crate) fn chunked_attention(
    q: &Tensor,
    k_t: &Tensor,
    v: &Tensor,
    scale: f64,
    budget_bytes: usize,
) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    let m = k_t.dim(2)?;
    let row_bytes = b * m * DType::F32.size_in_bytes();
    let rows = (budget_bytes / row_bytes.max(1)).clamp(1, n.max(1));
    let attend = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(k_t)? * scale)?; // [B, rows, M]
        let probs =
            crate::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        probs.matmul(v) // [B, rows, C]
    };
    if rows >= n {
        return attend(q);
    }
    let mut chunks = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        chunks.push(attend(&q.narrow(1, start, len)?)?);
        start += len;
    }
    Tensor::cat(&chunks, 1)
}

/// `Downsample(with_conv=True)`: zero-pad one column on the right and one row at the bottom, then a 3x3
/// conv with stride 2 and no padding (`H -> H/2` for even `H`).
#[derive(Debug, Clone)]
pub struct Downsample {
    pub(crate) conv: Conv2d,
}

impl Downsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 2, 0, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // torch.nn.functional.pad(x, (0, 1, 0, 1)): last dim (W) right by 1, then H bottom by 1.
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// `Upsample(with_conv=True)`: nearest-neighbour ×2, then a 3x3 conv with padding 1.
#[derive(Debug, Clone)]
pub struct Upsample {
    pub(crate) conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        // A small deterministic generator keeps the test free of global RNG state.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    #[test]
    fn chunked_attention_equals_single_pass() -> Result<()> {
        let (b, n, c) = (2, 37, 8);
        let q = randn(&[b, n, c], 1)?;
        let k_t = randn(&[b, c, n], 2)?;
        let v = randn(&[b, n, c], 3)?;
        let full = chunked_attention(&q, &k_t, &v, 0.35, usize::MAX)?;
        // 5 rows per chunk: 37 = 7·5 + 2 exercises the ragged last chunk.
        let chunked = chunked_attention(&q, &k_t, &v, 0.35, 5 * b * n * 4)?;
        let diff = (full - chunked)?.abs()?.max_all()?.to_vec0::<f32>()?;
        assert!(diff <= 1e-6, "chunked attention differs by {diff}");
        Ok(())
    }

    #[test]
    fn attention_rows_are_convex_combinations_of_values() -> Result<()> {
        // With v constant per channel, every output row equals that constant whatever the scores.
        let q = randn(&[1, 6, 4], 4)?;
        let k_t = randn(&[1, 4, 6], 5)?;
        let v = Tensor::new(&[[1f32, -2., 3., 0.5]], &Device::Cpu)?
            .broadcast_as((1, 6, 4))?
            .contiguous()?;
        let out = chunked_attention(&q, &k_t, &v, 1.0, 3 * 6 * 4)?;
        let diff = (out - &v)?.abs()?.max_all()?.to_vec0::<f32>()?;
        assert!(diff <= 1e-6);
        Ok(())
    }

    #[test]
    fn downsample_halves_even_sizes() -> Result<()> {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let down = Downsample::new(3, vb)?;
        let y = down.forward(&Tensor::zeros((1, 3, 8, 6), DType::F32, &Device::Cpu)?)?;
        assert_eq!(y.dims(), &[1, 3, 4, 3]);
        Ok(())
    }
}
