//! Strict loading through the whole pipeline: a checkpoint with tensors missing, mis-shaped and unexpected is
//! refused with all of them named in one error.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ldm_pipeline::{open, SdModels};

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

#[test]
fn every_load_problem_is_reported_at_once() -> Result<(), Box<dyn std::error::Error>> {
    let mut tensors =
        candle_core::safetensors::load(fixture("sd1-tiny/model.safetensors"), &Device::Cpu)?;
    let unet_key = "model.diffusion_model.out.2.bias";
    let vae_key = "first_stage_model.decoder.conv_out.weight";
    let text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    tensors
        .remove(unet_key)
        .ok_or("fixture lacks the UNet key")?;
    tensors
        .remove(text_key)
        .ok_or("fixture lacks the text key")?;
    tensors.insert(
        vae_key.into(),
        Tensor::zeros((3, 32, 3, 1), DType::F16, &Device::Cpu)?,
    );
    tensors.insert(
        "model.diffusion_model.stray.weight".into(),
        Tensor::zeros(2, DType::F16, &Device::Cpu)?,
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    std::fs::copy(
        fixture("sd1-tiny/model.yaml"),
        dir.path().join("broken.yaml"),
    )?;

    let err = SdModels::build(open(&path, None)?, &Device::Cpu)
        .err()
        .ok_or("a broken checkpoint loaded")?;
    let msg = err.to_string();
    for needle in [
        "2 missing",
        unet_key,
        text_key,
        "1 of the wrong shape",
        "`first_stage_model.decoder.conv_out.weight` is [3, 32, 3, 1], expected [3, 32, 3, 3]",
        "1 unexpected",
        "model.diffusion_model.stray.weight",
        "broken.safetensors",
    ] {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    Ok(())
}
