//! Shared by img2img_parity.rs and inpaint_parity.rs: the cases of fixtures/img2img (tools/fixtures/
//! make_img2img.py: torch 2.15.0, diffusers 0.42.1) and the comparison. Tolerances: final latents
//! |x−y| ≤ max(1e-3·|x+y|, 1e-3); images max abs ≤ 2/255.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_pipeline::init_image::{load_image, Pad};
use ldm_pipeline::inpaint::InpaintInput;
use ldm_pipeline::mask::Mask;
use ldm_pipeline::txt2img::Generated;
use ldm_pipeline::{open, GenerateRequest, ImageRequest, ImageTask, SdModels, ValidImageRequest};
use serde::Deserialize;

pub type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

#[derive(Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub strength: f64,
    pub guidance_scale: f64,
    pub sampler: String,
    pub karras: bool,
    pub eta: f64,
    pub batch: usize,
    pub seed: u64,
    pub image: String,
    pub mask: Option<String>,
    pub pad: Option<[usize; 4]>,
}

pub fn cases(suite: &str) -> R<Vec<Case>> {
    let all: HashMap<String, Vec<Case>> =
        serde_json::from_str(&std::fs::read_to_string(fixture("img2img/cases.json"))?)?;
    Ok(all.get(suite).ok_or("no such suite")?.clone())
}

pub fn refs() -> R<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("img2img/ref.safetensors"),
        &Device::Cpu,
    )?)
}

pub fn models(path: &str) -> R<SdModels> {
    Ok(SdModels::build(open(&fixture(path), None)?, &Device::Cpu)?)
}

pub fn request(c: &Case) -> ImageRequest {
    ImageRequest {
        generate: GenerateRequest {
            prompt: c.prompt.clone(),
            negative_prompt: c.negative_prompt.clone(),
            steps: c.steps,
            cfg_scale: c.guidance_scale,
            sampler: c.sampler.clone(),
            karras: c.karras,
            eta: c.eta,
            seed: Some(c.seed),
            batch: c.batch,
            ..GenerateRequest::default()
        },
        strength: c.strength,
    }
}

pub fn inpaint_input(c: &Case) -> R<InpaintInput> {
    let image = load_image(&fixture(&format!("img2img/{}", c.image)), "image")?;
    let mask = match &c.mask {
        Some(m) => Some(Mask::load(&fixture(&format!("img2img/{m}")))?),
        None => None,
    };
    let pad = c
        .pad
        .map_or(Pad::default(), |[left, top, right, bottom]| Pad {
            left,
            top,
            right,
            bottom,
        });
    Ok(InpaintInput::new(image, mask, pad)?)
}

pub fn validate(
    models: &SdModels,
    c: &Case,
    task: ImageTask,
    size: (usize, usize),
) -> R<ValidImageRequest> {
    Ok(request(c).validate(&models.spec, task, size, 0)?)
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

/// Worst (latent error as a multiple of the tolerance, image error in 1/255) over a suite.
#[derive(Default)]
pub struct Worst(pub f32, pub f32, pub f32);

impl Worst {
    /// Compares one case's output with the references `suite.name.*`; panics with the case name if off.
    pub fn check(&mut self, refs: &HashMap<String, Tensor>, key: &str, out: &Generated) -> R {
        let want = &refs[&format!("{key}.latents")];
        let lat = max_ratio(&out.latents, want, 1e-3, 1e-3)?;
        let lat_abs = max_abs(&out.latents, want)?;
        let img = max_abs(&out.images, &refs[&format!("{key}.image")])? * 255.0;
        assert!(lat <= 1.0, "{key}: latents off by {lat}× tolerance");
        assert!(img <= 2.0, "{key}: image off by {img}/255");
        self.0 = self.0.max(lat);
        self.1 = self.1.max(lat_abs);
        self.2 = self.2.max(img);
        Ok(())
    }

    pub fn report(&self, what: &str, n: usize) {
        eprintln!(
            "{what}: {n} cases, worst latent error {:.3}× tolerance ({:.2e} abs), worst image error {:.3}/255",
            self.0, self.1, self.2
        );
    }
}
