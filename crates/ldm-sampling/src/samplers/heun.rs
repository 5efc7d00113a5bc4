//! Heun's second-order method: Karras et al. 2022 (EDM), algorithm 1 (deterministic, no churn).
//!
//! x̃ = x_i + (σ_{i+1} − σ_i) d_i, d_i = (x_i − x̂₀(x_i, σ_i))/σ_i;
//! x_{i+1} = x_i + (σ_{i+1} − σ_i) (d_i + d̃)/2, d̃ = (x̃ − x̂₀(x̃, σ_{i+1}))/σ_{i+1}; the last step
//! (σ_{i+1} = 0) is a plain Euler step. 2·steps − 1 model evaluations.
//!
//! As diffusers' HeunDiscreteScheduler (v0.42.1), whose doubled timestep list is exactly these
//! evaluations; `clip_sample` clamps x̂₀ at both.

use candle_core::Tensor;

use super::{clip_x0, next_ve, reimpose, KnownRegion, Step};
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;

/// Heun on VE-scaled `x` ([B, C, H, W]) along `levels` (descending σ, ending at 0).
pub fn heun(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    clip: Option<f64>,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    super::check_levels(levels)?;
    let total = 2 * (levels.len() - 1) - 1;
    let mut index = 0;
    for (i, w) in levels.windows(2).enumerate() {
        let (level, next) = (w[0], w[1]);
        let dt = next.sigma - level.sigma;
        let x0 = clip_x0(d.denoise(&x, level)?, clip)?;
        let slope = ((&x - &x0)? / level.sigma)?;
        on_step(Step {
            index,
            total,
            level,
            denoised: &x0,
        });
        index += 1;
        // diffusers re-imposes after each of Heun's two calls, both at σ_{i+1} (where the sample then is).
        let euler = reimpose(keep, (&x + (&slope * dt)?)?, next_ve(levels, i))?;
        if next.sigma == 0.0 {
            x = euler;
            continue;
        }
        let x0_2 = clip_x0(d.denoise(&euler, next)?, clip)?;
        let slope_2 = ((&euler - &x0_2)? / next.sigma)?;
        x = (&x + (((slope + slope_2)? / 2.0)? * dt)?)?;
        x = reimpose(keep, x, next_ve(levels, i))?;
        on_step(Step {
            index,
            total,
            level: next,
            denoised: &x0_2,
        });
        index += 1;
    }
    Ok(x)
}

/// The (σ, t) of every model evaluation [`heun`] makes along `levels`.
pub(crate) fn heun_evaluations(levels: &[NoiseLevel]) -> Vec<NoiseLevel> {
    let Some((_, inner)) = levels.split_last() else {
        return Vec::new();
    };
    let Some((first, rest)) = inner.split_first() else {
        return Vec::new();
    };
    std::iter::once(*first)
        .chain(rest.iter().flat_map(|l| [*l, *l]))
        .collect()
}
