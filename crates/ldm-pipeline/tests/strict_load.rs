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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix; the key map accepts those names as
/// aliases, and so must the pipeline's lazy loader.
#[test]
fn diffusers_text_encoder_saved_without_text_model_prefix_loads(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let folder = dir.path().join("sd1");
    copy_dir(&fixture("sd1-tiny/diffusers"), &folder)?;
    let te = folder.join("text_encoder/model.safetensors");
    let stripped: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(&te, &Device::Cpu)?
            .into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("text_model.")
                        .map(str::to_string)
                        .unwrap_or(k),
                    v,
                )
            })
            .collect();
    assert!(stripped.keys().all(|k| !k.starts_with("text_model.")));
    candle_core::safetensors::save(&stripped, &te)?;
    let models = SdModels::build(open(&folder, None)?, &Device::Cpu)?;
    let reference = SdModels::build(open(&fixture("sd1-tiny/diffusers"), None)?, &Device::Cpu)?;
    let prompts = ["a red apple"];
    let got = models
        .encode_prompts(&prompts)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = reference
        .encode_prompts(&prompts)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(got, want);
    Ok(())
}
