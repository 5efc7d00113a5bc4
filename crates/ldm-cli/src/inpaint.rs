//! `ldm inpaint`: repaint the white part of a mask, or outpaint with `--pad`.
use std::path::PathBuf;

use clap::Args;
use ldm_pipeline::init_image::{load_image, Pad};
use ldm_pipeline::inpaint::InpaintInput;
use ldm_pipeline::mask::Mask;
use ldm_pipeline::ImageTask;

use crate::img2img::{
    check_output, model_name, random_seed, run_with_progress, save, ImageGenArgs,
};

/// `ldm inpaint`.
#[derive(Args)]
pub struct InpaintArgs {
    /// The image (PNG, JPEG or WebP); once padded, its sides must be multiples of the model's size multiple
    /// (e.g. 64 for SD): it is not resized.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// The mask, of the image's size: white (grey >= 128) is repainted, black kept; greyscale, RGB or RGBA
    /// (alpha ignored). Optional with --pad.
    #[arg(long, value_name = "FILE")]
    mask: Option<PathBuf>,
    /// Outpaint: extend the image by L,T,R,B pixels (or one number for all sides), filling the margins with
    /// the nearest edge pixels; the margins are repainted.
    #[arg(long, value_name = "L,T,R,B")]
    pad: Option<String>,
    #[command(flatten)]
    gen: ImageGenArgs,
}

/// Models without text (the paper's `__is_first_stage__` inpainting model) need no prompt, and their guidance
/// scale defaults to 1.
pub fn run(args: InpaintArgs) -> anyhow::Result<()> {
    let compute = args.gen.compute.resolve()?;
    let (model, config) = args.gen.model_and_config()?;
    let pad = match &args.pad {
        Some(p) => Pad::parse(p)?,
        None => Pad::default(),
    };
    let mut opened = ldm_pipeline::open(&model, config.as_ref())?;
    crate::lora::apply(&mut opened, &args.gen.lora)?;
    let (req, output) = args.gen.request_for(1.0, opened.spec.takes_prompt())?;
    let image = load_image(&args.image, "image")?;
    let mask = match &args.mask {
        Some(m) => Some(Mask::load(m)?),
        None => None,
    };
    let input = InpaintInput::new(image, mask, pad)?;
    let valid = req.validate(
        &opened.spec,
        ImageTask::Inpaint,
        input.size(),
        random_seed(),
    )?;
    check_output(&output)?;
    let out = run_with_progress(opened, &compute, |models, progress| {
        ldm_pipeline::inpaint::inpaint(models, &valid, &input, progress)
    })?;
    save(&out, &valid, &model_name(&model), &output)
}
