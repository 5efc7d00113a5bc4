//! Whole img2img runs against diffusers' StableDiffusionImg2ImgPipeline (fixtures/img2img, made by
//! tools/fixtures/make_img2img.py with torch 2.15.0, diffusers 0.42.1 and a CPU generator per seed):
//! eight samplers (DDIM η 0.5, Euler a, DPM++ 2M Karras, PLMS, Euler, LMS, Heun, DDPM), strengths 0.3 to 1,
//! CFG 1 and 5, a batch of 2; and SD 2.x v-prediction (sd2v-tiny: DDIM, Euler a). Tolerances: final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3); images ≤ 2/255.
mod common;

use common::*;
use ldm_pipeline::img2img::img2img;
use ldm_pipeline::init_image::{image_to_tensor, load_image};
use ldm_pipeline::ImageTask;

fn check(form: &str, suite: &str) -> R {
    let models = models(form)?;
    let refs = refs()?;
    let cases = cases(suite)?;
    let mut worst = Worst::default();
    for c in &cases {
        let img = load_image(&fixture(&format!("img2img/{}", c.image)), "init-image")?;
        let req = validate(&models, c, ImageTask::Img2img, (img.width, img.height))?;
        let init = image_to_tensor(&img, &models.device)?;
        let out = img2img(&models, &req, &init, &mut |_, _| {})?;
        worst.check(&refs, &format!("{suite}.{}", c.name), &out)?;
    }
    worst.report(&format!("{suite} {form}"), cases.len());
    Ok(())
}

#[test]
fn sd1_single_file_img2img_matches_diffusers() -> R {
    check("sd1-tiny/model.safetensors", "img2img")
}

#[test]
fn sd1_diffusers_folder_img2img_matches_diffusers() -> R {
    check("sd1-tiny/diffusers", "img2img")
}

#[test]
fn sd2v_single_file_img2img_matches_diffusers() -> R {
    check("sd2v-tiny/model.safetensors", "img2img-sd2v")
}

#[test]
fn sd2v_diffusers_folder_img2img_matches_diffusers() -> R {
    check("sd2v-tiny/diffusers", "img2img-sd2v")
}
