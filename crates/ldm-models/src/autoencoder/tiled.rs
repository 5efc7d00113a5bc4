//! Tiled first-stage decode and encode, so that a large image (2048² and up) goes through the autoencoder in
//! bounded working memory. Two modes ([`TileMode`], in [`TileConfig`]):
//!
//! | mode | result | memory (f32) | how |
//! |---|---|---|---|
//! | [`TileMode::SharedNorm`] (default) | the untiled result up to float rounding (≈1e-5) | 2–3 feature maps of the finest level on the host + one tile's working set | tiles in lockstep, GroupNorm statistics over the whole map |
//! | [`TileMode::Independent`] | approximate (per-tile GroupNorm statistics and attention) | one tile's working set + the output, independent of the image size | whole network per tile, outputs blended |
//!
//! For SD's decoder (f = 8) the shared mode's largest moment is the first ResNet block of the finest level,
//! which maps 256 to 128 channels: its input (256·H·W floats), inner activation and output (128·H·W each)
//! live at once, 2 KiB per image pixel: 512 MiB at 512², 2 GiB at 1024², 8 GiB at 2048² (plus weights and
//! one tile's working set). The untiled decode's peak is several times that (every op's output plus the
//! convolutions' unfolded inputs; measured 1690 MiB at 512² with 323 MiB of weights); the independent
//! mode's stays at one tile's working set plus the 3-channel output, whatever the image size.
//!
//! ## Shared-statistics mode
//!
//! This is the scheme of the AUTOMATIC1111 "Tiled VAE" extension (multidiffusion-upscaler), made exact. The
//! networks are local except for GroupNorm (statistics over the whole map) and attention. So:
//! - the parts at LATENT resolution run untiled on the whole latent, as they are small: decoder `conv_in` and
//!   mid block (with its attention), encoder mid block, `norm_out` and `conv_out` (and `quant_conv` /
//!   `post_quant_conv`, the VQ quantiser);
//! - everything at higher resolution runs in SEGMENTS between GroupNorms: the current feature map lives on
//!   the host (f32); its GroupNorm statistics are computed over the whole map (per batch element and group:
//!   mean, then mean squared deviation, accumulated in f64, each pixel once); then every tile (a core of
//!   `T·2^k` pixels at a level of resolution `2^k` per latent pixel, cores partitioning the map) is cropped
//!   with a margin of the segment's receptive field (1 pixel for a 3x3 conv, 2 for the stride-2 downsample,
//!   clipped at the image border where the network's own zero padding applies), moved to the model's device,
//!   normalised with the global statistics ([`Norm::forward_with_stats`]), pushed through the segment's local
//!   ops, and its core written to the next map. A ResNet block is two segments (`conv1(swish(norm1(x)))`,
//!   then `x + conv2(swish(norm2(h)))`, the latter written over `x` in place); an up/down sampler is one.
//! - attention blocks INSIDE a level (not in SD's first stage; some VQ configs) run on the whole map.
//!
//! With every segment's margin covering its receptive field, each core is computed from exactly the values
//! the untiled pass uses, so the result equals the untiled one up to float rounding (summation order of the
//! statistics; tests/tiled_vae.rs measures ~4e-6). No overlap and no blending are needed:
//! [`TileConfig::overlap`] is unused in this mode, and the tile side (`T·2^k` pixels at level `k`,
//! capped per segment so that one tile's input holds at most 4 Mi floats) only trades working-set size
//! against per-tile overhead. The price is host memory for whole feature maps (table above), computing time about
//! that of the untiled pass plus ~1–2 % for the 1-pixel margins, and host↔device copies per segment.
//!
//! ## Independent mode
//!
//! The latent (decode) or image (encode) is cut into overlapping tiles; each tile goes through the whole
//! network on its own; each output tile is multiplied by a blend weight and added into one output buffer,
//! then dropped. Only one tile's activations live at a time; the output buffer (3 or 2·C channels, f32) is
//! the only image-sized allocation. [`tiled_decode`] / [`tiled_encode`] implement it for any closure.
//!
//! | symbol              | here                        | unit                                         |
//! |---------------------|-----------------------------|----------------------------------------------|
//! | tile side `T`       | [`TileConfig::tile`]        | latent pixels (the image tile is `T·f`)      |
//! | overlap `O`         | [`TileConfig::overlap`]     | latent pixels, the least overlap of neighbours |
//! | stride `S = T − O`  | [`TileConfig::stride`]      | latent pixels, the largest step between tiles |
//! | factor `f`          | argument `f`                | image pixels per latent pixel (1 = pixel space) |
//!
//! **Placement.** Along an axis of `L > T` latent pixels there are `n = ⌈(L − O)/S⌉` full-size tiles, spread
//! evenly from `0` to `L − T` (start `k` is `round(k·(L − T)/(n − 1))`), so every tile has the full size `T`
//! and neighbours overlap by at least `O`. An axis with `L ≤ T` is one tile; an input that fits in one tile
//! on both axes goes through the network untiled (in both modes), so tiling never changes small images.
//!
//! **Blending.** Weights are separable, `w(y, x) = u(y)·v(x)`. Along an axis, neighbours cross-fade
//! linearly over their whole overlap (the left tile's weight falls from ≈1 to ≈0 while the right one's rises,
//! at pixel centres, so the two sum to exactly 1 and each tile's outermost pixels — the ones hurt most by
//! zero padding — get the least weight). Where tiles are dense enough that three overlap, each tile's window
//! (the product of its ramps) is divided by the sum of all windows; so on every axis, and hence in 2-D, the
//! weights at every output pixel sum to 1 ([`axis_tiles`] exposes them for tests).
//!
//! **Defaults** ([`TileConfig::default`], `T = 64`, `O = 16`, i.e. 512-pixel tiles with 128-pixel overlaps
//! for SD's f = 8) follow diffusers' `AutoencoderKL.enable_tiling` (`tile_latent_min_size = 64`,
//! `tile_overlap_factor = 0.25`, blend over 128 px); ComfyUI's `VAEDecodeTiled` also defaults to 512-pixel
//! tiles (with 64-pixel overlap). Unlike diffusers, the last tile is not cut short at the border (a small
//! tile has poor GroupNorm statistics) and decoded tiles are not all kept until the end.
//!
//! **What independent tiles change.** A tile sees only its own GroupNorm statistics and its own pixels for
//! attention, so the result differs from the untiled one wherever the content is not stationary (diffusers'
//! tiled decode has the same property and accepts it). How much depends on the weights: for the tiny random
//! VAE of fixtures/sd1-tiny (one channel per GroupNorm group) a 512² decode moved by up to 255/255 (mean
//! 32/255). Blending itself is exact: tiling a local operation reproduces it (tests/tiled_vae.rs).
use candle_core::{DType, Module, Result, Tensor};
use ldm_kernels::Conv2d;

