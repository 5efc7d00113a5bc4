//! Image grids: samples of a model during and after training, and reconstructions of an autoencoder.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ldm_core::image::RgbImage;
use ldm_core::rng::TorchRng;
use ldm_pipeline::init_image::Pad;
use ldm_pipeline::inpaint::{inpaint, InpaintInput};
use ldm_pipeline::mask::Mask;
use ldm_pipeline::spec::{ConcatSpec, CondSpec};
use ldm_pipeline::{sample_with_rng, Condition, GenerateRequest, SdModels};
use ldm_pipeline::{ImageRequest, ImageTask};

use crate::error::{Result, TrainError};
use crate::recipe::LdmRecipe;

fn pipe_err(e: ldm_pipeline::PipelineError) -> TrainError {
    TrainError::invalid("sampling", e.to_string())
}

/// Tiles `images` ([B, 3, H, W] in [0, 1]) into rows of `cols` with a 2-pixel white border and writes a PNG.
pub fn save_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let (b, c, h, w) = images.dims4()?;
    let cols = cols.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let pad = 2;
    let (gh, gw) = (rows * (h + pad) + pad, cols * (w + pad) + pad);
    let imgs = images
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    let imgs = if c == 1 {
        imgs.repeat((1, 3, 1, 1))?
    } else {
        imgs
    };
    let data = imgs.flatten_all()?.to_vec1::<f32>()?;
    let mut grid = vec![1f32; 3 * gh * gw];
    for i in 0..b {
        let (r, col) = (i / cols, i % cols);
        let (y0, x0) = (pad + r * (h + pad), pad + col * (w + pad));
        for ch in 0..3 {
            for y in 0..h {
                let src = &data[((i * 3 + ch) * h + y) * w..][..w];
                let dst = (ch * gh + y0 + y) * gw + x0;
                grid[dst..dst + w].copy_from_slice(src);
            }
        }
    }
    let t = Tensor::from_vec(grid, (3, gh, gw), &Device::Cpu)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    RgbImage::from_tensor(&t)?.save_png(path, &[])?;
    Ok(())
}

/// Loads the model at `model` through the inference loader (with the YAML `config`, or the one beside it),
/// merges `loras` (kohya files with their weights, as `--lora FILE:WEIGHT` does) and writes a grid of
/// `recipe.sample.count` samples to `out`: one row per class for class-conditional models (classes cycled),
/// the recipe's prompts for text models, plain samples otherwise. Models conditioned by concatenation work on
/// `examples` (training images `[N, C, H, W]` in [−1, 1]), see [`concat_grid`]. Returns `out`.
pub fn sample_grid(
    model: &Path,
    config: Option<&Path>,
    loras: &[(PathBuf, f64)],
    recipe: &LdmRecipe,
    examples: Option<&Tensor>,
    out: &Path,
    seed: u64,
) -> Result<PathBuf> {
    let config = config.map(|p| ldm_pipeline::load::ConfigOverride::Yaml(p.to_path_buf()));
    let mut opened = ldm_pipeline::open(model, config.as_ref()).map_err(pipe_err)?;
    ldm_pipeline::lora::apply_loras(&mut opened, loras).map_err(pipe_err)?;
    let models = SdModels::build(opened, &Device::Cpu).map_err(pipe_err)?;
    let s = &recipe.sample;
    let size = recipe.data.size;
    let size = size.div_ceil(models.spec.size_multiple()) * models.spec.size_multiple();
    let request = |prompt: &str, batch: usize| GenerateRequest {
        prompt: prompt.to_string(),
        steps: s.steps,
        cfg_scale: s.cfg_scale,
        sampler: "ddim".into(),
        width: Some(size),
        height: Some(size),
        seed: Some(seed),
        batch,
        ..GenerateRequest::default()
    };
    if models.spec.concat != ConcatSpec::None {
        let examples = examples.ok_or_else(|| {
            TrainError::invalid(
                "sampling",
                "a model conditioned by concatenation needs example images for its grid",
            )
        })?;
        return concat_grid(&models, recipe, examples, out, seed);
    }
    let mut rng = TorchRng::new(seed);
    let (images, cols) = match &models.spec.cond {
        CondSpec::Class(c) => {
            let classes = c.null_class.unwrap_or(c.n_classes).min(s.count).max(1);
            let labels: Vec<usize> = (0..s.count).map(|i| i % classes).collect();
            let req = request("", s.count)
                .validate(&models.spec, seed)
                .map_err(pipe_err)?;
            let g = sample_with_rng(
                &models,
                &req,
                &Condition::Classes(labels),
                &mut rng,
                &mut |_, _| {},
            )
            .map_err(pipe_err)?;
            (g.images, classes)
        }
        CondSpec::Text(_) => {
            let prompts: Vec<&str> = if s.prompts.is_empty() {
                vec![""]
            } else {
                s.prompts.iter().map(|p| p.as_str()).collect()
            };
            let per = s.count.div_ceil(prompts.len()).max(1);
            let mut all = Vec::new();
            for p in &prompts {
                let req = request(p, per)
                    .validate(&models.spec, seed)
                    .map_err(pipe_err)?;
                let g = ldm_pipeline::txt2img::txt2img_with_rng(
                    &models,
                    &req,
                    &mut rng,
                    &mut |_, _| {},
                )
                .map_err(pipe_err)?;
                all.push(g.images);
            }
            (Tensor::cat(&all, 0)?, per)
        }
        _ => {
            let req = request("", s.count)
                .validate(&models.spec, seed)
                .map_err(pipe_err)?;
            let g = sample_with_rng(&models, &req, &Condition::None, &mut rng, &mut |_, _| {})
                .map_err(pipe_err)?;
            let cols = (s.count as f64).sqrt().ceil() as usize;
            (g.images, cols)
        }
    };
    save_grid(&images, cols, out)?;
    Ok(out.to_path_buf())
}

