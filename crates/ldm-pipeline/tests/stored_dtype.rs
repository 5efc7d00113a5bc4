//! Inference keeps an fp16/bf16 checkpoint's matrices and kernels in their stored dtype on the CPU
//! (`StrictLoader::keep_stored_dtype`, half the weight memory of widening them at load). Linear and Conv2d widen
//! them per pass, so every network's output must be bit-identical to loading everything as f32.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ldm_core::weights::StrictLoader;
use ldm_models::autoencoder::FirstStage;
use ldm_pipeline::{open, SdModels};

type R = Result<(), Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn same(what: &str, a: &Tensor, b: &Tensor) -> R {
    let (a, b) = (
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
    );
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differ, 0, "{what}: {differ} of {} values differ", a.len());
    Ok(())
}

fn check(model: &str, stored: DType) -> R {
    let path = fixture(model);
    let dev = Device::Cpu;
    let opened = open(&path, None)?;
    let store = opened.store.clone();
    let some_matrix = "model.diffusion_model.out.2.weight";
    assert_eq!(store.dtype(some_matrix), Some(stored), "fixture dtype");
    let kept = SdModels::build(opened, &dev)?;
    let again = open(&path, None)?;
    let vb = StrictLoader::new(again.store.clone()).var_builder(DType::F32, &dev);
    let widened = SdModels::build_with(again.spec, again.tokenizer, vb, &dev)?;

    // The kept model really holds the stored dtype (the VAE's last convolution, via its accessor).
    let conv_out = |m: &SdModels| match &m.first_stage {
        FirstStage::Kl(ae) => Some(ae.decoder_conv_out().weight().dtype()),
        _ => None,
    };
    assert_eq!(conv_out(&kept), Some(stored));
    assert_eq!(conv_out(&widened), Some(DType::F32));

    let prompts = ["a red apple", ""];
    let (ca, cb) = (
        kept.encode_prompts(&prompts)?,
        widened.encode_prompts(&prompts)?,
    );
    same("text encoder", &ca, &cb)?;
    let c = kept.spec.unet.in_channels;
    let x = Tensor::randn(0f32, 1.0, (2, c, 8, 8), &dev)?;
    let t = Tensor::new(&[999f32, 10.0], &dev)?;
    same(
        "UNet",
        &kept.unet.forward(&x, &t, &ca)?,
        &widened.unet.forward(&x, &t, &ca)?,
    )?;
    let z = x.narrow(1, 0, 4.min(c))?;
    same(
        "first stage decode",
        &kept.first_stage.decode(&z)?,
        &widened.first_stage.decode(&z)?,
    )?;
    Ok(())
}

#[test]
fn fp16_sd1_is_bit_identical_to_widening_at_load() -> R {
    check("sd1-tiny/model.safetensors", DType::F16)
}

#[test]
fn bf16_sd2_is_bit_identical_to_widening_at_load() -> R {
    check("sd2v-tiny/model.safetensors", DType::BF16)
}
