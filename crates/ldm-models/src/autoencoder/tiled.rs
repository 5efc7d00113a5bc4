//! Tiled first-stage decode and encode with blended overlaps, so that a large image (2048² and up) goes
//! through the autoencoder in memory bounded by one tile, not by the image.
//!
//! The latent (decode) or image (encode) is cut into overlapping tiles; each tile goes through the network on
//! its own; each output tile is multiplied by a blend weight and added into one output buffer, then dropped.
//! Only one tile's activations live at a time; the output buffer (3 or 2·C channels, f32) is the only
//! image-sized allocation.
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
//! on both axes goes through the network untiled, so tiling never changes small images.
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
//! **What tiling changes.** The networks are not local: GroupNorm normalises with statistics over the
//! whole feature map, and the mid-block `AttnBlock` attends over all pixels. A tile sees only its own
//! statistics and its own pixels, so a tiled result differs from the untiled one wherever the content is not
//! stationary. diffusers' tiled decode has the same property and accepts it. How much it matters depends on
//! the weights: for the tiny random VAE of fixtures/sd1-tiny (one channel per GroupNorm group) a 512² decode
//! moves by up to 255/255 (mean 32/255) and an encode by about half the latent range
//! (tests/tiled_vae.rs, ignored tests). Sharing GroupNorm statistics across tiles (as the A1111 "Tiled VAE"
//! extension does) would remove most of it; it needs a statistics hook in `Decoder`/`Encoder` and is not
//! built. Blending itself is exact: tiling a local operation reproduces it (tests/tiled_vae.rs).
use candle_core::{DType, Result, Tensor};

use super::kl::{AutoencoderKl, DiagonalGaussian};

/// Tile side and overlap of a tiled encode/decode, in LATENT pixels. Build it with [`TileConfig::new`] (or
/// [`TileConfig::from_pixels`]); an invalid configuration cannot be constructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    tile: usize,
    overlap: usize,
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
        Ok(Self { tile, overlap })
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
    /// [`AutoencoderKl::decode`] through [`tiled_decode`].
    pub fn decode_tiled(&self, z: &Tensor, cfg: &TileConfig) -> Result<Tensor> {
        let f = self.config().ddconfig.downsample_factor();
        tiled_decode(z, f, cfg, |t| self.decode(t))
    }

    /// [`AutoencoderKl::encode`] through [`tiled_encode`]: the mean and log-variance of the tiles are
    /// blended (a log-variance blend is a geometric blend of variances), then clamped as untiled.
    pub fn encode_tiled(&self, x: &Tensor, cfg: &TileConfig) -> Result<DiagonalGaussian> {
        let f = self.config().ddconfig.downsample_factor();
        let moments = tiled_encode(x, f, cfg, |t| {
            let p = self.encode(t)?;
            Tensor::cat(&[&p.mean, &p.logvar], 1)
        })?;
        DiagonalGaussian::from_moments(&moments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
