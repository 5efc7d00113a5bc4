//! `ldm sample`, `ldm layout2img`, `ldm semantic2img` and `ldm upscale`: the LDM paper's models that are not
//! plain text-to-image, through `ldm_pipeline::sample`.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ldm_models::cond::{LayoutObject, SemanticMap};
use ldm_pipeline::init_image::{image_to_tensor, load_image};
use ldm_pipeline::txt2img::Generated;
use ldm_pipeline::{
    sample, Condition, ConfigOverride, GenerateRequest, PipelineError, ValidRequest,
};

use crate::img2img::{check_output, model_name, random_seed, run_with_progress};

/// Flags shared by the conditioned-sampling subcommands (txt2img's where they apply).
#[derive(Args)]
pub struct SampleArgs {
    /// Checkpoint: an original LDM single file (with its config.yaml beside it or --config), or a diffusers
    /// folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The original config YAML.
    #[arg(long)]
    config: Option<String>,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (default: 1, i.e. none; the x4 upscaler's default is 9).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// ddim, plms, ddpm, euler, euler-a, heun, lms, dpmpp-2m
    #[arg(long, default_value = "ddim")]
    sampler: String,
    #[arg(long)]
    karras: bool,
    /// DDIM's η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Initial latent noise: float32 .npy of shape [batch, C, H/f, W/f], unit variance.
    #[arg(long, value_name = "FILE.npy")]
    noise: Option<PathBuf>,
    /// Decode in tiles of this many pixels (shared GroupNorm statistics: same image, far less memory), for
    /// large images.
    #[arg(long, value_name = "PX")]
    tile_vae: Option<usize>,
    #[arg(long, short, default_value = "ldm-output.png")]
    output: PathBuf,
    #[command(flatten)]
    compute: crate::compute::ComputeArgs,
}

/// `ldm sample`.
#[derive(Args)]
pub struct SampleCmd {
    /// Class label(s) of a class-conditional model: one for the batch, or one per image (`--class 1,207`).
    #[arg(long = "class", value_delimiter = ',')]
    classes: Vec<usize>,
    #[command(flatten)]
    common: SampleArgs,
}

/// `ldm layout2img`.
#[derive(Args)]
pub struct Layout2imgCmd {
    /// A JSON list of objects: `[{"class": 3, "box": [x0, y0, x1, y1]}, ...]`, coordinates in [0, 1].
    #[arg(long, value_name = "FILE.json")]
    boxes: PathBuf,
    #[command(flatten)]
    common: SampleArgs,
}

/// `ldm semantic2img`.
#[derive(Args)]
pub struct Semantic2imgCmd {
    /// A PNG of class indices (8/16-bit greyscale or palette); its size is the output's.
    #[arg(long, value_name = "FILE.png")]
    map: PathBuf,
    #[command(flatten)]
    common: SampleArgs,
}

/// `ldm upscale`.
#[derive(Args)]
pub struct UpscaleCmd {
    /// The low-resolution image; the output is f times larger (4× for LDM-SR and the SD x4 upscaler).
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// The prompt of a text-conditioned upscaler (SD x4).
    #[arg(value_name = "TEXT")]
    prompt: Option<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Noise added to the low-res image by noise-augmented upscalers (SD x4; diffusers' default 20).
    #[arg(long)]
    noise_level: Option<usize>,
    #[command(flatten)]
    common: SampleArgs,
}

impl SampleArgs {
    fn request(&self, prompt: String, negative: String, default_cfg: f64) -> GenerateRequest {
        GenerateRequest {
            prompt,
            negative_prompt: negative,
            steps: self.steps,
            cfg_scale: self.cfg_scale.unwrap_or(default_cfg),
            sampler: self.sampler.clone(),
            karras: self.karras,
            eta: self.eta,
            width: self.width,
            height: self.height,
            seed: self.seed,
            batch: self.batch,
            noise: self.noise.clone(),
            tile_vae: self.tile_vae,
        }
    }
    fn model(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => crate::default_model(),
        }
    }
    fn config(&self) -> Option<ConfigOverride> {
        self.config.as_deref().map(ConfigOverride::parse)
    }
}

/// Opens the model, validates, samples and writes the images with their parameters.
fn run_task(
    common: &SampleArgs,
    req: GenerateRequest,
    extra_fields: Vec<(&'static str, String)>,
    cond: impl FnOnce(&ValidRequest, &ldm_pipeline::spec::ModelSpec) -> ldm_pipeline::Result<Condition>,
) -> anyhow::Result<()> {
    let compute = common.compute.resolve()?;
    let model = common.model()?;
    let opened = ldm_pipeline::open(&model, common.config().as_ref())?;
    let valid = req.validate(&opened.spec, random_seed())?;
    let cond = cond(&valid, &opened.spec)?;
    check_output(&common.output)?;
    let out = run_with_progress(opened, &compute, |models, progress| {
        sample(models, &valid, &cond, progress)
    })?;
    save(
        &out,
        &valid,
        &model_name(&model),
        &common.output,
        extra_fields,
    )
}

fn save(
    out: &Generated,
    v: &ValidRequest,
    model: &str,
    output: &Path,
    extra: Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    crate::output::save_images(out, v, model, output, &extra)
}

pub fn run_sample(a: SampleCmd) -> anyhow::Result<()> {
    let req = a.common.request(String::new(), String::new(), 1.0);
    let extra = if a.classes.is_empty() {
        vec![]
    } else {
        let list: Vec<String> = a.classes.iter().map(|c| c.to_string()).collect();
        vec![("Class", list.join(","))]
    };
    let classes = a.classes.clone();
    run_task(&a.common, req, extra, |_, _| {
        Ok(if classes.is_empty() {
            Condition::None
        } else {
            Condition::Classes(classes)
        })
    })
}

pub fn run_layout(a: Layout2imgCmd) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.boxes)
        .map_err(|e| PipelineError::invalid("boxes", format!("{}: {e}", a.boxes.display())))?;
    let objects: Vec<LayoutObject> = LayoutObject::parse_json(&text)
        .map_err(|e| PipelineError::invalid("boxes", format!("{}: {e}", a.boxes.display())))?;
    let req = a.common.request(String::new(), String::new(), 1.0);
    let extra = vec![("Layout", a.boxes.display().to_string())];
    run_task(&a.common, req, extra, |_, _| {
        Ok(Condition::Layout(vec![objects]))
    })
}

