//! Text-to-image (Rombach et al. 2022, Sec. 3.3 with classifier-free guidance, Ho & Salimans 2021), step for
//! step as diffusers' `StableDiffusionPipeline.__call__` does it:
//!
//! 1. context c = τ(prompt), and for guidance the unconditional context τ(negative prompt or ""), stacked as
//!    [uncond × B; cond × B];
//! 2. unit noise z_T ~ N(0, I) of shape [B, C, H/f, W/f] — one `randn` of the whole batch from the seeded
//!    generator (or a user's `.npy`);
//! 3. the sampler's loop on the denoiser built from the UNet ε_θ (or v_θ), with per-step noise drawn from the
//!    same generator after the initial draw;
//! 4. x = D(z_0 / scale), mapped from [−1, 1] to [0, 1].
use candle_core::{DType, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::autoencoder::TileConfig;
use ldm_sampling::{
    denoiser_for, guidance_enabled, prepare, run_latents, Cfg, KnownRegion, NoisePredictor, Plan,
    Step,
};

use crate::error::{PipelineError, Result};
use crate::models::SdModels;
use crate::request::ValidRequest;

/// The UNet with fixed conditioning, as the sampler sees it. Every tensor has the batch B' the sampler passes
/// (doubled under guidance: [unconditional; conditional]).
pub(crate) struct UnetPredictor<'a> {
    pub models: &'a SdModels,
    /// Cross-attention context [B', L, D] (text, class or layout tokens).
    pub context: Option<Tensor>,
    /// Class labels [B'] (u32) for UNets with `num_classes` (the x4 upscaler's noise level).
    pub y: Option<Tensor>,
    /// Channels concatenated after the (scaled) latent input, [B', C', H, W]: an inpainting UNet's mask and
    /// masked-image latents, a super-resolution model's low-res image, a semantic map.
    pub extra: Option<Tensor>,
}

impl NoisePredictor for UnetPredictor<'_> {
    fn predict(&self, x_in: &Tensor, t: f64) -> ldm_sampling::Result<Tensor> {
        let b = x_in.dim(0)?;
        let t = Tensor::full(t as f32, b, x_in.device())?;
        // The sampler's state is f32; the UNet runs in the models' dtype (f16 on CUDA, say).
        let (dtype, state_dtype) = (self.models.dtype, x_in.dtype());
        let x_in = x_in.to_dtype(dtype)?;
        let x_in = match &self.extra {
            Some(extra) => Tensor::cat(&[&x_in, &extra.to_dtype(dtype)?], 1)?,
            None => x_in,
        };
        let out =
            self.models
                .unet
                .forward_with(&x_in, &t, self.context.as_ref(), self.y.as_ref())?;
        Ok(out.to_dtype(state_dtype)?)
    }
}

/// What txt2img returns.
pub struct Generated {
    /// Final latents in UNet space, [B, C, h, w].
    pub latents: Tensor,
    /// Decoded images in [0, 1], [B, 3, H, W].
    pub images: Tensor,
}

impl Generated {
    /// The result as every pipeline returns it: both tensors moved to the CPU (a no-op there), whatever device
    /// the networks ran on. The images are already f32 ([`decode_with`]); the latents are the sampler's f32.
    pub fn on_cpu(latents: Tensor, images: Tensor) -> Result<Self> {
        let cpu = candle_core::Device::Cpu;
        Ok(Generated {
            latents: latents.to_device(&cpu)?,
            images: images.to_device(&cpu)?,
        })
    }
}

/// Progress of a run: (model evaluations done, total).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// The initial unit-variance noise for `req`: the user's file, or one draw from `rng`.
pub fn initial_noise(
    models: &SdModels,
    req: &ValidRequest,
    rng: &mut dyn NoiseRng,
) -> Result<Tensor> {
    let f = models.spec.vae_factor();
    let shape = [
        req.batch,
        models.spec.latent_channels(),
        req.height / f,
        req.width / f,
    ];
    match &req.noise {
        Some(path) => {
            let npy = ldm_core::npy::read_npy_f32(path)
                .map_err(|e| PipelineError::invalid("noise", e.to_string()))?;
            if npy.shape != shape {
                return Err(PipelineError::invalid(
                    "noise",
                    format!(
                        "{} has shape {:?}, this request needs {:?}",
                        path.display(),
                        npy.shape,
                        shape
                    ),
                ));
            }
            Ok(Tensor::from_vec(npy.data, &shape, &models.device)?)
        }
        None => {
            let n = shape.iter().product();
            Ok(Tensor::from_vec(rng.randn(n), &shape, &models.device)?)
        }
    }
}

/// Runs txt2img for `req`; `progress` is called after every model evaluation.
pub fn txt2img(models: &SdModels, req: &ValidRequest, progress: Progress<'_>) -> Result<Generated> {
    txt2img_with_rng(models, req, &mut TorchRng::new(req.seed), progress)
}

