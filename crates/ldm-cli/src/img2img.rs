//! `ldm img2img`, and what it shares with `ldm inpaint`: the generation flags, running with a progress bar,
//! and writing the PNGs with A1111's parameters text.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ldm_pipeline::infotext::py_float;
use ldm_pipeline::init_image::{image_to_tensor, load_image};
use ldm_pipeline::txt2img::Generated;
use ldm_pipeline::{
    Compute, ConfigOverride, GenerateRequest, ImageRequest, ImageTask, Opened, SdModels,
    ValidImageRequest,
};

/// The txt2img flags that apply to img2img and inpainting (the size is the input image's).
#[derive(Args)]
pub struct ImageGenArgs {
    /// The prompt (or use --prompt).
    #[arg(value_name = "TEXT", conflicts_with = "prompt")]
    text: Option<String>,
    #[arg(long)]
    prompt: Option<String>,
    /// Checkpoint: single-file .safetensors / .ckpt, or a diffusers folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Original inference YAML file, or a preset: v1-inference, v2-inference (SD2 base, eps), v2-inference-v.
    #[arg(long)]
    config: Option<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale. Default: 7.5, or 1 for models without a prompt (no guidance).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// ddim, plms, ddpm, euler, euler-a, heun, lms, dpmpp-2m
    #[arg(long, default_value = "euler-a")]
    sampler: String,
    /// Karras noise levels (euler, heun, lms, dpmpp-2m).
    #[arg(long)]
    karras: bool,
    /// DDIM's η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Same seed, same image as diffusers' pipeline with a CPU generator of this seed.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How far the input is noised before sampling, in [0, 1] (1: from pure noise). Default: 0.75 for
    /// img2img (A1111's), 1 for inpaint (diffusers').
    #[arg(long)]
    strength: Option<f64>,
    /// Decode in tiles of this many pixels (shared GroupNorm statistics: same image, far less memory), for
    /// large images.
    #[arg(long, value_name = "PX")]
    tile_vae: Option<usize>,
    /// A kohya/AUTOMATIC1111 LoRA (.safetensors) merged into the weights at load, with a weight (default 1).
    /// Repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<String>,
    #[arg(long, short, default_value = "ldm-output.png")]
    output: PathBuf,
    #[command(flatten)]
    pub compute: crate::compute::ComputeArgs,
}

impl ImageGenArgs {
    /// The model path, the config override, the request (`default_strength` unless --strength is given)
    /// and the output path.
    pub fn request(
        self,
        default_strength: f64,
    ) -> anyhow::Result<(PathBuf, Option<ConfigOverride>, ImageRequest, PathBuf)> {
        let (model, config) = self.model_and_config()?;
        let (req, output) = self.request_for(default_strength, true)?;
        Ok((model, config, req, output))
    }

    /// The model path and the config override.
    pub fn model_and_config(&self) -> anyhow::Result<(PathBuf, Option<ConfigOverride>)> {
        let model = match &self.model {
            Some(m) => m.clone(),
            None => crate::default_model()?,
        };
        Ok((model, self.config.as_deref().map(ConfigOverride::parse)))
    }

    /// The request and the output path for a model that takes a prompt (`takes_prompt`: one is required, the
    /// guidance scale defaults to 7.5) or not (none is needed, and one given is refused by the pipeline by
    /// name; the scale defaults to 1).
    pub fn request_for(
        self,
        default_strength: f64,
        takes_prompt: bool,
    ) -> anyhow::Result<(ImageRequest, PathBuf)> {
        let prompt = self.text.or(self.prompt);
        let prompt = if takes_prompt {
            prompt.context("no prompt: give it as an argument or with --prompt")?
        } else {
            prompt.unwrap_or_default()
        };
        let default_cfg = if takes_prompt { 7.5 } else { 1.0 };
        let req = ImageRequest {
            generate: GenerateRequest {
                prompt,
                negative_prompt: self.negative_prompt,
                steps: self.steps,
                cfg_scale: self.cfg_scale.unwrap_or(default_cfg),
                sampler: self.sampler,
                karras: self.karras,
                eta: self.eta,
                seed: self.seed,
                batch: self.batch,
                tile_vae: self.tile_vae,
                ..GenerateRequest::default()
            },
            strength: self.strength.unwrap_or(default_strength),
        };
        Ok((req, self.output))
    }
}

/// `ldm img2img`.
#[derive(Args)]
pub struct Img2imgArgs {
    /// The image to start from (PNG, JPEG or WebP); its sides must be multiples of the model's size multiple
    /// (8 × UNet downsampling for SD, e.g. 64): it is not resized.
    #[arg(long, value_name = "FILE")]
    init_image: PathBuf,
    #[command(flatten)]
    gen: ImageGenArgs,
}

/// A time-based seed when none is given.
pub fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xFFFF_FFFF)
        .unwrap_or(0)
}

/// Refuses an output path whose folder does not exist, before any slow work.
pub fn check_output(output: &Path) -> anyhow::Result<()> {
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "output folder {} does not exist",
            dir.display()
        );
    }
    Ok(())
}

/// The checkpoint's stem, as A1111's `Model:` field.
pub fn model_name(model: &Path) -> String {
    model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds the networks on `compute`'s device and dtype and runs `task` with a progress bar.
pub fn run_with_progress(
    opened: Opened,
    compute: &Compute,
    task: impl FnOnce(&SdModels, &mut dyn FnMut(usize, usize)) -> ldm_pipeline::Result<Generated>,
) -> anyhow::Result<Generated> {
    let models = SdModels::build_on(opened, compute)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .context("progress bar template")?,
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let out = task(&models, &mut progress)?;
    bar.finish_and_clear();
    Ok(out)
}

/// Writes every image of `out` with A1111's img2img parameters (`Denoising strength` after `Model`).
pub fn save(
    out: &Generated,
    req: &ValidImageRequest,
    model: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let extra = [("Denoising strength", py_float(req.strength))];
    crate::output::save_images(out, &req.base, model, output, &extra)
}

pub fn run(args: Img2imgArgs) -> anyhow::Result<()> {
    let loras = args.gen.lora.clone();
    let compute = args.gen.compute.resolve()?;
    let (model, config, req, output) = args.gen.request(0.75)?;
    let mut opened = ldm_pipeline::open(&model, config.as_ref())?;
    crate::lora::apply(&mut opened, &loras)?;
    let img = load_image(&args.init_image, "init-image")?;
    // Validate before the (slow) weight loading, so a bad request fails at once.
    let valid = req.validate(
        &opened.spec,
        ImageTask::Img2img,
        (img.width, img.height),
        random_seed(),
    )?;
    check_output(&output)?;
    let out = run_with_progress(opened, &compute, |models, progress| {
        let init = image_to_tensor(&img, &models.device)?;
        ldm_pipeline::img2img::img2img(models, &valid, &init, progress)
    })?;
    save(&out, &valid, &model_name(&model), &output)
}
