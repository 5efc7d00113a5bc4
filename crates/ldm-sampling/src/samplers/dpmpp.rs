//! DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models", algorithm 2 (multistep second order, data prediction), in VE scaling as
//! k-diffusion's `sample_dpmpp_2m`:
//!
//! λ = −ln σ, h_i = λ_{i+1} − λ_i, r_i = h_{i−1}/h_i,
//! D_i = (1 + 1/(2 r_i)) x̂₀_i − 1/(2 r_i) x̂₀_{i−1}   (D_0 = x̂₀_0),
//! x_{i+1} = (σ_{i+1}/σ_i) x_i − (e^{−h_i} − 1) D_i,   and x = x̂₀ at the last step (σ = 0).
//!
//! | code       | paper     |
//! |------------|-----------|
//! | `h`        | h_i       |
//! | `h_last`   | h_{i−1}   |
//! | `d`        | D_i       |
//!
//! As diffusers' DPMSolverMultistepScheduler with `algorithm_type="dpmsolver++"`, `solver_order=2`,
//! `solver_type="midpoint"`, `final_sigmas_type="zero"` (v0.42.1), which runs the same updates on VP latents
//! (first and last steps first order).

use candle_core::Tensor;

use super::{lin2, next_ve, reimpose, KnownRegion, Step};
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;

/// DPM-Solver++(2M) on VE-scaled `x` ([B, C, H, W]) along `levels` (descending σ, ending at 0).
pub fn dpmpp_2m(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    super::check_levels(levels)?;
    let total = levels.len() - 1;
    let mut previous: Option<(Tensor, f64)> = None; // (x̂₀_{i−1}, h_{i−1})
    for (index, w) in levels.windows(2).enumerate() {
        let (level, next) = (w[0], w[1].sigma);
        let x0 = d.denoise(&x, level)?;
        on_step(Step {
            index,
            total,
            level,
            denoised: &x0,
        });
        if next == 0.0 {
            x = reimpose(keep, x0, None)?;
            continue;
        }
        let h = (level.sigma / next).ln();
        let d_i = match &previous {
            Some((x0_prev, h_last)) => {
                let r = h_last / h;
                lin2(1.0 + 1.0 / (2.0 * r), &x0, -1.0 / (2.0 * r), x0_prev)?
            }
            None => x0.clone(),
        };
        x = lin2(next / level.sigma, &x, -(-h).exp_m1(), &d_i)?;
        x = reimpose(keep, x, next_ve(levels, index))?;
        previous = Some((x0, h));
    }
    Ok(x)
}
