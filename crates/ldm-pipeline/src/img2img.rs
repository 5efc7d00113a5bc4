//! Image-to-image (SDEdit: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
//! Differential Equations", §3 and algorithm 1, as used by Rombach et al. 2022 for Stable Diffusion), step for
//! step as diffusers' `StableDiffusionImg2ImgPipeline.__call__` does it with a CPU `torch.Generator`:
//!
//! 1. the text context as in txt2img;
//! 2. the plan started part-way down the sampler's grid (`ldm_sampling::prepare_img2img`, diffusers'
//!    `get_timesteps`);
//! 3. x₀ = scale · z, z ~ q(z | x) = N(μ, σ²) of the VAE posterior of the init image: one `randn` of the
//!    latent's size from the seeded generator, then x₀ repeated over the batch;
//! 4. one `randn` [B, C, h, w] from the same generator, x_{t₀} = the scheduler's `add_noise(x₀, ε, t₀)`;
//! 5. the sampler's loop from there (its step noise from the same generator), then x = D(z₀ / scale).
//!
//! | code       | paper        |
//! |------------|--------------|
//! | `x0`       | x₀ = scale·z |
//! | `strength` | t₀ / T       |
//! | `noise`    | ε            |
use candle_core::{Device, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::autoencoder::Encoded;
use ldm_sampling::{add_noise, prepare_img2img, Plan};

use crate::error::{PipelineError, Result};
use crate::models::SdModels;
use crate::request::ValidImageRequest;
use crate::txt2img::{decode_with, prompt_context, Generated, Progress, Sampling};

/// The plan of `req` (its sampler started at its strength).
pub(crate) fn image_plan(models: &SdModels, req: &ValidImageRequest) -> Result<Plan> {
    let r = &req.base;
    prepare_img2img(
        r.sampler,
        &models.spec.scheduler,
        r.steps,
        r.karras,
        r.eta,
        req.strength,
    )
    .map_err(|e| match e {
        ldm_sampling::SamplingError::Strength(_) => {
            PipelineError::invalid("strength", e.to_string())
        }
        e => PipelineError::invalid("sampler", e.to_string()),
    })
}

/// One `randn` of `shape` from `rng`.
pub(crate) fn randn(rng: &mut dyn NoiseRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.randn(n), shape, device)?)
}

/// Scaled latents of `image` ([1, 3, H, W] in [−1, 1]): scale · (μ + σ·ε) with ε one `randn` from `rng`
/// (diffusers' `retrieve_latents(vae.encode(image), generator)`, `sample` mode). [1, C, h, w].
pub(crate) fn encode_sample(
    models: &SdModels,
    image: &Tensor,
    rng: &mut dyn NoiseRng,
) -> Result<Tensor> {
    let encoded = models
        .first_stage
        .encode(&image.to_dtype(models.dtype)?)
        .map_err(|e| PipelineError::Model(e.to_string()))?;
    let z = match &encoded {
        Encoded::Posterior(p) => {
            let eps = randn(rng, p.mean.dims(), &models.device)?.to_dtype(models.dtype)?;
            encoded.sample(&eps)?
        }
        Encoded::Latent(z) => z.clone(),
    };
    Ok((z.to_dtype(candle_core::DType::F32)? * models.spec.latent_scale)?)
}

/// Checks that `image` is [1, 3, H, W] of the request's size.
pub(crate) fn check_image(
    image: &Tensor,
    req: &ValidImageRequest,
    field: &'static str,
) -> Result<()> {
    let want = [1, 3, req.base.height, req.base.width];
    if image.dims() != want {
        return Err(PipelineError::invalid(
            field,
            format!(
                "image tensor has shape {:?}, this request needs {want:?}",
                image.dims()
            ),
        ));
    }
    Ok(())
}

/// Runs img2img for `req` from `init` ([1, 3, H, W] in [−1, 1], e.g. from
/// [`crate::init_image::image_to_tensor`]); `progress` is called after every model evaluation.
pub fn img2img(
    models: &SdModels,
    req: &ValidImageRequest,
    init: &Tensor,
    progress: Progress<'_>,
) -> Result<Generated> {
    if models.spec.is_inpainting() {
        return Err(PipelineError::invalid(
            "model",
            "img2img needs a plain (4-channel) model, not an inpainting one",
        ));
    }
    check_image(init, req, "init-image")?;
    let plan = image_plan(models, req)?;
    let r = &req.base;
    let context = prompt_context(models, r)?;
    let mut rng = TorchRng::new(r.seed);
    let x0 = encode_sample(models, init, &mut rng)?.repeat((r.batch, 1, 1, 1))?; // [B, C, h, w]
    let noise = randn(&mut rng, x0.dims(), &models.device)?;
    let latents = add_noise(&plan, &x0, &noise).map_err(|e| PipelineError::Model(e.to_string()))?;
    let sampler = Sampling {
        plan: &plan,
        models,
        req: r,
        context: Some(context),
        y: None,
        extra: None,
    };
    let latents = sampler.run(latents, &mut rng, None, progress)?;
    let images = decode_with(models, &latents, req.base.decode)?;
    Generated::on_cpu(latents, images)
}
