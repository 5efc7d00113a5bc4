//! Whole txt2img against diffusers (fixtures from tools/fixtures/make_sd_tiny.py: torch 2.15.0, diffusers 0.42.1,
//! transformers 5.25.0). Tolerances: final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3); images max abs ≤ 2/255 —
//! the fixture's fp64 reruns put diffusers' own f32 error at ≤ 1.7e-4 (latents) and 5e-6 (images).
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_pipeline::txt2img::txt2img;
use ldm_pipeline::{open, SdModels, ValidRequest};
use serde::Deserialize;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

#[derive(Deserialize)]
struct Cases {
    text_prompts: Vec<String>,
    txt2img: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance_scale: f64,
    sampler: String,
    karras: bool,
    eta: f64,
    width: usize,
    height: usize,
    batch: usize,
    seed: Option<u64>,
    fixed_noise: bool,
}

fn max_ratio(got: &Tensor, want: &Tensor, rel: f32, abs: f32) -> R<f32> {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    Ok(g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / (rel * (a + b).abs()).max(abs))
        .fold(0.0, f32::max))
}

fn max_abs(got: &Tensor, want: &Tensor) -> R<f32> {
    Ok((got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// Runs every txt2img case of `model_dir` on the checkpoint `form` (a path relative to the model dir).
fn check_model(model_dir: &str, form: &str) -> R {
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(fixture(&format!(
        "{model_dir}/cases.json"
    )))?)?;
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("{model_dir}/ref.safetensors")),
        &Device::Cpu,
    )?;
    let models = SdModels::build(
        open(&fixture(&format!("{model_dir}/{form}")), None)?,
        &Device::Cpu,
    )?;

    // The text contexts first: a wrong tokenizer or text encoder shows here before it shows in the images.
    let prompts: Vec<&str> = cases.text_prompts.iter().map(|s| s.as_str()).collect();
    let hidden = models.encode_prompts(&prompts)?;
    let r = max_ratio(&hidden, &refs["text.hidden"], 1e-4, 1e-5)?;
    assert!(
        r <= 1.0,
        "{model_dir}/{form}: text hidden states off by {r}× tolerance"
    );

    let dir = tempfile::tempdir()?;
    let mut worst = (0f32, 0f32);
    for c in &cases.txt2img {
        let noise = if c.fixed_noise {
            let t = &refs[&format!("txt2img.{}.noise", c.name)];
            let path = dir.path().join(format!("{}.npy", c.name));
            ldm_core::npy::write_npy_f32(&path, t.dims(), &t.flatten_all()?.to_vec1::<f32>()?)?;
            Some(path)
        } else {
            None
        };
        // Built directly (not through `validate`) so that `euler-a` + Karras runs as diffusers runs it (the flag
        // is ignored there); the CLI refuses that combination instead.
        let req = ValidRequest {
            prompt: c.prompt.clone(),
            negative_prompt: c.negative_prompt.clone(),
            steps: c.steps,
            cfg_scale: c.guidance_scale,
            sampler: c.sampler.parse()?,
            karras: c.karras,
            eta: c.eta,
            width: c.width,
            height: c.height,
            seed: c.seed.unwrap_or(0),
            batch: c.batch,
            noise,
            decode: Default::default(),
        };
        let out = txt2img(&models, &req, &mut |_, _| {})?;
        let lat = max_ratio(
            &out.latents,
            &refs[&format!("txt2img.{}.latents", c.name)],
            1e-3,
            1e-3,
        )?;
        let img = max_abs(&out.images, &refs[&format!("txt2img.{}.image", c.name)])? * 255.0;
        assert!(
            lat <= 1.0,
            "{model_dir}/{form} case {}: latents off by {lat}× tolerance",
            c.name
        );
        assert!(
            img <= 2.0,
            "{model_dir}/{form} case {}: image off by {img}/255",
            c.name
        );
        worst = (worst.0.max(lat), worst.1.max(img));
    }
    eprintln!(
        "{model_dir}/{form}: {} cases, worst latent error {:.3}× tolerance, worst image error {:.3}/255",
        cases.txt2img.len(),
        worst.0,
        worst.1
    );
    Ok(())
}

#[test]
fn sd1_single_file_matches_diffusers_for_every_sampler() -> R {
    check_model("sd1-tiny", "model.safetensors")
}

#[test]
fn sd1_ckpt_matches_diffusers_for_every_sampler() -> R {
    check_model("sd1-tiny", "model.ckpt")
}

#[test]
fn sd1_diffusers_folder_matches_diffusers_for_every_sampler() -> R {
    check_model("sd1-tiny", "diffusers")
}

#[test]
fn sd2v_single_file_matches_diffusers() -> R {
    check_model("sd2v-tiny", "model.safetensors")
}

#[test]
fn sd2v_diffusers_folder_matches_diffusers() -> R {
    check_model("sd2v-tiny", "diffusers")
}

/// The three forms of one checkpoint hold the same numbers, so they must give bit-identical results.
#[test]
fn single_file_ckpt_and_diffusers_folder_give_identical_images() -> R {
    let req = ValidRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: "blurry".into(),
        steps: 4,
        cfg_scale: 5.0,
        sampler: "euler-a".parse()?,
        karras: false,
        eta: 0.0,
        width: 32,
        height: 32,
        seed: 3,
        batch: 1,
        noise: None,
        decode: Default::default(),
    };
    let run = |form: &str| -> R<Vec<f32>> {
        let models = SdModels::build(
            open(&fixture(&format!("sd1-tiny/{form}")), None)?,
            &Device::Cpu,
        )?;
        let out = txt2img(&models, &req, &mut |_, _| {})?;
        Ok(out.images.flatten_all()?.to_vec1::<f32>()?)
    };
    let single = run("model.safetensors")?;
    assert_eq!(
        single,
        run("model.ckpt")?,
        "ckpt differs from the single file"
    );
    assert_eq!(
        single,
        run("diffusers")?,
        "diffusers folder differs from the single file"
    );
    Ok(())
}
