//! Bad img2img / inpainting inputs are refused by the library with errors that name the field (checked
//! against the fixture models' headers only; no weights are built).
use std::path::PathBuf;

use ldm_core::image::RgbImage;
use ldm_pipeline::init_image::{load_image, Pad};
use ldm_pipeline::inpaint::InpaintInput;
use ldm_pipeline::mask::Mask;
use ldm_pipeline::{open, GenerateRequest, ImageRequest, ImageTask, PipelineError};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn field(e: PipelineError) -> &'static str {
    match e {
        PipelineError::Invalid { field, .. } => field,
        other => panic!("not an invalid-request error: {other}"),
    }
}

fn request(strength: f64) -> ImageRequest {
    ImageRequest {
        generate: GenerateRequest {
            prompt: "x".into(),
            seed: Some(1),
            ..GenerateRequest::default()
        },
        strength,
    }
}

#[test]
fn strength_outside_zero_one_or_nan_is_refused() -> R {
    let spec = open(&fixture("sd1-tiny/model.safetensors"), None)?.spec;
    for s in [-0.01, 1.01, f64::NAN, f64::INFINITY] {
        for task in [ImageTask::Img2img, ImageTask::Inpaint] {
            let e = request(s)
                .validate(&spec, task, (32, 32), 0)
                .expect_err("refused");
            assert_eq!(field(e), "strength", "{s}");
        }
    }
    for s in [0.0, 0.5, 1.0] {
        let v = request(s).validate(&spec, ImageTask::Img2img, (32, 32), 0)?;
        assert_eq!((v.base.width, v.base.height, v.strength), (32, 32, s));
    }
    Ok(())
}

#[test]
fn sizes_models_and_noise_files_are_checked() -> R {
    let spec = open(&fixture("sd1-tiny/model.safetensors"), None)?.spec;
    let inpainting = open(&fixture("sd1-inpaint-tiny/model.safetensors"), None)?.spec;
    let r = request(0.5);
    let e = r
        .validate(&spec, ImageTask::Img2img, (30, 32), 0)
        .expect_err("odd");
    assert_eq!(field(e), "init-image");
    let e = r
        .validate(&spec, ImageTask::Inpaint, (32, 0), 0)
        .expect_err("empty");
    assert_eq!(field(e), "image");
    let e = r
        .validate(&inpainting, ImageTask::Img2img, (32, 32), 0)
        .expect_err("9-channel img2img");
    assert_eq!(field(e), "model");
    assert!(r
        .validate(&inpainting, ImageTask::Inpaint, (32, 32), 0)
        .is_ok());
    let mut with_noise = r.clone();
    with_noise.generate.noise = Some("n.npy".into());
    assert_eq!(
        field(
            with_noise
                .validate(&spec, ImageTask::Img2img, (32, 32), 0)
                .expect_err("noise")
        ),
        "noise"
    );
    let mut other_size = r.clone();
    other_size.generate.width = Some(64);
    assert_eq!(
        field(
            other_size
                .validate(&spec, ImageTask::Img2img, (32, 32), 0)
                .expect_err("size")
        ),
        "init-image"
    );
    Ok(())
}

#[test]
fn files_that_are_missing_or_not_images_are_refused() -> R {
    let e = load_image(&fixture("img2img/no-such.png"), "init-image").expect_err("missing");
    assert_eq!(field(e), "init-image");
    let e = load_image(&fixture("img2img/cases.json"), "image").expect_err("not an image");
    assert!(e.to_string().contains("not a readable image"), "{e}");
    let e = Mask::load(&fixture("img2img/cases.json")).expect_err("not an image");
    assert_eq!(field(e), "mask");
    Ok(())
}

#[test]
fn mask_of_another_size_or_no_mask_is_refused() -> R {
    let image = load_image(&fixture("img2img/init.png"), "image")?;
    let wide = Mask::load(&fixture("img2img/mask-wide.png"))?;
    let e = InpaintInput::new(image.clone(), Some(wide), Pad::default()).expect_err("size");
    assert_eq!(field(e), "mask");
    assert!(InpaintInput::new(image.clone(), None, Pad::default()).is_err());
    // outpainting without a mask repaints exactly the margins
    let small = RgbImage {
        width: 2,
        height: 2,
        data: vec![9; 12],
    };
    let pad = Pad::parse("1,0,1,2")?;
    let input = InpaintInput::new(small, None, pad)?;
    assert_eq!(input.size(), (4, 4));
    assert_eq!(input.mask.count(), 16 - 4);
    // a greyscale mask binarises at 128: mask.png has a soft-edged disc
    let m = Mask::load(&fixture("img2img/mask.png"))?;
    assert_eq!((m.width, m.height, m.count()), (32, 32, 384));
    Ok(())
}
