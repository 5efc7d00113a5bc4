//! ldm-sampling: noise schedules and samplers as plain functions of a denoiser (k-diffusion style), matching
//! HuggingFace diffusers' schedulers number for number.
//!
//! The pipeline's path: parse the model's `scheduler_config.json` ([`SchedulerConfig::from_json_str`], or
//! [`SchedulerConfig::sd_default`]), [`prepare`] a [`Plan`] for the requested sampler and step count, wrap the
//! UNet as a [`NoisePredictor`] (with [`Cfg`] when [`guidance_enabled`]), adapt it with [`denoiser_for`] the
//! config's prediction type, and [`run`] the plan from unit noise. This crate never sees a UNet.

pub mod config;
pub mod denoiser;
pub mod error;
pub mod plan;
pub mod samplers;
pub mod schedule;
mod timesteps;

pub use config::{SchedulerConfig, Spacing};
pub use denoiser::{
    c_in, denoiser_for, guidance_enabled, Cfg, Denoiser, EpsDenoiser, NoiseLevel, NoisePredictor,
    PredictionType, VDenoiser,
};
pub use error::{Result, SamplingError};
pub use plan::{
    add_noise, prepare, prepare_img2img, run, run_latents, start_step, Grid, Plan, SamplerKind,
};
pub use samplers::{DiscreteStep, KnownRegion, NoiseAt, Step};
pub use schedule::{BetaSchedule, Schedule};
