//! The training noise schedule as data, and the σ ↔ t maps the samplers use.
//!
//! Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. (4): q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)
//! with ᾱ_t = ∏_{s≤t} (1 − β_s). Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
//! Generative Models" (EDM), eq. (5): σ_t = √((1−ᾱ_t)/ᾱ_t) is the noise level of the same process in the
//! variance-exploding scaling x = x_t / √ᾱ_t = x_0 + σ ε, and eq. (269) gives the ρ = 7 step spacing.
//!
//! | code            | paper  | meaning                                               |
//! |-----------------|--------|-------------------------------------------------------|
//! | `betas[t]`      | β_t    | per-step noise variance                               |
//! | `alpha_bar(t)`  | ᾱ_t    | signal fraction at training step t                    |
//! | `sigma`         | σ      | VE noise level √((1−ᾱ)/ᾱ)                             |
//! | `t`             | t      | model timestep, possibly fractional                   |
//!
//! Numbers follow diffusers (reference: huggingface/diffusers v0.42.1, `schedulers/`): the betas are built in
//! f32 the way `torch.linspace` builds them (fused multiply-add, filled from both ends), ᾱ is `torch.cumprod`
//! (f64 accumulator, f32 results), so β and ᾱ are exactly the f32 numbers diffusers holds (returned as `f64`).
//! σ is computed in f32 with a correctly rounded square root; torch's `** 0.5` (SLEEF `powf`) is not
//! correctly rounded, so diffusers' σ table differs from this one by at most 1 f32 ulp (1.2e-7 relative) in
//! about a fifth of its entries. Interpolations are numpy's f64 ones.

use serde::Deserialize;

use crate::error::{Result, SamplingError};

