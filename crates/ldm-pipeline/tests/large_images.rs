//! Large images (issue 3, "Large images"; Rombach et al. 2022, Sec. 4.3.2): the UNet is fully convolutional, so
//! txt2img runs on latents larger than the training size; the result decodes through the tiled first stage.
//!
//! On fixtures/sd1-tiny (trained size 32² pixels, latent 16², f = 2) at 2× (64²) and 4× (128²): txt2img runs,
//! the same seed gives bit-identical latents and images, and the latents decode through the tiled first stage
//! (several tiles, shared GroupNorm statistics: the default `TileMode`), deterministically and within 3/255 of
//! the untiled decode (the bar); the independent-tiles difference is printed for comparison.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_models::autoencoder::{TileConfig, TileMode};
use ldm_pipeline::txt2img::{decode, decode_with, txt2img, DecodeMode};
use ldm_pipeline::{open, SdModels, ValidRequest};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn request(side: usize, seed: u64) -> R<ValidRequest> {
    Ok(ValidRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: String::new(),
        steps: 4,
        cfg_scale: 5.0,
        sampler: "euler-a".parse()?, // ancestral: per-step noise is drawn too, so determinism covers it
        karras: false,
        eta: 0.0,
        width: side,
        height: side,
        seed,
        batch: 1,
        noise: None,
        decode: Default::default(),
    })
}

fn values(t: &Tensor) -> R<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> R<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// txt2img at `scale`× the training size: shape, finiteness, determinism, tiled decode.
fn check_scale(models: &SdModels, scale: usize, tiles: TileConfig) -> R {
    let side = 32 * scale;
    let latent = side / 2;
    let req = request(side, 11)?;
    let first = txt2img(models, &req, &mut |_, _| {})?;
    assert_eq!(first.latents.dims(), [1, 4, latent, latent]);
    assert_eq!(first.images.dims(), [1, 3, side, side]);
    let lat = values(&first.latents)?;
    assert!(
        lat.iter().all(|v| v.is_finite()),
        "{side}²: non-finite latents"
    );
    let std = (lat.iter().map(|v| v * v).sum::<f32>() / lat.len() as f32).sqrt();
    assert!(std > 0.1, "{side}²: latents collapsed (rms {std})");

    let second = txt2img(models, &req, &mut |_, _| {})?;
    assert_eq!(
        lat,
        values(&second.latents)?,
        "{side}²: same seed, different latents"
    );
    assert_eq!(
        values(&first.images)?,
        values(&second.images)?,
        "{side}²: same seed, different images"
    );

    // The tiled decode really tiles here (the latent is larger than a tile on both axes) ...
    assert!(latent > tiles.tile());
    let tiled = decode_with(models, &first.latents, DecodeMode::Tiled(tiles))?;
    let err = max_abs(&tiled, &first.images)? * 255.0;
    let n = latent.div_ceil(tiles.tile());
    let independent = decode_with(
        models,
        &first.latents,
        DecodeMode::Tiled(tiles.with_mode(TileMode::Independent)),
    )?;
    let err_ind = max_abs(&independent, &first.images)? * 255.0;
    eprintln!(
        "{side}² (latent {latent}², {n}×{n} shared-norm tiles of {}): tiled vs untiled decode max {err:.4}/255 \
         (independent tiles with overlap ≥ {}: {err_ind:.2}/255)",
        tiles.tile(),
        tiles.overlap()
    );
    assert!(err <= 3.0, "{side}²: tiled decode differs by {err}/255");
    let again = decode_with(models, &first.latents, DecodeMode::Tiled(tiles))?;
    assert_eq!(
        values(&tiled)?,
        values(&again)?,
        "{side}²: tiled decode not deterministic"
    );
    assert!(values(&tiled)?.iter().all(|v| (0.0..=1.0).contains(v)));
    // ... and `DecodeMode::Whole` is the plain decode.
    assert_eq!(
        values(&decode_with(models, &first.latents, DecodeMode::Whole)?)?,
        values(&decode(models, &first.latents)?)?
    );
    Ok(())
}

#[test]
fn txt2img_beyond_the_training_size_is_deterministic_and_decodes_tiled() -> R {
    let models = SdModels::build(
        open(&fixture("sd1-tiny/model.safetensors"), None)?,
        &Device::Cpu,
    )?;
    check_scale(&models, 2, TileConfig::new(16, 4)?)?; // latent 32²: 3 × 3 tiles
    check_scale(&models, 4, TileConfig::new(24, 8)?)?; // latent 64²: 4 × 4 tiles
    Ok(())
}
