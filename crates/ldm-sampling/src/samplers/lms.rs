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

use super::{KnownRegion, Step};
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;

const ORDER: usize = 4;

/// ∫_{σ_i}^{σ_{i+1}} of the Lagrange basis polynomial of node `j` (σ_{i−j}) over the `order` nodes
/// σ_i, σ_{i−1}, ...; `sigmas` is the whole grid (descending, ending at 0), `i` the current index;
/// `j < order <= i + 1` and `i + 1 < sigmas.len()`.
pub(crate) fn lms_coefficient(sigmas: &[f64], order: usize, i: usize, j: usize) -> f64 {
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

/// LMS (order 4) on VE-scaled `x` ([B, C, H, W]) along `levels` (descending σ, ending at 0), starting at
/// `levels[first]` (0 for a whole run).
///
/// Started part-way (img2img), diffusers' LMSDiscreteScheduler keeps its order and Lagrange nodes tied to the
/// absolute grid index (order = min(index + 1, 4)) while its derivative history starts empty, and sums only the
/// coefficients it has derivatives for (Python's `zip`); this does the same, so the first steps of such a run
/// use truncated higher-order coefficients rather than a lower-order method.
pub fn lms(
    d: &dyn Denoiser,
    mut x: Tensor,
    levels: &[NoiseLevel],
    first: usize,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    let sigmas: Vec<f64> = levels.iter().map(|l| l.sigma).collect();
    super::check_levels(levels)?;
    let total = levels.len() - 1;
    if first >= total {
        return Err(crate::error::SamplingError::Config(format!(
            "LMS start index {first} is past the last of {total} steps"
        )));
    }
    let mut slopes: Vec<Tensor> = Vec::with_capacity(ORDER); // newest first
    for (i, &level) in levels[..total].iter().enumerate().skip(first) {
        let x0 = d.denoise(&x, level)?;
        slopes.insert(0, ((&x - &x0)? / level.sigma)?);
        slopes.truncate(ORDER);
        let order = (i + 1).min(ORDER);
        for (j, slope) in slopes.iter().enumerate().take(order) {
            x = (&x + (slope * lms_coefficient(&sigmas, order, i, j))?)?;
        }
        x = super::reimpose(keep, x, super::next_ve(levels, i))?;
        on_step(Step {
            index: i - first,
            total: total - first,
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::lms_coefficient;

    /// Composite Simpson's rule with many intervals, as an independent reference.
    fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
        let n = 20_000;
        let h = (b - a) / n as f64;
        let inner: f64 = (1..n)
            .map(|k| f(a + k as f64 * h) * if k % 2 == 1 { 4.0 } else { 2.0 })
            .sum();
        (f(a) + f(b) + inner) * h / 3.0
    }

    #[test]
    fn coefficients_are_exact_integrals_of_the_lagrange_basis() {
        let sigmas = [14.6146, 9.72, 6.07, 3.61, 1.95, 0.97, 0.3, 0.0];
        for i in 0..sigmas.len() - 1 {
            let order = (i + 1).min(4);
            let mut sum = 0.0;
            for j in 0..order {
                let basis = |tau: f64| {
                    (0..order)
                        .filter(|&k| k != j)
                        .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
                        .product::<f64>()
                };
                let c = lms_coefficient(&sigmas, order, i, j);
                let reference = simpson(basis, sigmas[i], sigmas[i + 1]);
                assert!(
                    (c - reference).abs() <= 1e-10 * reference.abs().max(1.0),
                    "i {i} j {j}: {c} vs {reference}"
                );
                sum += c;
            }
            // the basis sums to 1, so the coefficients sum to the step length
            assert!(
                (sum - (sigmas[i + 1] - sigmas[i])).abs() <= 1e-12,
                "i {i}: sum {sum}"
            );
        }
    }
}