use super::blocks::{swish, GroupStats, Norm, ResnetBlock};
use super::first_stage::{Encoded, FirstStage};
use super::kl::{AutoencoderKl, DiagonalGaussian};
use super::model::{Decoder, Encoder, Level};
use super::vq::VqModel;

/// How tiles relate to each other (module doc, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TileMode {
    /// Tiles run in lockstep and share every GroupNorm's statistics (computed over the whole feature map);
    /// the parts at latent resolution (decoder `conv_in` + mid block, encoder mid block + `norm_out` +
    /// `conv_out`) run untiled. Equals the untiled pass up to float rounding. Memory: two to three feature
    /// maps of the finest level on the host (f32) plus one tile's working set (module doc).
    #[default]
    SharedNorm,
    /// Every tile goes through the whole network on its own and the outputs are blended over the overlaps.
    /// Memory: one tile's working set plus the output, independent of the image size; but each tile sees
    /// only its own GroupNorm statistics and attention context, so the result is approximate.
    Independent,
}

/// Tile side and overlap of a tiled encode/decode, in LATENT pixels. Build it with [`TileConfig::new`] (or
/// [`TileConfig::from_pixels`]); an invalid configuration cannot be constructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    tile: usize,
    overlap: usize,
    mode: TileMode,
}

/// Why a [`TileConfig`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TileConfigError {
    #[error("tile size is 0; a tile must be at least 1 latent pixel")]
    ZeroTile,
    #[error(
        "tile overlap {overlap} must be smaller than the tile size {tile} (both in latent pixels), \
         or tiles would never advance"
    )]
    OverlapNotBelowTile { tile: usize, overlap: usize },
    #[error("tile size {pixels} px is not a multiple of the autoencoder factor f = {factor}")]
    PixelsNotMultiple { pixels: usize, factor: usize },
    #[error("autoencoder factor f must be at least 1, got 0")]
    ZeroFactor,
}

impl TileConfig {
    /// diffusers' `tile_latent_min_size` for SD (512 px at f = 8).
    pub const DEFAULT_TILE: usize = 64;
    /// diffusers' blend extent for SD: `0.25 · 64` latents (128 px at f = 8).
    pub const DEFAULT_OVERLAP: usize = 16;

    /// `tile` latent pixels per side, neighbours overlapping by at least `overlap` latent pixels.
    pub fn new(tile: usize, overlap: usize) -> std::result::Result<Self, TileConfigError> {
        if tile == 0 {
            return Err(TileConfigError::ZeroTile);
        }
        if overlap >= tile {
            return Err(TileConfigError::OverlapNotBelowTile { tile, overlap });
        }
        Ok(Self {
            tile,
            overlap,
            mode: TileMode::default(),
        })
    }

    /// The same tiles in another [`TileMode`].
    pub fn with_mode(mut self, mode: TileMode) -> Self {
        self.mode = mode;
        self
    }

    /// The tile mode ([`TileMode::SharedNorm`] unless set).
    pub fn mode(&self) -> TileMode {
        self.mode
    }

