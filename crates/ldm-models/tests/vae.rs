//! AutoencoderKL parity with diffusers on the tiny fixtures of `tools/fixtures/make_sd_tiny.py`
//! (torch 2.15, diffusers 0.42.1; references in fp32 from the stored fp16/bf16 weights).
//! Tolerance, per element: |x − y| ≤ max(1e-4·|x + y|, 1e-5).

use candle_core::Module;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::autoencoder::blocks::AttnBlock;
use ldm_models::autoencoder::{AutoencoderKl, AutoencoderKlConfig, DiagonalGaussian};

mod common;
mod kl_fixture;
use common::{assert_close, load};
use kl_fixture::{check_vae_fixture, tiny_vae_config};

#[test]
fn sd1_tiny_fp16_single_file_matches_diffusers() -> Result<()> {
    check_vae_fixture("sd1-tiny", 1e-5)
}

#[test]
fn sd2v_tiny_bf16_single_file_matches_diffusers() -> Result<()> {
    check_vae_fixture("sd2v-tiny", 1e-5)
}

#[test]
fn mid_attention_in_query_chunks_equals_one_pass() -> Result<()> {
    let weights = load("sd1-tiny/model.safetensors")?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let attn = AttnBlock::new(64, 32, vb.pp("first_stage_model.decoder.mid.attn_1"))?;
    let x = Tensor::randn(0f32, 1.0, (2, 64, 12, 15), &Device::Cpu)?; // N = 180 pixels
    let whole = attn.forward(&x)?;
    // 7 query rows per chunk (2 images · 180 keys · 4 bytes each): 26 chunks, the last one ragged.
    let chunked = attn.with_score_budget(7 * 2 * 180 * 4).forward(&x)?;
    assert_close("mid.attn_1 chunked vs whole", &chunked, &whole, 0.0, 1e-6)?;
    Ok(())
}

#[test]
fn posterior_sample_is_mean_plus_std_times_noise() -> Result<()> {
    let dev = Device::Cpu;
    // logvar −40 is clamped to −30; 25 to 20.
    let moments =
        Tensor::new(&[1f32, -2., 0.0, -40., 2f32.ln(), 25.], &dev)?.reshape((1, 6, 1, 1))?;
    let q = DiagonalGaussian::from_moments(&moments)?;
    let noise = Tensor::new(&[0.5f32, -1.0, 2.0], &dev)?.reshape((1, 3, 1, 1))?;
    let got = q.sample(&noise)?.flatten_all()?.to_vec1::<f32>()?;
    // σ = exp(logvar / 2) = [e^−15, √2, e^10]
    let want = [
        1.0 + 0.5 * (-15f32).exp(),
        -2.0 - 2f32.sqrt(),
        2.0 * 10f32.exp(),
    ];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
    }
    assert_eq!(
        q.mode().flatten_all()?.to_vec1::<f32>()?,
        vec![1.0, -2.0, 0.0]
    );
    Ok(())
}

#[test]
fn encode_and_decode_reject_wrong_shapes() -> Result<()> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let vae = AutoencoderKl::new(&tiny_vae_config(), vb)?;
    let odd = Tensor::zeros((1, 3, 31, 32), DType::F32, &Device::Cpu)?;
    assert!(
        vae.encode(&odd).is_err(),
        "sides must be multiples of f = 2"
    );
    let z = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu)?;
    assert!(
        vae.decode(&z).is_err(),
        "decoder needs embed_dim = 4 channels"
    );
    Ok(())
}

#[test]
fn sd_preset_is_kl_f8_with_four_latent_channels() {
    let cfg = AutoencoderKlConfig::sd();
    assert_eq!(cfg.ddconfig.downsample_factor(), 8);
    assert_eq!(cfg.embed_dim, 4);
}
