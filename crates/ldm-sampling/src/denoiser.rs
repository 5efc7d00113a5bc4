//! From a noise-predicting model to a denoiser: prediction-type adapters and classifier-free guidance.
//!
//! Samplers see only a [`Denoiser`] (STYLE P1/P2, as in k-diffusion's `external.py`), working in the
//! variance-exploding scaling of Karras et al. 2022 (EDM), eq. (7) and table 1: x = x₀ + σ ε. The model was
//! trained on the variance-preserving input x_t = √ᾱ x₀ + √(1−ᾱ) ε = x / √(σ²+1), so the adapters feed it
//! `c_in · x` with c_in = 1/√(σ²+1), and read its output as
//!
//! * ε (Ho et al. 2020, eq. 11): x̂₀ = x − σ ε̂;
//! * v (Salimans & Ho 2022, "Progressive Distillation", §4, v = √ᾱ ε − √(1−ᾱ) x₀):
//!   x̂₀ = x/(σ²+1) − σ/√(σ²+1) · v̂.
//!
//! | code        | paper | meaning                                          |
//! |-------------|-------|--------------------------------------------------|
//! | `x`         | x     | VE-scaled sample x₀ + σε                         |
//! | `x_in`      | x_t   | what the model sees, c_in·x                      |
//! | `sigma`     | σ     | noise level of `x`                               |
//! | `t`         | t     | model timestep that goes with σ                  |
//! | `x0`        | x̂₀    | the denoiser's estimate                          |
//!
//! Every evaluation carries both σ and t ([`NoiseLevel`]) because diffusers' samplers do not always give the
//! model the t whose σ scaled its input (Karras σ are mapped back with `sigma_to_t`, DPM-Solver rounds that t,
//! PLMS repeats one t); carrying both reproduces them exactly.
//!
//! Guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6) is applied to the raw model
//! output, ε̃ = ε_u + g (ε_c − ε_u), in one batched call on [uncond; cond] as diffusers does. (STYLE P2 puts
//! `Cfg` on the denoiser; on the raw output it is the same map, since x̂₀ is affine in the output with the same
//! coefficients for both halves, and it keeps diffusers' order of operations, including PLMS with v-models,
//! which combines raw outputs.)

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::Result;

/// The raw network: given the model-scaled input `x_in` ([B, C, H, W]) and the model timestep `t` (possibly
/// fractional), return its output (ε or v, [B, C, H, W]). The conditioning is part of the implementor.
pub trait NoisePredictor {
    fn predict(&self, x_in: &Tensor, t: f64) -> Result<Tensor>;
}

impl<P: NoisePredictor + ?Sized> NoisePredictor for &P {
    fn predict(&self, x_in: &Tensor, t: f64) -> Result<Tensor> {
        (**self).predict(x_in, t)
    }
}

impl<P: NoisePredictor + ?Sized> NoisePredictor for Box<P> {
    fn predict(&self, x_in: &Tensor, t: f64) -> Result<Tensor> {
        (**self).predict(x_in, t)
    }
}

/// Where a sampler evaluates the model: the noise level σ of its VE-scaled input and the model timestep t.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseLevel {
    pub sigma: f64,
    pub t: f64,
}

/// What the model was trained to predict (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum PredictionType {
    /// ε-prediction (SD 1.x, SD 2 base).
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    /// v-prediction (SD 2.x 768-v).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

/// A denoiser in VE scaling: `denoise(x, level)` is x̂₀. `predict` and `x0_from_output` expose the two halves
/// for PLMS, which combines raw outputs before converting them (as diffusers does).
pub trait Denoiser {
    /// The (guided) raw model output at VE-scaled `x` ([B, C, H, W]).
    fn predict(&self, x: &Tensor, level: NoiseLevel) -> Result<Tensor>;
    /// x̂₀ from a raw output `out` evaluated at VE-scaled `x` with noise level `sigma`.
    fn x0_from_output(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor>;
    /// x̂₀ at (x, level).
    fn denoise(&self, x: &Tensor, level: NoiseLevel) -> Result<Tensor> {
        let out = self.predict(x, level)?;
        self.x0_from_output(&out, x, level.sigma)
    }
}

/// c_in = 1/√(σ²+1): VE-scaled x to the model's VP input.
pub fn c_in(sigma: f64) -> f64 {
    1.0 / (sigma * sigma + 1.0).sqrt()
}

/// An ε-predicting model as a denoiser: x̂₀ = x − σ ε̂.
#[derive(Debug, Clone)]
pub struct EpsDenoiser<P> {
    pub model: P,
}

impl<P: NoisePredictor> Denoiser for EpsDenoiser<P> {
    fn predict(&self, x: &Tensor, level: NoiseLevel) -> Result<Tensor> {
        self.model.predict(&(x * c_in(level.sigma))?, level.t)
    }
    fn x0_from_output(&self, eps: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok((x - (eps * sigma)?)?)
    }
}

/// A v-predicting model as a denoiser: x̂₀ = x/(σ²+1) − σ/√(σ²+1) · v̂.
#[derive(Debug, Clone)]
pub struct VDenoiser<P> {
    pub model: P,
}

impl<P: NoisePredictor> Denoiser for VDenoiser<P> {
    fn predict(&self, x: &Tensor, level: NoiseLevel) -> Result<Tensor> {
        self.model.predict(&(x * c_in(level.sigma))?, level.t)
    }
    fn x0_from_output(&self, v: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let c_skip = 1.0 / (sigma * sigma + 1.0);
        let c_out = sigma * c_in(sigma);
        Ok(((x * c_skip)? - (v * c_out)?)?)
    }
}

/// The adapter for `prediction`, boxed (what a pipeline holding a runtime prediction type needs).
pub fn denoiser_for<'a, P: NoisePredictor + 'a>(
    prediction: PredictionType,
    model: P,
) -> Box<dyn Denoiser + 'a> {
    match prediction {
        PredictionType::Epsilon => Box::new(EpsDenoiser { model }),
        PredictionType::VPrediction => Box::new(VDenoiser { model }),
    }
}