    /// A tile of `tile_px` image pixels for an autoencoder of factor `f`, with the default overlap ratio
    /// (a quarter of the tile, as diffusers). This is what a `--tile-vae PIXELS` flag maps to.
    pub fn from_pixels(tile_px: usize, f: usize) -> std::result::Result<Self, TileConfigError> {
        if f == 0 {
            return Err(TileConfigError::ZeroFactor);
        }
        if !tile_px.is_multiple_of(f) {
            return Err(TileConfigError::PixelsNotMultiple {
                pixels: tile_px,
                factor: f,
            });
        }
        let tile = tile_px / f;
        Self::new(tile, tile / 4)
    }

    /// Tile side in latent pixels.
    pub fn tile(&self) -> usize {
        self.tile
    }

    /// Least overlap of neighbouring tiles in latent pixels.
    pub fn overlap(&self) -> usize {
        self.overlap
    }

    /// Largest step between neighbouring tile starts, `tile − overlap ≥ 1`.
    pub fn stride(&self) -> usize {
        self.tile - self.overlap
    }
}

impl Default for TileConfig {
    fn default() -> Self {
        Self {
            tile: Self::DEFAULT_TILE,
            overlap: Self::DEFAULT_OVERLAP,
            mode: TileMode::default(),
        }
    }
}

/// One tile along one axis.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisTile {
    /// First latent pixel the tile covers.
    pub start: usize,
    /// Tile length in latent pixels.
    pub len: usize,
    /// Blend weight of each of the tile's `len · unit` output positions (see the module doc).
    pub weights: Vec<f32>,
}

/// Tile starts along an axis of `len` latent pixels (module doc, "Placement").
fn tile_starts(len: usize, cfg: &TileConfig) -> Vec<usize> {
    if len <= cfg.tile {
        return vec![0];
    }
    let n = (len - cfg.overlap).div_ceil(cfg.stride()); // ≥ 2
    let span = len - cfg.tile;
    (0..n).map(|k| (k * span + (n - 1) / 2) / (n - 1)).collect()
}

/// The tiles along an axis of `len` latent pixels, each with its blend weights at `unit` output positions
/// per latent pixel (`f` for decode, 1 for encode). The weights of all tiles covering an output position
/// sum to 1. Empty for `len == 0`.
pub fn axis_tiles(len: usize, unit: usize, cfg: &TileConfig) -> Vec<AxisTile> {
    if len == 0 || unit == 0 {
        return Vec::new();
    }
    let starts = tile_starts(len, cfg);
    let tile_len = cfg.tile.min(len);
    let n = starts.len();
    // Output-space intervals [a, b) of every tile.
    let spans: Vec<(usize, usize)> = starts
        .iter()
        .map(|&s| (s * unit, (s + tile_len) * unit))
        .collect();
    let window = |k: usize, p: usize| -> f64 {
        let (a, b) = spans[k];
        let mut w = 1.0;
        if k > 0 {
            let prev_end = spans[k - 1].1;
            if p < prev_end {
                w *= (p - a) as f64 + 0.5;
                w /= (prev_end - a) as f64; // rises over the overlap with the previous tile
            }
        }
        if k + 1 < n {
            let next_start = spans[k + 1].0;
            if p >= next_start {
                w *= (b - p) as f64 - 0.5;
                w /= (b - next_start) as f64; // falls over the overlap with the next tile
            }
        }
        w
    };
    let mut total = vec![0f64; len * unit];
    for (k, &(a, b)) in spans.iter().enumerate() {
        for (p, t) in total.iter_mut().enumerate().take(b).skip(a) {
            *t += window(k, p);
        }
    }
    spans
        .iter()
        .zip(&starts)
        .enumerate()
        .map(|(k, (&(a, b), &start))| AxisTile {
            start,
            len: tile_len,
            weights: (a..b).map(|p| (window(k, p) / total[p]) as f32).collect(),
        })
        .collect()
}

