//! Tiled first-stage decode/encode (`ldm_models::autoencoder::tiled`).
//!
//! - The blend weights are a partition of unity: on every axis length 1..=300 (mostly not multiples of the
//!   tile) and several tile/overlap/factor combinations, the weights at each output pixel sum to 1 within
//!   1e-6, and tiling an exactly local operation (identity, nearest upsampling, average pooling) gives the
//!   untiled result within 1e-5.
//! - With the tiny KL VAE of fixtures/sd1-tiny (f = 2, from tools/fixtures/make_sd_tiny.py) on a 512² image
//!   (latent 256², 64-latent tiles with 16-latent overlaps: 5 × 5 tiles): the issue's bar, tiled decode within
//!   3/255 of the untiled one (max abs on [0, 1] images), and tiled encode close to untiled. Both are
//!   `#[ignore]`d and KNOWN TO FAIL today (per-tile GroupNorm/attention statistics; numbers at the tests).
//! - Degenerate configurations and mismatched networks are clear errors.
use std::cell::Cell;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::autoencoder::tiled::axis_tiles;
use ldm_models::autoencoder::{
    tiled_decode, tiled_encode, AutoencoderKl, AutoencoderKlConfig, DdConfig, TileConfig,
    TileConfigError,
};

#[allow(dead_code)] // the shared helpers; this file uses `load` only
mod common;
use common::load;

fn cfg(tile: usize, overlap: usize) -> TileConfig {
    TileConfig::new(tile, overlap).expect("valid test config")
}

