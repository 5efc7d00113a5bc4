//! `SchedulerConfig`: a diffusers `scheduler_config.json`, read as typed data.
//!
//! diffusers gives each scheduler class its own defaults for keys a config leaves out (DDIM, PNDM and DDPM
//! space timesteps `leading`, the Euler-type schedulers and DPM-Solver `linspace`; DDIM sets `set_alpha_to_one`
//! and `clip_sample`, PNDM does not; Heun's default betas differ). Such keys are `Option`s here and are
//! resolved per [`SamplerKind`] by [`SchedulerConfig::resolved`]. Keys this crate has no use for (`_class_name`,
//! `skip_prk_steps`, `solver_order`, ...) are ignored; keys whose non-default values it does not implement
//! are kept so that [`crate::prepare`] can refuse them by name instead of silently sampling something else.

use serde::Deserialize;

use crate::denoiser::PredictionType;
use crate::error::{Result, SamplingError};
use crate::plan::SamplerKind;
use crate::schedule::BetaSchedule;

/// How the `steps` model timesteps are picked from the `num_train_timesteps` training steps
/// (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    /// `0, r, 2r, ...` (r = T // steps) plus `steps_offset`, descending: never reaches t = T-1.
    Leading,
    /// `T, T - T/steps, ...` rounded, minus 1: starts at t = T-1.
    Trailing,
    /// `linspace(0, T-1, steps)`, descending (rounded for integer-timestep schedulers).
    Linspace,
}

/// A diffusers scheduler config. Missing keys take diffusers' defaults (per sampler where they differ).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    /// `None`: 0.0001, but 0.00085 for Heun (its class default).
    pub beta_start: Option<f64>,
    /// `None`: 0.02, but 0.012 for Heun.
    pub beta_end: Option<f64>,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start/beta_end/beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub steps_offset: usize,
    /// `None`: the sampler's own default (see [`SamplerKind::default_spacing`]).
    pub timestep_spacing: Option<Spacing>,
    pub prediction_type: PredictionType,
    /// DDIM/PLMS: ᾱ after the last step is 1 (true) or ᾱ₀ (false). `None`: DDIM true, PNDM false.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM, DDPM, Heun: clamp x̂₀ to ±`clip_sample_range`. `None`: DDIM/DDPM true, Heun false.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// Karras σ spacing (rho = 7). [`crate::prepare`] ORs this with its `karras` argument, as diffusers'
    /// `from_config(config, use_karras_sigmas=True)` does.
    pub use_karras_sigmas: bool,
    // Keys whose non-default values are refused (see `check_supported`).
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
    pub variance_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub euler_at_final: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub lambda_min_clipped: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            steps_offset: 0,
            timestep_spacing: None,
            prediction_type: PredictionType::Epsilon,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            use_karras_sigmas: false,
            thresholding: false,
            rescale_betas_zero_snr: false,
            variance_type: None,
            interpolation_type: None,
            timestep_type: None,
            final_sigmas_type: None,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            euler_at_final: false,
            sigma_min: None,
            sigma_max: None,
            lambda_min_clipped: None,
        }
    }
}

/// The values of a [`SchedulerConfig`] that one sampler actually uses, with its defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub beta_start: f64,
    pub beta_end: f64,
    pub spacing: Spacing,
    /// ᾱ after the last DDIM/PLMS step.
    pub set_alpha_to_one: bool,
    /// `Some(range)` when x̂₀ is clamped (DDIM, DDPM, Heun only).
    pub clip: Option<f64>,
}

impl SchedulerConfig {
    /// Stable Diffusion 1.x's `scheduler/scheduler_config.json` (a PNDM config with no `timestep_spacing`,
    /// so every sampler keeps its own default spacing): betas 0.00085..0.012 `scaled_linear` over 1000
    /// steps, `steps_offset` 1, `set_alpha_to_one` false, `clip_sample` false, ε-prediction.
    pub fn sd_default() -> Self {
        Self {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Self::default()
        }
    }

    /// [`Self::sd_default`] with v-prediction (SD 2.x 768-v).
    pub fn sd_v_default() -> Self {
        Self {
            prediction_type: PredictionType::VPrediction,
            ..Self::sd_default()
        }
    }

    /// Parses a `scheduler_config.json`. Python's `json` writes `-Infinity` for DPM-Solver's default
    /// `lambda_min_clipped`, which is not JSON; it is read as "absent" (the same default).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let text = text.replace("-Infinity", "null");
        Ok(serde_json::from_str(&text)?)
    }

    /// The values `kind` uses, with diffusers' per-class defaults for missing keys.
    pub fn resolved(&self, kind: SamplerKind) -> Resolved {
        let heun = kind == SamplerKind::Heun;
        let clip_default = matches!(kind, SamplerKind::Ddim | SamplerKind::Ddpm);
        let clips = matches!(
            kind,
            SamplerKind::Ddim | SamplerKind::Ddpm | SamplerKind::Heun
        );
        Resolved {
            beta_start: self
                .beta_start
                .unwrap_or(if heun { 0.00085 } else { 0.0001 }),
            beta_end: self.beta_end.unwrap_or(if heun { 0.012 } else { 0.02 }),
            spacing: self.timestep_spacing.unwrap_or(kind.default_spacing()),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(kind == SamplerKind::Ddim),
            clip: (clips && self.clip_sample.unwrap_or(clip_default))
                .then_some(self.clip_sample_range),
        }
    }

    /// Refuses values that would change what diffusers computes in ways this crate does not implement.
    pub(crate) fn check_supported(&self, kind: SamplerKind) -> Result<()> {
        let unsupported = |what: String| {
            Err(SamplingError::Unsupported {
                sampler: kind,
                what,
            })
        };
        let flags = [
            ("thresholding", self.thresholding),
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("euler_at_final", self.euler_at_final),
        ];
        for (name, on) in flags {
            if on {
                return unsupported(format!("`{name}: true`"));
            }
        }
        let strings = [
            (
                "variance_type",
                &self.variance_type,
                kind == SamplerKind::Ddpm,
                "fixed_small",
            ),
            (
                "interpolation_type",
                &self.interpolation_type,
                kind == SamplerKind::Euler,
                "linear",
            ),
            (
                "timestep_type",
                &self.timestep_type,
                kind == SamplerKind::Euler,
                "discrete",
            ),
            (
                "final_sigmas_type",
                &self.final_sigmas_type,
                matches!(kind, SamplerKind::Euler | SamplerKind::DpmPp2m),
                "zero",
            ),
        ];
        for (name, value, applies, default) in strings {
            if let (Some(v), true) = (value, applies) {
                if v != default {
                    return unsupported(format!("`{name}: {v}` (only `{default}`)"));
                }
            }
        }
        if self.sigma_min.is_some() || self.sigma_max.is_some() {
            return unsupported("`sigma_min`/`sigma_max` overrides".into());
        }
        if let Some(l) = self.lambda_min_clipped {
            if l != f64::NEG_INFINITY {
                return unsupported(format!("`lambda_min_clipped: {l}`"));
            }
        }
        if self.num_train_timesteps < 2 {
            return Err(SamplingError::Config(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            )));
        }
        Ok(())
    }
}
