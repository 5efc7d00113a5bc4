//! The paper's own inpainting model (CompVis `models/ldm/inpainting_big`: `__is_first_stage__` cond stage,
//! concat conditioning [x_t; E(masked image); mask]) against the references of
//! tools/fixtures/make_ldm_inpaint.py: the ORIGINAL `scripts/inpaint.py` (`make_batch` and its loop body, with
//! `DDIMSampler`, η = 0, the initial noise from `torch.Generator().manual_seed(seed)`), torch 2.15 CPU.
//! Tolerances (the bar): initial noise |x−y| ≤ 1e-6, final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3),
//! predicted and composited images max abs ≤ 2/255. Also: the spec built from the real inpainting_big YAML,
//! and named errors for bad inputs.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_pipeline::init_image::{load_image, Pad};
use ldm_pipeline::inpaint::{inpaint, ldm_inpaint, InpaintInput};
use ldm_pipeline::mask::Mask;
use ldm_pipeline::spec::{CondSpec, InpaintConcat};
use ldm_pipeline::{
    open, ConfigOverride, GenerateRequest, ImageRequest, ImageTask, PipelineError, SdModels,
    ValidImageRequest,
};
use serde_json::Value;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

const DIR: &str = "ldm-inpaint-tiny";

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn load() -> R<(SdModels, Vec<Value>, HashMap<String, Tensor>)> {
    let models = SdModels::build(
        open(&fixture(&format!("{DIR}/model.safetensors")), None)?,
        &Device::Cpu,
    )?;
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!(
        "{DIR}/cases.json"
    )))?)?;
    let cases = cases["cases"].as_array().ok_or("cases")?.clone();
    let refs =
        candle_core::safetensors::load(fixture(&format!("{DIR}/ref.safetensors")), &Device::Cpu)?;
    Ok((models, cases, refs))
}

fn max_abs(a: &Tensor, b: &Tensor) -> R<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Worst |x−y| / max(1e-3·|x+y|, 1e-3) over the tensor.
fn rel_ratio(a: &Tensor, b: &Tensor) -> R<f32> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    if a.len() != b.len() {
        return Err(format!("lengths {} vs {}", a.len(), b.len()).into());
    }
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1e-3 * (x + y).abs()).max(1e-3))
        .fold(0f32, f32::max))
}

fn input(c: &Value) -> R<InpaintInput> {
    let image = load_image(
        &fixture(&format!("{DIR}/{}", c["image"].as_str().ok_or("image")?)),
        "image",
    )?;
    let mask = Mask::load(&fixture(&format!(
        "{DIR}/{}",
        c["mask"].as_str().ok_or("mask")?
    )))?;
    Ok(InpaintInput::new(image, Some(mask), Pad::default())?)
}

fn image_request(c: &Value) -> R<ImageRequest> {
    Ok(ImageRequest {
        generate: GenerateRequest {
            steps: c["steps"].as_u64().ok_or("steps")? as usize,
            cfg_scale: c["guidance_scale"].as_f64().ok_or("guidance_scale")?,
            sampler: c["sampler"].as_str().ok_or("sampler")?.into(),
            eta: c["eta"].as_f64().ok_or("eta")?,
            seed: c["seed"].as_u64(),
            batch: c["batch"].as_u64().ok_or("batch")? as usize,
            ..GenerateRequest::default()
        },
        strength: 1.0,
    })
}

fn validate(models: &SdModels, req: &ImageRequest, inp: &InpaintInput) -> R<ValidImageRequest> {
    Ok(req.validate(&models.spec, ImageTask::Inpaint, inp.size(), 0)?)
}