/// Runs `op` on overlapping tiles of `input` `[B, C, H, W]` and blends the results into `[B, C', h, w]`.
/// `in_unit` / `out_unit` are the input / output pixels per latent pixel; tiles are laid out in latent
/// pixels. `what` names the operation in errors.
fn tiled_apply<F>(
    input: &Tensor,
    in_unit: usize,
    out_unit: usize,
    cfg: &TileConfig,
    what: &str,
    op: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let (b, _, h, w) = input.dims4()?;
    if in_unit == 0 || out_unit == 0 {
        candle_core::bail!("{what}: the autoencoder factor f must be at least 1");
    }
    if h == 0 || w == 0 || h % in_unit != 0 || w % in_unit != 0 {
        candle_core::bail!(
            "{what}: input {:?} must have non-zero sides divisible by {in_unit}",
            input.dims()
        );
    }
    let (lh, lw) = (h / in_unit, w / in_unit); // latent sides
    if lh <= cfg.tile && lw <= cfg.tile {
        return op(input); // one tile: no blending, exactly the untiled result
    }
    let rows = axis_tiles(lh, out_unit, cfg);
    let cols = axis_tiles(lw, out_unit, cfg);
    let (oh, ow) = (lh * out_unit, lw * out_unit);
    // The output buffer on the host: tiles are added in place, then the buffer moves to the input's device.
    let mut acc: Option<(Vec<f32>, usize, DType)> = None;
    for r in &rows {
        for c in &cols {
            let tile_in = input
                .narrow(2, r.start * in_unit, r.len * in_unit)?
                .narrow(3, c.start * in_unit, c.len * in_unit)?
                .contiguous()?;
            let y = op(&tile_in)?;
            let (yb, yc, yh, yw) = y.dims4()?;
            let (th, tw) = (r.weights.len(), c.weights.len());
            if yb != b || yh != th || yw != tw {
                candle_core::bail!(
                    "{what}: a tile of input {:?} gave {:?}, expected [{b}, _, {th}, {tw}] \
                     (the network must map {in_unit} input pixels to {out_unit} output pixels)",
                    tile_in.dims(),
                    y.dims()
                );
            }
            let (buf, ch, _) =
                acc.get_or_insert_with(|| (vec![0f32; b * yc * oh * ow], yc, y.dtype()));
            if *ch != yc {
                candle_core::bail!(
                    "{what}: tiles gave {ch} and {yc} channels; the network must be consistent"
                );
            }
            let data = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            drop(y);
            let (y0, x0) = (r.start * out_unit, c.start * out_unit);
            for (plane, src_plane) in data.chunks_exact(th * tw).enumerate() {
                let dst_plane = &mut buf[plane * oh * ow..(plane + 1) * oh * ow];
                for (i, (src_row, wy)) in src_plane.chunks_exact(tw).zip(&r.weights).enumerate() {
                    let dst_row = &mut dst_plane[(y0 + i) * ow + x0..(y0 + i) * ow + x0 + tw];
                    for ((d, s), wx) in dst_row.iter_mut().zip(src_row).zip(&c.weights) {
                        *d += s * wy * wx;
                    }
                }
            }
        }
    }
    let (buf, ch, dtype) =
        acc.expect("invariant: inputs larger than a tile have at least one tile");
    Tensor::from_vec(buf, (b, ch, oh, ow), input.device())?.to_dtype(dtype)
}

/// Tiled first-stage decode: latent `z` `[B, C, h, w]` → `[B, C', f·h, f·w]`, with `decode` applied to
/// `[B, C, ≤T, ≤T]` tiles of `z` and the results blended (module doc). `decode` is the whole first-stage
/// decoder (KL: `post_quant_conv` + decoder; VQ: quantise + decoder; identity for f = 1). A latent that
/// fits in one tile is decoded in one call.
pub fn tiled_decode<F>(z: &Tensor, f: usize, cfg: &TileConfig, decode: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    tiled_apply(z, 1, f, cfg, "tiled decode", decode)
}

/// Tiled first-stage encode: image `x` `[B, C, H, W]` (H, W multiples of `f`) → `[B, C', H/f, W/f]`, with
/// `encode` applied to `[B, C, ≤T·f, ≤T·f]` tiles of `x` and the results blended (module doc). `encode`
/// returns whatever per-pixel latent quantity should be blended (KL: the moments, see
/// [`AutoencoderKl::encode_tiled`]). An image that fits in one tile is encoded in one call.
pub fn tiled_encode<F>(x: &Tensor, f: usize, cfg: &TileConfig, encode: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    tiled_apply(x, f, 1, cfg, "tiled encode", encode)
}

impl AutoencoderKl {
    /// [`AutoencoderKl::decode`], tiled. [`TileMode::SharedNorm`]: `post_quant_conv` and the decoder's
    /// latent-resolution part on the whole latent, the rest tile by tile with shared statistics
    /// ([`Decoder::forward_shared_tiles`]; tiles of `cfg.tile()` latents, `cfg.overlap()` unused).
    /// [`TileMode::Independent`]: [`tiled_decode`] of the whole decode. A latent that fits in one tile is
    /// decoded untiled in both modes.
    pub fn decode_tiled(&self, z: &Tensor, cfg: &TileConfig) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        if h <= cfg.tile && w <= cfg.tile {
            return self.decode(z);
        }
        match cfg.mode {
            TileMode::SharedNorm => {
                let z = self.check_latent(z)?;
                self.decoder()
                    .forward_shared_tiles(&self.post_quant_conv().forward(z)?, cfg.tile)
            }
            TileMode::Independent => {
                let f = self.config().ddconfig.downsample_factor();
                tiled_decode(z, f, cfg, |t| self.decode(t))
            }
        }
    }

    /// [`AutoencoderKl::encode`], tiled. [`TileMode::SharedNorm`]: the encoder's full-resolution part tile by
    /// tile with shared statistics ([`Encoder::forward_shared_tiles`]), the rest on the whole latent.
    /// [`TileMode::Independent`]: [`tiled_encode`], the mean and log-variance of the tiles blended (a
    /// log-variance blend is a geometric blend of variances), then clamped as untiled.
    pub fn encode_tiled(&self, x: &Tensor, cfg: &TileConfig) -> Result<DiagonalGaussian> {
        let f = self.config().ddconfig.downsample_factor();
        let (_, _, h, w) = x.dims4()?;
        if h <= cfg.tile * f && w <= cfg.tile * f {
            return self.encode(x);
        }
        match cfg.mode {
            TileMode::SharedNorm => {
                self.check_image(x)?;
                let h = self.encoder().forward_shared_tiles(x, cfg.tile)?;
                DiagonalGaussian::from_moments(&self.quant_conv().forward(&h)?)
            }
            TileMode::Independent => {
                let moments = tiled_encode(x, f, cfg, |t| {
                    let p = self.encode(t)?;
                    Tensor::cat(&[&p.mean, &p.logvar], 1)
                })?;
                DiagonalGaussian::from_moments(&moments)
            }
        }
    }
}

