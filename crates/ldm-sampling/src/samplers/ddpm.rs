//! DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", eq. (6)–(7)
//! with the posterior q(x_{t−1} | x_t, x̂₀) and σ_t² = β̃_t (diffusers' `fixed_small`).
//!
//! x_{t−1} = √ᾱ_{t−1} β_t/(1−ᾱ_t) · x̂₀ + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t + √β̃_t z,
//! β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) · β_t, where for a strided schedule α_t = ᾱ_t/ᾱ_{t−1}, β_t = 1 − α_t and t−1
//! is the next visited timestep (ᾱ = 1 after the last).
//!
//! As diffusers' DDPMScheduler (v0.42.1): noise is drawn whenever t > 0 (so also at a last timestep of 1,
//! where β̃ is clamped to 1e-20), and `clip_sample` clamps x̂₀.

use candle_core::Tensor;
use ldm_core::rng::NoiseRng;

use super::{clip_x0, lin2, next_vp, noise_like, reimpose, DiscreteStep, KnownRegion, Step};
use crate::denoiser::Denoiser;
use crate::error::Result;

/// DDPM on diffusers' VP latents `x` ([B, C, H, W]); returns the latents after the last step.
pub fn ddpm(
    d: &dyn Denoiser,
    mut x: Tensor,
    steps: &[DiscreteStep],
    clip: Option<f64>,
    rng: &mut dyn NoiseRng,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    for (index, s) in steps.iter().enumerate() {
        let level = s.level();
        let (alpha_bar, alpha_bar_prev) = (s.alpha_bar_from, s.alpha_bar_to);
        let x0 = clip_x0(d.denoise(&(&x / alpha_bar.sqrt())?, level)?, clip)?;
        let alpha = alpha_bar / alpha_bar_prev;
        let beta = 1.0 - alpha;
        let c_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar);
        let c_xt = alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar);
        x = lin2(c_x0, &x0, c_xt, &x)?;
        if s.t > 0.0 {
            let variance = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta).max(1e-20);
            x = (&x + (noise_like(rng, &x)? * variance.sqrt())?)?;
        }
        x = reimpose(keep, x, next_vp(steps, index))?;
        on_step(Step {
            index,
            total: steps.len(),
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}
