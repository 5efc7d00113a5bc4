//! `ldm txt2img`.
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ldm_pipeline::{Compute, ConfigOverride, GenerateRequest, SdModels};

pub fn run(
    model: &Path,
    compute: &Compute,
    config: Option<&ConfigOverride>,
    loras: &[String],
    req: &GenerateRequest,
    output: &Path,
    timings: bool,
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
    let load_start = Instant::now();
    let models = SdModels::build_on(opened, compute)?;
    models.device.synchronize()?;
    let load_s = load_start.elapsed().as_secs_f64();

    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .context("progress bar template")?,
    );
    // With --timings, the device is synchronised after every model evaluation so that each stamp closes one
    // evaluation (one UNet CFG step for the one-evaluation samplers).
    let mut stamps = Vec::new();
    let mut progress = |done: usize, total: usize| {
        if timings {
            // A failed synchronisation shows up as the run's own error right after.
            let _ = models.device.synchronize();
            stamps.push(Instant::now());
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let start = Instant::now();
    let out = ldm_pipeline::txt2img::txt2img(&models, &valid, &mut progress)?;
    let end = Instant::now();
    bar.finish_and_clear();
    if timings {
        print_timings(compute, load_s, start, &stamps, end);
    }

    crate::output::save_images(&out, &valid, &model_name, output, &[])
}

/// One `TIMINGS` line on stderr (for tools/bench/gpu.sh): the load, the first evaluation (prompt encoding and
/// warm-up included), the median of the others, the decode (from the last evaluation to the images on the CPU)
/// and the whole generation (everything after the load, before the PNG is written).
fn print_timings(compute: &Compute, load_s: f64, start: Instant, stamps: &[Instant], end: Instant) {
    let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
    let mut steps: Vec<f64> = stamps.windows(2).map(|w| secs(w[0], w[1])).collect();
    steps.sort_by(f64::total_cmp);
    let median = match steps.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => steps[n / 2],
        n => 0.5 * (steps[n / 2 - 1] + steps[n / 2]),
    };
    let first = stamps.first().map_or(f64::NAN, |&t| secs(start, t));
    let decode = stamps.last().map_or(f64::NAN, |&t| secs(t, end));
    eprintln!(
        "TIMINGS device={} load_s={load_s:.3} evals={} first_eval_s={first:.4} eval_median_s={median:.4} \
         decode_s={decode:.4} generate_s={:.3}",
        compute.describe().replace(' ', "/"),
        stamps.len(),
        secs(start, end)
    );
}
