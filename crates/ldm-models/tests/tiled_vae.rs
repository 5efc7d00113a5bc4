//! Tiled first-stage decode/encode (`ldm_models::autoencoder::tiled`).
//!
//! - The blend weights are a partition of unity: on every axis length 1..=300 (mostly not multiples of the
//!   tile) and several tile/overlap/factor combinations, the weights at each output pixel sum to 1 within
//!   1e-6, and tiling an exactly local operation (identity, nearest upsampling, average pooling) gives the
//!   untiled result within 1e-5.
//! - Shared-statistics mode (the default): tiled == untiled up to float rounding (1e-4) for decode and encode
//!   on the fixture VAE (fixtures/sd1-tiny, f = 2) and a random f = 4 VAE with what the fixture lacks.
//! - The issue's bar, tiled decode within 3/255 of the untiled one (max abs on [0, 1] images), on the latent
//!   of a natural photo (fixtures/tiled-vae/astronaut-512.png, skimage's astronaut) and a random latent: at
//!   256² by default, at 512² `#[ignore]`d for its cost (numbers in the report / test output).
//! - The independent-tiles mode stays available and is approximate.
//! - Degenerate configurations and mismatched networks are clear errors.
use std::cell::Cell;

use candle_core::Shape;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use ldm_models::autoencoder::tiled::axis_tiles;
use ldm_models::autoencoder::{
    tiled_decode, tiled_encode, AttnType, AutoencoderKl, AutoencoderKlConfig, DdConfig, FirstStage,
    TileConfig, TileConfigError, TileMode, VqModel, VqModelConfig,
};

#[allow(dead_code)] // the shared helpers; this file uses `load` and `fixture` only
mod common;
#[allow(dead_code)] // this file uses the configuration only
mod kl_fixture;
use common::{fixture, load};
use kl_fixture::tiny_vae_config;

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

