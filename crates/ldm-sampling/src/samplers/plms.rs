//! PLMS: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM),
//! eq. (9) (the transfer φ) and eq. (12) (the linear multistep combination, with its first steps).
//!
//! φ(x_t, ε, t → t') = √(ᾱ_{t'}/ᾱ_t) x_t − (ᾱ_{t'} − ᾱ_t) / (ᾱ_t √(1−ᾱ_{t'}) + √(ᾱ_t (1−ᾱ_t) ᾱ_{t'})) · ε,
//! ε' = (55 e₀ − 59 e₁ + 37 e₂ − 9 e₃)/24 from the latest four outputs (fewer at the start).
//!
//! | code             | paper      |
//! |------------------|------------|
//! | `alpha_bar_from` | ᾱ_t        |
//! | `alpha_bar_to`   | ᾱ_{t'}     |
//! | `outputs`        | e_i        |
//!
//! Exactly diffusers' PNDMScheduler with `skip_prk_steps` (v0.42.1): the first call makes an Euler-like step,
//! the second is evaluated at its result but redoes the first step from the start with the mean of both
//! outputs (a pseudo improved-Euler start); its output is then dropped from the history, so the third call
//! combines (3 e₂ − e₀)/2. The history holds raw model outputs (ε or v) and is converted to ε at the
//! sample the transfer starts from, as diffusers does for v-models.

use candle_core::Tensor;

use super::{next_vp, reimpose, DiscreteStep, KnownRegion, Step};
use crate::denoiser::Denoiser;
use crate::error::Result;

/// PLMS on diffusers' VP latents `x` ([B, C, H, W]); `calls` has one entry per model evaluation.
pub fn plms(
    d: &dyn Denoiser,
    mut x: Tensor,
    calls: &[DiscreteStep],
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    let mut outputs: Vec<Tensor> = Vec::with_capacity(4);
    let mut start: Option<Tensor> = None;
    for (index, s) in calls.iter().enumerate() {
        let level = s.level();
        let out = d.predict(&(&x / s.alpha_bar.sqrt())?, level)?;
        let (combined, from) = match index {
            0 => {
                start = Some(x.clone());
                outputs.push(out.clone());
                (out, x.clone())
            }
            1 => {
                let first = outputs.last().unwrap_or(&out);
                let mean = ((&out + first)? / 2.0)?;
                (mean, start.take().unwrap_or_else(|| x.clone()))
            }
            _ => {
                if outputs.len() == 4 {
                    outputs.remove(0);
                }
                outputs.push(out);
                (multistep(&outputs)?, x.clone())
            }
        };
        let (alpha_bar, alpha_bar_prev) = (s.alpha_bar_from, s.alpha_bar_to);
        let sigma = super::sigma_of(alpha_bar);
        let from_ve = (&from / alpha_bar.sqrt())?;
        let x0 = d.x0_from_output(&combined, &from_ve, sigma)?;
        let eps = ((&from_ve - &x0)? / sigma)?;
        let denom = alpha_bar * (1.0 - alpha_bar_prev).sqrt()
            + (alpha_bar * (1.0 - alpha_bar) * alpha_bar_prev).sqrt();
        x = super::lin2(
            (alpha_bar_prev / alpha_bar).sqrt(),
            &from,
            -(alpha_bar_prev - alpha_bar) / denom,
            &eps,
        )?;
        x = reimpose(keep, x, next_vp(calls, index))?;
        on_step(Step {
            index,
            total: calls.len(),
            level,
            denoised: &x0,
        });
    }
    Ok(x)
}

/// Adams–Bashforth combination of the history (oldest first), of order `outputs.len()` (1 to 4).
fn multistep(outputs: &[Tensor]) -> Result<Tensor> {
    let coeffs: &[f64] = match outputs.len() {
        1 => &[1.0],
        2 => &[-1.0 / 2.0, 3.0 / 2.0],
        3 => &[5.0 / 12.0, -16.0 / 12.0, 23.0 / 12.0],
        _ => &[-9.0 / 24.0, 37.0 / 24.0, -59.0 / 24.0, 55.0 / 24.0],
    };
    let n = outputs.len();
    let mut acc = (&outputs[n - 1] * coeffs[coeffs.len() - 1])?;
    for (o, c) in outputs[..n - 1]
        .iter()
        .rev()
        .zip(coeffs[..coeffs.len() - 1].iter().rev())
    {
        acc = (acc + (o * *c)?)?;
    }
    Ok(acc)
}
