//! Inpainting (Rombach et al. 2022, §4.5), step for step as diffusers' `StableDiffusionInpaintPipeline.__call__`
//! does it with a CPU `torch.Generator`, for both kinds of model:
//!
//! * a 9-channel inpainting UNet sees [x_t; m; scale·z(masked image)] (Stable Diffusion inpainting's
//!   `c_concat`), with m the mask at latent resolution;
//! * a plain 4-channel UNet samples as img2img does, and after every update the known region is reset to the
//!   image latents noised to the next level with the run's initial noise ([`ldm_sampling::KnownRegion`],
//!   a latent blend in the manner of RePaint without resampling, Lugmayr et al. 2022).
//!
//! Generator order (as diffusers): image posterior sample (4-channel models, or strength < 1), initial noise
//! [B, C, h, w], masked-image posterior sample (always: diffusers encodes it for both kinds), then step noise.
//! At strength 1 the initial latents are pure noise × `init_noise_sigma`; below 1, `add_noise` of the image
//! latents at the first level of the shortened plan. The mask (1 = repaint) is taken to latent resolution by
//! nearest neighbour (`F.interpolate` default: pixel (f·i, f·j)); the masked image is the image with repainted
//! pixels set to 0 (mid-grey in [−1, 1]). The output is the decoded latents (no overlay of the original).
//!
//! The paper's own inpainting model (CompVis `models/ldm/inpainting_big`, [`InpaintConcat::Ldm`]) runs as the
//! original `scripts/inpaint.py` does it, see [`ldm_inpaint`].
use candle_core::{Device, Tensor};
use ldm_core::image::RgbImage;
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::autoencoder::Encoded;
use ldm_sampling::{add_noise, guidance_enabled, prepare, KnownRegion};

use crate::error::{PipelineError, Result};
use crate::img2img::{check_image, encode_sample, image_plan, randn};
use crate::init_image::{image_to_tensor, pad_edge, Pad};
use crate::mask::Mask;
use crate::models::SdModels;
use crate::request::ValidImageRequest;
use crate::spec::InpaintConcat;
use crate::txt2img::{decode_with, initial_noise, prompt_context, Generated, Progress, Sampling};

/// An inpainting input: the image and its mask, of one size (after any outpainting padding).
#[derive(Debug, Clone, PartialEq)]
pub struct InpaintInput {
    pub image: RgbImage,
    pub mask: Mask,
}

impl InpaintInput {
    /// Pairs `image` with `mask` (which must have the image's size) and pads both by `pad` for outpainting:
    /// the image by edge replication ([`pad_edge`]), the mask with repaint. Without a mask, `pad` must be
    /// non-zero and only the margins are repainted.
    pub fn new(image: RgbImage, mask: Option<Mask>, pad: Pad) -> Result<Self> {
        let mask = match mask {
            Some(m) => {
                if (m.width, m.height) != (image.width, image.height) {
                    return Err(PipelineError::invalid(
                        "mask",
                        format!(
                            "the mask is {}x{}, the image {}x{}: they must be the same size",
                            m.width, m.height, image.width, image.height
                        ),
                    ));
                }
                m
            }
            None if !pad.is_zero() => Mask::keep_all(image.width, image.height),
            None => {
                return Err(PipelineError::invalid(
                    "mask",
                    "inpainting needs a mask (white = repaint), or a padding to outpaint",
                ))
            }
        };
        Ok(Self {
            image: pad_edge(&image, pad),
            mask: mask.pad(pad),
        })
    }

    /// (width, height) in pixels.
    pub fn size(&self) -> (usize, usize) {
        (self.image.width, self.image.height)
    }
}