impl VqModel {
    /// [`VqModel::decode`] (quantise, then decode), tiled as [`AutoencoderKl::decode_tiled`]; quantising is
    /// per pixel, so it runs on the whole latent in the shared mode and per tile in the independent one.
    pub fn decode_tiled(&self, h: &Tensor, cfg: &TileConfig) -> Result<Tensor> {
        let (_, c, lh, lw) = h.dims4()?;
        if lh <= cfg.tile && lw <= cfg.tile {
            return self.decode(h);
        }
        match cfg.mode {
            TileMode::SharedNorm => {
                if c != self.config().embed_dim {
                    return self.decode(h); // its channel-count error
                }
                let z_q = self.quantize(h)?.z_q;
                let (_, decoder, _, post_quant_conv) = self.parts();
                decoder.forward_shared_tiles(&post_quant_conv.forward(&z_q)?, cfg.tile)
            }
            TileMode::Independent => {
                tiled_decode(h, self.downsample_factor(), cfg, |t| self.decode(t))
            }
        }
    }

    /// [`VqModel::encode`], tiled as [`AutoencoderKl::encode_tiled`] (the independent mode blends `h`).
    pub fn encode_tiled(&self, x: &Tensor, cfg: &TileConfig) -> Result<Tensor> {
        let f = self.downsample_factor();
        let (_, c, ih, iw) = x.dims4()?;
        let fits = ih <= cfg.tile * f && iw <= cfg.tile * f;
        if fits || c != self.config().ddconfig.in_channels || ih % f != 0 || iw % f != 0 {
            return self.encode(x); // the untiled pass, or its input error
        }
        match cfg.mode {
            TileMode::SharedNorm => {
                let (encoder, _, quant_conv, _) = self.parts();
                quant_conv.forward(&encoder.forward_shared_tiles(x, cfg.tile)?)
            }
            TileMode::Independent => tiled_encode(x, f, cfg, |t| self.encode(t)),
        }
    }
}

impl FirstStage {
    /// [`FirstStage::decode`], tiled per `cfg` (the identity needs no tiling).
    pub fn decode_tiled(&self, z: &Tensor, cfg: &TileConfig) -> Result<Tensor> {
        match self {
            FirstStage::Kl(m) => m.decode_tiled(z, cfg),
            FirstStage::Vq(m) => m.decode_tiled(z, cfg),
            FirstStage::Identity { .. } => self.decode(z),
        }
    }