/// A deterministic pseudo-random tensor in [-1, 1) (an integer hash; no global RNG).
fn hashed(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let data: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut h =
                (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h ^= h >> 31;
            h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
            h ^= h >> 29;
            (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

const CONFIGS: [(usize, usize); 8] = [
    (1, 0),
    (2, 1),
    (5, 0),
    (8, 3),
    (8, 7),
    (13, 5),
    (16, 4),
    (64, 16),
];

#[test]
fn blend_weights_sum_to_one_on_every_axis_length() {
    for (tile, overlap) in CONFIGS {
        let c = cfg(tile, overlap);
        for unit in [1, 2, 8] {
            for len in 1..=300usize {
                let tiles = axis_tiles(len, unit, &c);
                let mut sum = vec![0f64; len * unit];
                for t in &tiles {
                    assert_eq!(t.weights.len(), t.len * unit);
                    assert!(t.start + t.len <= len);
                    for (i, &w) in t.weights.iter().enumerate() {
                        assert!(
                            (0.0..=1.0).contains(&w),
                            "tile {tile}/{overlap}, unit {unit}, len {len}: weight {w}"
                        );
                        sum[t.start * unit + i] += w as f64;
                    }
                }
                for (p, s) in sum.iter().enumerate() {
                    assert!(
                        (s - 1.0).abs() <= 1e-6,
                        "tile {tile}/{overlap}, unit {unit}, len {len}: weights at {p} sum to {s}"
                    );
                }
                let expected_tiles = if len <= tile {
                    1
                } else {
                    (len - overlap).div_ceil(tile - overlap)
                };
                assert_eq!(
                    tiles.len(),
                    expected_tiles,
                    "len {len}, tile {tile}/{overlap}"
                );
            }
        }
    }
}

#[test]
fn tiling_a_local_operation_changes_nothing() -> Result<()> {
    // Sides that are not multiples of any tile; batch 2 and 3 channels.
    let x = hashed((2, 3, 37, 53), 1)?;
    for (tile, overlap) in CONFIGS {
        let c = cfg(tile, overlap);
        // f = 1, identity (a pixel-space "first stage").
        let y = tiled_decode(&x, 1, &c, |t| Ok(t.clone()))?;
        assert!(max_abs(&y, &x)? <= 1e-5, "identity, tile {tile}/{overlap}");
        // f = 4 decode: nearest upsampling, 3 → 5 channels (output channels need not match the input's).
        let up = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            Tensor::cat(&[t, &t.narrow(1, 0, 2)?], 1)?.upsample_nearest2d(4 * h, 4 * w)
        };
        let y = tiled_decode(&x, 4, &c, up)?;
        assert_eq!(y.dims(), [2, 5, 148, 212]);
        assert!(
            max_abs(&y, &up(&x)?)? <= 1e-5,
            "upsample, tile {tile}/{overlap}"
        );
        // f = 2 encode: 2×2 average pooling of a 74 × 106 image.
        let img = up(&x)?.narrow(2, 0, 74)?.narrow(3, 0, 106)?.contiguous()?;
        let pool = |t: &Tensor| t.avg_pool2d(2);
        let y = tiled_encode(&img, 2, &c, pool)?;
        assert_eq!(y.dims(), [2, 5, 37, 53]);
        assert!(
            max_abs(&y, &pool(&img)?)? <= 1e-5,
            "pool, tile {tile}/{overlap}"
        );
    }
    Ok(())
}

#[test]
fn inputs_within_one_tile_go_through_untiled() -> Result<()> {
    let x = hashed((1, 4, 16, 12), 2)?;
    let calls = Cell::new(0);
    let y = tiled_decode(&x, 2, &cfg(16, 4), |t| {
        calls.set(calls.get() + 1);
        assert_eq!(t.dims(), [1, 4, 16, 12]);
        t.upsample_nearest2d(32, 24)
    })?;
    assert_eq!((calls.get(), y.dims()), (1, &[1usize, 4, 32, 24][..]));
    // One side larger than the tile: tiled along that side only, full height per tile.
    calls.set(0);
    tiled_decode(&x, 2, &cfg(8, 2), |t| {
        calls.set(calls.get() + 1);
        let (_, _, h, w) = t.dims4()?;
        assert_eq!((h, w), (8, 8));
        t.upsample_nearest2d(2 * h, 2 * w)
    })?;
    assert_eq!(calls.get(), 3 * 2); // 16 → ⌈14/6⌉ = 3 rows, 12 → ⌈10/6⌉ = 2 columns
    Ok(())
}

#[test]
fn degenerate_configurations_are_clear_errors() -> Result<()> {
    assert_eq!(TileConfig::new(0, 0), Err(TileConfigError::ZeroTile));
    for overlap in [8, 9, 100] {
        let e = TileConfig::new(8, overlap).expect_err("overlap ≥ tile");
        assert_eq!(e, TileConfigError::OverlapNotBelowTile { tile: 8, overlap });
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("overlap {overlap}")) && msg.contains("tile size 8"),
            "{msg}"
        );
    }
    assert!(TileConfig::new(0, 0)
        .expect_err("zero")
        .to_string()
        .contains("tile size is 0"));
    assert_eq!(
        TileConfig::from_pixels(100, 8),
        Err(TileConfigError::PixelsNotMultiple {
            pixels: 100,
            factor: 8
        })
    );
    assert_eq!(
        TileConfig::from_pixels(512, 0),
        Err(TileConfigError::ZeroFactor)
    );
    assert_eq!(TileConfig::from_pixels(512, 8), Ok(TileConfig::default()));
    assert_eq!(
        TileConfig::from_pixels(0, 8),
        Err(TileConfigError::ZeroTile)
    );
    assert_eq!(TileConfig::default().stride(), 48);

    let x = hashed((1, 3, 20, 20), 3)?;
    // A network that does not scale by f.
    let e = tiled_decode(&x, 2, &cfg(8, 2), |t| Ok(t.clone())).expect_err("wrong factor");
    assert!(e.to_string().contains("expected [1, _, 16, 16]"), "{e}");
    // An image whose sides are not multiples of f.
    let e = tiled_encode(&x, 8, &cfg(1, 0), |t| t.avg_pool2d(8)).expect_err("20 % 8");
    assert!(e.to_string().contains("divisible by 8"), "{e}");
    let e = tiled_decode(&x, 0, &cfg(8, 2), |t| Ok(t.clone())).expect_err("f = 0");
    assert!(e.to_string().contains("at least 1"), "{e}");
    Ok(())
}

