//! Linear multistep (LMS, order 4) on the probability-flow ODE in σ: Karras et al. 2022 (EDM), eq. (3),
//! integrated with Adams–Bashforth coefficients over non-uniform σ nodes (k-diffusion's `sample_lms`):
//!
//! x_{i+1} = x_i + Σ_{j<order} c_j d_{i−j},   c_j = ∫_{σ_i}^{σ_{i+1}} ∏_{k≠j} (τ − σ_{i−k})/(σ_{i−j} − σ_{i−k}) dτ,
//! d_i = (x_i − x̂₀(x_i, σ_i))/σ_i, order = min(i + 1, 4).
//!
//! diffusers' LMSDiscreteScheduler (v0.42.1) integrates the Lagrange basis with `scipy.integrate.quad`
//! (in f32); the integrand is a polynomial of degree ≤ 3, which 3-point Gauss–Legendre integrates exactly,
//! so the coefficients here are exact to f64 rounding.

use candle_core::Tensor;

use super::Step;
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;

const ORDER: usize = 4;

/// ∫_{σ_i}^{σ_{i+1}} of the Lagrange basis polynomial of node `j` (σ_{i−j}) over the `order` nodes
/// σ_i, σ_{i−1}, ...; `sigmas` is the whole grid (descending, ending at 0), `i` the current index.
pub fn lms_coefficient(sigmas: &[f64], order: usize, i: usize, j: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
            .product::<f64>()
    };
    // 3-point Gauss–Legendre on [a, b]: exact for polynomials of degree <= 5.
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let node = (3.0f64 / 5.0).sqrt();
    half * (8.0 / 9.0 * basis(mid)
        + 5.0 / 9.0 * (basis(mid - half * node) + basis(mid + half * node)))
}

/// LMS (order 4) on VE-scaled `x` ([B, C, H, W]) along `levels` (descending σ, ending at 0).
pub fn lms(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    let sigmas: Vec<f64> = levels.iter().map(|l| l.sigma).collect();
    let total = levels.len() - 1;
    let mut slopes: Vec<Tensor> = Vec::with_capacity(ORDER); // newest first
    for (i, &level) in levels[..total].iter().enumerate() {
        let x0 = d.denoise(&x, level)?;
        slopes.insert(0, ((&x - &x0)? / level.sigma)?);
        slopes.truncate(ORDER);
        let order = (i + 1).min(ORDER);
        for (j, slope) in slopes.iter().enumerate().take(order) {
            x = (&x + (slope * lms_coefficient(&sigmas, order, i, j))?)?;
        }
        on_step(Step {
            index: i,
            total,
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}