/// How betas are laid out over the training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β linear from `beta_start` to `beta_end`.
    #[default]
    Linear,
    /// √β linear (Stable Diffusion's schedule).
    ScaledLinear,
    /// Nichol & Dhariwal 2021, "Improved DDPM", eq. (17): ᾱ(t) = cos²(((t/T + s)/(1 + s)) π/2), s = 0.008,
    /// β capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// The training schedule: β_t and ᾱ_t for t = 0..T, stored as the f32 values diffusers computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// σ_t computed in f32, widened.
    sigmas: Vec<f64>,
    /// ln σ_t held in f32, as diffusers' `log_sigmas`.
    log_sigmas: Vec<f32>,
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU, bit for bit: the step is computed in f32, the first
/// half is `start + step*i` and the second half `end - step*(n-1-i)`, each a fused multiply-add.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` in f64: `i*step + start`, the last value set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / div * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// The first `num` values of `numpy.arange(start, stop, step)` for floats: numpy fills `start + i*delta` with
/// `delta = (start + step) - start`. (numpy may make the array one element longer than intended, e.g.
/// `arange(1000, 0, -1000/61)`; callers take the intended count.)
pub fn np_arange(start: f64, step: f64, num: usize) -> Vec<f64> {
    let delta = (start + step) - start;
    (0..num)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)` in f64 (NaN for an empty table).
pub fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let Some(last) = fp.len().checked_sub(1) else {
        return f64::NAN;
    };
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    (fp[j + 1] - fp[j]) * (x - j as f64) + fp[j] // the slope over a unit interval
}

impl Schedule {
    /// Betas from `schedule` over `train_steps` steps, as diffusers' schedulers build them.
    pub fn new(
        schedule: BetaSchedule,
        beta_start: f64,
        beta_end: f64,
        train_steps: usize,
    ) -> Result<Self> {
        if train_steps < 2 {
            return Err(SamplingError::Config(format!(
                "train_steps must be at least 2, got {train_steps}"
            )));
        }
        let betas = match schedule {
            BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, train_steps),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(beta_start.powf(0.5), beta_end.powf(0.5), train_steps)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..train_steps)
                    .map(|i| {
                        let (t1, t2) = (
                            i as f64 / train_steps as f64,
                            (i + 1) as f64 / train_steps as f64,
                        );
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        };
        Self::from_betas_f32(betas)
    }

    /// The schedule a diffusers scheduler config describes for `kind` (whose class may have its own beta
    /// defaults).
    pub fn from_config(config: &crate::SchedulerConfig, kind: crate::SamplerKind) -> Result<Self> {
        let r = config.resolved(kind);
        match &config.trained_betas {
            Some(b) => Self::from_betas(b),
            None => Self::new(
                config.beta_schedule,
                r.beta_start,
                r.beta_end,
                config.num_train_timesteps,
            ),
        }
    }

    /// From explicit betas (`trained_betas`), rounded to f32 as `torch.tensor(..., dtype=float32)` does.
    pub fn from_betas(betas: &[f64]) -> Result<Self> {
        Self::from_betas_f32(betas.iter().map(|&b| b as f32).collect())
    }

    fn from_betas_f32(betas: Vec<f32>) -> Result<Self> {
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b >= 0.0 && **b < 1.0))
        {
            return Err(SamplingError::Config(format!(
                "beta[{i}] = {b} is outside [0, 1)"
            )));
        }
        if betas.len() < 2 {
            return Err(SamplingError::Config(format!(
                "need at least 2 betas, got {}",
                betas.len()
            )));
        }
        // torch.cumprod on CPU accumulates in f64 and rounds each output to f32.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect();
        let alphas_cumprod: Vec<f32> = alphas_cumprod;
        let sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| f64::from(((1.0f32 - a) / a).sqrt()))
            .collect();
        let log_sigmas = sigmas.iter().map(|&s| s.ln() as f32).collect();
        Ok(Self {
            betas,
            alphas_cumprod,
            sigmas,
            log_sigmas,
        })
    }

    /// Number of training steps T.
    pub fn train_steps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for t = 0..T.
    pub fn betas(&self) -> Vec<f64> {
        self.betas.iter().map(|&b| f64::from(b)).collect()
    }

    /// ᾱ_t for t = 0..T.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|&a| f64::from(a)).collect()
    }

    /// ᾱ_t; `t` must be below [`Self::train_steps`].
    pub fn alpha_bar(&self, t: usize) -> f64 {
        f64::from(self.alphas_cumprod[t])
    }

    /// The training σ_t = √((1−ᾱ_t)/ᾱ_t) for t = 0..T, computed in f32 like diffusers (ascending in t).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// σ at a possibly fractional timestep: linear interpolation of σ_t over t (`np.interp`), as diffusers'
    /// Euler-type schedulers do. Clamped to [σ_0, σ_{T−1}] outside [0, T−1].
    pub fn t_to_sigma(&self, t: f64) -> f64 {
        np_interp_index(t, &self.sigmas)
    }

    /// The timestep whose σ is `sigma`, by linear interpolation of ln σ_t over t (diffusers' `_sigma_to_t`,
    /// used for Karras σ). The table of ln σ_t is held in f32 as in diffusers; numpy's SIMD f32 `log` can differ
    /// from this correctly rounded one by an ulp, which moves t by at most about 1e-4.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigmas = &self.log_sigmas;
        let log_sigma = sigma.max(1e-10).ln();
        // low = argmax of cumsum(log_sigma - log_sigmas >= 0), i.e. the last index at or below log_sigma (0 if none)
        let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
        for (i, &ls) in log_sigmas.iter().enumerate() {
            if log_sigma - f64::from(ls) >= 0.0 {
                count += 1;
            }
            if count > best {
                best = count;
                low = i;
            }
        }
        let low = low.min(log_sigmas.len() - 2);
        let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
        let w = ((f64::from(lo) - log_sigma) / f64::from(lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }
}

/// Karras et al. 2022, eq. (269): `steps` σ from `sigma_max` down to `sigma_min` with ρ = 7, as diffusers'
/// `_convert_to_karras` computes them (f64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}