#[test]
fn spec_of_the_fixture_and_of_the_real_inpainting_big_config() -> R {
    let opened = open(&fixture(&format!("{DIR}/model.safetensors")), None)?;
    let spec = &opened.spec;
    assert_eq!(spec.inpaint_concat(), Some(InpaintConcat::Ldm));
    assert!(!InpaintConcat::Ldm.mask_first() && InpaintConcat::Sd.mask_first());
    assert!(spec.is_inpainting());
    assert!(!spec.takes_prompt());
    assert_eq!(spec.cond, CondSpec::None);
    assert_eq!((spec.unet.in_channels, spec.unet.out_channels), (7, 3));
    assert_eq!(spec.vae_factor(), 4);
    assert_eq!(spec.latent_scale, 1.0);
    assert_eq!(spec.conditioning(), "none + mask and masked image");

    // the released model's own YAML (its architecture at full size; only the spec is built)
    let real = ConfigOverride::Yaml(fixture(
        "configs/latent-diffusion/models/ldm/inpainting_big/config.yaml",
    ));
    let big = open(&fixture(&format!("{DIR}/model.safetensors")), Some(&real))?;
    assert_eq!(big.spec.inpaint_concat(), Some(InpaintConcat::Ldm));
    assert_eq!(big.spec.unet.model_channels, 256);
    assert!(big.spec.unet.resblock_updown);
    eprintln!("inpainting_big: {}", big.spec.describe());
    assert!(
        big.spec.describe().starts_with("LDM inpainting"),
        "{}",
        big.spec.describe()
    );
    // ... and the tiny weights do not fit it: strict loading names the mismatches
    assert!(SdModels::build(big, &Device::Cpu).is_err());

    // `__is_first_stage__` with a UNet that is not 2·C + 1 channels wide is refused
    let yaml = std::fs::read_to_string(fixture(&format!("{DIR}/model.yaml")))?;
    let bad_yaml = yaml.replace("in_channels: 7", "in_channels: 6");
    assert_ne!(yaml, bad_yaml);
    let tmp = tempfile::tempdir()?;
    let bad_path = tmp.path().join("bad.yaml");
    std::fs::write(&bad_path, bad_yaml)?;
    let err = open(
        &fixture(&format!("{DIR}/model.safetensors")),
        Some(&ConfigOverride::Yaml(bad_path)),
    )
    .err()
    .ok_or("a 6-channel __is_first_stage__ UNet was accepted")?;
    assert!(err.to_string().contains("2 × 3 + 1"), "{err}");
    Ok(())
}

#[test]
fn ldm_inpainting_matches_the_original_inpaint_script() -> R {
    let (models, cases, refs) = load()?;
    for c in &cases {
        let name = c["name"].as_str().ok_or("name")?;
        let inp = input(c)?;
        let req = validate(&models, &image_request(c)?, &inp)?;

        // the stored initial noise is the seed's first draw
        let want = &refs[&format!("{name}.noise")];
        let drawn = TorchRng::new(req.base.seed).randn(want.elem_count());
        let drawn = Tensor::from_vec(drawn, want.dims(), &Device::Cpu)?;
        let noise_err = max_abs(&drawn, want)?;
        assert!(noise_err <= 1e-6, "{name}: noise off by {noise_err}");

        let out = ldm_inpaint(&models, &req, &inp, &mut |_, _| {})?;
        let lat = rel_ratio(&out.latents, &refs[&format!("{name}.latents")])?;
        let pred = max_abs(&out.predicted, &refs[&format!("{name}.predicted")])? * 255.0;
        let img = max_abs(&out.images, &refs[&format!("{name}.image")])? * 255.0;
        eprintln!(
            "{name}: latents {lat:.4}× tolerance, predicted max abs {pred:.4}/255, composite max abs {img:.4}/255"
        );
        assert!(lat <= 1.0, "{name}: latents off by {lat}× the tolerance");
        assert!(pred <= 2.0, "{name}: predicted image off by {pred}/255");
        assert!(img <= 2.0, "{name}: composite off by {img}/255");

        // kept pixels are the input's exactly; `inpaint` returns the composite
        let image01 = (ldm_pipeline::init_image::image_to_tensor(&inp.image, &Device::Cpu)? + 1.0)?
            .affine(0.5, 0.0)?;
        let keep = (1.0 - inp.mask.to_tensor(&Device::Cpu)?)?;
        let kept_err = max_abs(
            &out.images.broadcast_mul(&keep)?,
            &image01
                .broadcast_mul(&keep)?
                .repeat((req.base.batch, 1, 1, 1))?,
        )?;
        assert!(
            kept_err <= 1e-6,
            "{name}: kept pixels changed by {kept_err}"
        );
        let again = inpaint(&models, &req, &inp, &mut |_, _| {})?;
        assert_eq!(max_abs(&again.images, &out.images)?, 0.0);
        assert_eq!(max_abs(&again.latents, &out.latents)?, 0.0);
    }
    Ok(())
}

