//! Sampling the models of the LDM paper that are not plain text-to-image: unconditional (Sec. 4.1),
//! class-conditional (Sec. 4.1, cin256), layout-to-image (Sec. 4.3.1), semantic synthesis and super-resolution
//! by concatenation (Sec. 4.3.2, 4.4), and the SD x4 upscaler (noise-augmented low-res image + text).
//!
//! One loop for all of them, as the original `DDIMSampler` and diffusers' LDM pipelines run it:
//! 1. for the x4 upscaler, the low-res image's augmentation noise is drawn first from the seeded generator
//!    (diffusers' `StableDiffusionUpscalePipeline` order), then it is noised to `noise_level`;
//! 2. unit noise z_T of shape [B, C, H/f, W/f] from the same generator (or the user's `.npy`);
//! 3. the sampler's loop on the UNet with the condition as cross-attention context, class label and/or
//!    concatenated channels; with classifier-free guidance (scale s > 1) the UNet runs on
//!    [unconditional; conditional] and ε = ε_u + s (ε_c − ε_u);
//! 4. x = D(z_0 / scale) (VQ first stages quantise first), mapped from [−1, 1] to [0, 1].
//!
//! Which guidance a model supports follows from its training: class-conditional models with a null class
//! (cin256-v2: class 1000), layout models (the empty layout), text models (the negative prompt). Unconditional,
//! semantic and LDM-SR models have no unconditional input, so a guidance scale > 1 is refused for them.
use candle_core::{DType, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::cond::{LayoutObject, SemanticMap};
use ldm_sampling::{guidance_enabled, prepare, SamplerKind, Schedule};

use crate::error::{PipelineError, Result};
use crate::img2img::randn;
use crate::models::{CondModel, SdModels};
use crate::request::ValidRequest;
use crate::spec::ConcatSpec;
use crate::txt2img::{decode_with, initial_noise, Generated, Progress, Sampling};

/// What a sample is conditioned on, beyond the request's prompt.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Nothing (unconditional models), or only the prompt (text models).
    None,
    /// One class label per image, or one for the whole batch.
    Classes(Vec<usize>),
    /// Boxes of a layout-to-image model: one layout per image, or one for the whole batch.
    Layout(Vec<Vec<LayoutObject>>),
    /// Semantic maps (class index per pixel) at the output size: one per image, or one for the whole batch.
    Semantic(Vec<SemanticMap>),
    /// Low-resolution images [1 or B, 3, h, w] in [−1, 1] at the latent's size (one for the batch, or one per
    /// image); `noise_level` is used by noise-augmented upscalers (SD x4) and must be 0 for the others.
    LowRes { image: Tensor, noise_level: usize },
}

impl Condition {
    fn name(&self) -> &'static str {
        match self {
            Condition::None => "none",
            Condition::Classes(_) => "class labels",
            Condition::Layout(_) => "a layout",
            Condition::Semantic(_) => "a semantic map",
            Condition::LowRes { .. } => "a low-res image",
        }
    }
}

fn no_guidance(models: &SdModels, req: &ValidRequest, why: &str) -> Result<()> {
    if guidance_enabled(req.cfg_scale) {
        return Err(PipelineError::invalid(
            "cfg_scale",
            format!(
                "{} ({}) has {why}, so classifier-free guidance is impossible: use a scale of 1",
                models.spec.describe(),
                models.spec.conditioning()
            ),
        ));
    }
    Ok(())
}

/// Batch of B (or 2B under guidance) from the conditional and the unconditional halves.
fn guided(cond: Tensor, uncond: Option<Tensor>) -> Result<Tensor> {
    Ok(match uncond {
        Some(u) => Tensor::cat(&[&u, &cond], 0)?,
        None => cond,
    })
}

/// One item per image: `items` holds one for the whole batch, or one per image.
fn per_image<T: Clone>(items: &[T], b: usize, field: &'static str) -> Result<Vec<T>> {
    match items.len() {
        1 => Ok(vec![items[0].clone(); b]),
        n if n == b => Ok(items.to_vec()),
        n => Err(PipelineError::invalid(
            field,
            format!("{n} given for a batch of {b}: give one, or one per image"),
        )),
    }
}