/// Whether diffusers applies classifier-free guidance at this scale (`guidance_scale > 1`). When it does
/// not, it runs the conditional batch alone and never evaluates the unconditional one.
pub fn guidance_enabled(scale: f64) -> bool {
    scale > 1.0
}

/// Classifier-free guidance on the raw output. `inner` must accept the doubled batch [x_in; x_in]
/// ([2B, C, H, W]) with the unconditional conditioning in the first half and the conditional in the second
/// (diffusers' `torch.cat([latents] * 2)` / `chunk(2)`). Use it only when [`guidance_enabled`]; otherwise
/// give the sampler the conditional predictor directly, as diffusers does.
#[derive(Debug, Clone)]
pub struct Cfg<P> {
    pub inner: P,
    pub scale: f64,
}

impl<P: NoisePredictor> NoisePredictor for Cfg<P> {
    fn predict(&self, x_in: &Tensor, t: f64) -> Result<Tensor> {
        let b = x_in.dim(0)?;
        let out = self.inner.predict(&Tensor::cat(&[x_in, x_in], 0)?, t)?; // [2B, C, H, W]
        let uncond = out.narrow(0, 0, b)?;
        let cond = out.narrow(0, b, b)?;
        Ok((&uncond + ((&cond - &uncond)? * self.scale)?)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Rows [uncond; cond] get different constant outputs.
    struct Halves;
    impl NoisePredictor for Halves {
        fn predict(&self, x_in: &Tensor, _t: f64) -> Result<Tensor> {
            let b = x_in.dim(0)? / 2;
            let rows: Vec<f32> = (0..2 * b)
                .map(|r| {
                    if r < b {
                        1.0 + r as f32
                    } else {
                        10.0 + r as f32
                    }
                })
                .collect();
            Ok(x_in.zeros_like()?.broadcast_add(&Tensor::from_vec(
                rows,
                (2 * b, 1),
                x_in.device(),
            )?)?)
        }
    }

    #[test]
    fn cfg_is_uncond_plus_scale_times_difference() {
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).expect("x");
        let out = Cfg {
            inner: Halves,
            scale: 7.5,
        }
        .predict(&x, 500.0)
        .expect("cfg");
        let got: Vec<Vec<f32>> = out.to_vec2().expect("values");
        // row 0: uncond 1, cond 12; row 1: uncond 2, cond 13
        assert_eq!(
            got,
            vec![vec![1.0 + 7.5 * 11.0; 3], vec![2.0 + 7.5 * 11.0; 3]]
        );
        assert!(guidance_enabled(1.01) && !guidance_enabled(1.0) && !guidance_enabled(0.5));
    }

    #[test]
    fn eps_and_v_adapters_invert_the_forward_process() {
        // x = x0 + σ ε; the model sees x_t = x/√(σ²+1); ε-target ε, v-target √ᾱ ε − √(1−ᾱ) x0.
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.3f64, -1.1, 2.0], &dev).expect("x0");
        let eps = Tensor::new(&[-0.5f64, 0.7, 1.3], &dev).expect("eps");
        for sigma in [0.03, 1.0, 14.6] {
            let x = (&x0 + (&eps * sigma).expect("s")).expect("x");
            let (a, s) = (c_in(sigma), sigma * c_in(sigma)); // √ᾱ, √(1−ᾱ)
            let v = ((&eps * a).expect("a") - (&x0 * s).expect("b")).expect("v");
            for (d, out) in [
                (
                    Box::new(EpsDenoiser { model: Halves }) as Box<dyn Denoiser>,
                    &eps,
                ),
                (Box::new(VDenoiser { model: Halves }), &v),
            ] {
                let got: Vec<f64> = d
                    .x0_from_output(out, &x, sigma)
                    .expect("x0")
                    .to_vec1()
                    .expect("v");
                let want: Vec<f64> = x0.to_vec1().expect("v");
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() < 1e-12, "σ {sigma}: {g} vs {w}");
                }
            }
        }
    }
}
