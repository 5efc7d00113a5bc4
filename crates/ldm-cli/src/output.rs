//! Writing generated images with their parameters, as AUTOMATIC1111 does (a `parameters` PNG text chunk).
use std::path::Path;

use ldm_core::image::RgbImage;
use ldm_pipeline::infotext::{infotext, py_float};
use ldm_pipeline::request::a1111_sampler_name;
use ldm_pipeline::txt2img::Generated;
use ldm_pipeline::ValidRequest;

/// Writes every image of `out` (`output`, or `output-<i>` for a batch) with A1111's parameters text: the
/// common fields, then `extra` after `Model` (e.g. `Denoising strength`), then η and the batch fields.
pub fn save_images(
    out: &Generated,
    v: &ValidRequest,
    model: &str,
    output: &Path,
    extra: &[(&'static str, String)],
) -> anyhow::Result<()> {
    let mut fields = vec![
        ("Steps", v.steps.to_string()),
        ("Sampler", a1111_sampler_name(v.sampler, v.karras)),
        ("CFG scale", py_float(v.cfg_scale)),
        ("Seed", v.seed.to_string()),
        ("Size", format!("{}x{}", v.width, v.height)),
        ("Model", model.to_string()),
    ];
    fields.extend(extra.iter().cloned());
    if v.eta != 0.0 {
        fields.push(("Eta", py_float(v.eta)));
    }
    if v.batch > 1 {
        fields.push(("Batch size", v.batch.to_string()));
    }
    for i in 0..v.batch {
        let mut f = fields.clone();
        if v.batch > 1 {
            f.push(("Batch pos", i.to_string()));
        }
        let text = infotext(&v.prompt, &v.negative_prompt, &f);
        let img = RgbImage::from_tensor(&out.images.get(i)?)?;
        let path = crate::output_path(output, i, v.batch);
        img.save_png(&path, &[("parameters", &text)])?;
        println!("{}", path.display());
    }
    Ok(())
}
