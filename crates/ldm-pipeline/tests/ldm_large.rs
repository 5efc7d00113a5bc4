//! Convolutional sampling beyond the training size (Rombach et al. 2022, Sec. 4.3.2): the UNet runs fully
//! convolutionally on a larger latent. On the tiny CompVis fixtures (trained at 32², latent 8²): semantic
//! synthesis from a 2× larger map (the fixture's map upsampled by 2, nearest) and class-conditional sampling at
//! 2×, both deterministic (same seed → bit-identical latents) and with the asked size.
use std::path::PathBuf;

use candle_core::Device;
use ldm_models::cond::SemanticMap;
use ldm_pipeline::{open, sample, Condition, GenerateRequest, SdModels};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn request(side: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        steps: 4,
        cfg_scale: 1.0,
        sampler: "ddim".into(),
        width: Some(side),
        height: Some(side),
        seed: Some(seed),
        ..GenerateRequest::default()
    }
}

fn upsample2(map: &SemanticMap) -> R<SemanticMap> {
    let (w, h) = (map.width, map.height);
    let mut labels = Vec::with_capacity(4 * w * h);
    for y in 0..2 * h {
        for x in 0..2 * w {
            labels.push(map.labels[(y / 2) * w + x / 2]);
        }
    }
    Ok(SemanticMap::from_labels(2 * w, 2 * h, labels, "map0 ×2")?)
}

#[test]
fn semantic_synthesis_at_twice_the_training_size_is_deterministic() -> R {
    let models = SdModels::build(
        open(&fixture("ldm-semantic-tiny/model.safetensors"), None)?,
        &Device::Cpu,
    )?;
    let map = SemanticMap::load(&fixture("ldm-semantic-tiny/map0.png"))?;
    let big = upsample2(&map)?;
    let run = |side: usize, m: &SemanticMap| -> R<ldm_pipeline::txt2img::Generated> {
        let req = request(side, 3).validate(&models.spec, 0)?;
        Ok(sample(
            &models,
            &req,
            &Condition::Semantic(vec![m.clone()]),
            &mut |_, _| {},
        )?)
    };
    let a = run(64, &big)?;
    let b = run(64, &big)?;
    assert_eq!(a.images.dims(), &[1, 3, 64, 64]);
    assert_eq!(a.latents.dims(), &[1, 3, 16, 16]);
    let d = (&a.latents - &b.latents)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0, "same seed, same latents");
    Ok(())
}

#[test]
fn class_conditional_sampling_at_twice_the_training_size_is_deterministic() -> R {
    let models = SdModels::build(
        open(&fixture("ldm-cin-tiny/model.safetensors"), None)?,
        &Device::Cpu,
    )?;
    let run = || -> R<ldm_pipeline::txt2img::Generated> {
        let mut r = request(64, 9);
        r.cfg_scale = 3.0;
        let req = r.validate(&models.spec, 0)?;
        Ok(sample(
            &models,
            &req,
            &Condition::Classes(vec![5]),
            &mut |_, _| {},
        )?)
    };
    let a = run()?;
    let b = run()?;
    assert_eq!(a.images.dims(), &[1, 3, 64, 64]);
    let d = (&a.images - &b.images)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0, "same seed, same image");
    Ok(())
}

/// Pixel space (f = 1, the paper's LDM-1): the tiny unconditional UNet with `IdentityFirstStage` as its first
/// stage runs on the image itself; the output is the final "latent" / scale mapped to [0, 1], at the latent's size.
#[test]
fn pixel_space_model_with_identity_first_stage_samples_images_directly() -> R {
    let tmp = tempfile::tempdir()?;
    let src = open(&fixture("ldm-uncond-tiny/model.safetensors"), None)?;
    let mut tensors = std::collections::HashMap::new();
    for k in src
        .store
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
    {
        tensors.insert(
            k.to_string(),
            src.store.load(k, candle_core::DType::F32, &Device::Cpu)?,
        );
    }
    let file = tmp.path().join("ldm1.safetensors");
    candle_core::safetensors::save(&tensors, &file)?;
    let yaml = std::fs::read_to_string(fixture("ldm-uncond-tiny/model.yaml"))?;
    let head = yaml.split("    first_stage_config:").next().ok_or("yaml")?;
    let yaml = format!(
        "{head}    first_stage_config:\n      target: ldm.models.autoencoder.IdentityFirstStage\n    cond_stage_config: __is_unconditional__\n"
    );
    std::fs::write(tmp.path().join("ldm1.yaml"), yaml)?;
    let models = SdModels::build(open(&file, None)?, &Device::Cpu)?;
    assert_eq!(models.spec.vae_factor(), 1);
    let req = request(16, 4).validate(&models.spec, 0)?;
    let out = sample(&models, &req, &Condition::None, &mut |_, _| {})?;
    assert_eq!(out.images.dims(), &[1, 3, 16, 16]);
    let expect = ((&out.latents / models.spec.latent_scale)? / 2.0)?
        .affine(1.0, 0.5)?
        .clamp(0f32, 1f32)?;
    let d = (&out.images - &expect)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(d < 1e-6, "identity decode: {d}");
    Ok(())
}
