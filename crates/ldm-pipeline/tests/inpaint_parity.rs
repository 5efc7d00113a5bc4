//! Whole inpainting runs against diffusers' StableDiffusionInpaintPipeline (fixtures/img2img, made by
//! tools/fixtures/make_img2img.py with torch 2.15.0, diffusers 0.42.1 and a CPU generator per seed): the
//! 9-channel sd1-inpaint-tiny (mask + masked-image latents concatenated) and the plain sd1-tiny (latent
//! blending), greyscale and RGB masks, strengths 0.6 to 1, CFG 1 and 5, a batch of 2, and outpainting by
//! edge padding. Tolerances: final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3); images ≤ 2/255.
mod common;

use common::*;
use ldm_pipeline::inpaint::inpaint;
use ldm_pipeline::ImageTask;

fn check(form: &str, suite: &str) -> R {
    let models = models(form)?;
    let refs = refs()?;
    let cases = cases(suite)?;
    let mut worst = Worst::default();
    for c in &cases {
        let input = inpaint_input(c)?;
        let req = validate(&models, c, ImageTask::Inpaint, input.size())?;
        let out = inpaint(&models, &req, &input, &mut |_, _| {})?;
        worst.check(&refs, &format!("{suite}.{}", c.name), &out)?;
    }
    worst.report(&format!("{suite} {form}"), cases.len());
    Ok(())
}

#[test]
fn nine_channel_inpainting_model_matches_diffusers() -> R {
    check("sd1-inpaint-tiny/model.safetensors", "inpaint9")
}

#[test]
fn plain_model_inpainting_by_latent_blending_matches_diffusers() -> R {
    check("sd1-tiny/model.safetensors", "inpaint4")
}

#[test]
fn plain_model_inpainting_from_the_diffusers_folder_matches_diffusers() -> R {
    check("sd1-tiny/diffusers", "inpaint4")
}
