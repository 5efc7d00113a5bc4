//! Image grids: samples of a model during and after training, and reconstructions of an autoencoder.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ldm_core::image::RgbImage;
use ldm_core::rng::TorchRng;
use ldm_pipeline::spec::CondSpec;
use ldm_pipeline::{sample_with_rng, Condition, GenerateRequest, SdModels};

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
/// the recipe's prompts for text models, plain samples otherwise. Returns `out`.
pub fn sample_grid(
    model: &Path,
    config: Option<&Path>,
    loras: &[(PathBuf, f64)],
    recipe: &LdmRecipe,
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
