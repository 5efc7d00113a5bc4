//! `ldm`: the command-line front end. Flags become a `GenerateRequest`; everything else lives in the library
//! crates (STYLE P9).
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ldm_pipeline::{ConfigOverride, GenerateRequest, PipelineError};

mod compute;
mod conditioned;
mod img2img;
mod info;
mod inpaint;
mod lora;
mod output;
mod train;
mod txt2img;

#[derive(Parser)]
#[command(
    name = "ldm",
    version,
    about = "Latent diffusion (Stable Diffusion) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Txt2img(Box<Txt2imgArgs>),
    /// Generate images from an image and a prompt (SDEdit): `--init-image FILE --strength F`.
    Img2img(Box<img2img::Img2imgArgs>),
    /// Repaint the white part of a mask (`--image FILE --mask FILE`), or outpaint (`--pad L,T,R,B`); with an
    /// inpainting model or a plain one.
    Inpaint(Box<inpaint::InpaintArgs>),
    /// Sample an unconditional or class-conditional LDM (`--class N`).
    Sample(Box<conditioned::SampleCmd>),
    /// Layout-to-image: `--boxes FILE.json` of `{"class", "box": [x0, y0, x1, y1]}` objects.
    Layout2img(Box<conditioned::Layout2imgCmd>),
    /// Semantic synthesis from a map of class indices: `--map FILE.png`.
    Semantic2img(Box<conditioned::Semantic2imgCmd>),
    /// Super-resolution: LDM-SR or the SD x4 upscaler (`--image FILE`, optional prompt and --noise-level).
    Upscale(Box<conditioned::UpscaleCmd>),
    /// Train a latent diffusion model from a recipe (`--config RECIPE.toml`); Ctrl-C saves and stops.
    Train(train::TrainArgs),
    /// Train a KL or VQ autoencoder (first stage) from a recipe.
    TrainAutoencoder(train::TrainArgs),
    /// Describe a checkpoint: form, family, prediction type, dtypes, parameters per component.
    Info {
        /// A .safetensors / .ckpt file or a diffusers folder.
        path: PathBuf,
        /// Config override: an original YAML file or a preset (v1-inference, v2-inference, v2-inference-v).
        #[arg(long)]
        config: Option<String>,
    },
}

#[derive(Args)]
struct Txt2imgArgs {
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
    #[arg(long, default_value_t = 7.5)]
    cfg_scale: f64,
    /// ddim, plms, ddpm, euler, euler-a, heun, lms, dpmpp-2m
    #[arg(long, default_value = "euler-a")]
    sampler: String,
    /// Karras noise levels (euler, euler-a, heun, lms, dpmpp-2m).
    #[arg(long)]
    karras: bool,
    /// DDIM's η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Same seed, same image as diffusers with a CPU generator of this seed.
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
    /// A kohya/AUTOMATIC1111 LoRA (.safetensors) merged into the weights at load, with a weight (default 1).
    /// Repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    lora: Vec<String>,
    #[arg(long, short, default_value = "ldm-output.png")]
    output: PathBuf,
    #[command(flatten)]
    compute: compute::ComputeArgs,
    /// Print a `TIMINGS` line on stderr: load, per-evaluation median (the device synchronised after each),
    /// decode and whole-generation seconds.
    #[arg(long)]
    timings: bool,
}

/// The model used when `--model` is not given: `$LDM_MODEL`, else an error saying how to choose one.
pub(crate) fn default_model() -> anyhow::Result<PathBuf> {
    match std::env::var_os("LDM_MODEL") {
        Some(p) => Ok(PathBuf::from(p)),
        None => anyhow::bail!(
            "no model: pass --model PATH (a .safetensors/.ckpt file or a diffusers folder) or set LDM_MODEL"
        ),
    }
}

fn config_override(c: &Option<String>) -> Option<ConfigOverride> {
    c.as_deref().map(ConfigOverride::parse)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { path, config } => info::run(&path, config_override(&config).as_ref()),
        Command::Img2img(a) => img2img::run(*a),
        Command::Sample(a) => conditioned::run_sample(*a),
        Command::Layout2img(a) => conditioned::run_layout(*a),
        Command::Semantic2img(a) => conditioned::run_semantic(*a),
        Command::Upscale(a) => conditioned::run_upscale(*a),
        Command::Inpaint(a) => inpaint::run(*a),
        Command::Train(a) => train::run_ldm(a),
        Command::TrainAutoencoder(a) => train::run_autoencoder(a),
        Command::Txt2img(a) => {
            let prompt = a
                .text
                .or(a.prompt)
                .context("no prompt: give it as an argument or with --prompt")?;
            let model = match a.model {
                Some(m) => m,
                None => default_model()?,
            };
            let req = GenerateRequest {
                prompt,
                negative_prompt: a.negative_prompt,
                steps: a.steps,
                cfg_scale: a.cfg_scale,
                sampler: a.sampler,
                karras: a.karras,
                eta: a.eta,
                width: a.width,
                height: a.height,
                seed: a.seed,
                batch: a.batch,
                noise: a.noise,
                tile_vae: a.tile_vae,
            };
            let compute = a.compute.resolve()?;
            txt2img::run(
                &model,
                &compute,
                config_override(&a.config).as_ref(),
                &a.lora,
                &req,
                &a.output,
                a.timings,
            )
        }
    }
}

fn main() -> ExitCode {
    // Keep freed tensor buffers in the process instead of faulting them in again (see the module's docs).
    ldm_kernels::alloc::tune();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            let usage = matches!(
                e.downcast_ref::<PipelineError>(),
                Some(PipelineError::Invalid { .. })
            ) || matches!(
                e.downcast_ref::<ldm_train::TrainError>(),
                Some(ldm_train::TrainError::Invalid { .. } | ldm_train::TrainError::Recipe { .. })
            );
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the message already contains (our error
/// types name their cause in their own message, e.g. `path: No such file or directory`).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace('\n', " ")
}

/// `out.png` for one image, `out-<i>.png` for a batch.
pub(crate) fn output_path(base: &Path, index: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ldm-output".into());
    let ext = base
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}-{index}.{ext}"))
}