/// [`txt2img`] drawing the initial noise (unless given as a file) and then the step noise from `rng`.
pub fn txt2img_with_rng(
    models: &SdModels,
    req: &ValidRequest,
    rng: &mut dyn NoiseRng,
    progress: Progress<'_>,
) -> Result<Generated> {
    if models.spec.is_inpainting() {
        return Err(PipelineError::invalid(
            "model",
            "txt2img needs a plain (4-channel) model, not an inpainting one",
        ));
    }
    if !matches!(models.spec.concat, crate::spec::ConcatSpec::None) || !models.spec.takes_prompt() {
        return Err(PipelineError::invalid(
            "model",
            format!(
                "txt2img needs a text-to-image model; this one ({}) is conditioned on {}",
                models.spec.describe(),
                models.spec.conditioning()
            ),
        ));
    }
    let plan = prepare(
        req.sampler,
        &models.spec.scheduler,
        req.steps,
        req.karras,
        req.eta,
    )
    .map_err(|e| PipelineError::invalid("sampler", e.to_string()))?;
    let noise = initial_noise(models, req, rng)?;
    let context = prompt_context(models, req)?;
    let latents = (noise * plan.init_noise_sigma)?;
    let sampler = Sampling {
        plan: &plan,
        models,
        req,
        context: Some(context),
        y: None,
        extra: None,
    };
    let latents = sampler.run(latents, rng, None, progress)?;
    let images = decode_with(models, &latents, req.decode)?;
    Generated::on_cpu(latents, images)
}

/// The UNet's text context for `req`: the prompt's × B, preceded by the negative prompt's × B when guidance
/// is on ([2B, L, D] or [B, L, D]).
pub(crate) fn prompt_context(models: &SdModels, req: &ValidRequest) -> Result<Tensor> {
    let b = req.batch;
    let cond = models
        .encode_prompts(&[req.prompt.as_str()])?
        .repeat((b, 1, 1))?;
    if !guidance_enabled(req.cfg_scale) {
        return Ok(cond);
    }
    let uncond = models
        .encode_prompts(&[req.negative_prompt.as_str()])?
        .repeat((b, 1, 1))?;
    Ok(Tensor::cat(&[&uncond, &cond], 0)?)
}

/// One sampling run of a request: the plan, the UNet with its context (from [`prompt_context`]) and any extra
/// input channels (given for the whole UNet batch, i.e. doubled under guidance).
pub(crate) struct Sampling<'a> {
    pub plan: &'a Plan,
    pub models: &'a SdModels,
    pub req: &'a ValidRequest,
    pub context: Option<Tensor>,
    pub y: Option<Tensor>,
    pub extra: Option<Tensor>,
}

impl Sampling<'_> {
    /// Runs the plan from `latents` (as diffusers holds them before its loop); see [`run_latents`].
    pub fn run(
        self,
        latents: Tensor,
        rng: &mut dyn NoiseRng,
        keep: Option<&KnownRegion<'_>>,
        progress: Progress<'_>,
    ) -> Result<Tensor> {
        let unet = UnetPredictor {
            models: self.models,
            context: self.context,
            y: self.y,
            extra: self.extra,
        };
        let denoiser = if guidance_enabled(self.req.cfg_scale) {
            let cfg = Cfg {
                inner: unet,
                scale: self.req.cfg_scale,
            };
            denoiser_for(
                self.models.spec.prediction(),
                Box::new(cfg) as Box<dyn NoisePredictor + '_>,
            )
        } else {
            denoiser_for(
                self.models.spec.prediction(),
                Box::new(unet) as Box<dyn NoisePredictor + '_>,
            )
        };
        let mut on_step = |s: Step<'_>| progress(s.index + 1, s.total);
        run_latents(
            self.plan,
            denoiser.as_ref(),
            latents,
            rng,
            keep,
            &mut on_step,
        )
        .map_err(|e| PipelineError::Model(e.to_string()))
    }
}

/// How the first stage decodes the final latents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecodeMode {
    /// The whole latent in one pass (memory grows with the image).
    #[default]
    Whole,
    /// Overlapping tiles blended together (memory bounded by the tile; see `ldm_models::autoencoder::tiled`).
    Tiled(TileConfig),
}

/// Latents in UNet space → images in [0, 1], decoded in one pass.
pub fn decode(models: &SdModels, latents: &Tensor) -> Result<Tensor> {
    decode_with(models, latents, DecodeMode::Whole)
}

/// Latents in UNet space → images in [0, 1], decoded as `mode` says.
pub fn decode_with(models: &SdModels, latents: &Tensor, mode: DecodeMode) -> Result<Tensor> {
    let z = (latents / models.spec.latent_scale)?.to_dtype(models.dtype)?;
    let x = match mode {
        DecodeMode::Whole => models.first_stage.decode(&z)?,
        DecodeMode::Tiled(cfg) => models.first_stage.decode_tiled(&z, &cfg)?,
    };
    Ok(((x.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