/// The first stage of the tiny fixture models (as in tests/vae.rs).
fn tiny_vae() -> Result<AutoencoderKl> {
    let config = AutoencoderKlConfig {
        embed_dim: 4,
        ddconfig: DdConfig {
            ch: 32,
            out_ch: 3,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![],
            in_channels: 3,
            resolution: 32,
            z_channels: 4,
            double_z: true,
            num_groups: 32,
            attn_type: Default::default(),
        },
    };
    let vb = VarBuilder::from_tensors(
        load("sd1-tiny/model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    );
    AutoencoderKl::new(&config, vb.pp("first_stage_model"))
}

/// A 512² test image in [−1, 1] that is not stationary: smooth colour gradients, a bright disc, a dark
/// square with hard edges, stripes in one corner and a little noise.
fn test_image_n(n: usize) -> Result<Tensor> {
    let noise = hashed((1, 3, n, n), 7)?.flatten_all()?.to_vec1::<f32>()?;
    let mut v = vec![0f32; 3 * n * n];
    for c in 0..3 {
        for y in 0..n {
            for x in 0..n {
                let (fy, fx) = (y as f32 / n as f32, x as f32 / n as f32);
                let mut p = match c {
                    0 => fx * 1.6 - 0.8,
                    1 => (fy * 5.0).sin() * 0.6,
                    _ => (fx * fy * 6.0).cos() * 0.5,
                };
                if (fx - 0.3).powi(2) + (fy - 0.65).powi(2) < 0.03 {
                    p = 0.9 - 0.2 * c as f32;
                }
                if (0.55..0.8).contains(&fx) && (0.15..0.4).contains(&fy) {
                    p = -0.85;
                }
                if fx > 0.75 && fy > 0.75 && (x / 6) % 2 == 0 {
                    p = -p;
                }
                let i = (c * n + y) * n + x;
                v[i] = (p + 0.05 * noise[i]).clamp(-1.0, 1.0);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, n, n), &Device::Cpu)
}

fn to_unit(x: &Tensor) -> Result<Tensor> {
    ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)
}

/// The issue's bar on a 512² image: 25 tiles of 64 latents (128 px) with ≥ 16-latent overlaps.
///
/// KNOWN TO FAIL (2026-12-07, measured): max 255/255, mean 32.5/255. The tiny random VAE (32 channels in
/// 32 GroupNorm groups, i.e. one channel per group, and a mid attention over all latent pixels) makes the
/// per-tile statistics of a non-stationary image far from the global ones. Meeting the bar needs GroupNorm
/// statistics shared across tiles (a hook in `Decoder`), which is not built. Ignored also for its cost:
/// ~15 min on 2 shared cores (the untiled encode and decode each run attention over 65 536 pixels).
#[test]
#[ignore = "known to fail (max 255/255, per-tile GroupNorm/attention statistics) and ~15 min"]
fn issue_3_tiled_decode_within_3_over_255_of_untiled_on_512_image() -> Result<()> {
    let vae = tiny_vae()?;
    let z = vae.encode(&test_image_n(512)?)?.mean; // [1, 4, 256, 256]
    let whole = to_unit(&vae.decode(&z)?)?;
    let tiled = to_unit(&vae.decode_tiled(&z, &TileConfig::default())?)?;
    let err = max_abs(&tiled, &whole)? * 255.0;
    let mean_err = (&tiled - &whole)?.abs()?.mean_all()?.to_scalar::<f32>()? * 255.0;
    eprintln!("tiled decode vs untiled: max {err:.3}/255, mean {mean_err:.4}/255");
    assert!(err <= 3.0, "tiled decode differs by {err}/255 (bar 3/255)");
    Ok(())
}

/// Tiled encode against untiled on the posterior mean, bar 5 % of the latent's range.
///
/// KNOWN TO FAIL, for the reason above: at 128² (latent 64²) the measured max |Δmean| is 3.00 / 3.23 / 2.11
/// (mean 0.35 / 0.27 / 0.15) for tiles 16/4, 32/8, 48/16, on a latent range of 5.46. Not measured at 512²
/// (the untiled encode alone takes ~7 min here).
#[test]
#[ignore = "known to fail (per-tile GroupNorm/attention statistics) and ~10 min"]
fn tiled_encode_close_to_untiled_on_512_image() -> Result<()> {
    let vae = tiny_vae()?;
    let x = test_image_n(512)?;
    let z = vae.encode(&x)?.mean;
    let tiled = vae.encode_tiled(&x, &TileConfig::default())?.mean;
    let zf = z.flatten_all()?;
    let spread = zf.max(0)?.to_scalar::<f32>()? - zf.min(0)?.to_scalar::<f32>()?;
    let err = max_abs(&tiled, &z)?;
    let mean_err = (&tiled - &z)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    eprintln!("tiled encode vs untiled (posterior mean): max {err:.4}, mean {mean_err:.5}, range {spread:.3}");
    assert!(
        err <= 0.05 * spread,
        "tiled encode mean differs by {err} (latent range {spread})"
    );
    Ok(())
}

#[test]
fn tiled_decode_of_a_module_closure_keeps_the_dtype() -> Result<()> {
    // A 1×1 "decoder" in f16 (a conv is local, so tiling is exact up to rounding).
    let w = hashed((3, 4, 1, 1), 9)?.to_dtype(DType::F16)?;
    let conv = candle_nn::Conv2d::new(w, None, Default::default());
    let z = hashed((1, 4, 30, 30), 4)?.to_dtype(DType::F16)?;
    let y = tiled_decode(&z, 1, &cfg(8, 3), |t| conv.forward(t))?;
    assert_eq!(y.dtype(), DType::F16);
    let err = max_abs(
        &y.to_dtype(DType::F32)?,
        &conv.forward(&z)?.to_dtype(DType::F32)?,
    )?;
    assert!(err <= 1e-2, "f16 tiled 1×1 conv differs by {err}");
    Ok(())
}