/// The centre box of half the image's sides: the mask of inpainting grids.
pub fn centre_mask(width: usize, height: usize) -> Mask {
    let (x0, y0) = (width / 4, height / 4);
    let (x1, y1) = (x0 + width.div_ceil(2), y0 + height.div_ceil(2));
    let repaint = (0..height)
        .flat_map(|y| (0..width).map(move |x| (y0..y1).contains(&y) && (x0..x1).contains(&x)))
        .collect();
    Mask {
        width,
        height,
        repaint,
    }
}

/// A grid of a concatenation model at work on `examples` (`[N, C, H, W]` in [−1, 1]), one row per example:
/// super-resolution: the low-res input (nearest-neighbour enlarged), the model's output, the original;
/// inpainting: the input with its centre box greyed out, the model's output, the original. Text-conditioned
/// models get the recipe's first prompt.
pub fn concat_grid(
    models: &SdModels,
    recipe: &LdmRecipe,
    examples: &Tensor,
    out: &Path,
    seed: u64,
) -> Result<PathBuf> {
    let spec = &models.spec;
    let s = &recipe.sample;
    let (n, _, h, w) = examples.dims4()?;
    let examples = if examples.dim(1)? == 1 {
        examples.repeat((1, 3, 1, 1))?
    } else {
        examples.clone()
    };
    let prompt = match spec.cond {
        CondSpec::Text(_) => s.prompts.first().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let originals = ((&examples + 1.0)? / 2.0)?;
    let request = |batch: usize, cfg_scale: f64| GenerateRequest {
        prompt: prompt.clone(),
        steps: s.steps,
        cfg_scale,
        sampler: "ddim".into(),
        width: Some(w),
        height: Some(h),
        seed: Some(seed),
        batch,
        ..GenerateRequest::default()
    };
    let mut rows = Vec::with_capacity(3 * n);
    match &spec.concat {
        ConcatSpec::LowRes { noise_aug } => {
            let f = spec.vae_factor();
            let lr = crate::concat::degrade(&examples, f)?;
            let (cfg, noise_level) = match noise_aug {
                Some(a) => (s.cfg_scale, 20.min(a.max_noise_level.saturating_sub(1))),
                None => (1.0, 0),
            };
            let req = request(n, cfg).validate(spec, seed).map_err(pipe_err)?;
            let cond = Condition::LowRes {
                image: lr.clone(),
                noise_level,
            };
            let mut rng = TorchRng::new(seed);
            let g =
                sample_with_rng(models, &req, &cond, &mut rng, &mut |_, _| {}).map_err(pipe_err)?;
            let shown = ((lr + 1.0)? / 2.0)?.upsample_nearest2d(h, w)?;
            for i in 0..n {
                rows.push(shown.get(i)?);
                rows.push(g.images.get(i)?);
                rows.push(originals.get(i)?);
            }
        }
        ConcatSpec::Inpaint(_) => {
            let mask = centre_mask(w, h);
            let keep = (1.0 - mask.to_tensor(&Device::Cpu).map_err(pipe_err)?)?;
            let cfg = if matches!(spec.cond, CondSpec::Text(_)) {
                s.cfg_scale
            } else {
                1.0
            };
            for i in 0..n {
                let original = originals.get(i)?;
                let image = RgbImage::from_tensor(&original)?;
                let input = InpaintInput::new(image, Some(mask.clone()), Pad::default())
                    .map_err(pipe_err)?;
                let req = ImageRequest {
                    generate: request(1, cfg),
                    strength: 1.0,
                }
                .validate(spec, ImageTask::Inpaint, (w, h), seed)
                .map_err(pipe_err)?;
                let g = inpaint(models, &req, &input, &mut |_, _| {}).map_err(pipe_err)?;
                // The input as the model sees it: repainted pixels grey.
                let keep = keep.squeeze(0)?;
                let shown = (original.broadcast_mul(&keep)?
                    + ((1.0 - &keep)? * 0.5)?.broadcast_as(original.shape())?)?;
                rows.push(shown);
                rows.push(g.images.get(0)?);
                rows.push(original);
            }
        }
        other => {
            return Err(TrainError::invalid(
                "sampling",
                format!("no grid for {other:?} models"),
            ))
        }
    }
    save_grid(&Tensor::stack(&rows, 0)?, 3, out)?;
    Ok(out.to_path_buf())
}