pub fn run_semantic(a: Semantic2imgCmd) -> anyhow::Result<()> {
    let map =
        SemanticMap::load(&a.map).map_err(|e| PipelineError::invalid("map", e.to_string()))?;
    let mut req = a.common.request(String::new(), String::new(), 1.0);
    req.width = Some(a.common.width.unwrap_or(map.width));
    req.height = Some(a.common.height.unwrap_or(map.height));
    let extra = vec![("Semantic map", a.map.display().to_string())];
    run_task(&a.common, req, extra, |_, _| {
        Ok(Condition::Semantic(vec![map]))
    })
}

pub fn run_upscale(a: UpscaleCmd) -> anyhow::Result<()> {
    let compute = a.common.compute.resolve()?;
    let img = load_image(&a.image, "image")?;
    let model = a.common.model()?;
    let opened = ldm_pipeline::open(&model, a.common.config().as_ref())
        .with_context(|| format!("opening {}", model.display()))?;
    let spec = &opened.spec;
    let f = spec.vae_factor();
    let noise_aug = matches!(
        spec.concat,
        ldm_pipeline::spec::ConcatSpec::LowRes { noise_aug: Some(_) }
    );
    let noise_level = a.noise_level.unwrap_or(if noise_aug { 20 } else { 0 });
    let default_cfg = if noise_aug { 9.0 } else { 1.0 };
    let mut req = a.common.request(
        a.prompt.clone().unwrap_or_default(),
        a.negative_prompt.clone(),
        default_cfg,
    );
    req.width = Some(img.width * f);
    req.height = Some(img.height * f);
    let valid = req.validate(spec, random_seed())?;
    let image = image_to_tensor(&img, &candle_core::Device::Cpu)?;
    let cond = Condition::LowRes { image, noise_level };
    check_output(&a.common.output)?;
    let out = run_with_progress(opened, &compute, |models, progress| {
        sample(models, &valid, &cond, progress)
    })?;
    let mut extra = vec![("Upscale input", a.image.display().to_string())];
    if noise_aug {
        extra.push(("Noise level", noise_level.to_string()));
    }
    save(&out, &valid, &model_name(&model), &a.common.output, extra)
}