fn invalid_field(e: &PipelineError) -> Option<&'static str> {
    match e {
        PipelineError::Invalid { field, .. } => Some(field),
        _ => None,
    }
}

#[test]
fn bad_inputs_are_named_errors() -> R {
    let (models, cases, _) = load()?;
    let c = &cases[0];
    let inp = input(c)?;
    let base = image_request(c)?;
    // Boxed: PipelineError is large (clippy::result_large_err).
    let run = |req: &ImageRequest, inp: &InpaintInput| -> Result<(), Box<PipelineError>> {
        let v = req.validate(&models.spec, ImageTask::Inpaint, inp.size(), 0)?;
        ldm_inpaint(&models, &v, inp, &mut |_, _| {}).map_err(Box::new)?;
        Ok(())
    };

    // a mask of another size
    let small = Mask::keep_all(16, 16);
    let e = InpaintInput::new(inp.image.clone(), Some(small.clone()), Pad::default())
        .err()
        .ok_or("a 16x16 mask for a 32x32 image was accepted")?;
    assert_eq!(invalid_field(&e), Some("mask"), "{e}");
    let forged = InpaintInput {
        image: inp.image.clone(),
        mask: small,
    };
    let e = run(&base, &forged).err().ok_or("forged mask accepted")?;
    assert_eq!(invalid_field(&e), Some("mask"), "{e}");
    assert!(e.to_string().contains("16x16"), "{e}");

    // guidance requested
    let mut req = base.clone();
    req.generate.cfg_scale = 7.5;
    let e = run(&req, &inp).err().ok_or("guidance accepted")?;
    assert_eq!(invalid_field(&e), Some("cfg_scale"), "{e}");
    assert!(e.to_string().contains("no unconditional input"), "{e}");

    // a prompt for a model without text
    let mut req = base.clone();
    req.generate.prompt = "a red barn".into();
    let e = run(&req, &inp).err().ok_or("prompt accepted")?;
    assert_eq!(invalid_field(&e), Some("prompt"), "{e}");
    assert!(e.to_string().contains("not on text"), "{e}");
    let e = inpaint(
        &models,
        &req.validate(&models.spec, ImageTask::Inpaint, inp.size(), 0)?,
        &inp,
        &mut |_, _| {},
    )
    .err()
    .ok_or("prompt accepted by inpaint")?;
    assert_eq!(invalid_field(&e), Some("prompt"), "{e}");

    // a strength below 1 (the original always starts from pure noise)
    let mut req = base.clone();
    req.strength = 0.5;
    let e = run(&req, &inp).err().ok_or("strength accepted")?;
    assert_eq!(invalid_field(&e), Some("strength"), "{e}");

    // not for img2img or txt2img
    let e = base
        .validate(&models.spec, ImageTask::Img2img, inp.size(), 0)
        .err()
        .ok_or("img2img accepted")?;
    assert_eq!(invalid_field(&e), Some("model"), "{e}");
    let e = base
        .generate
        .validate(&models.spec, 0)
        .err()
        .ok_or("txt2img accepted")?;
    assert_eq!(invalid_field(&e), Some("model"), "{e}");
    Ok(())
}