/// Samples `req.batch` images from `models` under `cond`, all noise from the seed's generator; `progress` is
/// called after every model evaluation.
pub fn sample(
    models: &SdModels,
    req: &ValidRequest,
    cond: &Condition,
    progress: Progress<'_>,
) -> Result<Generated> {
    sample_with_rng(models, req, cond, &mut TorchRng::new(req.seed), progress)
}

/// [`sample`] drawing every noise (augmentation, z_T unless given as a file, step noise) from `rng` in that
/// order.
pub fn sample_with_rng(
    models: &SdModels,
    req: &ValidRequest,
    cond: &Condition,
    rng: &mut dyn NoiseRng,
    progress: Progress<'_>,
) -> Result<Generated> {
    let spec = &models.spec;
    let b = req.batch;
    let guidance = guidance_enabled(req.cfg_scale);
    let dev = &models.device;
    let mismatch = || {
        PipelineError::invalid(
            "model",
            format!(
                "{} is conditioned on {}, not on {}",
                spec.describe(),
                spec.conditioning(),
                cond.name()
            ),
        )
    };
    if !req.prompt.is_empty() && !spec.takes_prompt() {
        return Err(PipelineError::invalid(
            "prompt",
            format!(
                "{} is conditioned on {}, not on text",
                spec.describe(),
                spec.conditioning()
            ),
        ));
    }
    let plan = prepare(req.sampler, &spec.scheduler, req.steps, req.karras, req.eta)
        .map_err(|e| PipelineError::invalid("sampler", e.to_string()))?;

    // The concatenated channels come first: the x4 upscaler draws its augmentation noise before z_T.
    let fits = match (&spec.concat, cond) {
        (ConcatSpec::None, c) => !matches!(c, Condition::LowRes { .. } | Condition::Semantic(_)),
        (ConcatSpec::LowRes { .. }, c) => matches!(c, Condition::LowRes { .. }),
        (ConcatSpec::Semantic(_), c) => matches!(c, Condition::Semantic(_)),
        (ConcatSpec::Inpaint(_), _) => true,
    };
    if !fits {
        return Err(mismatch());
    }
    let (extra, y) = match (&spec.concat, cond) {
        (ConcatSpec::Inpaint(_), _) => {
            return Err(PipelineError::invalid(
                "model",
                "this is an inpainting model: use inpaint",
            ))
        }
        (ConcatSpec::LowRes { noise_aug }, Condition::LowRes { image, noise_level }) => {
            let f = spec.vae_factor();
            let want = [image.dim(0)?, 3, req.height / f, req.width / f];
            if image.dims() != want || (want[0] != 1 && want[0] != b) {
                return Err(PipelineError::invalid(
                    "image",
                    format!(
                        "the low-res image is {:?}; an output of {}×{} needs [1 or {b}, 3, {}, {}]",
                        image.dims(),
                        req.width,
                        req.height,
                        req.height / f,
                        req.width / f
                    ),
                ));
            }
            let image = image.to_dtype(DType::F32)?.to_device(dev)?;
            let (image, y) = match noise_aug {
                Some(aug) => {
                    if *noise_level > aug.max_noise_level {
                        return Err(PipelineError::invalid(
                            "noise_level",
                            format!(
                                "{noise_level} is above the model's max_noise_level {}",
                                aug.max_noise_level
                            ),
                        ));
                    }
                    let schedule = Schedule::from_config(&aug.schedule, SamplerKind::Ddpm)
                        .map_err(|e| PipelineError::Model(e.to_string()))?;
                    let ab = schedule.alpha_bar(*noise_level) as f32;
                    let noise = randn(rng, image.dims(), dev)?;
                    let noised = ((image * f64::from(ab.sqrt()))?
                        + (noise * f64::from((1.0 - ab).sqrt()))?)?;
                    let n = if guidance { 2 * b } else { b };
                    let y = Tensor::full(*noise_level as u32, n, dev)?;
                    (noised, Some(y))
                }
                None => {
                    if *noise_level != 0 {
                        return Err(PipelineError::invalid(
                            "noise_level",
                            "this upscaler has no noise augmentation",
                        ));
                    }
                    no_guidance(models, req, "no unconditional input")?;
                    (image, None)
                }
            };
            let image = if image.dim(0)? == b {
                image
            } else {
                image.repeat((b, 1, 1, 1))?
            };
            let image = if guidance {
                Tensor::cat(&[&image, &image], 0)?
            } else {
                image
            };
            (Some(image), y)
        }
        (ConcatSpec::Semantic(_), Condition::Semantic(maps)) => {
            no_guidance(models, req, "no unconditional input")?;
            let maps = per_image(maps, b, "map")?;
            for map in &maps {
                if (map.width, map.height) != (req.width, req.height) {
                    return Err(PipelineError::invalid(
                        "map",
                        format!(
                            "the semantic map {} is {}×{}, the request {}×{}",
                            map.origin, map.width, map.height, req.width, req.height
                        ),
                    ));
                }
            }
            let rescaler = models
                .rescaler
                .as_ref()
                .ok_or_else(|| PipelineError::Model("no SpatialRescaler was built".into()))?;
            let n_classes = rescaler.config().in_channels;
            for map in &maps {
                map.check(n_classes)
                    .map_err(|e| PipelineError::invalid("map", e.to_string()))?;
            }
            let one_hot = SemanticMap::one_hot(&maps, n_classes, dev)
                .map_err(|e| PipelineError::invalid("map", e.to_string()))?;
            let c = rescaler
                .forward(&one_hot.to_dtype(models.dtype)?)
                .map_err(|e| PipelineError::Model(e.to_string()))?;
            (Some(c), None)
        }
        _ => (None, None),
    };

    let noise = initial_noise(models, req, rng)?;

    let context = match (&models.cond, cond) {
        (
            CondModel::Clip { .. } | CondModel::Bert { .. },
            Condition::None | Condition::LowRes { .. },
        ) => {
            let c = models
                .encode_prompts(&[req.prompt.as_str()])?
                .repeat((b, 1, 1))?;
            let u = if guidance {
                Some(
                    models
                        .encode_prompts(&[req.negative_prompt.as_str()])?
                        .repeat((b, 1, 1))?,
                )
            } else {
                None
            };
            Some(guided(c, u)?)
        }
        (CondModel::Class(_), Condition::Classes(labels)) => {
            let labels = per_image(labels, b, "class")?;
            let c = models.encode_classes(&labels)?;
            let u = if guidance {
                Some(models.null_class_context(b)?)
            } else {
                None
            };
            Some(guided(c, u)?)
        }
        (CondModel::Layout { .. }, Condition::Layout(layouts)) => {
            let layouts = per_image(layouts, b, "boxes")?;
            let rows: Vec<Option<&[LayoutObject]>> =
                layouts.iter().map(|l| Some(l.as_slice())).collect();
            let c = models.encode_layouts(&rows)?;
            let u = if guidance {
                Some(models.encode_layouts(&[None])?.repeat((b, 1, 1))?)
            } else {
                None
            };
            Some(guided(c, u)?)
        }
        (CondModel::None, Condition::None | Condition::LowRes { .. } | Condition::Semantic(_)) => {
            if matches!(cond, Condition::None) {
                no_guidance(models, req, "no condition")?;
            }
            None
        }
        _ => return Err(mismatch()),
    };
    let latents = (noise * plan.init_noise_sigma)?;
    let sampler = Sampling {
        plan: &plan,
        models,
        req,
        context,
        y,
        extra,
    };
    let latents = sampler.run(latents, rng, None, progress)?;
    let images = decode_with(models, &latents, req.decode)?;
    Generated::on_cpu(latents, images)
}