    /// [`FirstStage::encode`], tiled per `cfg` (the identity needs no tiling).
    pub fn encode_tiled(&self, x: &Tensor, cfg: &TileConfig) -> Result<Encoded> {
        match self {
            FirstStage::Kl(m) => Ok(Encoded::Posterior(m.encode_tiled(x, cfg)?)),
            FirstStage::Vq(m) => Ok(Encoded::Latent(m.encode_tiled(x, cfg)?)),
            FirstStage::Identity { .. } => self.encode(x),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Shared-statistics mode
// ---------------------------------------------------------------------------------------------------------

/// A feature map `[B, C, H, W]` kept on the host in f32 between the synchronisation points (the GroupNorms)
/// of a shared-statistics pass.
#[derive(Debug, Clone)]
struct HostMap {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

/// Device and dtype the tiles are computed in.
#[derive(Debug, Clone)]
struct Ctx {
    device: candle_core::Device,
    dtype: DType,
}

impl Ctx {
    fn of(t: &Tensor) -> Self {
        Self {
            device: t.device().clone(),
            dtype: t.dtype(),
        }
    }
}

/// One tile of a shared-statistics segment: its core `[y0, y1) × [x0, x1)` (the pixels it is responsible
/// for; the cores of all tiles partition the map) and the crop `[cy0, cy1) × [cx0, cx1)` it reads (the core
/// plus the segment's receptive-field margin, clipped to the map).
#[derive(Debug, Clone, Copy)]
struct Geom {
    y0: usize,
    y1: usize,
    x0: usize,
    x1: usize,
    cy0: usize,
    cy1: usize,
    cx0: usize,
    cx1: usize,
}

impl Geom {
    /// Core offset inside the crop, in crop pixels.
    fn oy(&self) -> usize {
        self.y0 - self.cy0
    }
    fn ox(&self) -> usize {
        self.x0 - self.cx0
    }
    fn ch(&self) -> usize {
        self.y1 - self.y0
    }
    fn cw(&self) -> usize {
        self.x1 - self.x0
    }
}

/// The most input floats (channels × crop pixels; × 4 for an upsampling segment) of one tile in the shared
/// mode: 4 Mi floats, 16 MiB in f32, so that a 3x3 convolution's unfolded input stays near 150 MiB however
/// large [`TileConfig::tile`] is. Cores are a partition with no blending, so their size changes nothing but
/// speed and memory, and each segment may pick its own.
const SHARED_TILE_FLOATS: usize = 1 << 22;

/// The core side of a segment whose input has `channels` channels (`×4` given for an upsampling one): the
/// level's core `core`, capped by [`SHARED_TILE_FLOATS`] and rounded down to even (a stride-2 segment needs
/// even cores; at least 2).
fn segment_core(core: usize, channels: usize) -> usize {
    let cap = ((SHARED_TILE_FLOATS / channels.max(1)) as f64).sqrt() as usize;
    core.min(cap).max(2) & !1
}

/// Cores of side `core` (the last ones shorter) partitioning `h × w`, each with a margin of `pad`.
fn geoms(h: usize, w: usize, core: usize, pad: usize) -> Vec<Geom> {
    let core = core.max(1);
    let mut out = Vec::new();
    for y0 in (0..h).step_by(core) {
        for x0 in (0..w).step_by(core) {
            let (y1, x1) = ((y0 + core).min(h), (x0 + core).min(w));
            out.push(Geom {
                y0,
                y1,
                x0,
                x1,
                cy0: y0.saturating_sub(pad),
                cy1: (y1 + pad).min(h),
                cx0: x0.saturating_sub(pad),
                cx1: (x1 + pad).min(w),
            });
        }
    }
    out
}

impl HostMap {
    fn zeros(b: usize, c: usize, h: usize, w: usize) -> Self {
        Self {
            b,
            c,
            h,
            w,
            data: vec![0f32; b * c * h * w],
        }
    }

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (b, c, h, w) = t.dims4()?;
        let data = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { b, c, h, w, data })
    }

    fn to_tensor(&self, ctx: &Ctx) -> Result<Tensor> {
        Tensor::from_slice(
            &self.data,
            (self.b, self.c, self.h, self.w),
            &candle_core::Device::Cpu,
        )?
        .to_dtype(ctx.dtype)?
        .to_device(&ctx.device)
    }

    /// The crop of `g` as a tensor on the compute device.
    fn crop(&self, g: &Geom, ctx: &Ctx) -> Result<Tensor> {
        self.rect(g.cy0, g.cy1, g.cx0, g.cx1, ctx)
    }

    /// The core of `g` as a tensor on the compute device.
    fn core(&self, g: &Geom, ctx: &Ctx) -> Result<Tensor> {
        self.rect(g.y0, g.y1, g.x0, g.x1, ctx)
    }

    fn rect(&self, y0: usize, y1: usize, x0: usize, x1: usize, ctx: &Ctx) -> Result<Tensor> {
        let (th, tw) = (y1 - y0, x1 - x0);
        let mut v = Vec::with_capacity(self.b * self.c * th * tw);
        for plane in self.data.chunks_exact(self.h * self.w) {
            for y in y0..y1 {
                v.extend_from_slice(&plane[y * self.w + x0..y * self.w + x1]);
            }
        }
        Tensor::from_vec(v, (self.b, self.c, th, tw), &candle_core::Device::Cpu)?
            .to_dtype(ctx.dtype)?
            .to_device(&ctx.device)
    }

    /// Writes `t` `[B, C, th, tw]` at rows `y0..y0+th`, columns `x0..x0+tw`.
    fn write(&mut self, t: &Tensor, y0: usize, x0: usize, what: &str) -> Result<()> {
        let (b, c, th, tw) = t.dims4()?;
        if b != self.b || c != self.c || y0 + th > self.h || x0 + tw > self.w {
            candle_core::bail!(
                "{what}: a tile result {:?} does not fit at ({y0}, {x0}) of [{}, {}, {}, {}]",
                t.dims(),
                self.b,
                self.c,
                self.h,
                self.w
            );
        }
        let v = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (h, w) = (self.h, self.w);
        for (dst, src) in self
            .data
            .chunks_exact_mut(h * w)
            .zip(v.chunks_exact(th * tw))
        {
            for (i, row) in src.chunks_exact(tw).enumerate() {
                dst[(y0 + i) * w + x0..(y0 + i) * w + x0 + tw].copy_from_slice(row);
            }
        }
        Ok(())
    }

    /// GroupNorm statistics over the whole map: per (batch, group) mean, then the mean squared deviation
    /// from it (two passes, accumulated in f64), each pixel counted once.
    fn group_stats(&self, groups: usize) -> Result<GroupStats> {
        if groups == 0 || !self.c.is_multiple_of(groups) {
            candle_core::bail!(
                "shared GroupNorm statistics: {} channels do not split into {groups} groups",
                self.c
            );
        }
        let n = (self.c / groups) * self.h * self.w;
        let (mut mean, mut var) = (Vec::new(), Vec::new());
        for chunk in self.data.chunks_exact(n.max(1)) {
            let m = chunk.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let s = chunk.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
            mean.push(m);
            var.push(s);
        }
        Ok(GroupStats {
            batch: self.b,
            groups,
            mean,
            var,
        })
    }
}

/// `op` applied tile by tile to a map (cores of side `core`), with a margin of `pad` pixels per tile; `op`
/// gets the crop and the tile geometry and returns the output for the core only (the core's size changed
/// by `scale`). The outputs are assembled into a new map, whose channel count is that of the outputs.
fn map_tiles<F>(
    src: &HostMap,
    core: usize,
    pad: usize,
    scale: Resample,
    ctx: &Ctx,
    what: &str,
    op: F,
) -> Result<HostMap>
where
    F: Fn(&Tensor, &Geom) -> Result<Tensor>,
{
    let (oh, ow) = scale.out_size(src.h, src.w);
    let mut out: Option<HostMap> = None;
    let work_c = if scale == Resample::Up2 {
        4 * src.c
    } else {
        src.c
    };
    for g in geoms(src.h, src.w, segment_core(core, work_c), pad) {
        let y = op(&src.crop(&g, ctx)?, &g)?;
        let (y0, x0) = scale.out_pos(g.y0, g.x0);
        let out_c = y.dim(1)?;
        out.get_or_insert_with(|| HostMap::zeros(src.b, out_c, oh, ow))
            .write(&y, y0, x0, what)?;
    }
    out.ok_or_else(|| candle_core::Error::Msg(format!("{what}: empty feature map")))
}

/// How a segment changes the resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resample {
    Same,
    Up2,
    Down2,
}

impl Resample {
    fn out_size(self, h: usize, w: usize) -> (usize, usize) {
        self.out_pos(h, w)
    }
    fn out_pos(self, y: usize, x: usize) -> (usize, usize) {
        match self {
            Resample::Same => (y, x),
            Resample::Up2 => (2 * y, 2 * x),
            Resample::Down2 => (y / 2, x / 2),
        }
    }
}

/// The core of a `Same`-resolution segment output computed on the crop of `g`.
fn core_of(t: &Tensor, g: &Geom) -> Result<Tensor> {
    t.narrow(2, g.oy(), g.ch())?.narrow(3, g.ox(), g.cw())
}

/// A 3x3-conv segment `conv(swish(norm(x)))` with shared statistics (`norm_out`/`conv_out`, `norm1`/`conv1`).
fn norm_swish_conv(
    x: &HostMap,
    norm: &Norm,
    conv: &Conv2d,
    core: usize,
    ctx: &Ctx,
    what: &str,
) -> Result<HostMap> {
    let stats = x.group_stats(norm.groups())?;
    map_tiles(x, core, 1, Resample::Same, ctx, what, |t, g| {
        let y = conv.forward(&swish(&norm.forward_with_stats(t, &stats)?)?)?;
        core_of(&y, g)
    })
}

/// A [`ResnetBlock`] with shared GroupNorm statistics: `h = conv1(swish(norm1(x)))` tile by tile, then
/// `x + conv2(swish(norm2(h)))` tile by tile, written over `x` in place when the channel count stays
/// (a tile reads `x` only at its core for the residual, so overwriting cores is safe).
fn resnet_shared(block: &ResnetBlock, x: HostMap, core: usize, ctx: &Ctx) -> Result<HostMap> {
    let out_c = block.conv1.weight().dim(0)?;
    let h = norm_swish_conv(
        &x,
        &block.norm1,
        &block.conv1,
        core,
        ctx,
        "tiled ResnetBlock",
    )?;
    let stats = h.group_stats(block.norm2.groups())?;
    let mut out = match block.nin_shortcut {
        None => None,
        Some(_) => Some(HostMap::zeros(x.b, out_c, x.h, x.w)),
    };
    let mut x = x;
    for g in geoms(h.h, h.w, segment_core(core, h.c.max(x.c)), 1) {
        let r = block.conv2.forward(&swish(
            &block.norm2.forward_with_stats(&h.crop(&g, ctx)?, &stats)?,
        )?)?;
        let r = core_of(&r, &g)?;
        let xc = x.core(&g, ctx)?;
        let y = match &block.nin_shortcut {
            Some(s) => (s.forward(&xc)? + r)?,
            None => (xc + r)?,
        };
        match out.as_mut() {
            Some(o) => o.write(&y, g.y0, g.x0, "tiled ResnetBlock")?,
            None => x.write(&y, g.y0, g.x0, "tiled ResnetBlock")?,
        }
    }
    Ok(out.unwrap_or(x))
}

/// The ResNet blocks (and attention blocks, which run on the whole map) of one level.
fn level_blocks_shared<R>(
    level: &Level<R>,
    mut x: HostMap,
    core: usize,
    ctx: &Ctx,
) -> Result<HostMap> {
    for (i, block) in level.blocks.iter().enumerate() {
        x = resnet_shared(block, x, core, ctx)?;
        if let Some(attn) = level.attns.get(i) {
            // Attention is global: it runs on the whole map (as untiled; chunked over queries).
            let y = attn.forward(&x.to_tensor(ctx)?)?;
            x = HostMap::from_tensor(&y)?;
        }
    }
    Ok(x)
}

impl Decoder {
    /// The decoder with shared GroupNorm statistics (module doc, "Shared-statistics mode"): `conv_in` and
    /// the mid block at latent resolution on the whole latent, then every up level and `norm_out`/`conv_out`
    /// tile by tile with statistics over the whole map. `tile` is the core side in latent pixels. Equal
    /// to [`Decoder::forward`] up to float rounding.
    pub fn forward_shared_tiles(&self, z: &Tensor, tile: usize) -> Result<Tensor> {
        let ctx = Ctx::of(z);
        let h = self.mid.forward(&self.conv_in.forward(z)?)?;
        let mut x = HostMap::from_tensor(&h)?;
        drop(h);
        let mut core = tile.max(1);
        for level in self.up.iter().rev() {
            x = level_blocks_shared(level, x, core, &ctx)?;
            if let Some(up) = &level.resample {
                x = map_tiles(
                    &x,
                    core,
                    1,
                    Resample::Up2,
                    &ctx,
                    "tiled Upsample",
                    |t, g| {
                        let (_, _, th, tw) = t.dims4()?;
                        let y = up.forward(t)?;
                        debug_assert_eq!(y.dims()[2..], [2 * th, 2 * tw]);
                        y.narrow(2, 2 * g.oy(), 2 * g.ch())?
                            .narrow(3, 2 * g.ox(), 2 * g.cw())
                    },
                )?;
                core *= 2;
            }
        }
        let y = norm_swish_conv(
            &x,
            &self.norm_out,
            &self.conv_out,
            core,
            &ctx,
            "tiled decoder output",
        )?;
        drop(x);
        y.to_tensor(&ctx)
    }
}

impl Encoder {
    /// The encoder with shared GroupNorm statistics: `conv_in` and every down level tile by tile (cores of
    /// `tile·f` image pixels, statistics over the whole map), then the mid block, `norm_out` and `conv_out`
    /// at latent resolution on the whole map. Equal to [`Encoder::forward`] up to float rounding. The
    /// image sides must be multiples of `f`.
    pub fn forward_shared_tiles(&self, x: &Tensor, tile: usize) -> Result<Tensor> {
        let ctx = Ctx::of(x);
        let f = 1usize << self.down.len().saturating_sub(1);
        let (_, _, ih, iw) = x.dims4()?;
        if ih % f != 0 || iw % f != 0 {
            candle_core::bail!(
                "tiled encode: image {:?} must have sides divisible by f = {f}",
                x.dims()
            );
        }
        let mut core = tile.max(1) * f;
        let img = HostMap::from_tensor(x)?;
        let mut h = map_tiles(
            &img,
            core,
            1,
            Resample::Same,
            &ctx,
            "tiled encoder input",
            |t, g| core_of(&self.conv_in.forward(t)?, g),
        )?;
        drop(img);
        for level in &self.down {
            h = level_blocks_shared(level, h, core, &ctx)?;
            if let Some(down) = &level.resample {
                // Cores start at even rows/columns (`segment_core` is even), and a margin of 2 keeps crops
                // even too, so the stride-2 grid of every crop is the global one.
                h = map_tiles(
                    &h,
                    core,
                    2,
                    Resample::Down2,
                    &ctx,
                    "tiled Downsample",
                    |t, g| {
                        let y = down.forward(t)?;
                        y.narrow(2, g.oy() / 2, g.ch() / 2)?
                            .narrow(3, g.ox() / 2, g.cw() / 2)
                    },
                )?;
                core /= 2;
            }
        }
        let h = h.to_tensor(&ctx)?;
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_cores_are_even_and_capped() {
        // SD's finest level (256 input channels) with 512-pixel level cores: capped at 128 pixels.
        assert_eq!(segment_core(512, 256), 128);
        assert_eq!(segment_core(64, 512), 64);
        for (core, c) in [(1, 3), (3, 3), (7, 4096), (100, 1 << 30), (2, 0)] {
            let s = segment_core(core, c);
            assert!(
                s >= 2 && s.is_multiple_of(2),
                "core {core}, channels {c}: {s}"
            );
            assert!(s <= core.max(2), "core {core}, channels {c}: {s}");
        }
    }

    #[test]
    fn starts_cover_the_axis_with_full_tiles_and_at_least_the_overlap() {
        let cfg = TileConfig::new(8, 3).expect("valid");
        for len in 1..200 {
            let s = tile_starts(len, &cfg);
            let t = cfg.tile().min(len);
            assert_eq!(s[0], 0, "len {len}");
            assert_eq!(
                s[s.len() - 1] + t,
                len,
                "len {len}: last tile ends at the border"
            );
            for w in s.windows(2) {
                assert!(w[1] > w[0], "len {len}: starts {s:?} not increasing");
                assert!(
                    w[0] + t >= w[1] + cfg.overlap(),
                    "len {len}: overlap below 3 in {s:?}"
                );
            }
        }
    }
}
