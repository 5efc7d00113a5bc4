//! Euler and Euler ancestral steps on the probability-flow ODE / reverse SDE in VE scaling.
//!
//! Karras et al. 2022 (EDM), eq. (3) and algorithm 1 without churn: dx/dσ = (x − x̂₀(x, σ))/σ, so
//! x_{i+1} = x_i + (σ_{i+1} − σ_i) · (x_i − x̂₀)/σ_i. The ancestral variant (k-diffusion's
//! `sample_euler_ancestral`, from Ho et al. 2020's posterior in VE form) steps down to
//! σ_down = √(σ_{i+1}² − σ_up²), σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i²), then adds σ_up z.
//!
//! | code    | paper        |
//! |---------|--------------|
//! | `sigma` | σ_i          |
//! | `next`  | σ_{i+1}      |
//! | `slope` | dx/dσ        |
//! | `up`, `down` | σ_up, σ_down |
//!
//! As diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler (v0.42.1); the ancestral sampler
//! draws noise at every step, including the last (where σ_up = 0).

use candle_core::Tensor;
use ldm_core::rng::NoiseRng;

use super::{next_ve, noise_like, reimpose, KnownRegion, Step};
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;

/// Euler on VE-scaled `x` ([B, C, H, W]) along `levels` (descending σ, ending at 0).
pub fn euler(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    super::check_levels(levels)?;
    let total = levels.len() - 1;
    for (index, w) in levels.windows(2).enumerate() {
        let (level, next) = (w[0], w[1].sigma);
        let x0 = d.denoise(&x, level)?;
        let slope = ((&x - &x0)? / level.sigma)?; // dx/dσ
        x = (&x + (slope * (next - level.sigma))?)?;
        x = reimpose(keep, x, next_ve(levels, index))?;
        on_step(Step {
            index,
            total,
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}

/// Euler ancestral on VE-scaled `x` along `levels`; one `randn` of x's size per step.
pub fn euler_ancestral(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    rng: &mut dyn NoiseRng,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    super::check_levels(levels)?;
    let total = levels.len() - 1;
    for (index, w) in levels.windows(2).enumerate() {
        let (level, next) = (w[0], w[1].sigma);
        let sigma = level.sigma;
        let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let down = (next * next - up * up).max(0.0).sqrt();
        let x0 = d.denoise(&x, level)?;
        let slope = ((&x - &x0)? / sigma)?;
        x = (&x + (slope * (down - sigma))?)?;
        x = (&x + (noise_like(rng, &x)? * up)?)?;
        x = reimpose(keep, x, next_ve(levels, index))?;
        on_step(Step {
            index,
            total,
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}
