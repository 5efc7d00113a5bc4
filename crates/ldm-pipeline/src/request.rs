//! A txt2img request as the CLI (and later the server) states it, and its validation against a model
//! (STYLE P9): pipelines accept only a [`ValidRequest`] (img2img and inpainting: a [`ValidImageRequest`]).
use std::path::PathBuf;

use ldm_sampling::SamplerKind;

use crate::error::{PipelineError, Result};
use crate::spec::ModelSpec;
use crate::txt2img::DecodeMode;
use ldm_models::autoencoder::TileConfig;

/// Largest side accepted, in pixels; a guard against requests that would exhaust memory by accident.
pub const MAX_SIDE: usize = 8192;
/// Largest batch and step count accepted.
pub const MAX_BATCH: usize = 64;
pub const MAX_STEPS: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: String,
    pub karras: bool,
    pub eta: f64,
    /// None: the model's training size when its config states it (`image_size` · f), else 64 latents · f.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: Option<u64>,
    pub batch: usize,
    /// A float32 `.npy` of the initial latent noise, unit variance, [batch, C, H/f, W/f].
    pub noise: Option<PathBuf>,
    /// Decode in tiles of this side (pixels) with shared GroupNorm statistics, for images too large to decode
    /// in one pass (`ldm_models::autoencoder::tiled`); None: one pass.
    pub tile_vae: Option<usize>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.5,
            sampler: "euler-a".into(),
            karras: false,
            eta: 0.0,
            width: None,
            height: None,
            seed: None,
            batch: 1,
            noise: None,
            tile_vae: None,
        }
    }
}

/// A request checked against the model it will run on.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub karras: bool,
    pub eta: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub batch: usize,
    pub noise: Option<PathBuf>,
    /// How the final latents are decoded.
    pub decode: DecodeMode,
}

impl GenerateRequest {
    /// Checks every field; `random_seed` is used when no seed was asked for.
    pub fn validate(&self, spec: &ModelSpec, random_seed: u64) -> Result<ValidRequest> {
        if spec.is_inpainting() {
            return Err(PipelineError::invalid(
                "model",
                "this is an inpainting model (its UNet takes mask and image channels); txt2img needs a plain model",
            ));
        }
        self.check(spec, random_seed)
    }

    /// Every check but the model's kind.
    pub(crate) fn check(&self, spec: &ModelSpec, random_seed: u64) -> Result<ValidRequest> {
        let sampler: SamplerKind = self.sampler.parse().map_err(|_| {
            PipelineError::invalid(
                "sampler",
                format!("unknown sampler `{}` (one of: ddim, plms, ddpm, euler, euler-a, heun, lms, dpmpp-2m)", self.sampler),
            )
        })?;
        if self.steps == 0 {
            return Err(PipelineError::invalid("steps", "must be at least 1"));
        }
        if self.steps > MAX_STEPS {
            return Err(PipelineError::invalid(
                "steps",
                format!("{} is more than {MAX_STEPS}", self.steps),
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(PipelineError::invalid(
                "batch",
                format!("{} is not in 1..={MAX_BATCH}", self.batch),
            ));
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            return Err(PipelineError::invalid(
                "cfg-scale",
                format!("{} is not a finite number >= 0", self.cfg_scale),
            ));
        }
        if !self.eta.is_finite() || self.eta < 0.0 {
            return Err(PipelineError::invalid(
                "eta",
                format!("{} is not a finite number >= 0", self.eta),
            ));
        }
        if self.karras && !sampler.supports_karras() {
            return Err(PipelineError::invalid(
                "karras",
                format!("the {} sampler has no Karras schedule", sampler.name()),
            ));
        }
        let m = spec.size_multiple();
        let default_side = spec.sample_size.unwrap_or(64) * spec.vae_factor();
        let side = |v: Option<usize>, field: &'static str| -> Result<usize> {
            let v = v.unwrap_or(default_side);
            if v == 0 || v > MAX_SIDE {
                return Err(PipelineError::invalid(
                    field,
                    format!("{v} is not in 1..={MAX_SIDE}"),
                ));
            }
            if !v.is_multiple_of(m) {
                return Err(PipelineError::invalid(
                    field,
                    format!("{v} is not a multiple of {m} (this model's f × UNet downsampling)"),
                ));
            }
            Ok(v)
        };
        let width = side(self.width, "width")?;
        let height = side(self.height, "height")?;
        let decode = match self.tile_vae {
            None => DecodeMode::Whole,
            Some(px) => DecodeMode::Tiled(
                TileConfig::from_pixels(px, spec.vae_factor())
                    .map_err(|e| PipelineError::invalid("tile_vae", e.to_string()))?,
            ),
        };
        Ok(ValidRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler,
            karras: self.karras,
            eta: self.eta,
            width,
            height,
            seed: self.seed.unwrap_or(random_seed),
            batch: self.batch,
            noise: self.noise.clone(),
            decode,
        })
    }
}

