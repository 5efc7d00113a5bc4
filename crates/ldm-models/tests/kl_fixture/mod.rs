//! The KL first-stage parity check of the tiny fixtures, shared by `vae.rs` (default convolution algorithm)
//! and `winograd_parity.rs` (Winograd for every 3×3 convolution).
use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use ldm_models::autoencoder::{AutoencoderKl, AutoencoderKlConfig, DdConfig};

use crate::common::{assert_close, load};

/// The first stage of every tiny fixture model (FIXTURE_CONTRACT.md).
pub fn tiny_vae_config() -> AutoencoderKlConfig {
    AutoencoderKlConfig {
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
    }
}

/// Encodes and decodes with the first stage of fixture `model`, against diffusers' references, to
/// |x − y| ≤ max(1e-4·|x + y|, `floor`).
pub fn check_vae_fixture(model: &str, floor: f32) -> Result<()> {
    let weights = load(&format!("{model}/model.safetensors"))?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let vae = AutoencoderKl::new(&tiny_vae_config(), vb.pp("first_stage_model"))?;
    let refs = load(&format!("{model}/ref.safetensors"))?;
    let posterior = vae.encode(&refs["vae.image"])?;
    assert_close(
        &format!("{model} vae.mean"),
        &posterior.mean,
        &refs["vae.mean"],
        1e-4,
        floor,
    )?;
    assert_close(
        &format!("{model} vae.logvar"),
        &posterior.logvar,
        &refs["vae.logvar"],
        1e-4,
        floor,
    )?;
    let decoded = vae.decode(&refs["vae.z"])?;
    assert_close(
        &format!("{model} vae.decoded"),
        &decoded,
        &refs["vae.decoded"],
        1e-4,
        floor,
    )?;
    Ok(())
}
