//! DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. (12) and (16).
//!
//! x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
//! σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}), z ~ N(0, I).
//!
//! | code              | paper        |
//! |-------------------|--------------|
//! | `alpha_bar`       | ᾱ_t          |
//! | `alpha_bar_prev`  | ᾱ_{t−1}      |
//! | `std`             | σ_t (eq. 16) |
//! | `x0`, `eps`       | x̂₀, ε̂        |
//!
//! As diffusers' DDIMScheduler (v0.42.1): ε̂ is the model's (before `clip_sample` clamps x̂₀), the step goes
//! to t − T/steps whatever the spacing, and noise is drawn at every step when η > 0.

use candle_core::Tensor;
use ldm_core::rng::NoiseRng;

use super::{clip_x0, lin2, next_vp, noise_like, reimpose, DiscreteStep, KnownRegion, Step};
use crate::denoiser::Denoiser;
use crate::error::Result;

/// DDIM on diffusers' VP latents `x` ([B, C, H, W]); returns the latents after the last step. `keep`: see
/// [`KnownRegion`].
// The arguments are the grid, its two options, and the three per-run inputs every sampler takes.
#[allow(clippy::too_many_arguments)]
pub fn ddim(
    d: &dyn Denoiser,
    mut x: Tensor,
    steps: &[DiscreteStep],
    eta: f64,
    clip: Option<f64>,
    rng: &mut dyn NoiseRng,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    for (index, s) in steps.iter().enumerate() {
        let level = s.level();
        let (alpha_bar, alpha_bar_prev) = (s.alpha_bar_from, s.alpha_bar_to);
        let x_ve = (&x / alpha_bar.sqrt())?;
        let x0 = d.denoise(&x_ve, level)?;
        let eps = ((&x_ve - &x0)? / level.sigma)?;
        let x0 = clip_x0(x0, clip)?;
        let variance =
            (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev);
        let std = eta * variance.sqrt();
        let dir = (1.0 - alpha_bar_prev - std * std).max(0.0).sqrt();
        x = lin2(alpha_bar_prev.sqrt(), &x0, dir, &eps)?;
        if eta > 0.0 {
            x = (x + (noise_like(rng, &eps)? * std)?)?;
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