/// AUTOMATIC1111's display name of a sampler (as its infotext and API spell them).
pub fn a1111_sampler_name(kind: SamplerKind, karras: bool) -> String {
    let base = match kind {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::Plms => "PLMS",
        SamplerKind::Ddpm => "DDPM",
        SamplerKind::Euler => "Euler",
        SamplerKind::EulerAncestral => "Euler a",
        SamplerKind::Heun => "Heun",
        SamplerKind::Lms => "LMS",
        SamplerKind::DpmPp2m => "DPM++ 2M",
    };
    if karras {
        format!("{base} Karras")
    } else {
        base.to_string()
    }
}

/// The two tasks that start from an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTask {
    /// SDEdit image-to-image (a plain model).
    Img2img,
    /// Inpainting: a 9-channel inpainting model, or a plain model by latent blending.
    Inpaint,
}

impl ImageTask {
    /// The request field that names the input image.
    pub fn image_field(self) -> &'static str {
        match self {
            ImageTask::Img2img => "init-image",
            ImageTask::Inpaint => "image",
        }
    }
}

/// An img2img or inpainting request: the txt2img fields (`width`/`height` may be left out: the size is the
/// input image's; `noise` is not used by these tasks) and the strength.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub generate: GenerateRequest,
    /// How far the input is noised before sampling (SDEdit's t₀/T; A1111's "Denoising strength"), in [0, 1].
    pub strength: f64,
}

/// An [`ImageRequest`] checked against the model and the input image.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidImageRequest {
    /// `width` and `height` are the input image's.
    pub base: ValidRequest,
    pub strength: f64,
}

impl ImageRequest {
    /// Checks every field for `task` on an input image of `width` × `height` pixels (after any outpainting
    /// padding); `random_seed` is used when no seed was asked for.
    pub fn validate(
        &self,
        spec: &ModelSpec,
        task: ImageTask,
        (width, height): (usize, usize),
        random_seed: u64,
    ) -> Result<ValidImageRequest> {
        if task == ImageTask::Img2img && spec.is_inpainting() {
            return Err(PipelineError::invalid(
                "model",
                "this is an inpainting model (its UNet takes mask and image channels); use inpaint with a mask",
            ));
        }
        if !(0.0..=1.0).contains(&self.strength) {
            return Err(PipelineError::invalid(
                "strength",
                format!("{} is not a number in [0, 1]", self.strength),
            ));
        }
        if self.generate.noise.is_some() {
            return Err(PipelineError::invalid(
                "noise",
                "a noise file is for txt2img; img2img and inpainting draw their noise from the seed",
            ));
        }
        let field = task.image_field();
        for (given, side, name) in [
            (self.generate.width, width, "width"),
            (self.generate.height, height, "height"),
        ] {
            if given.is_some_and(|g| g != side) {
                return Err(PipelineError::invalid(
                    field,
                    format!("the image is {width}x{height}, but a {name} of {} was asked for (the image is not resized)", given.unwrap_or(0)),
                ));
            }
        }
        let m = spec.size_multiple();
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(PipelineError::invalid(
                field,
                format!("the image is {width}x{height}; sides must be in 1..={MAX_SIDE}"),
            ));
        }
        if !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            return Err(PipelineError::invalid(
                field,
                format!(
                    "the image is {width}x{height}; both sides must be multiples of {m} (this model's f × UNet \
                     downsampling; the image is not resized: crop or pad it)"
                ),
            ));
        }
        let generate = GenerateRequest {
            width: Some(width),
            height: Some(height),
            ..self.generate.clone()
        };
        Ok(ValidImageRequest {
            base: generate.check(spec, random_seed)?,
            strength: self.strength,
        })
    }
}
