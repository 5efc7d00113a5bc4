//! `ldm txt2img`.
use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use ldm_pipeline::{ConfigOverride, GenerateRequest, SdModels};

pub fn run(
    model: &Path,
    config: Option<&ConfigOverride>,
    loras: &[String],
    req: &GenerateRequest,
    output: &Path,
) -> anyhow::Result<()> {
    let mut opened = ldm_pipeline::open(model, config)?;
    let random_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xFFFF_FFFF)
        .unwrap_or(0);
    // Validate before the (slow) weight loading, so a bad request fails at once.
    let valid = req.validate(&opened.spec, random_seed)?;
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "output folder {} does not exist",
            dir.display()
        );
    }
    let model_name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::lora::apply(&mut opened, loras)?;
    let models = SdModels::build(opened, &Device::Cpu)?;

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
    let out = ldm_pipeline::txt2img::txt2img(&models, &valid, &mut progress)?;
    bar.finish_and_clear();

    crate::output::save_images(&out, &valid, &model_name, output, &[])
}
