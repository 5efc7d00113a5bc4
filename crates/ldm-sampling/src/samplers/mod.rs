//! The samplers, each a plain function of a [`Denoiser`](crate::Denoiser) (STYLE P1).
//!
//! Two families, two scalings:
//!
//! * DDIM, PLMS and DDPM walk integer timesteps and keep diffusers' variance-preserving latents
//!   x_t = √ᾱ x₀ + √(1−ᾱ) ε; they hand the denoiser x_t/√ᾱ (its VE scaling) and use ᾱ bookkeeping
//!   ([`DiscreteStep`]) because diffusers' versions step between levels that are not always the ones the
//!   model was evaluated at.
//! * Euler, Euler ancestral, Heun, LMS and DPM++ 2M take x in VE scaling (x = x₀ + σε, k-diffusion's
//!   convention) and a σ grid ending at 0 (`levels`, each with its model t).
//!
//! Every sampler takes an optional [`KnownRegion`]: diffusers' inpainting with a plain (4-channel) UNet
//! re-imposes the known part of the image after every update, noised to the level of the next model
//! evaluation (clean after the last). Without one, the samplers are exactly their txt2img selves.

mod ddim;
mod ddpm;
mod dpmpp;
mod euler;
mod heun;
mod lms;
mod plms;

pub use ddim::ddim;
pub use ddpm::ddpm;
pub use dpmpp::dpmpp_2m;
pub use euler::{euler, euler_ancestral};
pub use heun::heun;
pub(crate) use heun::heun_evaluations;
pub use lms::lms;
pub use plms::plms;

use candle_core::Tensor;
use ldm_core::rng::NoiseRng;

use crate::denoiser::NoiseLevel;
use crate::error::{Result, SamplingError};

/// What a sampler reports after each model evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// 0-based index of the evaluation.
    pub index: usize,
    /// Number of evaluations the run makes.
    pub total: usize,
    /// Where the model was evaluated.
    pub level: NoiseLevel,
    /// The x̂₀ estimate the update used ([B, C, H, W]).
    pub denoised: &'a Tensor,
}

/// One model evaluation of a discrete-time sampler, in ᾱ bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscreteStep {
    /// The model timestep.
    pub t: f64,
    /// ᾱ at `t`: the level the model is told its input is at.
    pub alpha_bar: f64,
    /// ᾱ of the sample the update starts from (differs from `alpha_bar` only in PLMS's second call).
    pub alpha_bar_from: f64,
    /// ᾱ the update moves to.
    pub alpha_bar_to: f64,
}

impl DiscreteStep {
    /// The evaluation point: t with σ = √((1−ᾱ)/ᾱ).
    pub fn level(&self) -> NoiseLevel {
        NoiseLevel {
            sigma: sigma_of(self.alpha_bar),
            t: self.t,
        }
    }
}

/// σ = √((1−ᾱ)/ᾱ).
pub fn sigma_of(alpha_bar: f64) -> f64 {
    ((1.0 - alpha_bar) / alpha_bar).sqrt()
}

/// A noise level in the scaling a sampler keeps its sample in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseAt {
    /// Variance-preserving latents at ᾱ: √ᾱ x₀ + √(1−ᾱ) ε (DDIM, PLMS, DDPM; diffusers' `add_noise` of the
    /// ᾱ-based schedulers).
    Vp { alpha_bar: f64 },
    /// Variance-exploding latents at σ: x₀ + σ ε (the σ-based samplers).
    Ve { sigma: f64 },
}

impl NoiseAt {
    /// `x0` noised with the unit `noise` to this level (both [B, C, H, W]).
    pub fn add_noise(self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        match self {
            NoiseAt::Vp { alpha_bar } => {
                lin2(alpha_bar.sqrt(), x0, (1.0 - alpha_bar).sqrt(), noise)
            }
            NoiseAt::Ve { sigma } => Ok((x0 + (noise * sigma)?)?),
        }
    }
}

/// The known region of an inpainting run with a plain UNet, re-imposed after every sampler update as
/// diffusers' `StableDiffusionInpaintPipeline` does for a 4-channel UNet:
/// x ← (1 − m)·noised(x₀, ε, next level) + m·x, with x₀ the clean image latents and ε the run's initial noise.
#[derive(Debug, Clone, Copy)]
pub struct KnownRegion<'a> {
    /// Clean image latents x₀, [B, C, H, W] (diffusers' `image_latents`).
    pub latents: &'a Tensor,
    /// The unit noise the run started from, [B, C, H, W].
    pub noise: &'a Tensor,
    /// 1 where the sampler repaints, 0 where the image is kept; [B, 1, H, W], binary.
    pub mask: &'a Tensor,
}

impl KnownRegion<'_> {
    /// The blended sample; `next` is the level of the next model evaluation, `None` after the last one
    /// (then the clean latents are used).
    pub fn reimpose(&self, x: Tensor, next: Option<NoiseAt>) -> Result<Tensor> {
        let known = match next {
            Some(at) => at.add_noise(self.latents, self.noise)?,
            None => self.latents.clone(),
        };
        let keep = (1.0 - self.mask)?; // (1 − m)
        Ok((keep.broadcast_mul(&known)? + self.mask.broadcast_mul(&x)?)?)
    }
}

/// Applies `keep` if there is one.
pub(crate) fn reimpose(
    keep: Option<&KnownRegion<'_>>,
    x: Tensor,
    next: Option<NoiseAt>,
) -> Result<Tensor> {
    match keep {
        Some(k) => k.reimpose(x, next),
        None => Ok(x),
    }
}

/// The VP level of call `i + 1` of a discrete-time list, `None` after the last.
pub(crate) fn next_vp(steps: &[DiscreteStep], i: usize) -> Option<NoiseAt> {
    steps.get(i + 1).map(|s| NoiseAt::Vp {
        alpha_bar: s.alpha_bar,
    })
}

/// The VE level σ_{i+1} of a σ grid (descending, ending at 0), `None` when that is the final σ = 0.
pub(crate) fn next_ve(levels: &[NoiseLevel], i: usize) -> Option<NoiseAt> {
    (i + 2 < levels.len()).then(|| NoiseAt::Ve {
        sigma: levels[i + 1].sigma,
    })
}

/// One `randn` of `x`'s size from `rng`, shaped and typed like `x`.
pub(crate) fn noise_like(rng: &mut dyn NoiseRng, x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    let v = rng.randn(n);
    if v.len() != n {
        return Err(SamplingError::NoiseLength {
            got: v.len(),
            expected: n,
        });
    }
    Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// a·x + b·y.
pub(crate) fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}

/// Refuses a σ grid with fewer than two levels (nothing to step between).
pub(crate) fn check_levels(levels: &[NoiseLevel]) -> Result<()> {
    if levels.len() < 2 {
        return Err(SamplingError::Config(format!(
            "a σ grid needs at least 2 levels, got {}",
            levels.len()
        )));
    }
    Ok(())
}

/// x̂₀ clamped to ±range when diffusers' `clip_sample` is on.
pub(crate) fn clip_x0(x0: Tensor, clip: Option<f64>) -> Result<Tensor> {
    Ok(match clip {
        Some(r) => x0.clamp(-r, r)?,
        None => x0,
    })
}