/// The first stage of the tiny fixture models (as in tests/vae.rs): f = 2, 32 channels in 32 groups, one
/// ResNet block per level, attention only in the mid block.
fn tiny_vae() -> Result<AutoencoderKl> {
    let config = tiny_vae_config();
    let vb = VarBuilder::from_tensors(
        load("sd1-tiny/model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    );
    AutoencoderKl::new(&config, vb.pp("first_stage_model"))
}

/// Deterministic random weights, a function of the key only: conv kernels ~ U(−1, 1)·√(3/fan_in), norm
/// gains 1 ± 0.2, biases ± 0.1.
struct HashedWeights;

impl SimpleBackend for HashedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let dims = s.dims().to_vec();
        let n: usize = dims.iter().product();
        let u = hashed((1, 1, 1, n), seed)?.reshape(dims.as_slice())?;
        let t = if dims.len() > 1 {
            let fan_in: usize = dims[1..].iter().product();
            (u * (3.0 / fan_in as f64).sqrt())?
        } else if name.ends_with("weight") {
            ((u * 0.2)? + 1.0)?
        } else {
            (u * 0.1)?
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("hashed-weight backend: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A random f = 4 VAE exercising what the tiny fixture lacks: three levels (two downsamples / upsamples),
/// channel changes with `nin_shortcut`, 4 channels per GroupNorm group, and attention inside a level.
fn random_f4_vae() -> Result<AutoencoderKl> {
    let config = AutoencoderKlConfig {
        embed_dim: 3,
        ddconfig: DdConfig {
            ch: 16,
            out_ch: 3,
            ch_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![16], // level 1 (resolution 32 / 2)
            in_channels: 3,
            resolution: 32,
            z_channels: 3,
            double_z: true,
            num_groups: 4,
            attn_type: AttnType::Vanilla,
        },
    };
    let vb = VarBuilder::from_backend(Box::new(HashedWeights), DType::F32, Device::Cpu);
    AutoencoderKl::new(&config, vb)
}

/// A smooth test image in [−1, 1] (gradients, a disc, stripes, a little noise), `[b, 3, h, w]`.
fn synthetic_image(b: usize, h: usize, w: usize) -> Result<Tensor> {
    let noise = hashed((b, 3, h, w), 7)?.flatten_all()?.to_vec1::<f32>()?;
    let mut v = vec![0f32; b * 3 * h * w];
    for (i, p) in v.iter_mut().enumerate() {
        let (x, y, c) = (i % w, (i / w) % h, (i / (w * h)) % 3);
        let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
        let mut q = match c {
            0 => fx * 1.6 - 0.8,
            1 => (fy * 5.0).sin() * 0.6,
            _ => (fx * fy * 6.0).cos() * 0.5,
        };
        if (fx - 0.3).powi(2) + (fy - 0.65).powi(2) < 0.03 {
            q = 0.9 - 0.2 * c as f32;
        }
        if fx > 0.7 && (x / 3) % 2 == 0 {
            q = -q;
        }
        *p = (q + 0.05 * noise[i]).clamp(-1.0, 1.0);
    }
    Tensor::from_vec(v, (b, 3, h, w), &Device::Cpu)
}

/// fixtures/tiled-vae/astronaut-512.png (scikit-image's `astronaut`, a natural photo) in [−1, 1],
/// `[1, 3, 512, 512]`, 2×2-average-pooled `halvings` times.
fn astronaut(halvings: usize) -> Result<Tensor> {
    let path = fixture("tiled-vae/astronaut-512.png");
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("astronaut png header");
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("astronaut png data");
    assert_eq!(
        (info.width, info.height, info.color_type, info.bit_depth),
        (512, 512, png::ColorType::Rgb, png::BitDepth::Eight)
    );
    let hwc = Tensor::from_vec(buf[..512 * 512 * 3].to_vec(), (512, 512, 3), &Device::Cpu)?;
    let mut x = ((hwc.permute((2, 0, 1))?.to_dtype(DType::F32)? / 127.5)? - 1.0)?.unsqueeze(0)?;
    for _ in 0..halvings {
        x = x.avg_pool2d(2)?;
    }
    Ok(x)
}

fn to_unit(x: &Tensor) -> Result<Tensor> {
    ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)
}

/// max and mean |a − b| of two images after mapping [−1, 1] to [0, 1] (clamped), in 1/255 units.
fn image_err_255(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let (a, b) = (to_unit(a)?, to_unit(b)?);
    let max = max_abs(&a, &b)? * 255.0;
    let mean = (&a - &b)?.abs()?.mean_all()?.to_scalar::<f32>()? * 255.0;
    Ok((max, mean))
}

fn mean_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.mean_all()?.to_scalar::<f32>()
}

fn shared(tile: usize) -> TileConfig {
    cfg(tile, tile / 4) // the overlap is unused in the shared-statistics mode
}

/// Exactness of the shared-statistics mode: with cores partitioning the latent and crops covering every
/// convolution's receptive field, tiled == untiled up to float rounding (bar 1e-4 absolute on O(1) values),
/// for decode and encode, on the fixture VAE (f = 2, ragged last tiles) and a random f = 4 VAE (nin_shortcut,
/// 4 channels per group, attention inside a level, batch 2, tiles of 4 latents = 16 image pixels).
#[test]
fn shared_norm_tiled_equals_untiled_up_to_rounding() -> Result<()> {
    let cases: [(&str, AutoencoderKl, usize, usize, usize, usize); 2] = [
        ("sd1-tiny f=2", tiny_vae()?, 1, 72, 88, 16),
        ("random f=4", random_f4_vae()?, 2, 56, 40, 4),
    ];
    for (name, vae, b, h, w, tile) in cases {
        let f = vae.config().ddconfig.downsample_factor();
        let x = synthetic_image(b, h, w)?;
        let c = shared(tile);
        assert_eq!(c.mode(), TileMode::SharedNorm);
        let post = vae.encode(&x)?;
        let tiled = vae.encode_tiled(&x, &c)?;
        let e_mean = max_abs(&tiled.mean, &post.mean)?;
        let e_logvar = max_abs(&tiled.logvar, &post.logvar)?;
        let z = post.mean;
        let whole = vae.decode(&z)?;
        assert_eq!(whole.dims(), [b, 3, h, w]);
        let y = vae.decode_tiled(&z, &c)?;
        let e_dec = max_abs(&y, &whole)?;
        // A random latent too (uniform in [−1.7, 1.7]).
        let zr = (hashed((b, z.dim(1)?, h / f, w / f), 11)? * 1.7)?;
        let e_rand = max_abs(&vae.decode_tiled(&zr, &c)?, &vae.decode(&zr)?)?;
        eprintln!(
            "{name}: shared-norm tiled vs untiled, max |Δ| encode mean {e_mean:.2e} logvar {e_logvar:.2e}, \
             decode {e_dec:.2e} (random latent {e_rand:.2e})"
        );
        for (what, e) in [
            ("encode mean", e_mean),
            ("encode logvar", e_logvar),
            ("decode", e_dec),
            ("decode of a random latent", e_rand),
        ] {
            assert!(e <= 1e-4, "{name}: {what} differs by {e}");
        }
        // The independent mode is a real alternative (and differs visibly on this small, non-stationary input).
        let ind = vae.decode_tiled(&z, &c.with_mode(TileMode::Independent))?;
        assert_eq!(ind.dims(), whole.dims());
        assert!(
            max_abs(&ind, &whole)? > 1e-3,
            "{name}: independent tiles unexpectedly exact"
        );
    }
    Ok(())
}

/// The VQ fixtures of tools/fixtures/make_vq_tiny.py (as in tests/vq_parity.rs): `f4` (f = 4, attention
/// inside level 2) and `f8-noattn` (f = 8, `attn_type: none`).
fn vq_fixture(model: &str) -> Result<VqModel> {
    let (ch_mult, attn_resolutions, z_channels, n_embed, attn_type) = match model {
        "f4" => (vec![1, 1, 1], vec![8], 3, 64, AttnType::Vanilla),
        _ => (vec![1, 1, 1, 1], vec![], 4, 32, AttnType::None),
    };
    let config = VqModelConfig {
        embed_dim: 3,
        n_embed,
        ddconfig: DdConfig {
            ch: 32,
            out_ch: 3,
            ch_mult,
            num_res_blocks: 1,
            attn_resolutions,
            in_channels: 3,
            resolution: 32,
            z_channels,
            double_z: false,
            num_groups: 32,
            attn_type,
        },
    };
    let weights = load(&format!("vq-tiny/{model}/model.safetensors"))?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    VqModel::new(&config, vb.pp("first_stage_model"))
}

/// The same exactness for the VQ first stage, through `FirstStage` (quantising on the whole latent).
#[test]
fn shared_norm_tiled_vq_equals_untiled_up_to_rounding() -> Result<()> {
    for model in ["f4", "f8-noattn"] {
        let stage = FirstStage::Vq(vq_fixture(model)?);
        let f = stage.downsample_factor();
        let x = synthetic_image(1, 80, 96)?;
        let c = shared(16 / f * 2); // 32-pixel cores
        let h = stage.encode(&x)?.mode().clone();
        let ht = stage.encode_tiled(&x, &c)?.mode().clone();
        let e_enc = max_abs(&ht, &h)?;
        let e_dec = max_abs(&stage.decode_tiled(&h, &c)?, &stage.decode(&h)?)?;
        eprintln!("vq {model}: shared-norm tiled vs untiled, max |Δ| encode {e_enc:.2e}, decode {e_dec:.2e}");
        assert!(
            e_enc <= 1e-4 && e_dec <= 1e-4,
            "vq {model}: {e_enc} / {e_dec}"
        );
    }
    Ok(())
}

/// The issue's bar at 256² (CI size): shared-norm tiled decode within 3/255 of untiled (max abs on [0, 1]
/// images), with `TileConfig::default()` (64-latent tiles, here 2 × 2) and 32-latent tiles (4 × 4), on the
/// latent of a natural photo (fixtures/tiled-vae/astronaut-512.png average-pooled to 256², encoded untiled)
/// and on a random latent. Also the shared-norm tiled encode of that photo against the untiled encode.
#[test]
fn issue_3_tiled_decode_within_3_over_255_of_untiled_on_256_image() -> Result<()> {
    check_issue_bar(1)
}

/// The issue's bar on a 512² image (the astronaut at full size, latent 256²: 4 × 4 default tiles); as the
/// 256² test. Ignored for its cost on 2 shared cores (three passes with attention over 65 536 latent pixels).
#[test]
#[ignore = "several minutes on 2 shared cores; the 256² test checks the same in CI"]
fn issue_3_tiled_decode_within_3_over_255_of_untiled_on_512_image() -> Result<()> {
    check_issue_bar(0)
}

fn check_issue_bar(halvings: usize) -> Result<()> {
    let vae = tiny_vae()?;
    let x = astronaut(halvings)?;
    let n = x.dim(2)?;
    let t0 = std::time::Instant::now();
    let post = vae.encode(&x)?;
    let t_enc = t0.elapsed().as_secs_f32();
    let t0 = std::time::Instant::now();
    let tiled = vae.encode_tiled(&x, &TileConfig::default())?;
    let t_enc_tiled = t0.elapsed().as_secs_f32();
    let e_mean = max_abs(&tiled.mean, &post.mean)?;
    let zf = post.mean.flatten_all()?;
    let spread = zf.max(0)?.to_scalar::<f32>()? - zf.min(0)?.to_scalar::<f32>()?;
    eprintln!(
        "{n}² astronaut: shared-norm tiled encode vs untiled: posterior mean max |Δ| {e_mean:.3e} \
         (mean {:.3e}), logvar max |Δ| {:.3e}, latent range {spread:.3} ({t_enc:.1} s untiled, \
         {t_enc_tiled:.1} s tiled)",
        mean_abs(&tiled.mean, &post.mean)?,
        max_abs(&tiled.logvar, &post.logvar)?
    );
    assert!(e_mean <= 1e-3, "tiled encode mean differs by {e_mean}");
    let z = post.mean;
    let zr = (hashed(z.dims4()?, 5)? * 1.7)?;
    for (what, z) in [("astronaut latent", &z), ("random latent", &zr)] {
        let t0 = std::time::Instant::now();
        let whole = vae.decode(z)?;
        let t_whole = t0.elapsed().as_secs_f32();
        let configs: &[TileConfig] = if what == "random latent" {
            &[TileConfig::default()]
        } else {
            &[TileConfig::default(), shared(32)]
        };
        for c in configs {
            let t0 = std::time::Instant::now();
            let y = vae.decode_tiled(z, c)?;
            let t_tiled = t0.elapsed().as_secs_f32();
            let (max, mean) = image_err_255(&y, &whole)?;
            eprintln!(
                "{n}² {what}, {}-latent shared-norm tiles: tiled vs untiled decode max {max:.4}/255, \
                 mean {mean:.5}/255 ({t_whole:.1} s untiled, {t_tiled:.1} s tiled)",
                c.tile()
            );
            assert!(
                max <= 3.0,
                "{what}: tiled decode differs by {max}/255 (bar 3/255)"
            );
        }
    }
    Ok(())
}

/// The independent-tiles mode is approximate (per-tile statistics). Measured on the 256² astronaut latent
/// with default tiles; only sanity is asserted (finite, right shape, clearly not exact on this VAE).
#[test]
fn independent_tiles_are_approximate() -> Result<()> {
    let vae = tiny_vae()?;
    let x = astronaut(2)?; // 128², latent 64²
    let z = vae.encode(&x)?.mean;
    let whole = vae.decode(&z)?;
    let c = cfg(24, 8).with_mode(TileMode::Independent);
    let y = vae.decode_tiled(&z, &c)?;
    let (max, mean) = image_err_255(&y, &whole)?;
    eprintln!("128² astronaut, independent 24/8 tiles: max {max:.2}/255, mean {mean:.3}/255");
    assert!(max.is_finite() && max > 3.0);
    let ys = vae.decode_tiled(&z, &cfg(24, 8))?;
    let (smax, _) = image_err_255(&ys, &whole)?;
    assert!(
        smax <= 0.05,
        "shared-norm 24-latent tiles differ by {smax}/255"
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