/// `mask` [1, 1, H, W] at latent resolution [1, 1, H/f, W/f]: nearest neighbour, pixel (f·i, f·j).
pub fn mask_to_latent(mask: &Tensor, f: usize, device: &Device) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let rows: Vec<u32> = (0..h / f).map(|i| (i * f) as u32).collect();
    let cols: Vec<u32> = (0..w / f).map(|j| (j * f) as u32).collect();
    let rows = Tensor::new(rows.as_slice(), device)?;
    let cols = Tensor::new(cols.as_slice(), device)?;
    Ok(mask.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Runs inpainting for `req` on `input`; `progress` is called after every model evaluation. For the paper's
/// inpainting model ([`InpaintConcat::Ldm`]) this is [`ldm_inpaint`] and the images are its composites.
pub fn inpaint(
    models: &SdModels,
    req: &ValidImageRequest,
    input: &InpaintInput,
    progress: Progress<'_>,
) -> Result<Generated> {
    if models.spec.inpaint_concat() == Some(InpaintConcat::Ldm) {
        let out = ldm_inpaint(models, req, input, progress)?;
        return Generated::on_cpu(out.latents, out.images);
    }
    let dev = &models.device;
    let image = image_to_tensor(&input.image, dev)?; // [1, 3, H, W] in [−1, 1]
    check_image(&image, req, "image")?;
    let plan = image_plan(models, req)?;
    let r = &req.base;
    let b = r.batch;
    let nine = models.spec.is_inpainting();
    let strength_max = req.strength == 1.0;
    let context = prompt_context(models, r)?;
    let mut rng = TorchRng::new(r.seed);

    // diffusers' prepare_latents
    let image_latents = if !nine || !strength_max {
        Some(encode_sample(models, &image, &mut rng)?.repeat((b, 1, 1, 1))?) // [B, C, h, w]
    } else {
        None
    };
    let f = models.spec.vae_factor();
    let shape = [b, models.spec.latent_channels(), r.height / f, r.width / f];
    let noise = randn(&mut rng, &shape, dev)?;
    let latents = match (&image_latents, strength_max) {
        (Some(x0), false) => {
            add_noise(&plan, x0, &noise).map_err(|e| PipelineError::Model(e.to_string()))?
        }
        _ => (&noise * plan.init_noise_sigma)?,
    };

    // diffusers' prepare_mask_latents
    let mask = input.mask.to_tensor(dev)?; // [1, 1, H, W]
    let keep = (1.0 - &mask)?;
    let masked_image = image.broadcast_mul(&keep)?;
    let mask_latent = mask_to_latent(&mask, f, dev)?.repeat((b, 1, 1, 1))?; // [B, 1, h, w]
    let masked_latents = if nine {
        encode_sample(models, &masked_image, &mut rng)?.repeat((b, 1, 1, 1))?
    } else {
        // A plain UNet never sees it, but diffusers encodes it anyway: draw its posterior noise so that the
        // step noise that follows is the same.
        let n: usize = shape[1..].iter().product();
        let _ = rng.randn(n);
        Tensor::zeros(0, candle_core::DType::F32, dev)?
    };

    let sampler = |extra| Sampling {
        plan: &plan,
        models,
        req: r,
        context: Some(context.clone()),
        y: None,
        extra,
    };
    let latents = if nine {
        let mut extra = Tensor::cat(&[&mask_latent, &masked_latents], 1)?; // [B, 1 + C, h, w]
        if guidance_enabled(r.cfg_scale) {
            extra = Tensor::cat(&[&extra, &extra], 0)?;
        }
        sampler(Some(extra)).run(latents, &mut rng, None, progress)?
    } else {
        let Some(x0) = &image_latents else {
            return Err(PipelineError::Model(
                "invariant: a plain model's inpainting encodes the image".into(),
            ));
        };
        let known = KnownRegion {
            latents: x0,
            noise: &noise,
            mask: &mask_latent,
        };
        sampler(None).run(latents, &mut rng, Some(&known), progress)?
    };
    let images = decode_with(models, &latents, req.base.decode)?;
    Generated::on_cpu(latents, images)
}

/// What [`ldm_inpaint`] returns.
pub struct LdmInpainted {
    /// Final latents, [B, C, h, w].
    pub latents: Tensor,
    /// The decoded latents in [0, 1] before the composite, [B, 3, H, W].
    pub predicted: Tensor,
    /// The composite (1 − m)·image + m·predicted in [0, 1], [B, 3, H, W].
    pub images: Tensor,
}

/// Inpainting with the paper's own inpainting model (Rombach et al. 2022, §4.5; CompVis
/// `models/ldm/inpainting_big`: `LatentDiffusion` with `cond_stage_config: __is_first_stage__`, concat
/// conditioning, UNet input 2·C + 1 channels), step for step as the original `scripts/inpaint.py`:
///
/// 1. the mask m ∈ {0, 1} (grey ≥ 0.5 repainted, [`Mask`]) and the masked image (1 − m)·x in [0, 1]; then, as
///    the script's `make_batch` does for every input, both are mapped to [−1, 1] (so repainted pixels are −1,
///    black, and the mask channel is −1 (keep) / +1 (repaint));
/// 2. c = E(masked image), the first stage's deterministic encoding (VQ: the pre-quantisation latent; no
///    scale factor), and the mask taken to the latent's size by nearest neighbour (`F.interpolate` default:
///    pixel (f·i, f·j));
/// 3. the UNet sees [x_t; c; m] (the masked image first, then the mask: the opposite of SD's order);
/// 4. initial noise z_T [B, C, h, w]: one draw from the seeded CPU generator (`torch.randn` with
///    `torch.Generator().manual_seed(seed)`), then the sampler's loop (the script uses DDIM with η = 0);
/// 5. predicted = clamp((D(z₀) + 1)/2, 0, 1) (VQ first stages quantise z₀ first), and the composite in pixel
///    space, (1 − m)·x + m·predicted, which leaves the kept pixels exactly as given. (The script then saves
///    `composite · 255` truncated to `uint8`; ldm-rs's writers round instead.)
///
/// The model has no prompt and no unconditional input: a prompt, a guidance scale above 1 and a strength
/// below 1 (the script always starts from pure noise) are refused.
pub fn ldm_inpaint(
    models: &SdModels,
    req: &ValidImageRequest,
    input: &InpaintInput,
    progress: Progress<'_>,
) -> Result<LdmInpainted> {
    let spec = &models.spec;
    let r = &req.base;
    if spec.inpaint_concat() != Some(InpaintConcat::Ldm) {
        return Err(PipelineError::invalid(
            "model",
            format!(
                "{} is not an LDM (`__is_first_stage__`) inpainting model",
                spec.describe()
            ),
        ));
    }
    if !r.prompt.is_empty() || !r.negative_prompt.is_empty() {
        return Err(PipelineError::invalid(
            "prompt",
            format!(
                "{} is conditioned on {}, not on text: give no prompt",
                spec.describe(),
                spec.conditioning()
            ),
        ));
    }
    if guidance_enabled(r.cfg_scale) {
        return Err(PipelineError::invalid(
            "cfg_scale",
            format!(
                "{} has no unconditional input (only the mask and the masked image), so classifier-free \
                 guidance is impossible: use a scale of 1 (not {})",
                spec.describe(),
                r.cfg_scale
            ),
        ));
    }
    if req.strength != 1.0 {
        return Err(PipelineError::invalid(
            "strength",
            format!(
                "{} inpaints from pure noise as the original scripts/inpaint.py: use a strength of 1 (not {})",
                spec.describe(),
                req.strength
            ),
        ));
    }
    let dev = &models.device;
    let image = image_to_tensor(&input.image, dev)?; // [1, 3, H, W] in [−1, 1]
    check_image(&image, req, "image")?;
    let (mw, mh) = (input.mask.width, input.mask.height);
    if (mw, mh) != (r.width, r.height) {
        return Err(PipelineError::invalid(
            "mask",
            format!(
                "the mask is {mw}x{mh}, the image {}x{}: they must be the same size",
                r.width, r.height
            ),
        ));
    }
    let b = r.batch;
    let plan = prepare(r.sampler, &spec.scheduler, r.steps, r.karras, r.eta)
        .map_err(|e| PipelineError::invalid("sampler", e.to_string()))?;
    let mut rng = TorchRng::new(r.seed);

    // make_batch: [0, 1] inputs, then x·2 − 1 for each
    let image01 = ((&image + 1.0)? / 2.0)?; // [1, 3, H, W]
    let mask01 = input.mask.to_tensor(dev)?; // [1, 1, H, W], 1 = repaint
    let masked01 = image01.broadcast_mul(&(1.0 - &mask01)?)?;
    let masked = masked01.affine(2.0, -1.0)?;
    let mask_pm = mask01.affine(2.0, -1.0)?; // −1 keep, +1 repaint

    // c = cond_stage_model.encode(masked_image); cc = F.interpolate(mask, size=c.shape[-2:])
    let encoded = models
        .first_stage
        .encode(&masked.to_dtype(models.dtype)?)
        .map_err(|e| PipelineError::Model(e.to_string()))?;
    let c = match encoded {
        Encoded::Latent(z) => z.to_dtype(candle_core::DType::F32)?, // [1, C, h, w]
        Encoded::Posterior(_) => {
            return Err(PipelineError::Model(format!(
                "{}: a KL first stage as `__is_first_stage__` cond stage returns a posterior, which the original \
                 script cannot concatenate; only VQ (and identity) first stages are supported",
                spec.describe()
            )))
        }
    };
    let f = spec.vae_factor();
    let mask_latent = mask_to_latent(&mask_pm, f, dev)?; // [1, 1, h, w]
    let extra = Tensor::cat(&[&c, &mask_latent], 1)?.repeat((b, 1, 1, 1))?; // [B, C + 1, h, w]

    let noise = initial_noise(models, r, &mut rng)?; // [B, C, h, w]
    let latents = (noise * plan.init_noise_sigma)?;
    let sampler = Sampling {
        plan: &plan,
        models,
        req: r,
        context: None,
        y: None,
        extra: Some(extra),
    };
    let latents = sampler.run(latents, &mut rng, None, progress)?;
    let predicted = decode_with(models, &latents, req.base.decode)?; // [B, 3, H, W] in [0, 1]

    // inpainted = (1 − mask)·image + mask·predicted_image
    let image01 = image01.clamp(0f32, 1f32)?;
    let keep = (1.0 - &mask01)?;
    let images = image01
        .broadcast_mul(&keep)?
        .broadcast_add(&predicted.broadcast_mul(&mask01)?)?;
    Ok(LdmInpainted {
        latents,
        predicted,
        images,
    })
}
